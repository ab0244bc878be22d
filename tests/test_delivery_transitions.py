"""The outcome transitions on their own: from an item, an attempt's results, the retry policy and a time, the
changes to write and the DSN to queue (the manager applying them to real queues is test_delivery_manager)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from dcrouter.delivery.bounces import DsnRequest, dsn_queue_id
from dcrouter.delivery.outcome import DeliveryReport, Outcome, RecipientResult
from dcrouter.delivery.retry import RetryDecision, RetryPolicy
from dcrouter.delivery.transitions import (
    Assessment,
    Next,
    Transition,
    assess,
    deferral,
    failed_recipients,
    finish,
    give_up,
    give_up_reason,
    one_result_each,
    put_back,
    record_group,
    routing_failed,
)
from dcrouter.mail.envelope import Envelope
from dcrouter.queue.item import Priority, QueueItem, QueueItemStatus

NOW = 1_700_000_000.0
POLICY = RetryPolicy(max_retries=3, base_delay=300, max_delay=14_400, lifetime=432_000)


def item(*rcpts: str, sender: str = "alice@senders.test", **fields: object) -> QueueItem:
    envelope = Envelope(mail_from=sender, recipients=list(rcpts or ["bob@a.test"]))
    fields.setdefault("created_at", NOW - 60)
    fields.setdefault("status", QueueItemStatus.DELIVERING)
    return QueueItem(id="Q1", envelope=envelope, size=10, **fields)  # type: ignore[arg-type]


def result(rcpt: str, reply: str, target: str = "mx.a.test:25") -> RecipientResult:
    code, enhanced, text = reply.split(" ", 2)
    kind = {"2": Outcome.DELIVERED, "4": Outcome.TEMPORARY, "5": Outcome.PERMANENT}[code[0]]
    return RecipientResult(rcpt, kind, int(code), enhanced, text, target)


def outcome(kind: str, reply: str, target: str = "mx.a.test:25", route: str = "rule:a.test") -> dict:
    return {"outcome": kind, "reply": reply, "target": target, "at": NOW - 10, "route": route}


class ReportTests(SynchronousTestCase):
    def test_one_result_each_in_the_group_order(self) -> None:
        report = DeliveryReport(
            "rule:a.test",
            [result("carol@a.test", "250 2.0.0 Ok"), result("eve@x.test", "250 2.0.0 Ok")],
            ["mx.a.test:25 answered"],
        )
        complete = one_result_each("rule:a.test", report, ["bob@a.test", "carol@a.test"])
        self.assertEqual(
            [(r.recipient, r.outcome, r.reply, r.target) for r in complete.results],
            [
                ("bob@a.test", Outcome.TEMPORARY, "451 4.3.0 No result for this recipient (local error)", ""),
                ("carol@a.test", Outcome.DELIVERED, "250 2.0.0 Ok", "mx.a.test:25"),
            ],
        )
        self.assertEqual((complete.route_name, complete.tried), ("rule:a.test", ["mx.a.test:25 answered"]))

    def test_routing_failure_is_temporary_for_every_pending_recipient(self) -> None:
        failed = routing_failed(["bob@a.test", "carol@b.test"])
        self.assertEqual(list(failed), ["bob@a.test", "carol@b.test"])
        self.assertEqual(
            {(r.outcome, r.reply) for r in failed.values()},
            {(Outcome.TEMPORARY, "451 4.3.0 Local error in routing")},
        )


class RecordGroupTests(SynchronousTestCase):
    def test_final_outcomes_and_a_history_entry(self) -> None:
        queued = item("bob@a.test", "carol@a.test", "dave@a.test")
        report = DeliveryReport(
            "rule:a.test",
            [
                result("bob@a.test", "250 2.0.0 Ok"),
                result("carol@a.test", "451 4.2.0 Try later"),
                result("dave@a.test", "550 5.1.1 No such user"),
            ],
            ["mx.a.test:25 answered"],
        )
        changes = record_group(queued, "rule:a.test", report, NOW).changes
        self.assertEqual(set(changes), {"outcomes", "history", "destination"})
        self.assertEqual(
            changes["outcomes"],
            {
                "bob@a.test": {
                    "outcome": "delivered",
                    "reply": "250 2.0.0 Ok",
                    "target": "mx.a.test:25",
                    "at": NOW,
                    "route": "rule:a.test",
                },
                "dave@a.test": {
                    "outcome": "permanent",
                    "reply": "550 5.1.1 No such user",
                    "target": "mx.a.test:25",
                    "at": NOW,
                    "route": "rule:a.test",
                },
            },
        )
        [entry] = changes["history"]
        self.assertEqual(
            (entry["at"], entry["route"], entry["tried"]), (NOW, "rule:a.test", ["mx.a.test:25 answered"])
        )
        self.assertEqual(
            [(r["recipient"], r["outcome"], r["reply"]) for r in entry["results"]],
            [
                ("bob@a.test", "delivered", "250 2.0.0 Ok"),
                ("carol@a.test", "temporary", "451 4.2.0 Try later"),
                ("dave@a.test", "permanent", "550 5.1.1 No such user"),
            ],
        )
        self.assertEqual({r["target"] for r in entry["results"]}, {"mx.a.test:25"})
        self.assertEqual(set(entry), {"at", "route", "tried", "results"})
        self.assertEqual(changes["destination"], "rule:a.test")
        self.assertEqual(queued.outcomes, {})  # the item itself is not changed

    def test_keeps_earlier_outcomes_history_and_destination(self) -> None:
        earlier = {"bob@a.test": outcome("delivered", "250 2.0.0 Ok")}
        queued = item(
            "bob@a.test",
            "carol@b.test",
            outcomes=earlier,
            history=[{"route": "rule:a.test"}],
            destination="x",
        )
        report = DeliveryReport("rule:b.test", [result("carol@b.test", "452 4.2.2 Full", "mx.b.test:25")])
        changes = record_group(queued, "rule:b.test", report, NOW).changes
        self.assertEqual(changes["outcomes"], earlier)
        self.assertEqual([h["route"] for h in changes["history"]], ["rule:a.test", "rule:b.test"])
        self.assertNotIn("destination", changes)
        self.assertNotIn("status", changes)

    def test_the_last_delivery_writes_the_status_too(self) -> None:
        """A fully delivered message's outcomes and status are one write."""
        earlier = {"bob@a.test": outcome("delivered", "250 2.0.0 Ok")}
        queued = item("bob@a.test", "carol@b.test", outcomes=earlier)
        report = DeliveryReport("rule:b.test", [result("carol@b.test", "250 2.0.0 Ok", "mx.b.test:25")])
        changes = record_group(queued, "rule:b.test", report, NOW).changes
        self.assertEqual(changes["status"], QueueItemStatus.DELIVERED)
        self.assertEqual(sorted(changes["outcomes"]), ["bob@a.test", "carol@b.test"])

    def test_no_status_while_some_failed(self) -> None:
        earlier = {"bob@a.test": outcome("permanent", "550 5.1.1 No such user")}
        queued = item("bob@a.test", "carol@b.test", outcomes=earlier)
        report = DeliveryReport("rule:b.test", [result("carol@b.test", "250 2.0.0 Ok", "mx.b.test:25")])
        self.assertNotIn("status", record_group(queued, "rule:b.test", report, NOW).changes)


