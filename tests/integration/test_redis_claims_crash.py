"""Claims of a Redis queue consumer killed with SIGKILL: a real child process (tests/redis_claim_child.py)
claims items from a real redis-server and holds them, renewing their leases by its heartbeat, until this
test kills it.

- Another consumer gets the items about one lease after the kill, not before (the heartbeat kept them
  while the child lived, past several leases), and not much later.
- A restarted child, on the same host and body directory, is the same consumer and takes its claims back at
  once, long before their lease would expire.
"""

from __future__ import annotations

import os
import sys
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from dcrouter.queue.redis import RedisQueue
from tests.integration import TwistdProcess, twistd_environment
from tests.redis_server import SKIP_REASON, start_redis
from tests.test_queue_contract import inline, make_item

CHILD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "redis_claim_child.py")
ITEMS = [f"K{n}" for n in range(5)]


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class KilledConsumerTests(TestCase):
    skip = SKIP_REASON
    timeout = 120

    def setUp(self) -> None:
        self.redis = start_redis(self)
        self.bodies = os.path.abspath(self.mktemp())

    async def other_consumer(self) -> RedisQueue:
        """A consumer of this process, holding its own slot (loaded before any child takes one), with the
        items queued."""
        queue = RedisQueue(self.redis.url, reactor=reactor, clock=reactor, body_directory=self.bodies)
        await queue.load()
        self.addCleanup(queue.save)
        for item_id in ITEMS:
            await queue.enqueue(make_item(item_id), inline())
        return queue

    async def child_claims(self, lease: float) -> tuple[TwistdProcess, str, int]:
        """Start a child that claims every item; returns it, its consumer name and the claims it took back
        at load, once it has claimed them all."""
        child = TwistdProcess()
        args = [sys.executable, CHILD, self.redis.url, self.bodies, str(lease), str(len(ITEMS)), "20"]
        reactor.spawnProcess(child, sys.executable, args, env=twistd_environment())
        self.addCleanup(child.kill_on_cleanup)
        await child.seen("HOLDING")
        lines = child.output.decode().splitlines()
        loaded = next(line for line in lines if line.startswith("LOADED ")).split()
        claimed = next(line for line in lines if line.startswith("CLAIMED ")).split(" ", 1)[1]
        self.assertEqual(claimed.split(","), ITEMS, child.output.decode())
        return child, loaded[1], int(loaded[2])

    async def kill(self, child: TwistdProcess) -> float:
        child.signal("KILL")
        code = await child.ended
        self.assertEqual(code, -9)
        return time.monotonic()

    async def test_killed_consumers_claims_return_after_about_a_lease(self) -> None:
        lease = 3.0
        other = await self.other_consumer()
        child, _, _ = await self.child_claims(lease)
        await sleep(lease * 1.5)  # longer than a lease: only the child's heartbeat keeps the claims
        self.assertEqual(await other.get_next(len(ITEMS)), [])
        killed = await self.kill(child)
        taken: list[str] = []
        while len(taken) < len(ITEMS) and time.monotonic() - killed < lease + 5:
            taken.extend(item.id for item in await other.get_next(len(ITEMS)))
            if len(taken) < len(ITEMS):
                await sleep(0.05)
        waited = time.monotonic() - killed
        self.assertEqual(sorted(taken), ITEMS)
        # The last renewal was at most a third of a lease before the kill.
        self.assertGreater(waited, lease * 0.5)
        self.assertLess(waited, lease + 1.0)

    async def test_restarted_consumer_takes_its_claims_back_at_once(self) -> None:
        lease = 60.0
        await self.other_consumer()
        first, name, _ = await self.child_claims(lease)
        killed = await self.kill(first)
        _, restarted_name, returned = await self.child_claims(lease)
        self.assertEqual((restarted_name, returned), (name, len(ITEMS)))
        self.assertLess(time.monotonic() - killed, lease / 3)
