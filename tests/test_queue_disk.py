"""What only the disk queue promises: restarts, crash recovery, set-aside of damage, group commit, indexes."""

from __future__ import annotations

import errno
import glob
import json
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from dcrouter.config import load_options
from dcrouter.interfaces import QueueFull, QueueUnavailable
from dcrouter.queue import disk as disk_module
from dcrouter.queue import files as files_module
from dcrouter.queue import index as index_module
from dcrouter.queue.contract import ClaimSchedule, QueueFilter
from dcrouter.queue.disk import DiskQueue
from dcrouter.queue.index import CLAIM_SQL, DESTINATION_DUE_SQL, DUE_SQL, FEW_DUE, READY_DESTINATIONS_SQL
from dcrouter.queue.item import Priority, QueueItemStatus
from dcrouter.router import build_queue
from tests.test_queue_contract import START, inline, make_item, read_body, spool_file


class DiskQueueTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.path = self.mktemp()

    async def open_queue(self, max_size: int = 0) -> tuple[DiskQueue, dict[str, int]]:
        queue = DiskQueue(self.path, reactor=reactor, clock=self.clock, max_size=max_size)
        counts = await queue.load()
        self.addCleanup(queue.save)
        return queue, counts

    def file(self, *parts: str) -> FilePath:
        return FilePath(os.path.join(self.path, *parts))

    def index(self) -> sqlite3.Connection:
        """A second, independent connection: it sees only what was committed."""
        conn = sqlite3.connect(os.path.join(self.path, "index.sqlite"), isolation_level=None)
        self.addCleanup(conn.close)
        return conn

    async def test_restart_sees_everything(self) -> None:
        queue, counts = await self.open_queue()
        self.assertEqual(counts["items"], 0)
        big = os.urandom(400_000)
        await queue.enqueue(make_item("R1", destination="a.example"), inline(b"one"))
        await queue.enqueue(make_item("R2", size=len(big)), spool_file(queue, big))
        await queue.enqueue(make_item("R3", created_at=START + 1), inline(b"three"))
        await queue.update("R1", attempts=2, last_error="451 later", status=QueueItemStatus.DEFERRED)
        await queue.update("R3", status=QueueItemStatus.DELIVERED)
        before = {i: await queue.get(i) for i in ("R1", "R2", "R3")}
        await queue.save()

        again, counts = await self.open_queue()
        self.assertEqual(
            (counts["items"], counts["live"], counts["damaged"], counts["orphans"]), (3, 2, 0, 0)
        )
        self.assertEqual({i: await again.get(i) for i in before}, before)
        self.assertEqual(await read_body(again, "R1"), b"one")
        self.assertEqual(await read_body(again, "R2"), big)
        self.assertEqual(await again.get_item_count(), 2)
        self.assertEqual([i.id for i in await again.get_by_destination("a.example")], ["R1"])

    async def test_first_read_of_a_fresh_inline_body_comes_from_memory(self) -> None:
        queue, _ = await self.open_queue()
        await queue.enqueue(make_item("M1"), inline(b"fresh"))
        # No trip to the reader thread: the result is there at once.
        self.assertEqual(self.successResultOf(queue.open_body("M1")).read(), b"fresh")
        # One use: a second read (a retry) comes from the index, with the same text.
        again = queue.open_body("M1")
        self.assertNoResult(again)
        self.assertEqual((await again).read(), b"fresh")
        # A body given as a file is never kept.
        await queue.enqueue(make_item("M2", size=4), spool_file(queue, b"file"))
        from_file = queue.open_body("M2")
        self.assertNoResult(from_file)
        stream = await from_file
        self.assertEqual(stream.read(), b"file")
        stream.close()

    async def test_removed_items_leave_no_body_in_memory(self) -> None:
        queue, _ = await self.open_queue()
        for name in ("D1", "D2", "D3", "D4"):
            await queue.enqueue(make_item(name), inline(name.encode()))
        await queue.dequeue("D1")
        await queue.dequeue_if("D2", QueueItemStatus.QUEUED)
        await self.assertFails(queue.open_body("D1"), KeyError)
        await self.assertFails(queue.open_body("D2"), KeyError)
        await queue.purge_all()
        await self.assertFails(queue.open_body("D3"), KeyError)
        self.assertEqual((queue._bodies, queue._bodies_octets), ({}, 0))

    async def test_kept_bodies_are_bounded(self) -> None:
        self.patch(disk_module, "BODY_CACHE_LIMIT", 10)
        queue, _ = await self.open_queue()
        await queue.enqueue(make_item("B1"), inline(b"first!"))
        await queue.enqueue(make_item("B2"), inline(b"second"))
        self.assertEqual((list(queue._bodies), queue._bodies_octets), (["B2"], 6))
        self.assertEqual(self.successResultOf(queue.open_body("B2")).read(), b"second")
        oldest = queue.open_body("B1")
        self.assertNoResult(oldest)
        self.assertEqual((await oldest).read(), b"first!")

    async def assertFails(self, d: Any, kind: type[BaseException]) -> None:
        try:
            await d
        except kind:
            return
        self.fail(f"expected {kind.__name__}")

    async def test_text_filters_stop_at_their_budget(self) -> None:
        self.patch(index_module, "LIST_SCAN_BUDGET", 3)
        queue, _ = await self.open_queue()
        for n in range(5):
            item = make_item(f"T{n}")
            item.envelope.recipients = ["x@rare.example" if n == 0 else f"r{n}@common.example"]
            await queue.enqueue(item, inline())
        page = await queue.list_items(QueueFilter(recipient="@rare."), 10)
        self.assertEqual(page.items, [])  # three looked at, none matched
        self.assertIsNotNone(page.next_cursor)
        page = await queue.list_items(QueueFilter(recipient="@rare."), 10, page.next_cursor)
        self.assertEqual(([i.id for i in page.items], page.next_cursor), (["T0"], None))
        page = await queue.list_items(QueueFilter(recipient="@common."), 2)
        self.assertEqual([i.id for i in page.items], ["T4", "T3"])
        page = await queue.list_items(QueueFilter(recipient="@common."), 2, page.next_cursor)
        self.assertEqual([i.id for i in page.items], ["T2", "T1"])

    async def test_held_survives_restart(self) -> None:
        queue, _ = await self.open_queue()
        await queue.enqueue(make_item("HOLD"), inline())
        await queue.update("HOLD", status=QueueItemStatus.HELD)
        await queue.save()
        again, counts = await self.open_queue()
        self.assertEqual((counts["live"], counts["claims_returned"]), (1, 0))
        self.assertEqual((await again.get("HOLD")).status, QueueItemStatus.HELD)
        self.assertEqual(await again.get_next(5), [])

    async def test_claims_in_flight_return_to_ready(self) -> None:
        queue, _ = await self.open_queue()
        await queue.enqueue(make_item("FIRST"), inline())
        await queue.enqueue(make_item("RETRIED", attempts=3, status=QueueItemStatus.DEFERRED), inline())
        self.assertEqual(len(await queue.get_next(5)), 2)
        await queue.save()

        again, counts = await self.open_queue()
        self.assertEqual(counts["claims_returned"], 2)
        self.assertEqual((await again.get("FIRST")).status, QueueItemStatus.QUEUED)
        self.assertEqual((await again.get("RETRIED")).status, QueueItemStatus.DEFERRED)
        self.assertEqual([i.id for i in await again.get_next(5)], ["FIRST", "RETRIED"])

    async def test_enqueue_fires_only_after_commit(self) -> None:
        queue, _ = await self.open_queue()
        conn = self.index()
        fired = []

        def committed(item: Any) -> None:
            # Another connection sees only committed rows: the item must already be there.
            fired.append(conn.execute("SELECT id FROM items WHERE id = ?", (item.id,)).fetchall())

        await defer.gatherResults(
            [queue.enqueue(make_item(f"C{n}"), inline()).addCallback(committed) for n in range(50)]
        )
        self.assertEqual(fired, [[(f"C{n}",)] for n in range(50)])

    async def test_big_body_is_moved_in(self) -> None:
        queue, _ = await self.open_queue()
        body = os.urandom(1_000_000)
        message = spool_file(queue, body, name="spool-big")
        await queue.enqueue(make_item("AB123", size=len(body)), message)
        self.assertEqual(os.listdir(queue.spool_directory), [])
        self.assertEqual(self.file("messages", "AB", "AB123").getContent(), body)
        self.assertIsNone(message.path)

    async def test_group_commit(self) -> None:
        queue, _ = await self.open_queue()
        results = await defer.gatherResults(
            [queue.enqueue(make_item(f"G{n:03}"), inline(b"x" * 10_000)) for n in range(200)]
        )
        self.assertEqual(len(results), 200)
        # The first write starts a commit alone; the 199 issued meanwhile share the next one.
        self.assertEqual((queue.commits, queue.committed_writes), (2, 200))
        self.assertEqual(await queue.get_item_count(), 200)

    async def test_max_size_counts_enqueues_not_yet_committed(self) -> None:
        queue, _ = await self.open_queue(max_size=5)
        outcomes = await defer.DeferredList(
            [queue.enqueue(make_item(f"F{n}"), inline()) for n in range(8)], consumeErrors=True
        )
        self.assertEqual([ok for ok, _ in outcomes], [True] * 5 + [False] * 3)
        for _ok, failure in outcomes[5:]:
            failure.trap(QueueFull)
        self.assertEqual(await queue.get_item_count(), 5)

    async def test_io_error_leaves_nothing_visible(self) -> None:
        queue, _ = await self.open_queue()
        # A regular file where the body's directory belongs: the move-in fails with a real ENOTDIR.
        self.file("messages", "XY").setContent(b"in the way")
        message = spool_file(queue, b"body" * 1000)
        try:
            await queue.enqueue(make_item("XY1"), message)
        except QueueUnavailable:
            pass
        else:
            self.fail("QueueUnavailable not raised")
        self.assertIsNone(await queue.get("XY1"))
        self.assertEqual(await queue.get_item_count(), 0)
        self.assertEqual(os.listdir(queue.spool_directory), [])
        self.assertEqual(self.index().execute("SELECT COUNT(*) FROM items").fetchone(), (0,))
        await queue.enqueue(make_item("OK1"), spool_file(queue, b"fine"))
        self.assertEqual(await read_body(queue, "OK1"), b"fine")

    async def test_unacknowledged_spool_files_discarded(self) -> None:
        queue, _ = await self.open_queue()
        await queue.save()
        for n in range(3):
            self.file("spool", f"spool-{n}").setContent(b"half a message")
        again, counts = await self.open_queue()
        self.assertEqual(counts["spool_discarded"], 3)
        self.assertEqual(os.listdir(again.spool_directory), [])

    async def test_damaged_row_set_aside(self) -> None:
        queue, _ = await self.open_queue()
        await queue.enqueue(make_item("GOOD"), inline(b"good body"))
        await queue.enqueue(make_item("BAD"), inline(b"bad body"))
        await queue.save()
        self.index().execute("UPDATE items SET item = '{\"truncated' WHERE id = 'BAD'")

        again, counts = await self.open_queue()
        self.assertEqual((counts["damaged"], counts["items"], counts["live"]), (1, 1, 1))
        self.assertIsNone(await again.get("BAD"))
        self.assertEqual(await read_body(again, "GOOD"), b"good body")
        [record_path] = glob.glob(os.path.join(self.path, "damaged", "BAD-*.json"))
        record = json.loads(FilePath(record_path).getContent())
        self.assertEqual((record["id"], record["item"]), ("BAD", '{"truncated'))
        self.assertEqual(self.file("damaged", record["body"]).getContent(), b"bad body")
        self.assertEqual(await again.get_item_count(), 1)

    async def test_missing_body_file_set_aside(self) -> None:
        queue, _ = await self.open_queue()
        await queue.enqueue(make_item("LOST"), spool_file(queue, b"gone"))
        await queue.enqueue(make_item("KEPT"), spool_file(queue, b"here", name="spool-2"))
        await queue.save()
        os.unlink(os.path.join(self.path, "messages", "LO", "LOST"))

        again, counts = await self.open_queue()
        self.assertEqual((counts["damaged"], counts["items"]), (1, 1))
        self.assertIsNone(await again.get("LOST"))
        [record_path] = glob.glob(os.path.join(self.path, "damaged", "LOST-*.json"))
        self.assertIn("body file unreadable", json.loads(FilePath(record_path).getContent())["reason"])
        self.assertEqual(await read_body(again, "KEPT"), b"here")

    async def test_body_without_row_set_aside_as_orphan(self) -> None:
        queue, _ = await self.open_queue()
        await queue.enqueue(make_item("HAS"), spool_file(queue, b"kept"))
        await queue.save()
        os.makedirs(os.path.join(self.path, "messages", "ZZ"))
        self.file("messages", "ZZ", "ZZ999").setContent(b"nobody's")

        again, counts = await self.open_queue()
        self.assertEqual((counts["orphans"], counts["items"]), (1, 1))
        self.assertEqual(self.file("orphans", "ZZ999").getContent(), b"nobody's")
        self.assertEqual(await read_body(again, "HAS"), b"kept")

    async def open_in_background(self) -> tuple[DiskQueue, dict[str, int]]:
        queue = DiskQueue(self.path, reactor=reactor, clock=self.clock, background_verification=True)
        counts = await queue.load()
        self.addCleanup(queue.save)
        return queue, counts

    async def test_background_verification_takes_mail_at_once(self) -> None:
        """load() fires before the rows are verified; mail taken meanwhile is durable and claimed once the
        verification, which sets aside what a full recovery would, is done."""
        queue, _ = await self.open_queue()
        await queue.enqueue(make_item("GOOD"), inline(b"good body"))
        await queue.enqueue(make_item("BAD"), inline(b"bad body"))
        await queue.enqueue(make_item("FILE"), spool_file(queue, b"file body"))
        await queue.save()
        self.index().execute("UPDATE items SET item = '{\"truncated' WHERE id = 'BAD'")
        os.makedirs(os.path.join(self.path, "messages", "ZZ"))
        self.file("messages", "ZZ", "ZZ999").setContent(b"nobody's")

        again, counts = await self.open_in_background()
        self.assertTrue(again.verifying())
        self.assertEqual((counts["items"], counts["damaged"], counts["orphans"]), (3, 0, 0))
        # Taken while verifying: an inline body and a file body (linked into messages/ as the walk runs).
        await again.enqueue(
            make_item("NEW", created_at=START + 1, next_attempt_at=START), inline(b"new body")
        )
        await again.enqueue(
            make_item("NEWFILE", created_at=START + 2, next_attempt_at=START), spool_file(again, b"new file")
        )
        self.assertEqual(await again.get_next(10), [])  # nothing unverified is handed out

        verified = await again.verified()
        self.assertFalse(again.verifying())
        self.assertEqual((verified["damaged"], verified["orphans"], verified["items"]), (1, 1, 2))
        self.assertEqual(self.file("orphans", "ZZ999").getContent(), b"nobody's")
        self.assertEqual(await again.get_item_count(), 4)
        claimed = await again.get_next(10)
        self.assertEqual([i.id for i in claimed], ["GOOD", "FILE", "NEW", "NEWFILE"])
        self.assertEqual(await read_body(again, "NEWFILE"), b"new file")
        self.assertEqual(await again.verified(), verified)
        await again.save()

        # Durable, and nothing left for the next start to set aside.
        third, counts = await self.open_queue()
        self.assertEqual((counts["items"], counts["damaged"], counts["orphans"]), (4, 0, 0))
        self.assertEqual(await read_body(third, "NEW"), b"new body")

    async def test_save_while_verifying(self) -> None:
        queue, _ = await self.open_queue()
        for n in range(30):
            await queue.enqueue(make_item(f"V{n:02d}"), inline())
        await queue.save()
        self.patch(disk_module, "VERIFY_CHUNK", 1)
        again, _ = await self.open_in_background()
        waiting = again.verified()
        await again.save()
        self.assertIsNone(await waiting)
        _third, counts = await self.open_queue()
        self.assertEqual((counts["items"], counts["damaged"]), (30, 0))

    async def test_dequeue_removes_body_file(self) -> None:
        queue, _ = await self.open_queue()
        await queue.enqueue(make_item("DQ1"), spool_file(queue, b"bye"))
        await queue.dequeue("DQ1")
        self.assertEqual(os.listdir(os.path.join(self.path, "messages", "DQ")), [])

    async def test_get_next_order_with_many_due(self) -> None:
        # More than FEW_DUE due items: get_next walks items_ready instead of sorting the due set.
        queue, _ = await self.open_queue()
        retries = [
            make_item(f"R{n:05}", priority=Priority.RETRY, created_at=START - 5000 + n)
            for n in range(FEW_DUE + 20)
        ]
        fresh = [make_item(f"F{n}", created_at=START - n) for n in range(3)]
        waiting = make_item("W0", created_at=START - 9000, next_attempt_at=START + 1)
        await defer.gatherResults([queue.enqueue(i, inline()) for i in [*retries, *fresh, waiting]])
        claimed = await queue.get_next(5)
        self.assertEqual([i.id for i in claimed], ["F2", "F1", "F0", "R00000", "R00001"])

    async def test_scheduled_claim_behind_a_long_backlog_looks_destination_by_destination(self) -> None:
        # More due items than a scheduled claim walks in order, all but a few a backlog of one destination.
        self.patch(index_module, "FEW_DUE", 10)
        self.patch(index_module, "SCHEDULED_WALK", 50)
        queue, _ = await self.open_queue()
        slow = [make_item(f"S{n:03}", destination="slow", created_at=START - 500 + n) for n in range(200)]
        fast = [make_item(f"F{n}", destination="fast", created_at=START - 10 + n) for n in range(3)]
        unrouted = [make_item("U0", created_at=START - 5)]
        waiting = make_item("FW", destination="fast", created_at=START - 900, next_attempt_at=START + 1)
        await defer.gatherResults([queue.enqueue(i, inline()) for i in [*slow, *fast, *unrouted, waiting]])
        claimed = await queue.get_next(10, ClaimSchedule({"slow": 1, "fast": 2}))
        self.assertEqual([i.id for i in claimed], ["S000", "F0", "U0", "F1"])
        claimed = await queue.get_next(10, ClaimSchedule({"slow": 0}))
        self.assertEqual([i.id for i in claimed], ["F2"])

    async def test_queries_use_indexes(self) -> None:
        await self.open_queue()
        conn = self.index()

        def plan(sql: str, *params: Any) -> str:
            return " | ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))

        for sql, params in (
            (READY_DESTINATIONS_SQL, ()),
            (DESTINATION_DUE_SQL, ("mx.example", START, 10)),
        ):
            searched = r"SEARCH items USING (COVERING )?INDEX items_dest_ready \(destination"
            self.assertRegex(plan(sql, *params), searched)
            self.assertNotIn("TEMP B-TREE", plan(sql, *params))
        claim = plan(CLAIM_SQL, START, 10)
        self.assertIn("USING INDEX items_ready_dest", claim)
        self.assertNotIn("TEMP B-TREE", claim)
        self.assertIn("USING INDEX items_due (next_attempt_at<?)", plan(DUE_SQL, START, 10))
        self.assertIn("USING INDEX items_status", plan("SELECT item FROM items WHERE status = ?", "queued"))
        self.assertIn(
            "USING INDEX items_destination",
            plan("SELECT item FROM items WHERE destination = ?", "mx.example"),
        )

    async def test_not_usable_before_load_or_after_save(self) -> None:
        queue = DiskQueue(self.path, reactor=reactor, clock=self.clock)
        for call in (queue.get("X"), queue.get_next(), queue.enqueue(make_item("X"), inline())):
            try:
                await call
            except QueueUnavailable:
                continue
            self.fail("QueueUnavailable not raised")
        await queue.load()
        await queue.save()
        try:
            await queue.load()
        except QueueUnavailable:
            return
        self.fail("a closed queue loaded again")

    async def attach_fails(self, path: str) -> str:
        queue = DiskQueue(path, reactor=reactor, clock=self.clock)
        try:
            await queue.attach()
        except QueueUnavailable as e:
            return str(e)
        await queue.save()
        self.fail("attached to what is not a disk queue")

    async def test_attach_creates_nothing_and_checks_what_it_finds(self) -> None:
        self.assertIn("no disk queue in", await self.attach_fails(self.path))
        self.assertFalse(os.path.exists(self.path))
        os.makedirs(self.path)
        sqlite3.connect(os.path.join(self.path, "index.sqlite")).close()  # an empty database
        self.assertIn("is not in WAL mode", await self.attach_fails(self.path))
        conn = sqlite3.connect(os.path.join(self.path, "index.sqlite"), isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.close()
        self.assertIn("holds no queue items table", await self.attach_fails(self.path))
        self.assertEqual(sorted(os.listdir(self.path)), ["index.sqlite"])

    async def test_attach_beside_a_loaded_queue_recovers_nothing(self) -> None:
        """What ``dcrouter quarantine`` relies on: the router's claims in flight stay claimed."""
        queue, _ = await self.open_queue()
        await queue.enqueue(make_item("A1"), inline(b"one"))
        await queue.enqueue(make_item("A2", status=QueueItemStatus.QUARANTINED), inline(b"two"))
        self.assertEqual([i.id for i in await queue.get_next(10)], ["A1"])
        beside = DiskQueue(self.path, reactor=reactor, clock=self.clock)
        await beside.attach()
        self.assertEqual(await beside.get_item_count(), 2)
        self.assertEqual((await beside.get("A1")).status, QueueItemStatus.DELIVERING)
        await beside.update_if("A2", QueueItemStatus.QUARANTINED, status=QueueItemStatus.QUEUED)
        self.assertEqual(await read_body(beside, "A2"), b"two")
        await beside.save()
        self.assertEqual([i.id for i in await queue.get_next(10)], ["A2"])
        self.assertEqual((await queue.get("A1")).status, QueueItemStatus.DELIVERING)

    async def test_recount_after_another_process_removed_items(self) -> None:
        queue, _ = await self.open_queue(max_size=2)
        await queue.enqueue(make_item("C3", status=QueueItemStatus.DELIVERED), inline(b"done"))
        await queue.enqueue(make_item("C1"), inline(b"one"))
        await queue.enqueue(make_item("C2"), inline(b"two"))
        beside = DiskQueue(self.path, reactor=reactor, clock=self.clock)
        await beside.attach()
        self.assertEqual((await beside.dequeue("C1")).id, "C1")
        await beside.save()
        # The count in memory does not know yet: at max_size, the next enqueue is refused.
        self.assertEqual(await queue.get_item_count(), 2)
        await self.assertFailure(queue.enqueue(make_item("C4"), inline()), QueueFull)
        # Taken from the index again; a write in the same batch after it counts on top.
        recounted = queue.recount()
        updated = queue.update("C2", status=QueueItemStatus.DELIVERED)
        self.assertEqual(await recounted, 1)
        await updated
        self.assertEqual(await queue.get_item_count(), 0)
        await queue.enqueue(make_item("C5"), inline(b"five"))
        self.assertEqual(await queue.get_item_count(), 1)

    async def test_save_waits_for_pending_writes(self) -> None:
        queue = DiskQueue(self.path, reactor=reactor, clock=self.clock)
        await queue.load()
        writes = [queue.enqueue(make_item(f"W{n}"), inline()) for n in range(20)]
        # A second save (the shutdown trigger, say) while the first is closing waits for the same close.
        await defer.gatherResults([queue.save(), queue.save()])
        self.assertTrue(all(d.called for d in writes))
        await defer.gatherResults(writes)
        _again, counts = await self.open_queue()
        self.assertEqual(counts["items"], 20)


class _TriggerRecordingReactor:
    """The real reactor, except that system event triggers are recorded instead of registered."""

    def __init__(self) -> None:
        self.triggers: list[tuple[str, str]] = []

    def addSystemEventTrigger(self, phase: str, event: str, callable: Any, *args: Any) -> tuple[str, str]:
        self.triggers.append((phase, event))
        return (phase, event)

    def removeSystemEventTrigger(self, trigger: Any) -> None:
        self.triggers.remove(trigger)

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


DAY = 86400.0


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Wait (real time: the sweep runs in a thread) for ``predicate``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


class OrphanRetentionTests(TestCase):
    """orphans/ is swept on the queue's clock: files set aside more than orphanRetention ago go."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())  # file times are wall-clock times
        self.path = self.mktemp()
        self.orphans = os.path.join(self.path, "orphans")
        os.makedirs(self.orphans)
        os.makedirs(os.path.join(self.path, "messages", "ZZ"))

    def put(self, *parts: str, age: float) -> str:
        path = os.path.join(self.path, *parts)
        FilePath(path).setContent(b"nobody's")
        when = self.clock.seconds() - age
        os.utime(path, (when, when))
        return path

    async def open_queue(self, retention: float) -> DiskQueue:
        queue = DiskQueue(self.path, reactor=reactor, clock=self.clock, orphan_retention=retention)
        await queue.load()
        self.addCleanup(queue.save)
        return queue

    async def test_set_aside_files_removed_after_the_retention(self) -> None:
        old = self.put("orphans", "OLD", age=8 * DAY)
        recent = self.put("orphans", "RECENT", age=1 * DAY)
        # Written a month ago, set aside by this start-up: retention counts from now.
        self.put("messages", "ZZ", "ZZ999", age=30 * DAY)
        queue = await self.open_queue(retention=7 * DAY)
        sweeper = queue._orphan_sweeper
        # Its Deferred too, not only the file: LoopingCall schedules the next sweep once the last has fired,
        # so a clock advanced while it is still under way would skip the hourly sweep.
        await until(lambda: not os.path.exists(old) and sweeper._sweeping is None, "the sweep at start-up")
        set_aside = os.path.join(self.orphans, "ZZ999")
        self.assertEqual((os.path.exists(recent), os.path.exists(set_aside)), (True, True))
        self.clock.advance(6 * DAY + 3600)  # the hourly sweep, RECENT now 7 days and an hour old
        await until(lambda: not os.path.exists(recent), "the hourly sweep")
        self.assertTrue(os.path.exists(set_aside))

    def test_configured_by_orphan_retention(self) -> None:
        smtp = {"ports": [2525], "implicitTlsPorts": [], "submissionPorts": [], "persistentPath": self.path}
        options = load_options({"smtpConfig": {**smtp, "orphanRetention": 3 * 86_400_000}}).options
        queue = build_queue(options.smtp_config, reactor)
        self.assertIsInstance(queue, DiskQueue)
        self.assertEqual(queue._orphan_sweeper.retention, 3 * DAY)

    async def test_zero_keeps_them(self) -> None:
        old = self.put("orphans", "OLD", age=365 * DAY)
        queue = await self.open_queue(retention=0)
        self.clock.advance(DAY)
        await queue.save()  # waits for a sweep under way, if one had started
        self.assertTrue(os.path.exists(old))


class ShutdownOwnershipTests(TestCase):
    async def load(self, **kwargs: Any) -> tuple[DiskQueue, _TriggerRecordingReactor]:
        recorder = _TriggerRecordingReactor()
        queue = DiskQueue(self.mktemp(), reactor=recorder, clock=Clock(), **kwargs)
        await queue.load()
        self.addCleanup(queue.save)
        return queue, recorder

    async def test_standalone_queue_closes_before_shutdown(self) -> None:
        queue, recorder = await self.load()
        self.assertEqual(recorder.triggers, [("before", "shutdown")])
        await queue.save()
        self.assertEqual(recorder.triggers, [])

    async def test_owned_queue_leaves_shutdown_to_its_owner(self) -> None:
        _, recorder = await self.load(close_on_shutdown=False)
        self.assertEqual(recorder.triggers, [])


class DurabilityTests(TestCase):
    """Which commits fsync: everything a caller relies on after a power loss; claims, which recovery undoes
    after any crash anyway, do not."""

    async def test_claims_commit_without_fsync_and_the_rest_with_it(self) -> None:
        clock = Clock()
        clock.advance(START)
        queue = DiskQueue(self.mktemp(), reactor=reactor, clock=clock, close_on_shutdown=False)
        await queue.load()
        self.addCleanup(queue.save)

        def synchronous() -> int:
            return int(queue._index.conn.execute("PRAGMA synchronous").fetchone()[0])

        await queue.enqueue(make_item("D1"), inline(b"one"))
        self.assertEqual(synchronous(), 2)  # FULL: the 250 depends on it
        self.assertEqual([i.id for i in await queue.get_next(1)], ["D1"])
        self.assertEqual(synchronous(), 0)  # OFF: a claim only
        await queue.update("D1", status=QueueItemStatus.DELIVERED)
        self.assertEqual(synchronous(), 2)


class DiskFullTests(TestCase):
    """ENOSPC at each step of storing a message: ``QueueUnavailable`` (ingress answers ``451 4.3.0``), no file
    left in spool/ or messages/, nothing visible, and the queue takes the next message once there is room.
    SQLite's own ENOSPC (SQLITE_FULL) is made real with ``max_page_count``; fsync failures are injected where
    the index calls them. tests/integration/test_smtp_disk_full.py fills a real file system."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.path = self.mktemp()

    async def open_queue(self) -> DiskQueue:
        queue = DiskQueue(self.path, reactor=reactor, clock=self.clock)
        await queue.load()
        self.addCleanup(queue.save)
        return queue

    async def refused(self, queue: DiskQueue, item_id: str, message: Any, **fields: Any) -> QueueUnavailable:
        try:
            await queue.enqueue(make_item(item_id, **fields), message)
        except QueueUnavailable as error:
            return error
        self.fail(f"{item_id} was stored")

    async def assert_nothing_left(self, queue: DiskQueue, *item_ids: str) -> None:
        for item_id in item_ids:
            self.assertIsNone(await queue.get(item_id))
        self.assertEqual(await queue.get_item_count(), 0)
        self.assertEqual(os.listdir(queue.spool_directory), [])
        self.assertEqual(glob.glob(os.path.join(self.path, "messages", "*", "*")), [])

    def fill_index(self, queue: DiskQueue) -> None:
        """The index's file system is full: SQLite may not add a single page (SQLITE_FULL, as on ENOSPC)."""
        conn = queue._index.conn
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count = {pages}")
        self.addCleanup(conn.execute, "PRAGMA max_page_count = 1073741823")

    async def test_index_full_for_an_inline_body(self) -> None:
        queue = await self.open_queue()
        self.fill_index(queue)
        error = await self.refused(queue, "IN1", inline(b"x" * 100_000))
        self.assertIn("database or disk is full", str(error))
        await self.assert_nothing_left(queue, "IN1")
        queue._index.conn.execute("PRAGMA max_page_count = 1073741823")
        await queue.enqueue(make_item("OK1"), inline(b"fine"))
        self.assertEqual(await read_body(queue, "OK1"), b"fine")

    async def test_index_full_after_the_body_file_moved_in(self) -> None:
        # The body is fsynced and linked into messages/ before the row's commit fails: it is removed again.
        queue = await self.open_queue()
        self.fill_index(queue)
        message = spool_file(queue, b"y" * 300_000)
        error = await self.refused(queue, "FI1", message, head=b"X-Big: " + b"h" * 100_000 + b"\r\n\r\n")
        self.assertIn("database or disk is full", str(error))
        self.assertIsNone(message.path)
        await self.assert_nothing_left(queue, "FI1")

    async def test_fsync_of_the_body_fails(self) -> None:
        queue = await self.open_queue()
        self.patch(index_module, "fsync_file", _no_space)
        error = await self.refused(queue, "FS1", spool_file(queue, b"z" * 300_000))
        self.assertIn("No space left on device", str(error))
        await self.assert_nothing_left(queue, "FS1")

    async def test_fsync_of_the_body_directory_fails(self) -> None:
        queue = await self.open_queue()
        self.patch(index_module, "fsync_directory", _no_space)
        error = await self.refused(queue, "FD1", spool_file(queue, b"z" * 300_000))
        self.assertIn("No space left on device", str(error))
        await self.assert_nothing_left(queue, "FD1")

    async def test_copy_to_another_file_system_fails_half_way(self) -> None:
        # A spool on another file system than messages/: the body is copied, and the copy runs out of room.
        queue = await self.open_queue()
        self.patch(files_module.os, "link", _cross_device)
        self.patch(files_module.shutil, "copyfileobj", _copy_half_then_no_space)
        error = await self.refused(queue, "CP1", spool_file(queue, b"c" * 300_000))
        self.assertIn("No space left on device", str(error))
        await self.assert_nothing_left(queue, "CP1")


def _no_space(path: str) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def _cross_device(source: str, target: str) -> None:
    raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), source, None, target)


def _copy_half_then_no_space(source: Any, target: Any, length: int = 0) -> None:
    target.write(source.read(1000))
    target.flush()
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
