"""Destination-aware scheduling on the Clock: messages are queued with their destination, and each look's
claim is shared between destinations (dcrouter.delivery.slots.RouteSlots.schedule, applied by the queue)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from dcrouter.config.smtp import DeliveryConfig
from dcrouter.delivery.outcome import DeliveryReport, Outcome, RecipientResult
from dcrouter.delivery.route import Route
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.queue.item import QueueItemStatus
from tests.results import result_of
from tests.test_delivery_manager import BODY, START, ManagerTestsBase, ScriptedTransport


class DownAwareTransport(ScriptedTransport):
    """A ScriptedTransport where routes in ``down`` reach no server (``451 4.4.1``, no target) and calls to
    routes in ``slow`` are held until the test releases them."""

    def __init__(self, queue: Any, clock: Any) -> None:
        super().__init__(queue, clock)
        self.down: set[str] = set()
        self.slow: set[str] = set()
        self.slow_held: list[Deferred] = []
        self.on_call = self._hold_slow

    def _hold_slow(self, call: dict[str, Any]) -> Deferred | None:
        if call["route"] in self.slow:
            d: Deferred = Deferred()
            self.slow_held.append(d)
            return d
        return None

    def _answer(self, rcpt: str, route: Route) -> RecipientResult:
        if route.name in self.down:
            refused = f"Connection refused by {route.name}"
            return RecipientResult(rcpt, Outcome.TEMPORARY, 451, "4.4.1", refused)
        return super()._answer(rcpt, route)

    def release_slow(self) -> None:
        self.slow_held.pop(0).callback(None)


class SchedulingTests(ManagerTestsBase):
    def setUp(self) -> None:
        super().setUp()
        self.transport = DownAwareTransport(self.queue, self.clock)

    def start(self, **changes: Any) -> Any:
        manager = super().start(**changes)
        self.processor.destination_of = manager.destination_of
        return manager

    def queue_only(self, rcpt: str) -> str:
        """Queue a message without waking delivery (a backlog built while delivery is paused)."""
        now = self.clock.seconds()
        envelope = Envelope(mail_from="alice@senders.test", recipients=[rcpt], received_at=now)
        return result_of(self.processor.process(envelope, SpooledMessage(len(BODY), data=BODY))).id

    def routes_called(self) -> list[str]:
        return [c["route"] for c in self.transport.calls]

    def test_messages_are_queued_with_their_destination(self) -> None:
        self.start()
        self.manager.pause_deliveries()
        qid = self.queue_only("bob@a.test")
        self.assertEqual(self.item(qid).destination, "rule:a.test")

    def test_slow_destination_keeps_to_its_slots_and_holds_back_nobody(self) -> None:
        """A backlog for a destination that answers slowly: it gets its maxPerDestination slots and as many
        claimed messages waiting, no more (nothing put back, the rest stays queued); mail for another
        destination queued behind the backlog starts at once."""
        self.start(max_per_destination=2, delivery=DeliveryConfig(concurrent_deliveries=10))
        self.transport.slow.add("rule:slow.test")
        self.manager.pause_deliveries()
        backlog = [self.queue_only(f"r{n}@slow.test") for n in range(30)]
        self.manager.resume_deliveries()
        self.clock.advance(0)
        self.assertEqual(self.routes_called(), ["rule:slow.test"] * 2)
        self.assertEqual(self.manager.in_flight_by_destination(), {"rule:slow.test": 2})
        statuses = [self.item(q).status for q in backlog]
        self.assertEqual(statuses.count(QueueItemStatus.DELIVERING), 4)  # 2 running, 2 waiting
        self.assertEqual(statuses.count(QueueItemStatus.QUEUED), 26)
        fast = self.send("alice@senders.test", "bob@fast.test")
        self.assertEqual(self.item(fast).status, QueueItemStatus.DELIVERED)
        # As the slow destination answers, its waiting messages start and the next ones are claimed.
        for _ in range(10):
            self.transport.release_slow()
            self.clock.advance(0)
        self.assertEqual(self.manager.in_flight_by_destination(), {"rule:slow.test": 2})
        statuses = [self.item(q).status for q in backlog]
        self.assertEqual(statuses.count(QueueItemStatus.DELIVERED), 10)
        self.assertEqual(statuses.count(QueueItemStatus.DELIVERING), 4)
        self.assertEqual(self.manager.get_delivery_stats()["busy"], 0)  # no put-backs

    def test_round_robin_between_destinations(self) -> None:
        """Each look hands its free slots out in turn to the destinations with due mail, oldest first."""
        self.start(max_per_destination=10, delivery=DeliveryConfig(concurrent_deliveries=5))
        self.transport.hold = True
        self.manager.pause_deliveries()
        for domain in ("a", "b", "c"):
            for n in range(10):
                self.queue_only(f"r{n}@{domain}.test")
        self.manager.resume_deliveries()
        self.clock.advance(0)
        self.assertEqual(
            self.routes_called(),
            ["rule:a.test", "rule:b.test", "rule:c.test", "rule:a.test", "rule:b.test"],
        )

    def test_down_destination_holds_nothing(self) -> None:
        """A destination that reaches no server: after its first attempts fail it gets nothing for a
        checkInterval (its mail waits, not claimed, no retry used), then one probe at a time; other mail
        flows meanwhile. Once a probe reaches a server, it gets its full share again."""
        self.start(
            max_per_destination=2, check_interval=10_000, delivery=DeliveryConfig(concurrent_deliveries=10)
        )
        self.transport.down.add("rule:down.test")
        self.manager.pause_deliveries()
        backlog = [self.queue_only(f"r{n}@down.test") for n in range(30)]
        self.manager.resume_deliveries()
        self.clock.advance(0)
        first_wave = self.routes_called().count("rule:down.test")
        self.assertLessEqual(first_wave, 4)  # one claim's share: 2 slots + 2 waiting places
        for n in range(5):
            self.send("alice@senders.test", f"r{n}@fast.test")
        self.advance_to(START + 9)
        self.assertEqual(self.routes_called().count("rule:down.test"), first_wave)
        self.assertEqual(self.routes_called().count("rule:fast.test"), 5)
        self.assertEqual(self.manager.in_flight_by_destination(), {})
        untouched = [q for q in backlog if self.item(q).attempts == 0]
        self.assertEqual(len(untouched), 30 - first_wave)
        self.assertEqual({self.item(q).status for q in untouched}, {QueueItemStatus.QUEUED})
        # After a checkInterval: one probe per look, each failing puts it down again.
        self.advance_to(START + 11)
        self.assertEqual(self.routes_called().count("rule:down.test"), first_wave + 1)
        # It comes back: the next probe reaches it, and its backlog flows at its full share.
        self.transport.down.clear()
        self.advance_to(START + 22)
        self.assertEqual(
            sum(1 for q in backlog if self.item(q).status is QueueItemStatus.DELIVERED), 30 - first_wave - 1
        )


class ReachedTests(ManagerTestsBase):
    def test_any_answer_counts_as_reached(self) -> None:
        from dcrouter.delivery.manager import _reached

        answered = RecipientResult("a@b", Outcome.TEMPORARY, 451, "4.7.1", "greylisted", "mx.b:25")
        refused = RecipientResult("a@b", Outcome.TEMPORARY, 451, "4.4.1", "Connection refused by mx.b")
        self.assertTrue(_reached(DeliveryReport("r", [answered])))
        self.assertFalse(_reached(DeliveryReport("r", [refused])))
        self.assertFalse(_reached(DeliveryReport("r", [])))
