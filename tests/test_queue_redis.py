"""The Redis queue against a real redis-server (tests/redis_server.py): the IDeliveryQueue contract, and what
only Redis promises: claims shared by several processes, durability checks, recovery, big bodies on a shared
directory. What takes real time to show (leases lapsing, the heartbeat, outages and recovery, ingress while
Redis is down) is in tests/integration/test_redis_leases.py."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dcrouter.config import load_options
from dcrouter.interfaces import DuplicateItem, QueueFull, QueueUnavailable, StatusMismatch
from dcrouter.net.redis_url import RedisAddress, parse_redis_url
from dcrouter.queue import redis as redis_module
from dcrouter.queue import redis_bodies, redis_chunks, redis_consumer
from dcrouter.queue import redis_scripts as scripts
from dcrouter.queue.contract import QueueFilter
from dcrouter.queue.item import QueueItem, QueueItemStatus
from dcrouter.queue.redis import HANDOUT_BODY_LIMIT, RedisQueue
from dcrouter.router import build_queue
from tests.redis_server import SKIP_REASON, start_redis
from tests.test_queue_contract import START, QueueContractMixin, inline, make_item, read_body, spool_file


def sleep(seconds: float) -> defer.Deferred:
    return deferLater(reactor, seconds, lambda: None)


class RedisQueueContractTests(QueueContractMixin, TestCase):
    """The contract, with bodies over 100 kB in Redis in chunks (test_file_backed_body goes through them)."""

    skip = SKIP_REASON
    inline_body_limit = 100_000
    body_store = "redis"

    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = start_redis(self)
        self.bodies = self.mktemp()

    def make_queue(self, max_size: int = 0) -> RedisQueue:
        return RedisQueue(
            self.redis.url,
            reactor=reactor,
            clock=self.clock,
            body_directory=self.bodies,
            max_size=max_size,
            inline_body_limit=self.inline_body_limit,
            body_store=self.body_store,
        )


class RedisQueueChunkedBodyContractTests(RedisQueueContractTests):
    """The contract again with every body in chunks (the empty one too)."""

    inline_body_limit = 0


class RedisQueueFileBodyContractTests(RedisQueueContractTests):
    """The contract again with every body in a file."""

    inline_body_limit = 0
    body_store = "directory"


class RedisQueueTestBase(TestCase):
    skip = SKIP_REASON

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.redis = start_redis(self)
        self.bodies = self.mktemp()

    async def open_queue(self, **kwargs: Any) -> tuple[RedisQueue, dict[str, int]]:
        kwargs.setdefault("body_directory", self.bodies)
        url = kwargs.pop("url", self.redis.url)
        queue = RedisQueue(url, reactor=reactor, clock=self.clock, **kwargs)
        counts = await queue.load()
        self.addCleanup(queue.save)
        return queue, counts

    async def abandon(self, queue: RedisQueue, *, elsewhere: bool = False) -> None:
        """What a SIGKILL does to a process: its claims stay in Redis, nobody renews or returns them, and the
        kernel drops its consumer slot's lock -- unless it ran ``elsewhere`` (another host: no process here
        can take its name, so its claims wait for their leases to expire)."""
        assert queue._renewal is not None and queue._store.connection is not None
        queue._renewal.stop()
        queue._held.clear()
        queue._state = "closed"
        await queue._store.connection.disconnect()
        if not elsewhere:
            queue._release_slot()
        else:
            self.addCleanup(queue._release_slot)

    def field(self, item_id: str, name: str) -> bytes | None:
        """A field of an item's hash, read straight from Redis."""
        reply = self.redis.command("HGET", f"dcrouter:item:{item_id}", name)
        return None if reply.startswith(b"$-1") else reply.split(b"\r\n")[1]

    def lease_until(self, item_id: str) -> float:
        """The item's lease expiry, on the Redis server's clock."""
        value = self.field(item_id, "lease_until")
        assert value is not None, f"{item_id} has no lease"
        return float(value)

    def redis_now(self) -> float:
        parts = self.redis.command("TIME").split(b"\r\n")
        return int(parts[2]) + int(parts[4]) / 1e6

    def warnings(self, events: list[dict[str, Any]]) -> list[str]:
        return [
            formatEvent(e)
            for e in events
            if e.get("log_namespace", "").startswith("dcrouter.queue.") and e["log_level"] == LogLevel.warn
        ]


