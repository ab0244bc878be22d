"""The IDeliveryQueue contract, run against every backend: what callers (ingress, delivery, the API) rely on
whichever ``queueStorage`` is configured."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from dcrouter.interfaces import IDeliveryQueue, QueueFull, QueueUnavailable, StatusMismatch
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.queue.contract import LOAD_COUNT_KEYS, ClaimSchedule, QueueFilter, destination_counts
from dcrouter.queue.disk import DiskQueue
from dcrouter.queue.item import Priority, QueueItem, QueueItemStatus
from dcrouter.queue.memory import MemoryQueue

START = 1_700_000_000.0


def make_item(item_id: str, **fields: Any) -> QueueItem:
    """An item created at START (due at once unless told otherwise)."""
    fields.setdefault("created_at", START)
    fields.setdefault("next_attempt_at", fields["created_at"])
    envelope = Envelope(
        mail_from="sender@example.org",
        recipients=["rcpt@example.com"],
        helo="client.example",
        peer_host="192.0.2.7",
        peer_port=40000,
        received_at=fields["created_at"],
    )
    return QueueItem(id=item_id, envelope=envelope, size=fields.pop("size", 5), **fields)


def inline(body: bytes = b"hello") -> SpooledMessage:
    return SpooledMessage(len(body), data=body)


def spool_file(queue: Any, body: bytes, name: str = "spool-test") -> SpooledMessage:
    """A big message as ingress leaves it: a closed, not fsynced file in the queue's spool directory."""
    path = os.path.join(queue.spool_directory, name)
    with open(path, "wb") as f:
        f.write(body)
    return SpooledMessage(len(body), path=path)


async def read_body(queue: Any, item_id: str) -> bytes:
    stream = await queue.open_body(item_id)
    try:
        return stream.read()
    finally:
        stream.close()


