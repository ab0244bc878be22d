"""The Redis queue against a real redis-server over real time: leases lapse on the Redis server's clock and
are taken over, the heartbeat keeps them (or, failing, lets a claim go undelivered), a Redis crash and
restart, and ingress through DcRouter and a real SMTP client answering 451 while Redis is down."""

from __future__ import annotations

import smtplib
import time

from twisted.internet import reactor
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

from dcrouter import DcRouter
from dcrouter.interfaces import ClaimLost, QueueUnavailable
from dcrouter.queue import redis_scripts as scripts
from dcrouter.queue.item import QueueItemStatus
from dcrouter.queue.redis import RedisQueue
from tests.redis_server import free_port
from tests.test_queue_contract import START, inline, make_item, read_body
from tests.test_queue_redis import RedisQueueTestBase, sleep, until


class LeaseExpiryTests(RedisQueueTestBase):
    """A claim's lease lapses in Redis unless its holder renews it."""

    async def test_expired_lease_is_taken_over(self) -> None:
        crashed, _ = await self.open_queue(lease_seconds=0.6)
        successor, _ = await self.open_queue(lease_seconds=0.6)
        await crashed.enqueue(make_item("L1", attempts=2, status=QueueItemStatus.DEFERRED), inline())
        [claimed] = await crashed.get_next()
        await self.abandon(crashed)
        self.assertEqual(await successor.get_next(), [])
        await sleep(0.7)
        [taken] = await successor.get_next()
        self.assertEqual((taken.id, taken.status, taken.attempts), ("L1", QueueItemStatus.DELIVERING, 2))
        self.assertEqual(taken.envelope, claimed.envelope)

    async def test_a_live_process_keeps_its_leases(self) -> None:
        # The heartbeat runs on the queue's clock, every 0.2 s here, as real time goes by: a stall of the test
        # machine up to 0.4 s does not lose the lease.
        holder, _ = await self.open_queue(lease_seconds=0.6)
        other, _ = await self.open_queue(lease_seconds=30)
        await holder.enqueue(make_item("K1"), inline())
        await holder.get_next()
        for _ in range(8):  # more than two leases
            await sleep(0.2)
            self.clock.advance(0.2)
        self.assertEqual(await other.get_next(), [])
        await holder.update("K1", status=QueueItemStatus.DEFERRED, attempts=1, next_attempt_at=START)
        # No longer renewed, and not needed: it is ready again at once.
        self.assertEqual([i.id for i in await other.get_next()], ["K1"])

    async def test_load_returns_expired_claims(self) -> None:
        crashed, _ = await self.open_queue(lease_seconds=0.2)
        await crashed.enqueue(make_item("C1"), inline())
        await crashed.get_next()
        await self.abandon(crashed, elsewhere=True)
        await sleep(0.3)
        _, counts = await self.open_queue()
        self.assertEqual((counts["claims_returned"], counts["items"], counts["live"]), (1, 1, 1))