class ListingTests(RedisQueueTestBase):
    async def test_list_walks_in_bounded_script_calls(self) -> None:
        """A filter matching only old items pages through several calls of LIST_BUDGET items each."""
        self.patch(redis_module, "LIST_BUDGET", 3)
        queue, _ = await self.open_queue()
        for n in range(10):
            item = make_item(f"L{n}")
            if n < 2:
                item.envelope.mail_from = "old@example.org"
            await queue.enqueue(item, inline())
        page = await queue.list_items(QueueFilter(sender="old@"), 1)
        self.assertEqual([i.id for i in page.items], ["L1"])
        page = await queue.list_items(QueueFilter(sender="old@"), 1, page.next_cursor)
        self.assertEqual([i.id for i in page.items], ["L0"])
        self.assertIsNone(page.next_cursor)
        everything = await queue.list_items(QueueFilter(), 4)
        self.assertEqual([i.id for i in everything.items], ["L9", "L8", "L7", "L6"])

    async def test_count_by_destination_walks_in_bounded_calls(self) -> None:
        """Counting walks the status sets COUNT_BUDGET items a call; past COUNT_CALLS calls it says so."""
        self.patch(redis_module, "COUNT_BUDGET", 3)
        queue, _ = await self.open_queue()
        for n in range(8):
            await queue.enqueue(make_item(f"C{n}", destination=f"d{n % 2}.example"), inline())
        counts = await queue.count_by_destination()  # 3 calls of 3 items: all 8 seen
        self.assertEqual(
            counts.by_destination,
            {"d0.example": {"queued": 4, "deferred": 0}, "d1.example": {"queued": 4, "deferred": 0}},
        )
        self.assertTrue(counts.complete)
        self.patch(redis_module, "COUNT_CALLS", 2)
        partial = await queue.count_by_destination()  # 6 of 8 seen: a lower bound, said so
        self.assertEqual(sum(c["queued"] for c in partial.by_destination.values()), 6)
        self.assertFalse(partial.complete)

    async def test_held_survives_restart(self) -> None:
        queue, _ = await self.open_queue()
        await queue.enqueue(make_item("HOLD", next_attempt_at=0.0), inline())
        await queue.update_if("HOLD", QueueItemStatus.QUEUED, status=QueueItemStatus.HELD)
        await queue.save()
        again, counts = await self.open_queue()
        self.assertEqual((counts["live"], counts["damaged"]), (1, 0))
        self.assertEqual((await again.get("HOLD")).status, QueueItemStatus.HELD)
        self.assertEqual(await again.get_next(5), [])
        self.assertEqual((await again.count_by_status())["held"], 1)

    async def test_a_page_stops_at_its_budget(self) -> None:
        self.patch(redis_module, "LIST_BUDGET", 2)
        self.patch(redis_module, "LIST_CALLS", 2)
        queue, _ = await self.open_queue()
        for n in range(6):
            item = make_item(f"B{n}")
            if n == 0:
                item.envelope.mail_from = "old@example.org"
            await queue.enqueue(item, inline())
        page = await queue.list_items(QueueFilter(sender="old@"), 5)
        self.assertEqual(page.items, [])  # four looked at, none matched
        self.assertIsNotNone(page.next_cursor)
        page = await queue.list_items(QueueFilter(sender="old@"), 5, page.next_cursor)
        self.assertEqual(([i.id for i in page.items], page.next_cursor), (["B0"], None))


