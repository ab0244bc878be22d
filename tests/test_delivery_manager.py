"""DeliveryManager against the real queues, a real RecipientRouter and a transport that answers on script.

The transport here is a collaborator, not a mock of the manager: it answers per recipient from a script
(``250`` unless told otherwise) and records what it was asked to deliver, reading the body through
``open_body`` as the real one does. Every timer runs on a ``Clock``.
"""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dcrouter.config.delivery import DeliveryConfig
from dcrouter.config.smtp import SmtpConfig
from dcrouter.delivery.bounces import dsn_queue_id
from dcrouter.delivery.manager import DeliveryManager
from dcrouter.delivery.outcome import DeliveryReport, Outcome, RecipientResult
from dcrouter.delivery.route import Route
from dcrouter.delivery.routing import RecipientRouter
from dcrouter.interfaces import ClaimLost, IDeliveryTransport, IRoutingRule, QueueUnavailable
from dcrouter.log import levels, set_level
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.processing.processor import EmailProcessor
from dcrouter.queue.contract import ClaimSchedule
from dcrouter.queue.disk import DiskQueue
from dcrouter.queue.item import Priority, QueueItem, QueueItemStatus
from dcrouter.queue.memory import MemoryQueue
from dcrouter.queue.operations import NotFound, WrongStatus
from tests.results import result_of

START = 1_700_000_000.0
BODY = b"From: alice@senders.test\r\nSubject: hi\r\n\r\n.\r\n..x\r\n8-bit \xc3\xa9t\xc3\xa9\r\n"

OUTCOMES = {"2": Outcome.DELIVERED, "4": Outcome.TEMPORARY, "5": Outcome.PERMANENT}


@implementer(IRoutingRule)
class DomainRule:
    """Routes every recipient to ``rule:<its domain>`` with one target named after the domain."""

    name = "by-domain"
    priority = 0

    def route(self, sender: str, recipient: str) -> Route | None:
        domain = recipient.rpartition("@")[2]
        return Route(name=f"rule:{domain}", targets=(f"mx.{domain}",), port=25)


@implementer(IDeliveryTransport)
class ScriptedTransport:
    """Answers each recipient with the next reply of its script (then ``250 2.0.0 Ok``). With ``hold``, the
    report is given only when the test releases the call."""

    def __init__(self, queue: Any, clock: Clock) -> None:
        self.queue = queue
        self.clock = clock
        self.script: dict[str, list[str]] = {}
        self.calls: list[dict[str, Any]] = []
        self.hold = False
        self.held: list[tuple[Deferred, DeliveryReport]] = []
        self.on_call: Callable[[dict[str, Any]], Deferred | None] | None = None

    def deliver(self, item: QueueItem, route: Route, recipients: list[str], open_body: Any) -> Deferred:
        return Deferred.fromCoroutine(self._deliver(item, route, recipients, open_body))

    async def _deliver(self, item: QueueItem, route: Route, recipients: list[str], open_body: Any) -> Any:
        stream = await open_body()
        try:
            body = stream.read()
        finally:
            stream.close()
        stored = await self.queue.get(item.id)
        call = {
            "id": item.id,
            "route": route.name,
            "rcpts": list(recipients),
            "body": body,
            "at": self.clock.seconds(),
            "outcomes_before": dict(stored.outcomes),
        }
        self.calls.append(call)
        results = [self._answer(rcpt, route) for rcpt in recipients]
        report = DeliveryReport(route.name, results, [f"{route.targets[0]}:25 answered"])
        if self.on_call is not None:
            waiting = self.on_call(call)
            if waiting is not None:
                await waiting
        if self.hold:
            d: Deferred = Deferred()
            self.held.append((d, report))
            return await d
        return report

    def _answer(self, rcpt: str, route: Route) -> RecipientResult:
        replies = self.script.get(rcpt) or []
        reply = replies.pop(0) if replies else "250 2.0.0 Ok"
        code, enhanced, text = reply.split(" ", 2)
        return RecipientResult(rcpt, OUTCOMES[code[0]], int(code), enhanced, text, f"{route.targets[0]}:25")

    def release(self, index: int = 0) -> None:
        d, report = self.held.pop(index)
        d.callback(report)

    def to(self, rcpt: str) -> list[dict[str, Any]]:
        return [c for c in self.calls if rcpt in c["rcpts"]]


def config(**changes: Any) -> SmtpConfig:
    delivery = changes.pop("delivery", DeliveryConfig())
    settings: dict[str, Any] = {"hostname": "mx.test", "delivery": delivery, "delay_warning_after": 0}
    settings.update(changes)
    return SmtpConfig(**settings)


