"""Child process of tests/integration/test_redis_claims_crash.py: a Redis queue consumer that claims and then
holds its claims (renewing their leases by its heartbeat) until it is killed.

Arguments: Redis URL, body directory, lease in seconds, how many items to claim, seconds to keep trying.
Prints ``LOADED <consumer name> <claims returned at load>``, then tries to claim that many items (a claim
every 50 ms) and prints ``CLAIMED <id>,<id>,...`` with what it got when it has them all or its time is up,
and ``HOLDING``; then idles with the reactor (and the heartbeat) running.
"""

from __future__ import annotations

import sys
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from dcrouter.queue.redis import RedisQueue


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def consume(queue: RedisQueue, wanted: int, patience: float) -> None:
    counts = await queue.load()
    say(f"LOADED {queue.owner} {counts['claims_returned']}")
    claimed: list[str] = []
    deadline = time.monotonic() + patience
    while len(claimed) < wanted and time.monotonic() < deadline:
        claimed.extend(item.id for item in await queue.get_next(wanted - len(claimed)))
        if len(claimed) < wanted:
            await deferLater(reactor, 0.05, lambda: None)
    say("CLAIMED " + ",".join(sorted(claimed)))
    say("HOLDING")


def main() -> None:
    url, body_directory, lease, wanted, patience = sys.argv[1:6]
    queue = RedisQueue(
        url, reactor=reactor, clock=reactor, body_directory=body_directory, lease_seconds=float(lease)
    )

    def failed(failure: Failure) -> None:
        say(f"ERROR {failure.getErrorMessage()}")
        reactor.stop()

    Deferred.fromCoroutine(consume(queue, int(wanted), float(patience))).addErrback(failed)
    reactor.run()


if __name__ == "__main__":
    main()