class ClaimTests(RedisQueueTestBase):
    async def test_two_consumers_never_get_the_same_item(self) -> None:
        first, _ = await self.open_queue()
        second, _ = await self.open_queue()
        ids = [f"R{n:03d}" for n in range(300)]
        await defer.gatherResults([first.enqueue(make_item(i), inline()) for i in ids])
        got: dict[str, list[str]] = {"first": [], "second": []}

        async def drain(name: str, queue: RedisQueue) -> None:
            while True:
                batch = await queue.get_next(7)
                if not batch:
                    return
                got[name].extend(i.id for i in batch)

        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(drain(n, q)) for n, q in (("first", first), ("second", second))]
        )
        self.assertEqual(set(got["first"]) & set(got["second"]), set())
        self.assertEqual(sorted(got["first"] + got["second"]), ids)
        self.assertTrue(got["first"] and got["second"], "both consumers should have claimed some")

    async def test_save_returns_claims_at_once(self) -> None:
        leaving, _ = await self.open_queue()
        staying, _ = await self.open_queue()
        await leaving.enqueue(make_item("S1"), inline())
        await leaving.enqueue(make_item("S2", attempts=1), inline())
        self.assertEqual(len(await leaving.get_next(5)), 2)
        await leaving.save()
        self.assertEqual((await staying.get("S1")).status, QueueItemStatus.QUEUED)
        self.assertEqual((await staying.get("S2")).status, QueueItemStatus.DEFERRED)
        self.assertEqual([i.id for i in await staying.get_next(5)], ["S1", "S2"])

    async def test_concurrent_updates_keep_both_changes(self) -> None:
        first, _ = await self.open_queue()
        second, _ = await self.open_queue()
        await first.enqueue(make_item("U1"), inline())
        await defer.gatherResults(
            [first.update("U1", attempts=3), second.update("U1", last_error="451 later", destination="mx.b")]
        )
        item = await first.get("U1")
        self.assertEqual((item.attempts, item.last_error, item.destination), (3, "451 later", "mx.b"))
        self.assertEqual([i.id for i in await second.get_by_destination("mx.b")], ["U1"])

    async def test_claim_hands_out_small_bodies_and_versions(self) -> None:
        """Delivering a claimed message costs no open_body round trip and one write per update."""
        queue, _ = await self.open_queue()
        small, big = b"small body\r\n", os.urandom(HANDOUT_BODY_LIMIT + 1)
        await queue.enqueue(make_item("H1", size=len(small)), inline(small))
        await queue.enqueue(make_item("H2", size=len(big)), inline(big))
        await queue.get_next(2)
        calls: list[str] = []
        real_call = queue._store.call
        self.patch(
            queue._store, "call", lambda method, *a, **kw: calls.append(method) or real_call(method, *a, **kw)
        )
        self.assertEqual(await read_body(queue, "H1"), small)
        self.assertEqual(calls, [])
        self.assertEqual(await read_body(queue, "H2"), big)  # too big to be handed out: read when opened
        calls.clear()
        await queue.update("H1", last_error="451 first")
        await queue.update("H1", status=QueueItemStatus.DELIVERED)
        self.assertEqual(calls, ["eval", "eval"])
        item = await queue.get("H1")
        self.assertEqual((item.status, item.last_error), (QueueItemStatus.DELIVERED, "451 first"))

    async def test_update_of_a_claimed_item_changed_elsewhere_keeps_both_changes(self) -> None:
        holder, _ = await self.open_queue()
        other, _ = await self.open_queue()
        await holder.enqueue(make_item("U2"), inline())
        await holder.get_next()
        await other.update("U2", destination="mx.b")
        await holder.update("U2", attempts=3)  # written on a stale version: refused, read again, applied
        item = await other.get("U2")
        self.assertEqual(
            (item.attempts, item.destination, item.status), (3, "mx.b", QueueItemStatus.DELIVERING)
        )

    async def test_guarded_update_sees_a_change_made_after_its_read(self) -> None:
        """update_if's status check and write are one step across processes: another process changing the
        item between the read and the write makes the write retry on what it did, not overwrite it."""
        operator, _ = await self.open_queue()
        router, _ = await self.open_queue()
        await router.enqueue(make_item("G1", status=QueueItemStatus.QUARANTINED), inline())
        real_call = operator._store.call

        async def read_then_changed(method: str, *args: Any) -> Any:
            result = await real_call(method, *args)
            if method == "hmget" and not changed:
                changed.append(await router.update("G1", status=QueueItemStatus.FAILED, last_error="gone"))
            return result

        changed: list[QueueItem] = []
        self.patch(operator._store, "call", lambda *a: defer.Deferred.fromCoroutine(read_then_changed(*a)))
        with self.assertRaises(StatusMismatch) as raised:
            await operator.update_if("G1", QueueItemStatus.QUARANTINED, status="queued", last_error=None)
        self.assertEqual(raised.exception.item.status, QueueItemStatus.FAILED)
        item = await router.get("G1")
        self.assertEqual((item.status, item.last_error), (QueueItemStatus.FAILED, "gone"))

    async def test_max_size_counts_every_process(self) -> None:
        first, _ = await self.open_queue(max_size=2)
        second, _ = await self.open_queue(max_size=2)
        await first.enqueue(make_item("M1"), inline())
        await second.enqueue(make_item("M2"), inline())
        with self.assertRaises(QueueFull):
            await first.enqueue(make_item("M3"), inline())
        self.assertEqual(await second.get_item_count(), 2)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(0.01)