class AssessTests(SynchronousTestCase):
    def assess(
        self, queued: QueueItem, *, tried: bool = True, temporary: bool = True, now: float = NOW
    ) -> Assessment:
        return assess(queued, tried=tried, failed_temporarily=temporary, policy=POLICY, now=now)

    def test_nothing_pending_finishes(self) -> None:
        done = item("bob@a.test", outcomes={"bob@a.test": outcome("delivered", "250 2.0.0 Ok")}, attempts=2)
        self.assertEqual(self.assess(done), Assessment(Next.FINISH, 2))

    def test_temporary_failures_defer_and_count_the_attempt(self) -> None:
        self.assertEqual(self.assess(item(attempts=1)), Assessment(Next.DEFER, 2))

    def test_busy_destinations_only_put_back(self) -> None:
        self.assertEqual(
            self.assess(item(attempts=1), tried=False, temporary=False), Assessment(Next.PUT_BACK, 1)
        )
        # Some group tried and delivered, the others found their destination busy: that attempt counts.
        self.assertEqual(
            self.assess(item(attempts=1), tried=True, temporary=False), Assessment(Next.PUT_BACK, 2)
        )
        # An attempt that used no retry does not reach the retry limit...
        self.assertEqual(
            self.assess(item(attempts=3), tried=False, temporary=False), Assessment(Next.PUT_BACK, 3)
        )

    def test_out_of_retries_gives_up(self) -> None:
        self.assertEqual(
            self.assess(item(attempts=2)), Assessment(Next.GIVE_UP, 3, RetryDecision.RETRY_LIMIT)
        )

    def test_expired_gives_up_even_without_trying(self) -> None:
        old = item(created_at=NOW - 432_000)
        self.assertEqual(
            self.assess(old, tried=False, temporary=False), Assessment(Next.GIVE_UP, 0, RetryDecision.EXPIRED)
        )