class QueueContractMixin:
    """Mixed into a TestCase with ``make_queue(max_size)``; ``self.clock`` decides due-ness and age."""

    clock: Clock

    def make_queue(self, max_size: int = 0) -> Any:
        raise NotImplementedError

    async def open_queue(self, max_size: int = 0) -> Any:
        queue = self.make_queue(max_size)
        await queue.load()
        self.addCleanup(queue.save)  # type: ignore[attr-defined]
        return queue

    async def enqueue_all(self, queue: Any, *items: QueueItem) -> None:
        for item in items:
            await queue.enqueue(item, inline(item.id.encode()))

    async def assertFails(self, deferred: Any, error: type[BaseException]) -> BaseException:
        try:
            await deferred
        except error as e:
            return e
        self.fail(f"{error.__name__} not raised")  # type: ignore[attr-defined]

    async def test_provides_interface(self) -> None:
        queue = await self.open_queue()
        self.assertTrue(verifyObject(IDeliveryQueue, queue))
        self.assertTrue(os.path.isdir(queue.spool_directory))

    async def test_load_reports_every_count(self) -> None:
        queue = self.make_queue()
        counts = await queue.load()
        self.addCleanup(queue.save)
        self.assertEqual(set(counts), set(LOAD_COUNT_KEYS))
        self.assertEqual(counts["items"], 0)

    async def test_enqueue_and_get(self) -> None:
        queue = await self.open_queue()
        item = make_item(
            "A1", destination="mx.example.com", history=[{"at": 1.0, "target": "x", "reply": "451"}]
        )
        stored = await queue.enqueue(item, inline(b"Subject: x\r\n\r\nbody\r\n"))
        self.assertEqual(stored, item)
        self.assertEqual(await queue.get("A1"), item)
        self.assertIsNone(await queue.get("NOPE"))
        self.assertEqual(await read_body(queue, "A1"), b"Subject: x\r\n\r\nbody\r\n")

    async def test_file_backed_body(self) -> None:
        queue = await self.open_queue()
        body = os.urandom(300_000)
        await queue.enqueue(make_item("BIG", size=len(body)), spool_file(queue, body))
        self.assertEqual(await read_body(queue, "BIG"), body)

    async def test_items_handed_out_are_copies(self) -> None:
        queue = await self.open_queue()
        item = make_item("C1")
        stored = await queue.enqueue(item, inline())
        item.attempts = 7
        stored.envelope.recipients.append("other@example.com")
        fetched = await queue.get("C1")
        fetched.attempts = 9
        again = await queue.get("C1")
        self.assertEqual((again.attempts, again.envelope.recipients), (0, ["rcpt@example.com"]))

    async def test_bad_and_duplicate_ids(self) -> None:
        queue = await self.open_queue()
        await queue.enqueue(make_item("D1"), inline(b"first"))
        await self.assertFails(queue.enqueue(make_item("D1"), inline(b"second")), ValueError)
        await self.assertFails(queue.enqueue(make_item("../etc"), inline()), ValueError)
        self.assertEqual(await read_body(queue, "D1"), b"first")
        self.assertEqual(await queue.get_item_count(), 1)

    async def test_get_next_orders_by_priority_then_age(self) -> None:
        queue = await self.open_queue()
        await self.enqueue_all(
            queue,
            make_item("RETRY_OLD", priority=Priority.RETRY, created_at=START - 100),
            make_item("FRESH_NEW", priority=Priority.FRESH, created_at=START - 1),
            make_item("BOUNCE", priority=Priority.BOUNCE, created_at=START - 500),
            make_item("FRESH_OLD", priority=Priority.FRESH, created_at=START - 50),
            make_item("RETRY_NEW", priority=Priority.RETRY, created_at=START - 10),
        )
        self.clock.advance(START)
        first = await queue.get_next(2)
        rest = await queue.get_next(10)
        self.assertEqual([i.id for i in first], ["FRESH_OLD", "FRESH_NEW"])
        self.assertEqual([i.id for i in rest], ["RETRY_OLD", "RETRY_NEW", "BOUNCE"])
        self.assertEqual({i.status for i in first + rest}, {QueueItemStatus.DELIVERING})
        self.assertEqual(await queue.get_next(10), [])
        self.assertEqual((await queue.get("BOUNCE")).status, QueueItemStatus.DELIVERING)

    async def test_get_next_keeps_arrival_order_for_equal_times(self) -> None:
        queue = await self.open_queue()
        ids = ["Z9", "A0", "M5", "B1"]
        await self.enqueue_all(queue, *(make_item(i) for i in ids))
        self.clock.advance(START)
        self.assertEqual([i.id for i in await queue.get_next(10)], ids)

    async def test_get_next_only_due_items(self) -> None:
        queue = await self.open_queue()
        await self.enqueue_all(
            queue,
            make_item("LATER", next_attempt_at=START + 60),
            make_item("NOW", created_at=START + 1, next_attempt_at=START),
        )
        self.clock.advance(START)
        self.assertEqual([i.id for i in await queue.get_next(10)], ["NOW"])
        self.clock.advance(59)
        self.assertEqual(await queue.get_next(10), [])
        self.clock.advance(1)
        self.assertEqual([i.id for i in await queue.get_next(10)], ["LATER"])

    async def test_scheduled_claim_skips_closed_destinations(self) -> None:
        """A full or paused destination's backlog ahead in the queue holds back nobody else's mail."""
        queue = await self.open_queue()
        slow = [
            make_item(f"SLOW{n:03d}", destination="slow", created_at=START - 1000 + n) for n in range(300)
        ]
        await self.enqueue_all(queue, *slow, make_item("FAST", destination="fast"), make_item("NEW"))
        self.clock.advance(START)
        claimed = await queue.get_next(10, ClaimSchedule({"slow": 0}))
        self.assertEqual([i.id for i in claimed], ["FAST", "NEW"])
        # Opened again (a slot free): its oldest first, only as many as its limit.
        claimed = await queue.get_next(10, ClaimSchedule({"slow": 2}))
        self.assertEqual([i.id for i in claimed], ["SLOW000", "SLOW001"])
        # Without a schedule: queue order, nothing left behind.
        self.assertEqual(len(await queue.get_next(1000)), 298)

    async def test_scheduled_claim_finds_mail_behind_a_backlog_with_a_slot_free(self) -> None:
        """A destination with one free slot and a backlog longer than a claim's window: one of its messages,
        and the mail behind the backlog, in the same claim."""
        queue = await self.open_queue()
        slow = [
            make_item(f"SLOW{n:04d}", destination="slow", created_at=START - 2000 + n) for n in range(1200)
        ]
        await self.enqueue_all(queue, *slow, make_item("FAST", destination="fast"))
        self.clock.advance(START)
        claimed = await queue.get_next(5, ClaimSchedule({"slow": 1}))
        self.assertEqual([i.id for i in claimed], ["SLOW0000", "FAST"])
        claimed = await queue.get_next(5, ClaimSchedule({"slow": 1}))
        self.assertEqual([i.id for i in claimed], ["SLOW0001"])

    async def test_scheduled_claim_is_round_robin_within_limits(self) -> None:
        queue = await self.open_queue()
        items = [make_item(f"A{n}", destination="a", created_at=START - 100 + n) for n in range(5)]
        items += [make_item(f"B{n}", destination="b", created_at=START - 50 + n) for n in range(5)]
        items += [make_item("C0", destination="c", created_at=START - 10)]
        await self.enqueue_all(queue, *items)
        self.clock.advance(START)
        claimed = await queue.get_next(6, ClaimSchedule({"b": 1}, default=3))
        self.assertEqual([i.id for i in claimed], ["A0", "B0", "C0", "A1", "A2"])
        self.assertEqual({i.status for i in claimed}, {QueueItemStatus.DELIVERING})
        # Unrouted mail has its own limit.
        unrouted = [make_item("U1", created_at=START - 5), make_item("U2", created_at=START - 4)]
        await self.enqueue_all(queue, *unrouted)
        claimed = await queue.get_next(10, ClaimSchedule({"a": 0, "b": 0}, unrouted=1))
        self.assertEqual([i.id for i in claimed], ["U1"])

    async def test_get_next_only_ready_statuses(self) -> None:
        queue = await self.open_queue()
        for n, status in enumerate(QueueItemStatus):
            await queue.enqueue(make_item(f"S{n}", status=status), inline())
        self.clock.advance(START)
        claimed = await queue.get_next(100)
        self.assertEqual(sorted(i.id for i in claimed), ["S0", "S1"])  # QUEUED, DEFERRED

    async def test_update_is_stored_and_reschedules(self) -> None:
        queue = await self.open_queue()
        await queue.enqueue(make_item("U1"), inline())
        self.clock.advance(START)
        [claimed] = await queue.get_next()
        attempt = {"at": START, "target": "mx.example.com", "reply": "451 4.3.0 try later"}
        updated = await queue.update(
            "U1",
            status="deferred",
            attempts=1,
            next_attempt_at=START + 300,
            priority=Priority.RETRY,
            last_error="451 4.3.0 try later",
            history=[attempt],
        )
        self.assertEqual(updated.status, QueueItemStatus.DEFERRED)
        self.assertEqual(await queue.get("U1"), updated)
        self.assertEqual(
            (updated.attempts, updated.history, updated.envelope), (1, [attempt], claimed.envelope)
        )
        self.assertEqual(await queue.get_next(), [])
        self.clock.advance(300)
        self.assertEqual([i.id for i in await queue.get_next()], ["U1"])

    async def test_update_refuses_unknown_items_and_fields(self) -> None:
        queue = await self.open_queue()
        await queue.enqueue(make_item("U2"), inline())
        await self.assertFails(queue.update("NOPE", attempts=1), KeyError)
        await self.assertFails(queue.update("U2", id="OTHER"), TypeError)
        await self.assertFails(queue.update("U2", colour="red"), TypeError)
        await self.assertFails(queue.update("U2", status="lost"), ValueError)
        self.assertEqual(await queue.get("U2"), make_item("U2"))

    async def test_dequeue(self) -> None:
        queue = await self.open_queue()
        await queue.enqueue(make_item("Q1"), inline())
        await queue.enqueue(make_item("Q2", size=4), spool_file(queue, b"file"))
        removed = await queue.dequeue("Q2")
        self.assertEqual(removed, make_item("Q2", size=4))
        self.assertIsNone(await queue.get("Q2"))
        await self.assertFails(queue.open_body("Q2"), KeyError)
        self.assertIsNone(await queue.dequeue("Q2"))
        self.assertEqual(await queue.get_item_count(), 1)

    async def test_update_if_changes_only_in_the_expected_status(self) -> None:
        queue = await self.open_queue()
        quarantined = make_item("G1", status=QueueItemStatus.QUARANTINED, last_error="virus")
        await queue.enqueue(quarantined, inline())
        await queue.enqueue(make_item("G2"), inline())
        self.assertEqual(await queue.get_item_count(), 2)
        released = await queue.update_if(
            "G1", QueueItemStatus.QUARANTINED, status="queued", next_attempt_at=START + 5, last_error=None
        )
        self.assertEqual(
            (released.status, released.next_attempt_at, released.last_error),
            (QueueItemStatus.QUEUED, START + 5, None),
        )
        self.assertEqual(await queue.get("G1"), released)
        # Already released: the guard fails, naming the status as stored, and nothing changes.
        mismatch = await self.assertFails(
            queue.update_if("G1", "quarantined", status="failed"), StatusMismatch
        )
        self.assertEqual(mismatch.item, released)  # type: ignore[attr-defined]
        self.assertEqual(await queue.get("G1"), released)
        await self.assertFails(queue.update_if("NOPE", "quarantined", status="queued"), KeyError)
        await self.assertFails(queue.update_if("G2", "lost", status="queued"), ValueError)
        await self.assertFails(queue.update_if("G2", "queued", colour="red"), TypeError)
        self.assertEqual(await queue.get_item_count(), 2)
        self.clock.advance(START + 5)
        self.assertEqual(sorted(i.id for i in await queue.get_next(10)), ["G1", "G2"])

    async def test_dequeue_if_removes_only_in_the_expected_status(self) -> None:
        queue = await self.open_queue()
        await queue.enqueue(make_item("H1"), inline())
        held = make_item("H2", status=QueueItemStatus.QUARANTINED, size=4)
        await queue.enqueue(held, spool_file(queue, b"file"))
        mismatch = await self.assertFails(queue.dequeue_if("H1", QueueItemStatus.QUARANTINED), StatusMismatch)
        self.assertEqual(mismatch.item, make_item("H1"))  # type: ignore[attr-defined]
        self.assertEqual(await read_body(queue, "H1"), b"hello")
        self.assertEqual(await queue.dequeue_if("H2", "quarantined"), held)
        self.assertIsNone(await queue.get("H2"))
        await self.assertFails(queue.open_body("H2"), KeyError)
        self.assertIsNone(await queue.dequeue_if("H2", "quarantined"))
        await self.assertFails(queue.dequeue_if("H1", "lost"), ValueError)
        self.assertEqual(await queue.get_item_count(), 1)

    async def test_item_count_excludes_final_statuses(self) -> None:
        queue = await self.open_queue()
        await self.enqueue_all(
            queue,
            make_item("N1"),
            make_item("N2"),
            make_item("N3"),
            make_item("N4", status=QueueItemStatus.QUARANTINED),
        )
        self.assertEqual(await queue.get_item_count(), 4)
        await queue.update("N1", status=QueueItemStatus.DELIVERED)
        await queue.update("N2", status=QueueItemStatus.BOUNCED)
        self.assertEqual(await queue.get_item_count(), 2)
        await queue.update("N2", status=QueueItemStatus.QUEUED)
        self.assertEqual(await queue.get_item_count(), 3)

    async def test_status_summary_counts_and_oldest_by_status(self) -> None:
        queue = await self.open_queue()
        self.assertEqual(await queue.status_summary(), {})
        await self.enqueue_all(
            queue,
            make_item("S1", created_at=START + 5),
            make_item("S2", created_at=START + 2),
            make_item("S3", created_at=START + 9, status=QueueItemStatus.QUARANTINED),
        )
        await queue.update("S1", status=QueueItemStatus.DEFERRED)
        summary = await queue.status_summary()
        self.assertEqual(
            summary, {"queued": (1, START + 2), "deferred": (1, START + 5), "quarantined": (1, START + 9)}
        )

    async def test_max_size(self) -> None:
        queue = await self.open_queue(max_size=2)
        await self.enqueue_all(queue, make_item("M1"), make_item("M2"))
        refused = spool_file(queue, b"x" * 1000, name="spool-refused")
        await self.assertFails(queue.enqueue(make_item("M3"), refused), QueueFull)
        self.assertFalse(os.path.exists(os.path.join(queue.spool_directory, "spool-refused")))
        self.assertIsNone(await queue.get("M3"))
        await queue.update("M1", status=QueueItemStatus.DELIVERED)
        await queue.enqueue(make_item("M3"), inline())
        await self.assertFails(queue.enqueue(make_item("M4"), inline()), QueueFull)
        await queue.dequeue("M2")
        await queue.enqueue(make_item("M4"), inline())
        self.assertEqual(await queue.get_item_count(), 2)

    async def test_pause_and_resume(self) -> None:
        queue = await self.open_queue()
        self.clock.advance(START)
        self.assertTrue(queue.is_processing())
        queue.pause()
        self.assertFalse(queue.is_processing())
        await queue.enqueue(make_item("P1"), inline())
        self.assertEqual(await queue.get_next(5), [])
        self.assertEqual((await queue.get("P1")).status, QueueItemStatus.QUEUED)
        queue.resume()
        self.assertTrue(queue.is_processing())
        self.assertEqual([i.id for i in await queue.get_next(5)], ["P1"])

    async def test_queries(self) -> None:
        queue = await self.open_queue()
        await self.enqueue_all(
            queue,
            make_item("G1", destination="a.example", created_at=START + 2),
            make_item("G2", destination="b.example"),
            make_item("G3", destination="a.example", created_at=START + 1, status=QueueItemStatus.DEFERRED),
        )
        self.assertEqual([i.id for i in await queue.get_by_destination("a.example")], ["G3", "G1"])
        self.assertEqual(await queue.get_by_destination("c.example"), [])
        self.assertEqual([i.id for i in await queue.get_by_status(QueueItemStatus.QUEUED)], ["G2", "G1"])
        self.assertEqual([i.id for i in await queue.get_by_status("deferred")], ["G3"])

    async def test_purge_expired(self) -> None:
        queue = await self.open_queue()
        await self.enqueue_all(
            queue,
            make_item("OLD_DONE", created_at=START - 7200, status=QueueItemStatus.DELIVERED),
            make_item("OLD_BOUNCED", created_at=START - 7200, status=QueueItemStatus.BOUNCED),
            make_item("OLD_LIVE", created_at=START - 7200, status=QueueItemStatus.DEFERRED),
            make_item("NEW_DONE", created_at=START - 60, status=QueueItemStatus.FAILED),
        )
        self.clock.advance(START)
        self.assertEqual(await queue.purge_expired(3600), 2)
        self.assertIsNone(await queue.get("OLD_DONE"))
        self.assertIsNone(await queue.get("OLD_BOUNCED"))
        self.assertIsNotNone(await queue.get("OLD_LIVE"))
        self.assertIsNotNone(await queue.get("NEW_DONE"))
        self.assertEqual(await queue.get_item_count(), 1)

    async def test_purge_all(self) -> None:
        queue = await self.open_queue()
        await self.enqueue_all(queue, make_item("X1"), make_item("X2", status=QueueItemStatus.DELIVERED))
        await queue.enqueue(make_item("X3"), spool_file(queue, b"body"))
        self.assertEqual(await queue.purge_all(), 3)
        self.assertEqual(await queue.get_item_count(), 0)
        self.assertEqual(await queue.get_by_status(QueueItemStatus.QUEUED), [])

    async def test_list_items_pages_newest_first(self) -> None:
        queue = await self.open_queue()
        await self.enqueue_all(queue, *(make_item(f"P{n}") for n in range(5)))
        page = await queue.list_items(QueueFilter(), 2)
        self.assertEqual([i.id for i in page.items], ["P4", "P3"])
        await self.enqueue_all(queue, make_item("P5"))  # queued meanwhile: not on later pages
        await queue.dequeue("P2")  # removed meanwhile: shifts nothing
        page = await queue.list_items(QueueFilter(), 2, page.next_cursor)
        self.assertEqual([i.id for i in page.items], ["P1", "P0"])
        self.assertIsNone(page.next_cursor)
        everything = await queue.list_items(QueueFilter(), 1000)
        self.assertEqual([i.id for i in everything.items], ["P5", "P4", "P3", "P1", "P0"])
        self.assertIsNone(everything.next_cursor)
        exact = await queue.list_items(QueueFilter(), 5)
        self.assertIsNone(exact.next_cursor)

    async def test_list_items_filters(self) -> None:
        queue = await self.open_queue()
        a = make_item("F1", destination="domain:a.example")
        a.envelope.mail_from = "Alice@Example.org"
        a.envelope.recipients = ["x@one.example", "y@two.example"]
        b = make_item("F2", destination="domain:b.example", status=QueueItemStatus.DEFERRED)
        await self.enqueue_all(queue, a, b)

        async def ids(**criteria: Any) -> list[str]:
            page = await queue.list_items(QueueFilter(**criteria), 10)
            return [i.id for i in page.items]

        self.assertEqual(await ids(status=QueueItemStatus.DEFERRED), ["F2"])
        self.assertEqual(await ids(status=QueueItemStatus.HELD), [])
        self.assertEqual(await ids(destination="domain:a.example"), ["F1"])
        self.assertEqual(await ids(sender="alice@"), ["F1"])
        self.assertEqual(await ids(recipient="@TWO.example"), ["F1"])
        self.assertEqual(await ids(recipient="@example.com"), ["F2"])
        self.assertEqual(await ids(sender="alice", status=QueueItemStatus.DEFERRED), [])

    async def test_list_items_refuses_bad_pages(self) -> None:
        queue = await self.open_queue()
        for limit, cursor in ((0, None), (1001, None), (10, "x1"), (10, "-1")):
            await self.assertFails(queue.list_items(QueueFilter(), limit, cursor), ValueError)

    async def test_count_by_status(self) -> None:
        queue = await self.open_queue()
        await self.enqueue_all(
            queue, make_item("S1"), make_item("S2", status=QueueItemStatus.HELD), make_item("S3")
        )
        counts = await queue.count_by_status()
        self.assertEqual(set(counts), {s.value for s in QueueItemStatus})
        self.assertEqual((counts["queued"], counts["held"], counts["delivered"]), (2, 1, 0))

    async def test_count_by_destination(self) -> None:
        queue = await self.open_queue()
        due = {"next_attempt_at": 0.0}
        await self.enqueue_all(
            queue,
            make_item("D1", **due, destination="a.example"),
            make_item("D2", **due, destination="a.example"),
            make_item("D3", **due, destination="a.example", status=QueueItemStatus.DEFERRED),
            make_item("D4", **due, destination="b.example", status=QueueItemStatus.DEFERRED),
            make_item("D5", **due, destination="b.example", status=QueueItemStatus.HELD),  # not counted
            make_item("D6", **due, destination="c.example", status=QueueItemStatus.DELIVERED),  # not counted
            make_item("D7", **due),  # no destination recorded: in "other"
        )
        counts = await queue.count_by_destination()  # held and delivered are not counted
        self.assertEqual(
            counts.by_destination,
            {"a.example": {"queued": 2, "deferred": 1}, "b.example": {"queued": 0, "deferred": 1}},
        )
        self.assertEqual(list(counts.by_destination), ["a.example", "b.example"])  # most first
        self.assertEqual(counts.other, {"destinations": 0, "queued": 1, "deferred": 0})
        self.assertTrue(counts.complete)
        claimed = await queue.get_next(10)  # delivering: neither queued nor deferred
        self.assertEqual(len(claimed), 5)
        self.assertEqual((await queue.count_by_destination()).by_destination, {})

    async def test_held_items_are_never_claimed(self) -> None:
        queue = await self.open_queue()
        await self.enqueue_all(queue, make_item("H1", next_attempt_at=0.0))
        await queue.update_if("H1", QueueItemStatus.QUEUED, status=QueueItemStatus.HELD)
        self.assertEqual(await queue.get_next(10), [])
        self.assertEqual(await queue.get_item_count(), 1)  # still queued mail
        await queue.update_if("H1", QueueItemStatus.HELD, status=QueueItemStatus.QUEUED)
        self.assertEqual([i.id for i in await queue.get_next(10)], ["H1"])

    async def test_closed_queue_refuses_writes(self) -> None:
        queue = await self.open_queue()
        await queue.save()
        await self.assertFails(queue.enqueue(make_item("L1"), inline()), QueueUnavailable)