class ManagerTestsBase(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.queue = MemoryQueue(clock=self.clock)
        self.addCleanup(self.queue.save)
        self.transport = ScriptedTransport(self.queue, self.clock)

    def start(self, **changes: Any) -> DeliveryManager:
        self.config = config(**changes)
        self.processor = EmailProcessor(self.queue, self.clock.seconds)
        self.manager = DeliveryManager(
            queue=self.queue,
            routes=RecipientRouter(self.config, rules=[DomainRule()]),
            transport=self.transport,
            submit_dsn=self.processor.submit_local,
            config=self.config,
            clock=self.clock,
            random=lambda: 0.5,
        )
        self.manager.startService()
        self.addCleanup(self.stop)
        self.clock.advance(0)  # the first look, on an empty queue
        return self.manager

    def stop(self) -> None:
        if self.manager.running:
            self.manager.stop_grace = 0
            d = self.manager.stopService()
            self.clock.advance(0)
            result_of(d)

    def send(self, sender: str, *rcpts: str, queue_id: str | None = None) -> str:
        envelope = Envelope(mail_from=sender, recipients=list(rcpts), received_at=self.clock.seconds())
        item = result_of(self.processor.process(envelope, SpooledMessage(len(BODY), data=BODY), queue_id))
        self.manager.wake()
        self.clock.advance(0)
        return item.id

    def item(self, item_id: str) -> QueueItem:
        found = result_of(self.queue.get(item_id))
        assert found is not None
        return found

    def advance_to(self, when: float) -> None:
        """Advance the clock to ``when`` (absolute), one second at a time, so every tick runs."""
        while self.clock.seconds() < when:
            self.clock.advance(min(1.0, when - self.clock.seconds()))
        self.clock.advance(0)


class DeliveryTests(ManagerTestsBase):
    def test_transport_and_rule_fit_the_interfaces(self) -> None:
        self.assertTrue(verifyObject(IDeliveryTransport, self.transport))
        self.assertTrue(verifyObject(IRoutingRule, DomainRule()))

    def test_delivers_on_wake(self) -> None:
        self.start()
        qid = self.send("alice@senders.test", "bob@a.test", "carol@a.test")
        self.assertEqual(
            [(c["id"], c["route"], c["rcpts"]) for c in self.transport.calls],
            [(qid, "rule:a.test", ["bob@a.test", "carol@a.test"])],
        )
        self.assertEqual(self.transport.calls[0]["body"], BODY)
        item = self.item(qid)
        self.assertEqual(item.status, QueueItemStatus.DELIVERED)
        self.assertEqual(item.destination, "rule:a.test")
        self.assertEqual(
            {r: o["outcome"] for r, o in item.outcomes.items()},
            {"bob@a.test": "delivered", "carol@a.test": "delivered"},
        )
        self.assertEqual(item.outcomes["bob@a.test"]["reply"], "250 2.0.0 Ok")
        self.assertEqual(item.outcomes["bob@a.test"]["target"], "mx.a.test:25")
        [entry] = item.history
        self.assertEqual(entry["route"], "rule:a.test")
        self.assertEqual(entry["at"], START)
        self.assertEqual(entry["tried"], ["mx.a.test:25 answered"])
        self.assertEqual([r["outcome"] for r in entry["results"]], ["delivered", "delivered"])
        self.assertIsNone(item.bounce_id)
        stats = self.manager.get_delivery_stats()
        self.assertEqual((stats["delivered"], stats["recipients_delivered"], stats["in_flight"]), (1, 2, 0))

    def test_one_info_line_per_outcome_that_matters(self) -> None:
        # Delivered recipients are said once, by the transport's line about the attempt: the manager's own
        # lines for them are debug (dropped by default). A deferred recipient keeps its info line and reply.
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.transport.script["bob@a.test"] = ["451 4.2.0 Try later"]
        self.start()
        qid = self.send("alice@senders.test", "bob@a.test", "carol@a.test")
        lines = [
            (e["log_level"], formatEvent(e))
            for e in events
            if e.get("log_namespace") == "dcrouter.delivery.manager" and e.get("queue_id") == qid
        ]
        self.assertIn(
            (LogLevel.info, f"{qid} to bob@a.test via rule:a.test: temporary (451 4.2.0 Try later)"), lines
        )
        self.assertFalse([line for line in lines if "carol@a.test" in line[1]], lines)
        set_level("debug", "dcrouter.delivery.manager")
        self.addCleanup(levels.clearLogLevels)
        other = self.send("alice@senders.test", "dave@a.test")
        self.assertEqual(
            [(e["log_level"], formatEvent(e)) for e in events if e.get("queue_id") == other],
            [
                (LogLevel.debug, f"{other} to dave@a.test via rule:a.test: delivered (250 2.0.0 Ok)"),
                (LogLevel.debug, f"{other} delivered"),
            ],
        )

    def test_timer_finds_due_items_without_wake(self) -> None:
        self.start(check_interval=5_000)
        envelope = Envelope(mail_from="alice@senders.test", recipients=["bob@a.test"])
        result_of(self.processor.process(envelope, SpooledMessage(len(BODY), data=BODY)))
        self.clock.advance(4.9)
        self.assertEqual(self.transport.calls, [])
        self.clock.advance(0.1)
        self.clock.advance(0)
        self.assertEqual(len(self.transport.calls), 1)

    def test_three_routes_recorded_before_the_next_is_tried(self) -> None:
        self.start()
        qid = self.send("alice@senders.test", "b@one.test", "c@two.test", "d@one.test", "e@three.test")
        self.assertEqual(
            [(c["route"], c["rcpts"]) for c in self.transport.calls],
            [
                ("rule:one.test", ["b@one.test", "d@one.test"]),
                ("rule:two.test", ["c@two.test"]),
                ("rule:three.test", ["e@three.test"]),
            ],
        )
        # What the queue held when each group was handed to the transport: the earlier groups, durably.
        self.assertEqual(
            [sorted(c["outcomes_before"]) for c in self.transport.calls],
            [[], ["b@one.test", "d@one.test"], ["b@one.test", "c@two.test", "d@one.test"]],
        )
        item = self.item(qid)
        self.assertEqual(item.status, QueueItemStatus.DELIVERED)
        self.assertEqual(
            [h["route"] for h in item.history], ["rule:one.test", "rule:two.test", "rule:three.test"]
        )

    def test_temporary_failure_retried_on_schedule(self) -> None:
        self.start(base_retry_delay=300_000)
        self.transport.script["bob@a.test"] = ["451 4.2.0 Try later"]
        qid = self.send("alice@senders.test", "bob@a.test", "carol@b.test")
        item = self.item(qid)
        self.assertEqual(item.status, QueueItemStatus.DEFERRED)
        self.assertEqual(item.priority, Priority.RETRY)
        self.assertEqual(item.attempts, 1)
        self.assertEqual(item.next_attempt_at, START + 300)
        self.assertEqual(item.last_error, "451 4.2.0 Try later")
        self.assertEqual(item.pending_recipients(), ["bob@a.test"])
        self.assertEqual(item.destination, "rule:a.test")
        self.assertEqual(self.manager.last_errors(), {"rule:a.test": ("451 4.2.0 Try later", START)})
        self.advance_to(START + 299)
        self.assertEqual(len(self.transport.to("bob@a.test")), 1)
        self.advance_to(START + 300)
        self.assertEqual([c["at"] for c in self.transport.to("bob@a.test")], [START, START + 300])
        # carol was delivered the first time and is never sent to again.
        self.assertEqual(len(self.transport.to("carol@b.test")), 1)
        item = self.item(qid)
        self.assertEqual(item.status, QueueItemStatus.DELIVERED)
        self.assertEqual(item.attempts, 1)
        self.assertEqual(len(item.history), 3)

    def test_backoff_doubles_up_to_the_cap_then_bounces(self) -> None:
        self.start(base_retry_delay=60_000, max_retry_delay=150_000, max_retries=4)
        self.transport.script["bob@a.test"] = ["451 4.4.1 Connection refused"] * 10
        qid = self.send("alice@senders.test", "bob@a.test")
        self.advance_to(START + 1000)
        self.assertEqual([c["at"] - START for c in self.transport.to("bob@a.test")], [0, 60, 180, 330])
        item = self.item(qid)
        self.assertEqual(item.status, QueueItemStatus.BOUNCED)
        self.assertEqual(item.attempts, 4)
        reply = item.outcomes["bob@a.test"]["reply"]
        self.assertTrue(reply.startswith("451 4.4.7 Retry limit reached after 4 attempts"), reply)
        self.assertIn("last error: 451 4.4.1 Connection refused", reply)
        dsn = self.dsn(item)
        rcpt = dsn.get_payload()[1].get_payload()[1]
        self.assertEqual(rcpt["Status"], "4.4.7")
        self.assertEqual(rcpt["Action"], "failed")

    def test_jitter_comes_from_the_injected_random(self) -> None:
        self.start(base_retry_delay=300_000)
        self.manager._random = lambda: 0.0  # the constructor argument, set late for this test
        self.transport.script["bob@a.test"] = ["421 4.4.2 Timeout"]
        qid = self.send("alice@senders.test", "bob@a.test")
        self.assertEqual(self.item(qid).next_attempt_at, START + 270)

    def dsn(self, item: QueueItem) -> email.message.Message:
        assert item.bounce_id is not None
        body = result_of(self.queue.open_body(item.bounce_id)).read()
        return email.message_from_bytes(body, policy=email.policy.compat32)


class BounceTests(ManagerTestsBase):
    def dsn_of(self, dsn_id: str) -> email.message.Message:
        body = result_of(self.queue.open_body(dsn_id)).read()
        return email.message_from_bytes(body, policy=email.policy.compat32)

    def test_permanent_failure_bounces_once_to_the_sender_route(self) -> None:
        self.start()
        self.transport.script["bob@a.test"] = ["550 5.1.1 No such user"]
        qid = self.send("alice@senders.test", "bob@a.test", "carol@a.test", "dave@b.test")
        item = self.item(qid)
        self.assertEqual(item.status, QueueItemStatus.BOUNCED)
        self.assertEqual(item.bounce_id, qid + "B")
        self.assertEqual(item.outcomes["bob@a.test"]["outcome"], "permanent")
        bounce = self.item(qid + "B")
        self.assertEqual(bounce.envelope.mail_from, "")
        self.assertEqual(bounce.envelope.recipients, ["alice@senders.test"])
        self.assertEqual(bounce.priority, Priority.BOUNCE)
        # The bounce is routed and delivered like any message: to the sender's route.
        [call] = [c for c in self.transport.calls if c["id"] == qid + "B"]
        self.assertEqual((call["route"], call["rcpts"]), ("rule:senders.test", ["alice@senders.test"]))
        self.assertEqual(bounce.status, QueueItemStatus.DELIVERED)
        msg = email.message_from_bytes(call["body"], policy=email.policy.compat32)
        self.assertEqual(msg["To"], "<alice@senders.test>")
        self.assertEqual(msg["Message-ID"], f"<{qid}B@mx.test>")
        recipients = msg.get_payload()[1].get_payload()[1:]
        self.assertEqual([r["Final-Recipient"] for r in recipients], ["rfc822; bob@a.test"])
        self.assertEqual(recipients[0]["Diagnostic-Code"], "smtp; 550 5.1.1 No such user")
        self.assertEqual(recipients[0]["Remote-MTA"], "dns; mx.a.test")
        headers = msg.get_payload()[2].get_payload(decode=True)
        self.assertEqual(headers, b"From: alice@senders.test\r\nSubject: hi\r\n")
        stats = self.manager.get_delivery_stats()
        self.assertEqual((stats["bounced"], stats["dsn_sent"], stats["recipients_failed"]), (1, 1, 1))

    def test_every_failed_recipient_in_one_dsn(self) -> None:
        self.start(max_retries=1)
        self.transport.script["bob@a.test"] = ["550 5.1.1 No such user"]
        self.transport.script["carol@b.test"] = ["452 4.2.2 Mailbox full"]
        qid = self.send("alice@senders.test", "bob@a.test", "carol@b.test")
        item = self.item(qid)
        self.assertEqual(item.status, QueueItemStatus.BOUNCED)
        msg = self.dsn_of(qid + "B")
        rcpts = msg.get_payload()[1].get_payload()[1:]
        self.assertEqual(
            [(r["Final-Recipient"], r["Status"]) for r in rcpts],
            [("rfc822; bob@a.test", "5.1.1"), ("rfc822; carol@b.test", "4.4.7")],
        )
        # One DSN, itself delivered to the sender.
        self.assertEqual(self.item(qid + "B").status, QueueItemStatus.DELIVERED)

    def test_null_sender_never_gets_a_bounce(self) -> None:
        self.start()
        self.transport.script["bob@a.test"] = ["550 5.1.1 No such user"]
        qid = self.send("", "bob@a.test")
        item = self.item(qid)
        self.assertEqual(item.status, QueueItemStatus.FAILED)
        self.assertIsNone(item.bounce_id)
        self.assertIsNone(result_of(self.queue.get(dsn_queue_id(qid, "failed"))))
        self.assertEqual(len(self.transport.calls), 1)
        self.assertEqual(self.manager.get_delivery_stats()["failed"], 1)

    def test_expired_message_bounces_with_4_4_7(self) -> None:
        self.start(queue_lifetime=1_000_000, base_retry_delay=600_000, max_retry_delay=3_600_000)
        self.transport.script["bob@a.test"] = ["421 4.4.2 Timeout"] * 10
        qid = self.send("alice@senders.test", "bob@a.test")
        self.advance_to(START + 2000)
        self.assertEqual([c["at"] - START for c in self.transport.to("bob@a.test")], [0, 600, 1800])
        item = self.item(qid)
        self.assertEqual(item.status, QueueItemStatus.BOUNCED)
        self.assertIn("451 4.4.7 Message expired after 0.5 hours", item.outcomes["bob@a.test"]["reply"])
        self.assertIn("last error: 421 4.4.2 Timeout", item.outcomes["bob@a.test"]["reply"])

    def test_bounce_already_queued_before_a_crash_is_not_sent_twice(self) -> None:
        """A crash after the DSN was queued but before BOUNCED was written: the next attempt finds nothing
        pending, re-queues the DSN under the same id, which the queue refuses: still one bounce."""
        self.start()
        self.manager.pause_deliveries()
        qid = self.send("alice@senders.test", "bob@a.test")
        earlier = Envelope(mail_from="", recipients=["alice@senders.test"])
        result_of(self.processor.process(earlier, SpooledMessage(5, data=b"first"), qid + "B"))
        result_of(
            self.queue.update(
                qid,
                outcomes={
                    "bob@a.test": {
                        "outcome": "permanent",
                        "reply": "550 5.1.1 No such user",
                        "target": "mx.a.test:25",
                        "at": START,
                        "route": "rule:a.test",
                    }
                },
            )
        )
        [claimed] = result_of(self.queue.get_next(1))
        item = result_of(Deferred.fromCoroutine(self.manager.deliver_message(claimed)))
        self.assertEqual(item.status, QueueItemStatus.BOUNCED)
        self.assertEqual(item.bounce_id, qid + "B")
        self.assertEqual(self.transport.calls, [])  # nothing pending: nothing re-sent
        self.assertEqual(result_of(self.queue.open_body(qid + "B")).read(), b"first")

    def test_bounce_retried_when_the_queue_refuses_it(self) -> None:
        self.start()
        self.transport.script["bob@a.test"] = ["550 5.1.1 No such user"]
        self.queue.max_size = 1  # the original fills the queue: the DSN gets QueueFull
        qid = self.send("alice@senders.test", "bob@a.test")
        item = self.item(qid)
        self.assertEqual(item.status, QueueItemStatus.DEFERRED)
        self.assertIsNone(item.bounce_id)
        self.assertEqual(len(self.flushLoggedErrors()), 1)
        self.queue.max_size = 0
        self.advance_to(START + 300)
        item = self.item(qid)
        self.assertEqual(item.status, QueueItemStatus.BOUNCED)
        self.assertEqual(len(self.transport.to("bob@a.test")), 1)


class DelayWarningTests(ManagerTestsBase):
    def test_warned_once_after_the_threshold(self) -> None:
        self.start(delay_warning_after=500_000, base_retry_delay=300_000)
        self.transport.script["bob@a.test"] = ["451 4.2.2 Mailbox full"] * 5
        qid = self.send("alice@senders.test", "bob@a.test")
        self.advance_to(START + 300)
        self.assertIsNone(self.item(qid).warned_at)  # 300 s < 500 s
        self.advance_to(START + 900)
        item = self.item(qid)
        self.assertEqual(item.warned_at, START + 900)
        warning = self.item(qid + "W")
        self.assertEqual(warning.envelope.recipients, ["alice@senders.test"])
        self.assertEqual(warning.priority, Priority.BOUNCE)
        body = result_of(self.queue.open_body(qid + "W")).read()
        msg = email.message_from_bytes(body, policy=email.policy.compat32)
        self.assertEqual(msg["Subject"], "Delayed Mail (still being retried)")
        rcpt = msg.get_payload()[1].get_payload()[1]
        self.assertEqual((rcpt["Action"], rcpt["Status"]), ("delayed", "4.2.2"))
        self.advance_to(START + 2100)
        self.assertEqual(len(self.transport.to("bob@a.test")), 4)
        self.assertEqual(self.item(qid).warned_at, START + 900)
        self.assertEqual(self.manager.get_delivery_stats()["delay_warnings"], 1)

    def test_never_for_the_null_sender(self) -> None:
        self.start(delay_warning_after=1_000, base_retry_delay=300_000)
        self.transport.script["bob@a.test"] = ["451 4.2.2 Mailbox full"] * 5
        qid = self.send("", "bob@a.test")
        self.advance_to(START + 300)
        self.assertIsNone(self.item(qid).warned_at)
        self.assertIsNone(result_of(self.queue.get(qid + "W")))

    def test_off_when_zero(self) -> None:
        self.start(delay_warning_after=0, base_retry_delay=1_000)
        self.transport.script["bob@a.test"] = ["451 4.2.2 Mailbox full"] * 3
        qid = self.send("alice@senders.test", "bob@a.test")
        self.advance_to(START + 10)
        self.assertIsNone(self.item(qid).warned_at)
        self.assertIsNone(result_of(self.queue.get(qid + "W")))


class LimitTests(ManagerTestsBase):
    def test_concurrent_deliveries_bound(self) -> None:
        self.start(delivery=DeliveryConfig(concurrent_deliveries=2))
        self.transport.hold = True
        ids = [self.send("alice@senders.test", f"r@d{n}.test") for n in range(4)]
        self.assertEqual([c["id"] for c in self.transport.calls], ids[:2])
        self.assertEqual(self.manager.get_delivery_stats()["in_flight"], 2)
        self.assertEqual(self.item(ids[2]).status, QueueItemStatus.QUEUED)
        self.transport.release()
        self.clock.advance(0)
        self.assertEqual([c["id"] for c in self.transport.calls], ids[:3])
        self.assertEqual(self.item(ids[0]).status, QueueItemStatus.DELIVERED)

    def test_per_destination_bound_waits_then_puts_back(self) -> None:
        """At maxPerDestination, the next message waits for the slot and starts the moment it frees; while
        that destination's slots and waiting places stay full, looks claim nothing more for a checkInterval,
        then claim past it again: beyond maxPerDestination waiters, messages go back to the queue for a
        checkInterval, and other destinations' messages start."""
        self.start(max_per_destination=1, check_interval=2_000)
        self.transport.hold = True
        first = self.send("alice@senders.test", "r1@a.test")
        second = self.send("alice@senders.test", "r2@a.test")
        third = self.send("alice@senders.test", "r4@a.test")
        other = self.send("alice@senders.test", "r3@b.test")
        self.assertEqual([c["id"] for c in self.transport.calls], [first])
        self.assertEqual(self.item(third).status, QueueItemStatus.QUEUED)  # not claimed: a.test is full
        self.clock.advance(2)  # a.test stayed full for a checkInterval: the tick's look claims past it
        self.assertEqual([c["id"] for c in self.transport.calls], [first, other])
        self.assertEqual(self.item(second).status, QueueItemStatus.DELIVERING)  # waiting for a.test's slot
        put_back = self.item(third)
        self.assertEqual(put_back.status, QueueItemStatus.QUEUED)
        self.assertEqual((put_back.attempts, put_back.next_attempt_at), (0, START + 4))
        # Queued without a destination: the put-back records it, so later claims schedule it with its route.
        self.assertEqual(put_back.destination, "rule:a.test")
        self.assertEqual(self.manager.get_delivery_stats()["busy"], 1)
        self.transport.release(0)
        self.clock.advance(0)
        # The freed slot went straight to the waiting message, without waiting for a look at the queue.
        self.assertEqual([c["id"] for c in self.transport.calls], [first, other, second])
        self.transport.hold = False
        while self.transport.held:
            self.transport.release()
        self.clock.advance(0)
        self.assertEqual(len(self.transport.calls), 3)  # the put-back one is not due yet
        self.advance_to(START + 4)
        self.assertEqual([c["id"] for c in self.transport.calls], [first, other, second, third])
        self.assertEqual(self.item(second).status, QueueItemStatus.DELIVERED)
        self.assertEqual(self.item(third).status, QueueItemStatus.DELIVERED)

    def test_busy_group_of_a_split_message_waits_without_using_a_retry(self) -> None:
        self.start(max_per_destination=1, check_interval=2_000)
        self.transport.hold = True
        first = self.send("alice@senders.test", "r1@a.test")
        split = self.send("alice@senders.test", "r2@b.test", "r3@a.test")
        self.transport.release(1)  # b.test delivered; a.test is busy: that group waits for the slot
        self.clock.advance(0)
        item = self.item(split)
        self.assertEqual(item.status, QueueItemStatus.DELIVERING)
        self.assertEqual(item.pending_recipients(), ["r3@a.test"])  # r2's outcome is already recorded
        self.transport.hold = False
        self.transport.release(0)
        self.clock.advance(0)
        self.assertEqual(self.item(first).status, QueueItemStatus.DELIVERED)
        item = self.item(split)
        self.assertEqual((item.status, item.attempts), (QueueItemStatus.DELIVERED, 0))
        self.assertEqual(len(self.transport.to("r2@b.test")), 1)
        self.assertEqual(len(self.transport.to("r3@a.test")), 1)

    def test_stopping_releases_slot_waiters(self) -> None:
        """A message waiting for a slot when delivery stops goes back to the queue, and nothing new starts."""
        self.start(max_per_destination=1)
        self.transport.hold = True
        self.send("alice@senders.test", "r1@a.test")
        waiting = self.send("alice@senders.test", "r2@a.test")
        stopped = self.manager.stopService()
        self.clock.advance(0)
        self.assertEqual(self.item(waiting).status, QueueItemStatus.QUEUED)
        self.transport.release(0)
        self.clock.advance(0)
        self.successResultOf(stopped)
        self.assertEqual(len(self.transport.calls), 1)

    def test_pause_and_resume(self) -> None:
        self.start()
        self.manager.pause_deliveries()
        qid = self.send("alice@senders.test", "bob@a.test")
        self.advance_to(START + 5)
        self.assertEqual(self.transport.calls, [])
        self.assertEqual(self.manager.get_delivery_stats()["paused"], 1)
        self.manager.resume_deliveries()
        self.clock.advance(0)
        self.assertEqual(self.item(qid).status, QueueItemStatus.DELIVERED)

    def test_pause_one_destination(self) -> None:
        self.start()
        self.manager.pause_deliveries("rule:a.test")
        qid = self.send("alice@senders.test", "bob@a.test", "carol@b.test")
        self.advance_to(START + 5)
        self.assertEqual([c["rcpts"] for c in self.transport.calls], [["carol@b.test"]])
        item = self.item(qid)
        # Put back as a busy destination's recipients are: due again after checkInterval, not a retry delay.
        self.assertLessEqual(item.next_attempt_at, self.clock.seconds() + self.config.check_interval / 1000)
        self.assertEqual(item.pending_recipients(), ["bob@a.test"])
        self.assertEqual(self.manager.paused_destinations, ["rule:a.test"])
        self.assertEqual(self.manager.last_errors(), {})
        self.manager.resume_deliveries("rule:a.test")
        self.advance_to(START + 10)
        self.assertEqual(self.item(qid).status, QueueItemStatus.DELIVERED)

    def test_bounce_now(self) -> None:
        self.start()
        self.manager.pause_deliveries()
        qid = self.send("alice@senders.test", "bob@a.test")
        item = result_of(Deferred.fromCoroutine(self.manager.bounce_now(qid, "operator says no")))
        self.assertEqual(item.status, QueueItemStatus.BOUNCED)
        self.assertIn("operator says no", item.outcomes["bob@a.test"]["reply"])
        self.assertEqual(self.item(item.bounce_id).envelope.recipients, ["alice@senders.test"])
        self.failureResultOf(Deferred.fromCoroutine(self.manager.bounce_now(qid, "again")), WrongStatus)
        self.failureResultOf(Deferred.fromCoroutine(self.manager.bounce_now("NOPE", "x")), NotFound)

    def test_wakes_coalesce(self) -> None:
        self.start()
        self.manager.pause_deliveries()
        for n in range(3):
            self.send("alice@senders.test", f"r{n}@a.test")
        self.manager.resume_deliveries()
        claims: list[tuple[int, int]] = []
        real_get_next = self.queue.get_next

        def get_next(count: int = 1, schedule: ClaimSchedule | None = None) -> Deferred:
            assert schedule is not None
            claims.append((count, schedule.unrouted))
            return real_get_next(count, schedule)

        self.queue.get_next = get_next  # type: ignore[method-assign]
        for _ in range(5):
            self.manager.wake()
        self.clock.advance(0)
        # Five wakes, one look; then one more because attempts finished during it (they coalesce too). A look
        # claims every free slot (concurrentDeliveries, 50), but of mail with no recorded destination at most
        # what one destination can start or queue for: 2 x maxPerDestination (20).
        self.assertEqual(claims, [(50, 40), (50, 40)])
        self.assertEqual(len(self.transport.calls), 3)


class LifecycleTests(ManagerTestsBase):
    def test_first_look_at_start(self) -> None:
        """Mail left in the queue by the last run starts when delivery starts, not a checkInterval later."""
        envelope = Envelope(mail_from="alice@senders.test", recipients=["bob@a.test"])
        processor = EmailProcessor(self.queue, self.clock.seconds)
        queued = result_of(processor.process(envelope, SpooledMessage(len(BODY), data=BODY)))
        self.start(check_interval=60_000)
        self.assertEqual(self.item(queued.id).status, QueueItemStatus.DELIVERED)
        self.assertEqual(self.clock.seconds(), START)

    def test_looks_every_check_interval_on_the_injected_clock(self) -> None:
        self.start(check_interval=2_000)
        looks: list[float] = []
        real_get_next = self.queue.get_next

        def get_next(count: int = 1, schedule: object = None) -> Deferred:
            looks.append(self.clock.seconds())
            return real_get_next(count, schedule)

        self.patch(self.queue, "get_next", get_next)
        self.advance_to(START + 7)
        self.assertEqual(looks, [START + 2, START + 4, START + 6])

    def test_stopping_leaves_no_timer_behind(self) -> None:
        self.start()
        self.send("alice@senders.test", "bob@a.test")
        self.manager.pause_deliveries()
        self.manager.resume_deliveries()  # a wake pending in the next reactor turn
        self.assertTrue(self.clock.getDelayedCalls())
        self.successResultOf(self.manager.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_waits_for_attempts_in_flight(self) -> None:
        self.start()
        self.transport.hold = True
        qid = self.send("alice@senders.test", "bob@a.test")
        stopped = self.manager.stopService()
        self.assertNoResult(stopped)
        self.send("alice@senders.test", "carol@a.test")  # wake after stop: nothing is claimed
        self.assertEqual(len(self.transport.calls), 1)
        self.transport.release()
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(self.item(qid).status, QueueItemStatus.DELIVERED)

    def test_stop_is_bounded(self) -> None:
        self.start()
        self.transport.hold = True
        qid = self.send("alice@senders.test", "bob@a.test")
        self.manager.stop_grace = 10
        stopped = self.manager.stopService()
        self.clock.advance(9)
        self.assertNoResult(stopped)
        self.clock.advance(1)
        self.successResultOf(stopped)
        self.assertEqual(self.item(qid).status, QueueItemStatus.DELIVERING)  # the queue's recovery returns it

    def test_purges_finished_items_after_the_retention(self) -> None:
        """Purged once queued longer than queueLifetime + finishedRetention (60 + 30 s here), at the next
        once-a-minute purge: so never less than the retention after it finished."""
        self.start(finished_retention=30_000, queue_lifetime=60_000)
        qid = self.send("alice@senders.test", "bob@a.test")
        self.assertEqual(self.item(qid).status, QueueItemStatus.DELIVERED)
        self.advance_to(START + 119)
        self.assertIsNotNone(result_of(self.queue.get(qid)))
        self.advance_to(START + 120)
        self.assertIsNone(result_of(self.queue.get(qid)))
        self.assertEqual(self.manager.get_delivery_stats()["purged"], 1)

    def test_transport_errback_is_a_temporary_failure(self) -> None:
        self.start()

        def broken(call: dict[str, Any]) -> Deferred:
            raise RuntimeError("bug in the transport")

        self.transport.on_call = broken
        qid = self.send("alice@senders.test", "bob@a.test")
        item = self.item(qid)
        self.assertEqual(item.status, QueueItemStatus.DEFERRED)
        self.assertEqual(item.last_error, "451 4.3.0 No result for this recipient (local error)")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.manager.get_delivery_stats()["errors"], 1)

    def test_routing_bug_is_a_temporary_failure(self) -> None:
        @implementer(IRoutingRule)
        class BrokenRule:
            name = "broken"
            priority = -1

            def route(self, sender: str, recipient: str) -> Route | None:
                raise RuntimeError("bug in a routing plugin")

        self.start()
        self.manager._routes = RecipientRouter(self.config, rules=[BrokenRule()])  # a plugin with a bug
        qid = self.send("alice@senders.test", "bob@a.test")
        item = self.item(qid)
        self.assertEqual((item.status, item.attempts), (QueueItemStatus.DEFERRED, 1))
        self.assertEqual(item.last_error, "451 4.3.0 Local error in routing")
        self.assertEqual(self.transport.calls, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_missing_result_is_a_temporary_failure(self) -> None:
        self.start()
        real = self.transport._answer

        def forgetful(rcpt: str, route: Route) -> RecipientResult:
            return real("carol@a.test" if rcpt == "bob@a.test" else rcpt, route)

        self.transport._answer = forgetful  # type: ignore[method-assign]
        qid = self.send("alice@senders.test", "bob@a.test")
        self.assertEqual(self.item(qid).pending_recipients(), ["bob@a.test"])
        self.assertEqual(self.item(qid).status, QueueItemStatus.DEFERRED)

    def test_update_failure_stops_the_attempt(self) -> None:
        """If the outcome of a group cannot be recorded, the next group is not tried."""
        self.start()

        def close_queue(call: dict[str, Any]) -> None:
            self.queue._state = "closed"  # the store fails from now on

        self.transport.on_call = close_queue
        qid = self.send("alice@senders.test", "bob@a.test", "carol@b.test")
        self.assertEqual(len(self.transport.calls), 1)
        # The attempt's failure, and the next look's (the store is still down): both logged.
        self.assertEqual(len(self.flushLoggedErrors(QueueUnavailable)), 2)
        self.assertEqual(self.manager.get_delivery_stats()["errors"], 2)
        self.queue._state = "open"  # the store is back
        item = self.item(qid)
        self.assertEqual(item.status, QueueItemStatus.DELIVERING)  # claimed until the queue recovers it
        self.assertEqual(item.outcomes, {})


class ClaimLostTests(ManagerTestsBase):
    """A queue that can no longer vouch for a claim (the Redis queue when its heartbeats failed) answers
    ``open_body`` with ClaimLost: the attempt stops there, sends nothing and records nothing."""

    def setUp(self) -> None:
        super().setUp()
        self.lost: set[str] = set()
        real_open_body = self.queue.open_body

        def open_body(item_id: str) -> Deferred:
            if item_id in self.lost:
                return fail(ClaimLost(f"the claim on {item_id} may be lost"))
            return real_open_body(item_id)

        self.patch(self.queue, "open_body", open_body)

    def test_attempt_stops_without_delivering_or_recording(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.start()
        self.lost.add("LOST1")
        qid = self.send("alice@senders.test", "bob@a.test", "carol@b.test", queue_id="LOST1")
        self.assertEqual(self.transport.calls, [])
        item = self.item(qid)
        self.assertEqual(
            (item.status, item.attempts, item.history, item.outcomes), (QueueItemStatus.DELIVERING, 0, [], {})
        )
        stats = self.manager.get_delivery_stats()
        self.assertEqual((stats["claims_lost"], stats["errors"], stats["in_flight"]), (1, 0, 0))
        [warning] = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(
            warning, f"delivery attempt for {qid} stopped undelivered: the claim on {qid} may be lost"
        )


class DiskQueueTests(TestCase):
    """Per-recipient outcomes survive a crash: a restart never re-sends to a delivered recipient."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.path = self.mktemp()

    async def open_queue(self) -> DiskQueue:
        queue = DiskQueue(self.path, reactor=reactor, clock=self.clock)
        await queue.load()
        self.addCleanup(queue.save)
        return queue

    def manager(self, queue: DiskQueue, transport: ScriptedTransport) -> DeliveryManager:
        cfg = config()
        return DeliveryManager(
            queue=queue,
            routes=RecipientRouter(cfg, rules=[DomainRule()]),
            transport=transport,
            submit_dsn=EmailProcessor(queue, self.clock.seconds).submit_local,
            config=cfg,
            clock=self.clock,
            random=lambda: 0.5,
        )

    async def test_crash_between_groups(self) -> None:
        queue = await self.open_queue()
        envelope = Envelope(mail_from="alice@senders.test", recipients=["bob@a.test", "carol@b.test"])
        item = await EmailProcessor(queue, self.clock.seconds).process(
            envelope, SpooledMessage(len(BODY), data=BODY)
        )
        transport = ScriptedTransport(queue, self.clock)
        crashed: Deferred = Deferred()

        def crash_on_second_group(call: dict[str, Any]) -> Deferred | None:
            if call["rcpts"] == ["carol@b.test"]:
                crashed.callback(None)
                return Deferred()  # never answers: the process "dies" here
            return None

        transport.on_call = crash_on_second_group
        [claimed] = await queue.get_next(1)
        Deferred.fromCoroutine(self.manager(queue, transport).deliver_message(claimed))
        await crashed
        await queue.save()

        queue = await self.open_queue()
        recovered = await queue.get(item.id)
        self.assertEqual(recovered.status, QueueItemStatus.QUEUED)
        self.assertEqual(recovered.outcomes["bob@a.test"]["outcome"], "delivered")
        self.assertEqual(recovered.pending_recipients(), ["carol@b.test"])
        again = ScriptedTransport(queue, self.clock)
        [claimed] = await queue.get_next(1)
        done = await self.manager(queue, again).deliver_message(claimed)
        self.assertEqual([c["rcpts"] for c in again.calls], [["carol@b.test"]])
        self.assertEqual(done.status, QueueItemStatus.DELIVERED)

    async def test_bounce_is_durable(self) -> None:
        queue = await self.open_queue()
        envelope = Envelope(mail_from="alice@senders.test", recipients=["bob@a.test"])
        item = await EmailProcessor(queue, self.clock.seconds).process(
            envelope, SpooledMessage(len(BODY), data=BODY)
        )
        transport = ScriptedTransport(queue, self.clock)
        transport.script["bob@a.test"] = ["550 5.1.1 No such user"]
        [claimed] = await queue.get_next(1)
        done = await self.manager(queue, transport).deliver_message(claimed)
        self.assertEqual((done.status, done.bounce_id), (QueueItemStatus.BOUNCED, item.id + "B"))
        await queue.save()
        queue = await self.open_queue()
        bounce = await queue.get(item.id + "B")
        self.assertEqual((bounce.envelope.mail_from, bounce.priority), ("", Priority.BOUNCE))
        stream = await queue.open_body(item.id + "B")
        with stream:
            self.assertIn(b"Final-Recipient: rfc822; bob@a.test", stream.read())
        self.assertEqual((await queue.get(item.id)).status, QueueItemStatus.BOUNCED)


class BacklogTests(ManagerTestsBase):
    def test_full_destination_with_a_backlog_does_not_spin(self) -> None:
        """Messages that only found their destination full do not trigger a new claim: with a backlog, the
        manager would otherwise claim and put back the whole queue, over and over (found by bench/relay)."""
        self.start(
            max_per_destination=1, check_interval=1_000, delivery=DeliveryConfig(concurrent_deliveries=5)
        )
        self.transport.hold = True
        self.manager.pause_deliveries()
        for n in range(40):
            self.send("alice@senders.test", f"r{n}@a.test")
        self.manager.resume_deliveries()
        self.clock.advance(0)
        # One claim of 2 (of the 5 free slots: what the destination can start or queue for): one in flight,
        # one waiting for the slot, none put back -- and nothing more until a delivery finishes or a tick.
        self.assertEqual(self.manager.get_delivery_stats()["claimed"], 2)
        self.assertEqual(self.manager.get_delivery_stats()["busy"], 0)
        self.transport.hold = False
        while self.transport.held:
            self.transport.release()
        self.advance_to(START + 120)
        self.assertEqual(len(self.transport.calls), 40)
        self.assertEqual(self.successResultOf(self.queue.get_item_count()), 0)

    def test_busy_destination_drains_its_backlog_without_put_backs(self) -> None:
        """With more delivery slots than one destination can start or queue for, looks claim no more than it
        can, so a backlog to one destination flows without waiting for a tick (bench/relay: put-backs halved
        the throughput at 100 senders)."""
        self.start(
            max_per_destination=2, check_interval=1_000, delivery=DeliveryConfig(concurrent_deliveries=10)
        )
        self.transport.hold = True
        self.manager.pause_deliveries()
        for n in range(30):
            self.send("alice@senders.test", f"r{n}@a.test")
        self.manager.resume_deliveries()
        self.clock.advance(0)
        self.assertEqual(len(self.transport.held), 2)
        while self.transport.held:
            self.transport.release(0)
            self.clock.advance(0)
            self.assertLessEqual(len(self.transport.held), 2)
        self.assertEqual(self.clock.seconds(), START)  # no tick was needed
        self.assertEqual(len(self.transport.calls), 30)
        self.assertEqual(self.manager.get_delivery_stats()["busy"], 0)
        self.assertEqual(self.successResultOf(self.queue.get_item_count()), 0)


class WriteCountTests(ManagerTestsBase):
    def test_delivered_message_costs_one_update(self) -> None:
        """Outcomes and the final status of a fully delivered message go in one queue write (on the disk queue
        each write is an fsync'd commit)."""
        updates: list[dict[str, Any]] = []
        original = self.queue.update

        def counting(item_id: str, **changes: Any) -> Any:
            updates.append(changes)
            return original(item_id, **changes)

        self.patch(self.queue, "update", counting)
        self.start()
        qid = self.send("alice@senders.test", "bob@a.test", "carol@a.test")
        self.assertEqual(self.item(qid).status, QueueItemStatus.DELIVERED)
        self.assertEqual(len(updates), 1, updates)
        self.assertEqual(updates[0]["status"], QueueItemStatus.DELIVERED)
        self.assertEqual(self.manager.get_delivery_stats()["delivered"], 1)

    def test_partial_failure_still_concludes_separately(self) -> None:
        self.start()
        self.transport.script["carol@a.test"] = ["550 5.1.1 No such user"]
        qid = self.send("alice@senders.test", "bob@a.test", "carol@a.test")
        self.assertEqual(self.item(qid).status, QueueItemStatus.BOUNCED)