class HeartbeatTests(RedisQueueTestBase):
    """Short leases kept by a heartbeat on the queue's clock as real time passes in Redis; a claim whose lease
    may have lapsed is never delivered."""

    async def test_leases_last_30_seconds_renewed_every_10_on_the_clock(self) -> None:
        queue, _ = await self.open_queue()
        await queue.enqueue(make_item("B1"), inline())
        await queue.get_next()
        claimed = self.lease_until("B1")
        self.assertTrue(29 < claimed - self.redis_now() <= 30, claimed - self.redis_now())
        await sleep(0.05)
        self.clock.advance(9.9)
        await sleep(0.1)
        self.assertEqual(self.lease_until("B1"), claimed, "renewed before a third of the lease")
        self.clock.advance(0.1)
        await until(lambda: self.lease_until("B1") > claimed, "the renewal")
        self.assertTrue(29 < self.lease_until("B1") - self.redis_now() <= 30)

    async def test_one_script_call_renews_every_claim(self) -> None:
        queue, _ = await self.open_queue()
        ids = [f"B{n}" for n in range(5)]
        for item_id in ids:
            await queue.enqueue(make_item(item_id), inline())
        await queue.get_next(5)
        before = {i: self.lease_until(i) for i in ids}
        run: list[str] = []
        real_script = queue._store.script
        self.patch(queue._store, "script", lambda script, *a: run.append(script) or real_script(script, *a))
        await sleep(0.05)
        self.clock.advance(10)
        await until(lambda: all(self.lease_until(i) > before[i] for i in ids), "every lease renewed")
        self.assertEqual(run.count(scripts.RENEW), 1)

    async def test_no_delivery_once_heartbeats_fail(self) -> None:
        queue, _ = await self.open_queue(command_timeout=0.3)
        await queue.enqueue(make_item("H1"), inline(b"handed out with the claim"))
        await queue.get_next()
        self.redis.kill()
        for _ in range(2):
            self.clock.advance(10)  # a heartbeat, which fails (Redis does not answer within 0.3 s)
            await sleep(0.5)
        # 20 s after the claim was sent: the lease is certainly valid for another 10 s, a third of a lease.
        (await queue.open_body("H1")).close()
        self.clock.advance(0.5)
        with self.assertRaises(ClaimLost):
            await queue.open_body("H1")
        self.redis.start()
        self.assertNotIn("H1", queue._held)  # let go of: no longer renewed, so it returns once expired

    async def test_claim_found_taken_over_is_not_delivered(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        slow, _ = await self.open_queue(lease_seconds=0.6)
        fast, _ = await self.open_queue()
        await slow.enqueue(make_item("T1"), inline())
        await slow.get_next()
        await sleep(0.7)  # slow's heartbeat (on self.clock) stays silent: its lease lapses in Redis
        self.assertEqual([i.id for i in await fast.get_next()], ["T1"])
        self.clock.advance(0.2)  # slow's heartbeat: finds T1 taken over
        await until(lambda: any("claim on T1 was lost" in w for w in self.warnings(events)), "the warning")
        with self.assertRaises(ClaimLost):
            await slow.open_body("T1")
        self.assertEqual(self.field("T1", "owner"), fast.owner.encode())


class OutageTests(RedisQueueTestBase):
    async def test_redis_restart(self) -> None:
        queue, _ = await self.open_queue(command_timeout=0.5)
        await queue.enqueue(make_item("BEFORE"), inline(b"acknowledged"))
        self.redis.kill()  # a crash: only the append-only file keeps what was acknowledged
        started = time.monotonic()
        with self.assertRaises(QueueUnavailable):
            await queue.enqueue(make_item("DURING"), inline())
        with self.assertRaises(QueueUnavailable):
            await queue.get_next()
        self.assertLess(time.monotonic() - started, 3)
        self.redis.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                await queue.enqueue(make_item("AFTER"), inline())
                break
            except QueueUnavailable:
                self.assertLess(time.monotonic(), deadline, "the queue did not recover")
                await sleep(0.1)
        self.assertEqual(await read_body(queue, "BEFORE"), b"acknowledged")
        self.assertEqual([i.id for i in await queue.get_next(5)], ["BEFORE", "AFTER"])

    async def test_load_fails_when_redis_is_unreachable(self) -> None:
        queue = RedisQueue(
            f"redis://127.0.0.1:{free_port()}/0",
            reactor=reactor,
            clock=self.clock,
            body_directory=self.bodies,
            command_timeout=0.3,
        )
        with self.assertRaises(QueueUnavailable):
            await queue.load()
        self.flushLoggedErrors(QueueUnavailable)
        with self.assertRaises(QueueUnavailable):
            await queue.enqueue(make_item("X"), inline())


class IngressTests(RedisQueueTestBase):
    """Through DcRouter and a real SMTP client: 250 while Redis is up, 451 4.3.0 while it is down, 250 again
    once it is back, without a restart."""

    async def send(self, port: int, body: str) -> tuple[int, bytes]:
        def transaction() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("client.test")
                client.mail("sender@client.test")
                client.rcpt("rcpt@example.test")
                return client.data(body.encode())

        return await deferToThread(transaction)

    async def test_ingress_answers_451_while_redis_is_down(self) -> None:
        port = free_port()
        config = {
            "ports": [port],
            "bindAddress": "127.0.0.1",
            "hostname": "mx.test",
            "implicitTlsPorts": [],
            "submissionPorts": [],
            "queueStorage": "redis",
            "redisUrl": self.redis.url,
            "persistentPath": self.bodies,
            "domainConfigs": [{"domains": ["example.test"], "targetIPs": ["127.0.0.1"]}],
        }
        router = DcRouter({"smtpConfig": config}, reactor=reactor)
        router.privilegedStartService()
        router.startService()
        self.addCleanup(router.stopService)
        await router.when_ready()
        self.assertIsInstance(router.queue, RedisQueue)
        code, _ = await self.send(port, "Subject: one\r\n\r\nfirst\r\n")
        self.assertEqual(code, 250)
        self.redis.kill()
        code, reply = await self.send(port, "Subject: two\r\n\r\nsecond\r\n")
        self.assertEqual((code, reply[:5]), (451, b"4.3.0"))
        self.redis.start()
        deadline = time.monotonic() + 15
        while (await self.send(port, "Subject: three\r\n\r\nthird\r\n"))[0] != 250:
            self.assertLess(time.monotonic(), deadline, "ingress did not recover")
            await sleep(0.2)
        self.assertEqual(await router.queue.get_item_count(), 2)
        self.flushLoggedErrors(QueueUnavailable)