class ConsumerTests(RedisQueueTestBase):
    """A restarted process (the same consumer name) takes its claims back at once; a live consumer's name is
    never taken. (Leases lapsing, and the heartbeat as real time passes: in tests/integration/.)"""

    async def test_restarted_consumer_takes_back_its_claims_at_once(self) -> None:
        crashed, _ = await self.open_queue()
        alive, _ = await self.open_queue()
        for item_id in ("R1", "R2", "R3"):
            await crashed.enqueue(make_item(item_id, attempts=int(item_id == "R2")), inline())
        self.assertEqual([i.id for i in await crashed.get_next(2)], ["R1", "R2"])
        self.assertEqual([i.id for i in await alive.get_next(1)], ["R3"])
        await self.abandon(crashed)
        restarted, counts = await self.open_queue()
        self.assertEqual(restarted.owner, crashed.owner)
        self.assertEqual(counts["claims_returned"], 2)
        self.assertEqual((await restarted.get("R2")).status, QueueItemStatus.DEFERRED)
        self.assertEqual([i.id for i in await restarted.get_next(5)], ["R1", "R2"])
        # The live consumer's claim is untouched.
        self.assertEqual(self.field("R3", "owner"), alive.owner.encode())

    async def test_a_live_consumers_name_is_never_taken(self) -> None:
        first, _ = await self.open_queue()
        second, _ = await self.open_queue()
        host = socket.gethostname()
        self.assertEqual((first.owner, second.owner), (f"{host}/0", f"{host}/1"))
        await first.save()  # a clean stop frees the name for the next process
        third, _ = await self.open_queue()
        self.assertEqual(third.owner, f"{host}/0")

    async def test_release_owned_returns_only_that_consumers_claims(self) -> None:
        queue, _ = await self.open_queue()
        await queue.enqueue(make_item("O1"), inline())
        await queue.enqueue(make_item("O2", attempts=1, status=QueueItemStatus.DEFERRED), inline())
        await queue.enqueue(make_item("O3"), inline())
        await queue.get_next(3)
        self.redis.command("HSET", "dcrouter:item:O3", "owner", "elsewhere/0")
        self.assertEqual(await queue._store.script(scripts.RELEASE_OWNED, queue.owner), 2)
        self.assertEqual(
            [(await queue.get(i)).status for i in ("O1", "O2", "O3")],
            [QueueItemStatus.QUEUED, QueueItemStatus.DEFERRED, QueueItemStatus.DELIVERING],
        )
        self.assertEqual(self.redis.command("ZRANGE", "dcrouter:leases", "0", "-1"), b"*1\r\n$2\r\nO3\r\n")


class ConsumerSlotTests(SynchronousTestCase):
    def test_lowest_free_slot(self) -> None:
        directory = self.mktemp()
        first = redis_consumer.take_slot(directory, "mx.example")
        second = redis_consumer.take_slot(directory, "mx.example")
        self.addCleanup(second.release)
        self.assertEqual((first.name, second.name), ("mx.example/0", "mx.example/1"))
        first.release()
        first.release()  # idempotent
        again = redis_consumer.take_slot(directory, "mx.example")
        self.addCleanup(again.release)
        self.assertEqual(again.name, "mx.example/0")

    def test_host_name_made_file_safe(self) -> None:
        slot = redis_consumer.take_slot(self.mktemp(), "odd/host:name")
        self.addCleanup(slot.release)
        self.assertEqual(slot.name, "odd/host:name/0")
        self.assertEqual(os.path.basename(slot.path), "odd_host_name.0.lock")


class DurabilityCheckTests(TestCase):
    skip = SKIP_REASON

    async def warnings_at_load(self, extra: list[str]) -> list[str]:
        server = start_redis(self, extra)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        queue = RedisQueue(server.url, reactor=reactor, clock=Clock(), body_directory=self.mktemp())
        await queue.load()
        await queue.save()
        return [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]

    async def test_no_warning_with_appendfsync_always(self) -> None:
        self.assertEqual(await self.warnings_at_load([]), [])

    async def test_warns_with_appendfsync_everysec(self) -> None:
        [warning] = await self.warnings_at_load(["--appendfsync", "everysec"])
        self.assertIn("DURABILITY WARNING", warning)
        self.assertIn("appendfsync everysec", warning)

    async def test_warns_without_appendonly(self) -> None:
        [warning] = await self.warnings_at_load(["--appendonly", "no"])
        self.assertIn("appendonly no", warning)

    async def test_warns_when_config_is_disabled(self) -> None:
        [warning] = await self.warnings_at_load(["--rename-command", "CONFIG", ""])
        self.assertIn("cannot check", warning)