class DeferralTests(SynchronousTestCase):
    def test_deferred_with_the_first_pending_recipients_error(self) -> None:
        queued = item("bob@a.test", "carol@b.test", "dave@c.test", last_error="old")
        temporary = {"carol@b.test": result("carol@b.test", "452 4.2.2 Full", "mx.b.test:25")}
        transition = deferral(
            queued, temporary, attempts=2, now=NOW, wait=600, destination="rule:a.test", warn=False
        )
        self.assertEqual(
            transition,
            Transition(
                {
                    "status": QueueItemStatus.DEFERRED,
                    "priority": Priority.RETRY,
                    "attempts": 2,
                    "next_attempt_at": NOW + 600,
                    "last_error": "452 4.2.2 Full",
                    "destination": "rule:a.test",
                }
            ),
        )

    def test_keeps_the_last_error_and_destination_it_has(self) -> None:
        changes = deferral(
            item(last_error="451 4.4.1 Refused"),
            {},
            attempts=1,
            now=NOW,
            wait=5,
            destination=None,
            warn=False,
        ).changes
        self.assertEqual(changes["last_error"], "451 4.4.1 Refused")
        self.assertNotIn("destination", changes)

    def test_delay_warning_listing_the_pending_recipients(self) -> None:
        queued = item(
            "bob@a.test",
            "carol@b.test",
            "dave@c.test",
            outcomes={"bob@a.test": outcome("delivered", "250 2.0.0 Ok")},
            last_error="421 4.4.2 Timeout",
        )
        temporary = {"carol@b.test": result("carol@b.test", "452 4.2.2 Full", "mx.b.test:25")}
        transition = deferral(queued, temporary, attempts=7, now=NOW, wait=60, destination=None, warn=True)
        self.assertEqual(
            transition.dsn,
            DsnRequest(
                "delayed",
                (
                    ("carol@b.test", "452 4.2.2 Full", "mx.b.test:25"),
                    ("dave@c.test", "421 4.4.2 Timeout", ""),
                ),
            ),
        )
        self.assertEqual(transition.changes["warned_at"], NOW)
        # Not queued: the deferral is written all the same, without warned_at (the next deferral warns).
        assert transition.unsent is not None
        self.assertEqual(
            dict(transition.unsent), {k: v for k, v in transition.changes.items() if k != "warned_at"}
        )


class PutBackTests(SynchronousTestCase):
    def test_never_tried_goes_back_queued(self) -> None:
        self.assertEqual(
            put_back(item(), now=NOW, delay=1.0).changes,
            {"status": QueueItemStatus.QUEUED, "next_attempt_at": NOW + 1, "attempts": 0},
        )

    def test_tried_before_goes_back_deferred(self) -> None:
        self.assertEqual(
            put_back(item(attempts=2), now=NOW, delay=0.0).changes,
            {"status": QueueItemStatus.DEFERRED, "next_attempt_at": NOW, "attempts": 2},
        )
        self.assertEqual(
            put_back(item(), now=NOW, delay=2.0, attempts=1).changes["status"], QueueItemStatus.DEFERRED
        )