class DestinationCountsTests(TestCase):
    def test_the_top_destinations_are_named_the_rest_summed(self) -> None:
        rows = [("a", "queued", 5), ("b", "deferred", 2), ("b", "queued", 2), ("c", "queued", 1)]
        rows += [("d", "deferred", 1), (None, "queued", 3), ("a", "held", 9)]
        counts = destination_counts(rows, top=2)
        self.assertEqual(
            counts.by_destination, {"a": {"queued": 5, "deferred": 0}, "b": {"queued": 2, "deferred": 2}}
        )
        self.assertEqual(counts.other, {"destinations": 2, "queued": 4, "deferred": 1})
        self.assertTrue(counts.complete)


class MemoryQueueContractTests(QueueContractMixin, TestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def make_queue(self, max_size: int = 0) -> MemoryQueue:
        return MemoryQueue(clock=self.clock, max_size=max_size, spool_directory=self.mktemp())


class MemoryQueueOwnSpoolTests(TestCase):
    async def test_load_warns_that_nothing_survives(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        queue = MemoryQueue(clock=Clock())
        await queue.load()
        self.addCleanup(queue.save)
        warnings = [
            e
            for e in events
            if e["log_namespace"] == "dcrouter.queue.memory" and e["log_level"] == LogLevel.warn
        ]
        self.assertEqual(len(warnings), 1)
        self.assertIn("lost when it exits", formatEvent(warnings[0]))

    def test_open_from_construction_and_every_deferred_fired_at_once(self) -> None:
        queue = MemoryQueue(clock=Clock(), spool_directory=self.mktemp())
        self.assertEqual(self.successResultOf(queue.enqueue(make_item("M1"), inline())), make_item("M1"))
        queue.pause()
        self.assertEqual(self.successResultOf(queue.get_next()), [])
        self.assertFalse(queue.is_processing())
        self.assertIsNone(self.successResultOf(queue.save()))
        self.assertIsNone(self.successResultOf(queue.save()))  # a second save is the same close
        self.failureResultOf(queue.enqueue(make_item("M2"), inline()), QueueUnavailable)
        self.assertIsNone(self.successResultOf(queue.get("M1")))  # dropped at save

    async def test_owned_spool_directory_removed_at_save(self) -> None:
        queue = MemoryQueue(clock=Clock())
        await queue.load()
        spool = queue.spool_directory
        body = os.urandom(1000)
        await queue.enqueue(make_item("O1"), spool_file(queue, body))
        self.assertEqual(await read_body(queue, "O1"), body)
        await queue.save()
        self.assertFalse(os.path.exists(spool))


class DiskQueueContractTests(QueueContractMixin, TestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def make_queue(self, max_size: int = 0) -> DiskQueue:
        return DiskQueue(self.mktemp(), reactor=reactor, clock=self.clock, max_size=max_size)