class RecoveryTests(RedisQueueTestBase):
    async def test_restart_sees_everything(self) -> None:
        queue, counts = await self.open_queue()
        self.assertEqual(counts["items"], 0)
        big = os.urandom(1_500_000)
        await queue.enqueue(make_item("R1", destination="a.example"), inline(b"one"))
        await queue.enqueue(make_item("R2", size=len(big)), spool_file(queue, big))
        await queue.update("R1", attempts=2, last_error="451 later", status=QueueItemStatus.DEFERRED)
        await queue.enqueue(make_item("R3", status=QueueItemStatus.DELIVERED), inline(b"three"))
        before = {i: await queue.get(i) for i in ("R1", "R2", "R3")}
        await queue.save()
        again, counts = await self.open_queue()
        self.assertEqual(
            (counts["items"], counts["live"], counts["damaged"], counts["orphans"]), (3, 2, 0, 0)
        )
        self.assertEqual({i: await again.get(i) for i in before}, before)
        self.assertEqual(await read_body(again, "R2"), big)
        self.assertEqual([i.id for i in await again.get_by_destination("a.example")], ["R1"])

    async def test_damaged_items_are_set_aside(self) -> None:
        queue, _ = await self.open_queue()
        await queue.enqueue(make_item("GOOD"), inline())
        await queue.enqueue(make_item("BADJSON"), inline(b"kept"))
        await queue.enqueue(make_item("NOBODY"), inline())
        await queue.save()
        self.redis.command("HSET", "dcrouter:item:BADJSON", "item", "{not json")
        self.redis.command("DEL", "dcrouter:body:NOBODY")
        again, counts = await self.open_queue()
        self.assertEqual((counts["damaged"], counts["items"], counts["live"]), (2, 1, 1))
        self.assertIsNone(await again.get("BADJSON"))
        self.assertEqual([i.id for i in await again.get_next(5)], ["GOOD"])
        self.assertIn(b"not json", self.redis.command("HGET", "dcrouter:damaged:BADJSON:2", "item"))
        self.assertIn(b"kept", self.redis.command("GET", "dcrouter:damaged-body:BADJSON:2"))

    async def test_background_verification(self) -> None:
        """load() fires before the items are verified; mail taken meanwhile is stored, and this process
        claims once the verification, which sets aside what a full recovery would, is done."""
        queue, _ = await self.open_queue()
        await queue.enqueue(make_item("GOOD"), inline())
        await queue.enqueue(make_item("BADJSON"), inline(b"kept"))
        await queue.enqueue(make_item("NOBODY"), inline())
        await queue.save()
        self.redis.command("HSET", "dcrouter:item:BADJSON", "item", "{not json")
        self.redis.command("DEL", "dcrouter:body:NOBODY")
        again, counts = await self.open_queue(background_verification=True)
        self.assertTrue(again.verifying())
        self.assertEqual(counts["damaged"], 0)
        await again.enqueue(make_item("NEW", created_at=START + 1, next_attempt_at=START), inline(b"new"))
        self.assertEqual(await again.get_next(5), [])
        verified = await again.verified()
        self.assertFalse(again.verifying())
        self.assertEqual((verified["damaged"], verified["items"], verified["live"]), (2, 2, 2))
        self.assertEqual([i.id for i in await again.get_next(5)], ["GOOD", "NEW"])
        self.assertEqual(await read_body(again, "NEW"), b"new")

    async def test_save_while_verifying(self) -> None:
        queue, _ = await self.open_queue()
        for n in range(20):
            await queue.enqueue(make_item(f"V{n:02d}"), inline())
        await queue.save()
        again, _ = await self.open_queue(background_verification=True)
        waiting = again.verified()
        await again.save()
        self.assertIsNone(await waiting)
        _third, counts = await self.open_queue()
        self.assertEqual((counts["items"], counts["damaged"]), (20, 0))

    async def test_stale_files_are_cleaned_up(self) -> None:
        queue, _ = await self.open_queue(body_store="directory")
        await queue.enqueue(make_item("BIG"), spool_file(queue, os.urandom(1_200_000)))
        await queue.save()
        old = time.time() - redis_bodies.GRACE_SECONDS - 60
        files = {
            "stale spool": os.path.join(self.bodies, "spool", "spool-old"),
            "fresh spool": os.path.join(self.bodies, "spool", "spool-new"),
            "orphan": redis_bodies.body_path(self.bodies, "ORPHAN"),
            "fresh orphan": redis_bodies.body_path(self.bodies, "ORPHAN2"),
        }
        for name, path in files.items():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(b"x")
            if not name.startswith("fresh"):
                os.utime(path, (old, old))
        os.utime(redis_bodies.body_path(self.bodies, "BIG"), (old, old))
        again, counts = await self.open_queue(body_store="directory")
        self.assertEqual((counts["spool_discarded"], counts["orphans"]), (1, 1))
        self.assertEqual(
            {name: os.path.exists(path) for name, path in files.items()},
            {"stale spool": False, "fresh spool": True, "orphan": False, "fresh orphan": True},
        )
        self.assertTrue(os.path.exists(os.path.join(self.bodies, "orphans", "ORPHAN")))
        self.assertEqual(len(await read_body(again, "BIG")), 1_200_000)

    async def test_orphans_removed_after_the_retention(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())  # file times are wall-clock times
        orphans = os.path.join(self.bodies, "orphans")
        os.makedirs(orphans)
        ages = {"OLD": 8 * 86400, "RECENT": 86400}
        for name, age in ages.items():
            path = os.path.join(orphans, name)
            with open(path, "wb") as f:
                f.write(b"nobody's")
            os.utime(path, (time.time() - age, time.time() - age))
        await self.open_queue(orphan_retention=7 * 86400)
        await until(lambda: not os.path.exists(os.path.join(orphans, "OLD")), "the sweep at start-up")
        self.assertEqual(os.listdir(orphans), ["RECENT"])