class GiveUpTests(SynchronousTestCase):
    def test_reasons(self) -> None:
        queued = item(created_at=NOW - 1800)
        self.assertEqual(
            give_up_reason(queued, attempts=4, decision=RetryDecision.RETRY_LIMIT, now=NOW),
            "Retry limit reached after 4 attempts",
        )
        self.assertEqual(
            give_up_reason(queued, attempts=4, decision=RetryDecision.EXPIRED, now=NOW),
            "Message expired after 0.5 hours in the queue",
        )

    def test_every_pending_recipient_fails_with_its_last_error(self) -> None:
        queued = item(
            "bob@a.test",
            "carol@b.test",
            "dave@c.test",
            outcomes={"bob@a.test": outcome("delivered", "250 2.0.0 Ok")},
        )
        temporary = {"carol@b.test": result("carol@b.test", "452 4.2.2 Full", "mx.b.test:25")}
        changes = give_up(
            queued, temporary, attempts=3, reason="Retry limit reached after 3 attempts", now=NOW
        ).changes
        self.assertEqual(set(changes), {"outcomes", "attempts", "last_error"})
        self.assertEqual(
            (changes["attempts"], changes["last_error"]), (3, "4.4.7 Retry limit reached after 3 attempts")
        )
        self.assertEqual(changes["outcomes"]["bob@a.test"], queued.outcomes["bob@a.test"])
        self.assertEqual(
            changes["outcomes"]["carol@b.test"],
            {
                "outcome": "permanent",
                "reply": "451 4.4.7 Retry limit reached after 3 attempts; last error: 452 4.2.2 Full",
                "target": "mx.b.test:25",
                "at": NOW,
                "route": "",
            },
        )
        self.assertEqual(
            changes["outcomes"]["dave@c.test"]["reply"],
            "451 4.4.7 Retry limit reached after 3 attempts; last error: none",
        )


class FinishTests(SynchronousTestCase):
    def test_all_delivered(self) -> None:
        done = item("bob@a.test", outcomes={"bob@a.test": outcome("delivered", "250 2.0.0 Ok")})
        self.assertEqual(
            finish(done, now=NOW, retry_delay=300), Transition({"status": QueueItemStatus.DELIVERED})
        )

    def test_the_null_sender_fails_without_a_dsn(self) -> None:
        done = item("bob@a.test", sender="", outcomes={"bob@a.test": outcome("permanent", "550 5.1.1 No")})
        self.assertEqual(
            finish(done, now=NOW, retry_delay=300), Transition({"status": QueueItemStatus.FAILED})
        )

    def test_bounce_listing_the_failed_recipients(self) -> None:
        done = item(
            "bob@a.test",
            "carol@b.test",
            "dave@c.test",
            outcomes={
                "carol@b.test": outcome("permanent", "550 5.1.1 No such user", "mx.b.test:25"),
                "bob@a.test": outcome("delivered", "250 2.0.0 Ok"),
                "dave@c.test": outcome("permanent", "451 4.4.7 Retry limit reached", ""),
            },
        )
        self.assertEqual(failed_recipients(done), ["carol@b.test", "dave@c.test"])
        self.assertEqual(
            finish(done, now=NOW, retry_delay=300),
            Transition(
                {"status": QueueItemStatus.BOUNCED, "bounce_id": "Q1B"},
                DsnRequest(
                    "failed",
                    (
                        ("carol@b.test", "550 5.1.1 No such user", "mx.b.test:25"),
                        ("dave@c.test", "451 4.4.7 Retry limit reached", ""),
                    ),
                ),
                unsent={
                    "status": QueueItemStatus.DEFERRED,
                    "next_attempt_at": NOW + 300,
                    "last_error": "4.3.0 Cannot queue the bounce",
                },
            ),
        )

    def test_bounce_id_of_a_long_queue_id(self) -> None:
        done = item("bob@a.test", outcomes={"bob@a.test": outcome("permanent", "550 5.1.1 No")}).evolve(
            id="X" * 64
        )
        bounce_id = finish(done, now=NOW, retry_delay=300).changes["bounce_id"]
        self.assertEqual(bounce_id, dsn_queue_id("X" * 64, "failed"))
        self.assertEqual(len(bounce_id), 41)
