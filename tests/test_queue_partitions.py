"""The disk queue with workers (dcrouter.queue.partitions): which worker holds which partition, where the
single-worker queue stays, adoption when the workers are fewer, the lock, and what worker 0 sees and may do
in the partitions other workers hold. Real DiskQueues in a temporary directory (their threads need the
reactor); no sockets. The processes themselves: tests/integration/test_workers_disk.py."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from dcrouter.config import load_options
from dcrouter.interfaces import HeldByOtherWorker, IDeliveryQueue, StatusMismatch
from dcrouter.queue import partitions as partitions_module
from dcrouter.queue.contract import QueueFilter
from dcrouter.queue.disk import DiskQueue
from dcrouter.queue.item import QueueItemStatus
from dcrouter.queue.partitions import (
    PartitionedQueue,
    existing_partitions,
    format_cursor,
    owned_partitions,
    parse_cursor,
    partition_path,
)
from dcrouter.router import build_queue
from tests.test_queue_contract import START, QueueContractMixin, inline, make_item, read_body


class LayoutTests(SynchronousTestCase):
    def test_partition_zero_is_the_single_worker_queue(self) -> None:
        self.assertEqual(partition_path("/q", 0), "/q")
        self.assertEqual(partition_path("/q", 3), os.path.join("/q", "partitions", "3"))

    def test_each_worker_holds_its_own(self) -> None:
        self.assertEqual(owned_partitions(0, 1, []), [0])
        self.assertEqual(owned_partitions(0, 2, [1]), [0])
        self.assertEqual(owned_partitions(1, 2, [1]), [1])

    def test_fewer_workers_adopt_what_is_left(self) -> None:
        existing = [1, 2, 3, 5]
        self.assertEqual(owned_partitions(0, 2, existing), [0, 2])
        self.assertEqual(owned_partitions(1, 2, existing), [1, 3, 5])
        # Back to one worker: it holds every partition.
        self.assertEqual(owned_partitions(0, 1, existing), [0, 1, 2, 3, 5])
        # Every partition has exactly one holder, whatever the count.
        for workers in (1, 2, 3, 4):
            held = [p for w in range(workers) for p in owned_partitions(w, workers, existing)]
            self.assertEqual(sorted(held), sorted({0, *range(workers), *existing}))

    def test_worker_out_of_range(self) -> None:
        self.assertRaises(ValueError, owned_partitions, 2, 2, [])

    def test_existing_partitions_ignores_other_names(self) -> None:
        base = self.mktemp()
        self.assertEqual(existing_partitions(base), [])
        for name in ("1", "4", "0", "tmp", "-2"):
            os.makedirs(os.path.join(base, "partitions", name))
        self.assertEqual(existing_partitions(base), [1, 4])

    def test_cursor_round_trip(self) -> None:
        self.assertEqual(parse_cursor(None), None)
        self.assertEqual(parse_cursor(format_cursor({1: "7", 0: "12"})), {0: "12", 1: "7"})
        for bad in ("", "12", "0:x", "0:1,,1:2", "a:1"):
            self.assertRaises(ValueError, parse_cursor, bad)


class BuildTests(SynchronousTestCase):
    def config(self, base: str, workers: int = 1, max_queue_size: int = 0) -> object:
        smtp = {
            "hostname": "mx.test",
            "ports": [2525],
            "implicitTlsPorts": [],
            "submissionPorts": [],
            "persistentPath": base,
            "maxQueueSize": max_queue_size,
        }
        return load_options({"workers": workers, "smtpConfig": smtp}).options.smtp_config

    def test_one_worker_keeps_the_plain_disk_queue(self) -> None:
        base = self.mktemp()
        queue = build_queue(self.config(base), reactor)  # type: ignore[arg-type]
        self.assertIsInstance(queue, DiskQueue)
        self.assertEqual(queue.path, os.path.abspath(base))  # type: ignore[attr-defined]

    def test_workers_partition_and_divide_the_bound(self) -> None:
        base = self.mktemp()
        queue = build_queue(self.config(base, 2, 1001), reactor, 1, 2)  # type: ignore[arg-type]
        assert isinstance(queue, PartitionedQueue)
        self.assertEqual(list(queue.held), [1])
        self.assertEqual(queue.own.path, os.path.join(os.path.abspath(base), "partitions", "1"))
        self.assertEqual(queue.spool_directory, os.path.join(queue.own.path, "spool"))
        self.assertEqual(queue.max_size, 501)
        self.assertFalse(queue.observe_others)
        self.assertTrue(build_queue(self.config(base, 2), reactor, 0, 2).observe_others)  # type: ignore[arg-type, attr-defined]

    def test_one_worker_after_many_holds_every_partition(self) -> None:
        base = self.mktemp()
        os.makedirs(os.path.join(base, "partitions", "1"))
        queue = build_queue(self.config(base), reactor)  # type: ignore[arg-type]
        assert isinstance(queue, PartitionedQueue)
        self.assertEqual(list(queue.held), [0, 1])


class PartitionedQueueTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.base = os.path.abspath(self.mktemp())

    async def open(self, worker: int, workers: int, **options: object) -> PartitionedQueue:
        queue = PartitionedQueue(
            self.base, reactor=reactor, clock=self.clock, worker=worker, workers=workers, **options
        )  # type: ignore[arg-type]
        await queue.load()
        self.addCleanup(queue.save)
        return queue

    async def fill(self, worker: int, workers: int, ids: list[str], created: float = START) -> None:
        """Enqueue ``ids`` through worker ``worker`` of ``workers``, then close it."""
        queue = await self.open(worker, workers)
        for n, item_id in enumerate(ids):
            item = make_item(item_id, created_at=created + n, next_attempt_at=START)
            await queue.enqueue(item, inline(item_id.encode()))
        await queue.save()

    async def test_single_worker_queue_stays_with_worker_zero(self) -> None:
        plain = DiskQueue(self.base, reactor=reactor, clock=self.clock)
        await plain.load()
        await plain.enqueue(make_item("OLD1"), inline(b"old"))
        await plain.save()
        zero = await self.open(0, 2)
        one = await self.open(1, 2)
        self.assertEqual(zero.own.path, self.base)
        self.assertEqual([i.id for i in await one.get_next(10)], [])
        claimed = await zero.get_next(10)
        self.assertEqual([i.id for i in claimed], ["OLD1"])
        self.assertEqual(await read_body(zero, "OLD1"), b"old")
        await zero.update("OLD1", status=QueueItemStatus.DELIVERED)
        self.assertEqual((await zero.get("OLD1")).status, QueueItemStatus.DELIVERED)  # type: ignore[union-attr]

    async def test_mail_goes_into_each_workers_own_partition(self) -> None:
        zero = await self.open(0, 2)
        one = await self.open(1, 2)
        self.assertTrue(verifyObject(IDeliveryQueue, zero))
        await zero.enqueue(make_item("Z1"), inline(b"z"))
        await one.enqueue(make_item("O1"), inline(b"o"))
        self.assertTrue(os.path.isfile(os.path.join(self.base, "partitions", "1", "index.sqlite")))
        self.assertEqual([i.id for i in await one.get_next(10)], ["O1"])
        self.assertEqual([i.id for i in await zero.get_next(10)], ["Z1"])
        self.assertEqual(await one.get_item_count(), 1)

    async def test_fewer_workers_deliver_what_more_left(self) -> None:
        await self.fill(2, 3, ["P2a", "P2b"])
        await self.fill(1, 3, ["P1a"])
        zero = await self.open(0, 2)
        one = await self.open(1, 2)
        self.assertEqual(list(zero.held), [0, 2])
        self.assertEqual(list(one.held), [1])
        await zero.enqueue(make_item("Z1", created_at=START - 10), inline(b"z"))
        # One partition per claim, in turn: the adopted one drains beside the own one.
        claims = [[i.id for i in await zero.get_next(10)] for _ in range(3)]
        self.assertEqual(claims, [["Z1"], ["P2a", "P2b"], []])
        self.assertEqual(await read_body(zero, "P2b"), b"P2b")
        await zero.update("P2a", status=QueueItemStatus.DELIVERED)
        await zero.dequeue("P2b")
        await zero.save()
        again = DiskQueue(partition_path(self.base, 2), reactor=reactor, clock=self.clock)
        await again.load()
        self.addCleanup(again.save)
        self.assertEqual((await again.get("P2a")).status, QueueItemStatus.DELIVERED)  # type: ignore[union-attr]
        self.assertIsNone(await again.get("P2b"))
        self.assertEqual([i.id for i in await one.get_next(10)], ["P1a"])

    async def test_purge_covers_every_held_partition(self) -> None:
        await self.fill(2, 3, ["P2a"])
        zero = await self.open(0, 2)
        await zero.enqueue(make_item("Z1"), inline(b"z"))
        await zero.update("Z1", status=QueueItemStatus.DELIVERED)
        await zero.update("P2a", status=QueueItemStatus.FAILED)
        self.clock.advance(100)
        self.assertEqual(await zero.purge_expired(10), 2)
        self.assertEqual(await zero.count_by_status(), dict.fromkeys((s.value for s in QueueItemStatus), 0))

    async def test_a_partition_has_one_holder_at_a_time(self) -> None:
        self.patch(partitions_module, "LOCK_RETRY", 0.01)
        first = await self.open(1, 2)
        second = PartitionedQueue(self.base, reactor=reactor, clock=self.clock, worker=1, workers=2)  # type: ignore[arg-type]
        loading: Deferred = second.load()
        self.addCleanup(second.save)
        await deferLater(reactor, 0.1, lambda: None)
        self.assertFalse(loading.called, "loaded while another process held the partition")
        await first.save()
        counts = await loading
        self.assertEqual(counts["items"], 0)

    async def test_worker_zero_reads_every_partition(self) -> None:
        await self.fill(1, 2, ["B1", "B2", "B3"], created=START + 1)  # created at START+1, +2, +3
        zero = await self.open(0, 2, observe_others=True)
        one = await self.open(1, 2)
        for n, item_id in enumerate(["A1", "A2"]):
            await zero.enqueue(make_item(item_id, created_at=START + 1.5 + 2 * n), inline(b"a"))
        # Newest first across partitions, two at a time, every item once.
        seen, cursor = [], None
        for _ in range(5):
            page = await zero.list_items(QueueFilter(), 2, cursor)
            seen.append([i.id for i in page.items])
            cursor = page.next_cursor
            if cursor is None:
                break
        self.assertEqual(seen, [["A2", "B3"], ["B2", "A1"], ["B1"]])
        self.assertEqual((await zero.count_by_status())["queued"], 5)
        self.assertEqual((await zero.status_summary())["queued"], (5, START + 1))
        counts = await zero.count_by_destination()
        self.assertEqual(counts.other["queued"], 5)
        self.assertEqual((await zero.get("B2")).id, "B2")  # type: ignore[union-attr]
        self.assertEqual(await read_body(zero, "B2"), b"B2")
        self.assertEqual(
            sorted(i.id for i in await zero.get_by_status("queued")), ["A1", "A2", "B1", "B2", "B3"]
        )
        # Worker 1, which serves no API, sees its own.
        self.assertEqual((await one.count_by_status())["queued"], 3)

    async def test_worker_zero_sees_a_partition_created_after_it(self) -> None:
        zero = await self.open(0, 2, observe_others=True)
        self.assertEqual((await zero.count_by_status())["queued"], 0)
        self.assertEqual(zero.others, {})
        one = await self.open(1, 2)
        await one.enqueue(make_item("LATE"), inline(b"late"))
        self.assertEqual((await zero.count_by_status())["queued"], 1)
        self.assertEqual(list(zero.others), [1])
        self.assertEqual((await zero.get("LATE")).id, "LATE")  # type: ignore[union-attr]

    async def test_worker_zero_holds_and_deletes_but_does_not_bounce_another_workers_mail(self) -> None:
        await self.fill(1, 2, ["B1", "B2"])
        one = await self.open(1, 2)
        zero = await self.open(0, 2, observe_others=True)
        held = await zero.update_if("B1", QueueItemStatus.QUEUED, status=QueueItemStatus.HELD)
        self.assertEqual(held.status, QueueItemStatus.HELD)
        # The holder sees the hold at once (its claims are queries) and claims nothing of it.
        self.assertEqual([i.id for i in await one.get_next(10)], ["B2"])
        self.assertEqual((await one.get("B1")).status, QueueItemStatus.HELD)  # type: ignore[union-attr]
        # A claim or a final status is the holder's to make.
        error = await self.assertFailure(
            zero.update_if("B1", QueueItemStatus.HELD, status=QueueItemStatus.DELIVERING), HeldByOtherWorker
        )
        self.assertIn("partition 1", str(error))
        await self.assertFailure(zero.update("B1", status=QueueItemStatus.BOUNCED), HeldByOtherWorker)
        # A removal is guarded by the status: one being delivered is refused, a held one goes.
        await self.assertFailure(zero.dequeue_if("B2", QueueItemStatus.QUEUED), StatusMismatch)
        self.assertEqual((await zero.dequeue_if("B1", QueueItemStatus.HELD)).id, "B1")  # type: ignore[union-attr]
        self.assertIsNone(await one.get("B1"))
        # The holder's count of live items catches up at its next recount.
        self.assertEqual(await one.get_item_count(), 2)
        self.clock.advance(partitions_module.RECOUNT_INTERVAL)
        for _ in range(200):
            if await one.get_item_count() == 1:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(await one.get_item_count(), 1)

    async def test_tools_may_remove_in_any_partition(self) -> None:
        await self.fill(1, 2, ["B1"])
        tool = await self.open(0, 2, observe_others=True, foreign_removals=True)
        self.assertEqual((await tool.dequeue("B1")).id, "B1")  # type: ignore[union-attr]
        self.assertIsNone(await tool.get("B1"))
        self.assertIsNone(await tool.dequeue("B1"))

    async def test_suppression_list_is_shared(self) -> None:
        zero = await self.open(0, 2)
        one = await self.open(1, 2)
        a, b = zero.suppression_list(), one.suppression_list()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        await a.add("gone@example.test", "550 5.1.1 no such user", 3600)
        found = await b.get("gone@example.test")
        self.assertIsNotNone(found)


class OneHeldPartitionContractTests(QueueContractMixin, TestCase):
    """The queue contract, on worker 1 of 2 (one partition held)."""

    def setUp(self) -> None:
        self.clock = Clock()

    def make_queue(self, max_size: int = 0) -> PartitionedQueue:
        return PartitionedQueue(
            self.mktemp(), reactor=reactor, clock=self.clock, worker=1, workers=2, max_size=max_size
        )


class SeveralPartitionsContractTests(QueueContractMixin, TestCase):
    """The queue contract, on worker 0 of 2 holding an adopted partition too and reading the others: every
    path through more than one partition (rotating claims, located writes, merged reads)."""

    def setUp(self) -> None:
        self.clock = Clock()

    def make_queue(self, max_size: int = 0) -> PartitionedQueue:
        base = self.mktemp()
        os.makedirs(os.path.join(base, "partitions", "2"))
        return PartitionedQueue(
            base,
            reactor=reactor,
            clock=self.clock,
            worker=0,
            workers=2,
            observe_others=True,
            max_size=max_size,
        )