class BodyTests(RedisQueueTestBase):
    async def test_big_bodies_go_to_the_shared_directory(self) -> None:
        first, _ = await self.open_queue(body_store="directory")
        second, _ = await self.open_queue(body_store="directory")  # another process, same Redis and directory
        big = os.urandom(2_000_000)
        small = os.urandom(600_000)
        await first.enqueue(make_item("BIG", size=len(big)), spool_file(first, big, "spool-big"))
        await first.enqueue(make_item("SMALL", size=len(small)), spool_file(first, small, "spool-small"))
        path = redis_bodies.body_path(self.bodies, "BIG")
        self.assertTrue(os.path.isfile(path))
        self.assertFalse(os.path.exists(redis_bodies.body_path(self.bodies, "SMALL")))
        self.assertEqual(self.redis.command("EXISTS", "dcrouter:body:BIG"), b":0\r\n")
        self.assertEqual(os.listdir(first.spool_directory), [])
        self.assertEqual(await read_body(second, "BIG"), big)
        self.assertEqual(await read_body(second, "SMALL"), small)
        await second.dequeue("BIG")
        self.assertFalse(os.path.exists(path))

    async def test_duplicate_ids_are_refused_across_processes(self) -> None:
        first, _ = await self.open_queue(body_store="directory")
        second, _ = await self.open_queue(body_store="directory")
        await first.enqueue(make_item("DUP"), spool_file(first, b"a" * 1_100_000, "spool-1"))
        with self.assertRaises(DuplicateItem):
            await second.enqueue(make_item("DUP"), spool_file(second, b"b" * 1_100_000, "spool-2"))
        with self.assertRaises(DuplicateItem):
            await second.enqueue(make_item("DUP"), inline(b"c"))
        self.assertEqual(await read_body(second, "DUP"), b"a" * 1_100_000)
        self.assertEqual(os.listdir(second.spool_directory), [])

    async def test_refused_big_body_leaves_nothing(self) -> None:
        queue, _ = await self.open_queue(max_size=1, body_store="directory")
        await queue.enqueue(make_item("FIRST"), inline())
        with self.assertRaises(QueueFull):
            await queue.enqueue(make_item("BIG"), spool_file(queue, os.urandom(1_100_000)))
        self.assertFalse(os.path.exists(redis_bodies.body_path(self.bodies, "BIG")))
        self.assertEqual(os.listdir(queue.spool_directory), [])


class ChunkedBodyTests(RedisQueueTestBase):
    """Bodies over the inline limit in Redis (``body_store="redis"``, the default): nothing else shared."""

    def chunks(self, item_id: str) -> list[int]:
        """The sizes of the chunks of ``item_id``'s body list, read straight from Redis."""
        sizes = (
            "local t = {} for i, v in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do t[i] = #v end return t"
        )
        reply = self.redis.command("EVAL", sizes, "1", f"dcrouter:body:{item_id}")
        return [int(line[1:]) for line in reply.split(b"\r\n") if line.startswith(b":")]

    def ttl(self, item_id: str) -> int:
        return int(self.redis.command("TTL", f"dcrouter:body:{item_id}")[1:].split(b"\r\n")[0])

    async def test_big_body_in_chunks_shared_without_a_directory(self) -> None:
        first, _ = await self.open_queue()
        # Another host: its own directory, so its own consumer name.
        second, _ = await self.open_queue(body_directory=self.mktemp(), consumer_host="other")
        big = os.urandom(2_000_000)
        await first.enqueue(make_item("BIG", size=len(big)), spool_file(first, big, "spool-big"))
        self.assertEqual(self.chunks("BIG"), [redis_chunks.CHUNK_SIZE] * 7 + [2_000_000 - 7 * 262_144])
        self.assertEqual(self.field("BIG", "body"), b"chunks")
        self.assertEqual(self.ttl("BIG"), -1)  # the item's body: it no longer expires
        self.assertFalse(os.path.exists(redis_bodies.body_path(self.bodies, "BIG")))
        self.assertEqual(os.listdir(first.spool_directory), [])
        self.assertEqual(await read_body(second, "BIG"), big)
        self.assertEqual(os.listdir(second.spool_directory), [])  # the download file is anonymous
        [claimed] = await second.get_next(1)
        self.assertEqual(claimed.id, "BIG")
        self.assertEqual(await read_body(second, "BIG"), big)
        await second.dequeue("BIG")
        self.assertEqual(self.redis.command("EXISTS", "dcrouter:body:BIG"), b":0\r\n")

    async def test_in_memory_big_body_is_chunked_too(self) -> None:
        queue, _ = await self.open_queue(inline_body_limit=10)
        await queue.enqueue(make_item("MEM"), inline(b"x" * 600_000))
        self.assertEqual(self.chunks("MEM"), [262_144, 262_144, 600_000 - 2 * 262_144])
        self.assertEqual(await read_body(queue, "MEM"), b"x" * 600_000)

    async def test_refused_item_leaves_no_chunks(self) -> None:
        queue, _ = await self.open_queue(max_size=1)
        await queue.enqueue(make_item("FIRST"), inline())
        with self.assertRaises(QueueFull):
            await queue.enqueue(make_item("BIG"), spool_file(queue, os.urandom(1_100_000)))
        self.assertEqual(self.redis.command("EXISTS", "dcrouter:body:BIG"), b":0\r\n")
        self.assertEqual(os.listdir(queue.spool_directory), [])

    async def test_duplicate_id_keeps_the_first_body(self) -> None:
        first, _ = await self.open_queue()
        second, _ = await self.open_queue()
        await first.enqueue(make_item("DUP"), spool_file(first, b"a" * 1_100_000, "spool-1"))
        with self.assertRaises(DuplicateItem):
            await second.enqueue(make_item("DUP"), spool_file(second, b"b" * 1_100_000, "spool-2"))
        self.assertEqual(await read_body(second, "DUP"), b"a" * 1_100_000)
        self.assertEqual(os.listdir(second.spool_directory), [])

    async def test_chunks_without_their_item_expire(self) -> None:
        """A process that died between its chunks and its item (no 250 was sent) leaves a list that expires;
        an item whose list expired first is refused (451), never stored without its body."""
        queue, _ = await self.open_queue()
        message = spool_file(queue, b"z" * 700_000, "spool-dead")
        self.assertEqual(await redis_chunks.store_chunks(queue._store, "DEAD", message), 3)
        self.assertGreater(self.ttl("DEAD"), redis_bodies.GRACE_SECONDS - 60)
        fields = queue._fields(make_item("DEAD"))
        for count in ("2", "4"):  # not the number written: refused
            reply = await queue._store.script(
                scripts.ENQUEUE, "DEAD", *fields, "chunks", count, 0, queue.owner, "30.0"
            )
            self.assertEqual(reply, b"nobody")
        self.redis.command("DEL", "dcrouter:body:DEAD")  # what the expiry does
        reply = await queue._store.script(
            scripts.ENQUEUE, "DEAD", *fields, "chunks", "3", 0, queue.owner, "30.0"
        )
        self.assertEqual(reply, b"nobody")
        self.assertIsNone(await queue.get("DEAD"))

    async def test_a_chunk_after_a_gap_is_refused(self) -> None:
        """A failover can lose the last chunks written to the old master: the next chunk, written to the new
        one, must not close the gap silently."""
        queue, _ = await self.open_queue()
        await redis_chunks.store_chunks(queue._store, "GAP", spool_file(queue, b"q" * 600_000, "spool-gap"))
        self.redis.command("RPOP", "dcrouter:body:GAP")  # the last chunk never reached the new master
        with self.assertRaises(QueueUnavailable):
            await redis_chunks._append(queue._store, "GAP", b"late", 3)
        self.assertEqual(self.chunks("GAP"), [262_144, 262_144])

    async def test_missing_chunks_set_aside_at_start_up(self) -> None:
        queue, _ = await self.open_queue()
        await queue.enqueue(make_item("GONE"), spool_file(queue, os.urandom(1_100_000)))
        await queue.save()
        self.redis.command("DEL", "dcrouter:body:GONE")
        again, counts = await self.open_queue()
        self.assertEqual(counts["damaged"], 1)
        self.assertIsNone(await again.get("GONE"))


class RedisUrlTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(parse_redis_url("redis://cache.internal"), RedisAddress(host="cache.internal"))
        self.assertEqual(
            parse_redis_url("redis://:s%40cret@[::1]:6380/3"),
            RedisAddress(host="::1", port=6380, db=3, password="s@cret"),
        )
        self.assertEqual(
            parse_redis_url("redis://queue:pw@10.0.0.5:6379/0"),
            RedisAddress(host="10.0.0.5", username="queue", password="pw"),
        )
        self.assertEqual(
            parse_redis_url("unix:///run/redis/redis.sock?db=2"),
            RedisAddress(unix_path="/run/redis/redis.sock", db=2),
        )
        self.assertEqual(
            parse_redis_url("redis+sentinel://:pw@10.0.0.1,[::1]:26380/my%20master/2?wait=2"),
            RedisAddress(
                host=None,
                port=0,
                db=2,
                password="pw",
                sentinels=(("10.0.0.1", 26379), ("::1", 26380)),
                master_name="my master",
                wait_replicas=2,
            ),
        )
        self.assertEqual(parse_redis_url("redis+sentinel://s1/mymaster").wait_replicas, 1)

    def test_display_hides_the_password(self) -> None:
        address = parse_redis_url("redis://:hunter2@[::1]:6380/3")
        self.assertEqual(address.display, "redis://[::1]:6380 db 3")
        sentinel = parse_redis_url("redis+sentinel://:hunter2@s1,s2:26380/mymaster/1")
        self.assertEqual(sentinel.display, "redis+sentinel://s1:26379,s2:26380/mymaster db 1")

    def test_refused(self) -> None:
        for url in ("", "http://x", "redis://", "redis://h/x", "redis://h:0x/1", "rediss://h", "unix://rel",
                    "unix:///s?x=1", "redis://h/0?db=1", "redis+sentinel://s1", "redis+sentinel:///m",
                    "redis+sentinel://s1/m/x", "redis+sentinel://s1/m/0/1", "redis+sentinel://s1/m?wait=x",
                    "redis+sentinel://s1/m?db=1", "redis+sentinel://s1:x/m"):  # fmt: skip
            with self.assertRaises(ValueError, msg=url):
                parse_redis_url(url)


class ConfigTests(SynchronousTestCase):
    def smtp(self, **keys: Any) -> dict[str, Any]:
        base = {"ports": [2525], "implicitTlsPorts": [], "submissionPorts": [], "persistentPath": "var/q"}
        return {"smtpConfig": {**base, **keys}}

    def test_redis_needs_a_url(self) -> None:
        with self.assertRaises(Exception) as caught:
            load_options(self.smtp(queueStorage="redis"))
        self.assertIn("smtpConfig.redisUrl: required", str(caught.exception))

    def test_bad_url_named(self) -> None:
        with self.assertRaises(Exception) as caught:
            load_options(self.smtp(queueStorage="redis", redisUrl="redis://h:1/x"))
        self.assertIn("smtpConfig.redisUrl: database must be a number", str(caught.exception))

    def test_router_builds_a_redis_queue(self) -> None:
        options = load_options(self.smtp(queueStorage="redis", redisUrl="redis://127.0.0.1:6390/2")).options
        queue = build_queue(options.smtp_config, Clock())
        self.assertIsInstance(queue, RedisQueue)
        self.assertEqual(queue.address, RedisAddress(host="127.0.0.1", port=6390, db=2))
        self.assertEqual(queue.spool_directory, os.path.abspath("var/q/spool"))
        self.assertEqual(queue._orphan_sweeper.retention, 7 * 86400)  # orphanRetention's default
        self.assertEqual((queue._body_store, queue._consumer_host), ("redis", socket.gethostname()))

    def test_body_store_and_consumer_name(self) -> None:
        keys = {"queueStorage": "redis", "redisUrl": "redis://127.0.0.1:6390/2"}
        options = load_options(self.smtp(**keys, redisBodyStore="directory", redisConsumerName="mx7")).options
        queue = build_queue(options.smtp_config, Clock())
        assert isinstance(queue, RedisQueue)
        self.assertEqual((queue._body_store, queue._consumer_host), ("directory", "mx7"))
        for bad, message in (
            ({"redisBodyStore": "s3"}, "smtpConfig.redisBodyStore"),
            ({"redisConsumerName": ""}, "smtpConfig.redisConsumerName: must not be empty"),
        ):
            with self.assertRaises(Exception) as caught:
                load_options(self.smtp(**keys, **bad))
            self.assertIn(message, str(caught.exception))

    def test_sentinel_url_accepted(self) -> None:
        url = "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster/0"
        options = load_options(self.smtp(queueStorage="redis", redisUrl=url)).options
        queue = build_queue(options.smtp_config, Clock())
        assert isinstance(queue, RedisQueue)
        self.assertEqual(queue.address.master_name, "mymaster")
