"""The event bus (dcrouter.events), what an SMTP session emits on it, and the metrics made of those events."""

from __future__ import annotations

import base64
import os
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from dcrouter import events as events_module
from dcrouter.config.auth import AuthConfig
from dcrouter.events import (
    EVENT_TYPES,
    NO_EVENTS,
    CallableSink,
    Event,
    EventBus,
    IEventSink,
    UnknownEventType,
    matches,
    parse_patterns,
)
from dcrouter.observe.metrics import QUEUE_READ_INTERVAL, RouterMetrics, route_label
from dcrouter.processing.message import Verdict
from dcrouter.processing.processor import ScannerStage
from tests.smtp_fixtures import PASSWORD, PEER_IP, connect, make_config
from tests.test_delivery_manager import START, ManagerTestsBase
from tests.test_processing_chain import ChainCase, ScriptedScanner, verdict
from tests.test_proxy_session import HELLO_A, HELLO_B, A, SessionTestCase, route
from tests.test_smtp_protocol import MAIL, MESSAGE, RCPT


def collect(bus: EventBus, patterns: tuple[str, ...] = ("*",)) -> list[Event]:
    seen: list[Event] = []
    bus.subscribe(CallableSink(seen.append), patterns)
    return seen


def samples(metrics: RouterMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode("utf-8")):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class PatternTests(SynchronousTestCase):
    def test_exact_family_and_everything(self) -> None:
        self.assertTrue(matches("message.queued", "message.queued"))
        self.assertTrue(matches("message.*", "message.queued"))
        self.assertFalse(matches("message.*", "messages.queued"))
        self.assertFalse(matches("security.*", "message.queued"))
        self.assertTrue(matches("*", "connection.connect"))

    def test_unknown_types_are_refused_by_name(self) -> None:
        self.assertEqual(
            parse_patterns([" message.* ", "security.auth_failure"]), ("message.*", "security.auth_failure")
        )
        error = self.assertRaises(UnknownEventType, parse_patterns, ["message.*", "mesage.queued"])
        self.assertIn("'mesage.queued'", str(error))
        self.assertRaises(UnknownEventType, parse_patterns, ["nothing.*"])

    def test_every_type_is_family_dot_name(self) -> None:
        for name in EVENT_TYPES:
            family, _, rest = name.partition(".")
            self.assertTrue(family and rest, name)


class BusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.bus = EventBus(self.clock.seconds)

    def test_sinks_get_what_they_subscribed_to(self) -> None:
        messages = collect(self.bus, ("message.*",))
        everything = collect(self.bus)
        self.bus.emit("message.queued", queue_id="Q1", session_id="S1", size=10)
        self.bus.emit("connection.connect", port=25)
        self.assertEqual([e.type for e in messages], ["message.queued"])
        self.assertEqual([e.type for e in everything], ["message.queued", "connection.connect"])
        event = messages[0]
        self.assertEqual((event.time, event.queue_id, event.session_id), (1000, "Q1", "S1"))
        self.assertEqual(
            event.to_json(),
            {"type": "message.queued", "time": 1000, "queueId": "Q1", "sessionId": "S1", "size": 10},
        )

    def test_wants_and_unsubscribe(self) -> None:
        self.assertFalse(self.bus.wants("message.queued"))
        sink = CallableSink(lambda event: None)
        self.bus.subscribe(sink, ["security.*"])
        self.assertTrue(self.bus.wants("security.relay_refused"))
        self.assertFalse(self.bus.wants("message.queued"))
        self.bus.unsubscribe(sink)
        self.assertFalse(self.bus.wants("security.relay_refused"))

    def test_protocols_narrow_a_subscription(self) -> None:
        smtp_only = []
        self.bus.subscribe(CallableSink(smtp_only.append), ["connection.*"], protocols=["smtp"])
        self.assertTrue(self.bus.wants("connection.connect", "smtp"))
        self.assertFalse(self.bus.wants("connection.connect", "proxy"))
        self.assertTrue(self.bus.wants("connection.connect"))  # some protocol's: an emitter not saying asks
        self.assertFalse(self.bus.wants("message.queued"))
        self.bus.emit("connection.connect", protocol="proxy", port=443)
        self.bus.emit("connection.connect", port=25)
        self.bus.emit("connection.connect", protocol="smtp", port=25)
        self.assertEqual([dict(e.fields) for e in smtp_only], [{"protocol": "smtp", "port": 25}])
        everything = collect(self.bus, ("connection.connect",))  # unnarrowed: every protocol
        self.assertTrue(self.bus.wants("connection.connect", "proxy"))
        self.bus.emit("connection.connect", protocol="proxy", port=443)
        self.assertEqual([e.fields["protocol"] for e in everything], ["proxy"])
        self.assertEqual(len(smtp_only), 1)

    def test_a_failing_sink_reaches_neither_the_emitter_nor_other_sinks(self) -> None:
        def broken(event: Event) -> None:
            raise RuntimeError("subscriber bug")

        self.bus.subscribe(CallableSink(broken, "broken"))
        seen = collect(self.bus)
        self.bus.emit("message.queued", queue_id="Q1")
        self.bus.emit("message.queued", queue_id="Q2")
        self.assertEqual([e.queue_id for e in seen], ["Q1", "Q2"])
        self.assertEqual(self.bus.failures, 2)
        # Logged once per sink and type, then only counted.
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_the_shared_silent_bus_takes_no_subscriber(self) -> None:
        NO_EVENTS.emit("message.queued", queue_id="Q")
        self.assertFalse(NO_EVENTS.wants("message.queued"))
        self.assertRaises(TypeError, NO_EVENTS.subscribe, CallableSink(lambda event: None))

    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(IEventSink, CallableSink(lambda event: None)))
        self.assertTrue(verifyObject(IEventSink, RouterMetrics()))


class SessionEventTests(SynchronousTestCase):
    """What one SMTP session emits: every event carries the session id, message events the queue id."""

    def setUp(self) -> None:
        self.bus = EventBus()
        self.seen = collect(self.bus)

    def connect(self, config: Any = None) -> Any:
        return connect(config, events=self.bus)

    def types(self) -> list[str]:
        return [e.type for e in self.seen]

    def test_a_message_from_connect_to_disconnect(self) -> None:
        server = self.connect()
        server.exchange(b"EHLO c\r\n" + MAIL + RCPT + b"DATA\r\n" + MESSAGE + b"QUIT\r\n")
        server.protocol.connectionLost()
        self.assertEqual(
            self.types(),
            [
                "connection.connect",
                "message.received",
                "message.queued",
                "message.accepted",
                "connection.disconnect",
            ],
        )
        session_id = server.protocol.session.session_id
        self.assertEqual({e.session_id for e in self.seen if e.type != "message.queued"}, {session_id})
        queue_id = server.queue.items[0].id
        for event in self.seen[1:4]:
            self.assertEqual(event.queue_id, queue_id)
        connect, received = self.seen[0], self.seen[1]
        self.assertEqual(
            dict(connect.fields), {"port": 25, "protocol": "smtp", "peer": PEER_IP, "tls": False}
        )
        self.assertEqual(received.fields["recipients"], 1)
        self.assertEqual(received.fields["size"], len(MESSAGE) - 3)  # without the final dot line

    def test_security_events(self) -> None:
        config = make_config(auth=AuthConfig(failure_delay=0, allow_insecure=True))
        server = self.connect(config)
        server.exchange(b"EHLO c\r\n")
        wrong = base64.b64encode(b"\0alice\0not " + PASSWORD.encode()).decode()
        self.assertTrue(server.exchange(f"AUTH PLAIN {wrong}\r\n".encode()).startswith(b"535"))
        server.exchange(MAIL)
        self.assertTrue(server.exchange(b"RCPT TO:<victim@elsewhere.example>\r\n").startswith(b"554 5.7.1"))
        right = base64.b64encode(b"\0alice\0" + PASSWORD.encode()).decode()
        server.exchange(b"RSET\r\n")
        self.assertTrue(server.exchange(f"AUTH PLAIN {right}\r\n".encode()).startswith(b"235"))
        failure = next(e for e in self.seen if e.type == "security.auth_failure")
        self.assertEqual(failure.fields["mechanism"], "PLAIN")
        self.assertNotIn(PASSWORD, repr(self.seen))  # never a password in an event
        relay = next(e for e in self.seen if e.type == "security.relay_refused")
        self.assertIsNotNone(relay.queue_id)
        self.assertIn("connection.authenticated", self.types())
        refused = [e.fields["replyClass"] for e in self.seen if e.type == "connection.command_refused"]
        self.assertEqual(refused, ["5xx", "5xx"])

    def test_non_smtp_command_is_a_policy_violation(self) -> None:
        server = self.connect()
        server.exchange(b"GET / HTTP/1.0\r\n")
        violation = next(e for e in self.seen if e.type == "security.policy_violation")
        self.assertEqual(violation.fields["rule"], "non_smtp")

    def test_metrics_from_the_session(self) -> None:
        metrics = RouterMetrics()
        metrics.subscribe(self.bus)
        server = self.connect()
        server.exchange(b"EHLO c\r\n" + MAIL + RCPT + b"DATA\r\n" + MESSAGE + b"NOOP x\r\nBOGUS\r\n")
        found = samples(metrics)
        self.assertEqual(found[("dcrouter_smtp_connections_total", (("port", "25"), ("tls", "no")))], 1)
        self.assertEqual(found[("dcrouter_smtp_sessions", (("port", "25"),))], 1)
        self.assertEqual(found[("dcrouter_messages_received_total", (("port", "25"),))], 1)
        self.assertEqual(found[("dcrouter_received_bytes_total", (("port", "25"),))], len(MESSAGE) - 3)
        self.assertEqual(found[("dcrouter_messages_queued_total", (("kind", "received"),))], 1)
        self.assertEqual(found[("dcrouter_smtp_commands_refused_total", (("reply_class", "5xx"),))], 1)
        server.protocol.connectionLost()
        self.assertEqual(samples(metrics)[("dcrouter_smtp_sessions", (("port", "25"),))], 0)

    def test_metrics_alone_count_smtp_sessions(self) -> None:
        """With only the metrics subscribed (they take SMTP's connects and disconnects, not the proxy's),
        an SMTP session's connect still reaches them."""
        bus = EventBus()
        metrics = RouterMetrics()
        metrics.subscribe(bus)
        server = connect(None, events=bus)
        server.exchange(b"EHLO c\r\n")
        found = samples(metrics)
        self.assertEqual(found[("dcrouter_smtp_connections_total", (("port", "25"), ("tls", "no")))], 1)
        self.assertEqual(found[("dcrouter_smtp_sessions", (("port", "25"),))], 1)
        server.protocol.connectionLost()
        self.assertEqual(samples(metrics)[("dcrouter_smtp_sessions", (("port", "25"),))], 0)

    def test_metrics_registries_are_per_router(self) -> None:
        first, second = RouterMetrics(), RouterMetrics()
        first.receive(Event("message.refused", 0.0, fields={"reason": "5.6.0"}))
        first.receive(Event("message.refused", 0.0, fields={"reason": "free text <a@b>"}))
        self.assertEqual(samples(first)[("dcrouter_messages_refused_total", (("reason", "5.6.0"),))], 1)
        self.assertEqual(samples(first)[("dcrouter_messages_refused_total", (("reason", "other"),))], 1)
        self.assertNotIn(("dcrouter_messages_refused_total", (("reason", "5.6.0"),)), samples(second))


class MetricsLabelTests(SynchronousTestCase):
    def test_mx_routes_are_one_label(self) -> None:
        self.assertEqual(route_label("mx:example.com"), "mx")
        self.assertEqual(route_label("domain:example.org"), "domain:example.org")
        self.assertEqual(route_label(None), "none")

    def test_delivery_and_processing_metrics(self) -> None:
        metrics = RouterMetrics()
        metrics.receive(
            Event(
                "delivery.attempt",
                0.0,
                "Q",
                fields={"route": "mx:a.example", "duration": 0.2, "delivered": 2, "failed": 1, "deferred": 0},
            )
        )
        metrics.receive(
            Event(
                "message.processed",
                0.0,
                "Q",
                fields={"outcome": "queued", "duration": 0.03, "stages": {"dkim": 0.01}},
            )
        )
        metrics.receive(Event("message.scanned", 0.0, "Q", fields={"scanner": "spam", "verdict": "clean"}))
        found = samples(metrics)
        self.assertEqual(found[("dcrouter_deliveries_total", (("outcome", "delivered"), ("route", "mx")))], 2)
        self.assertEqual(found[("dcrouter_deliveries_total", (("outcome", "failed"), ("route", "mx")))], 1)
        self.assertEqual(found[("dcrouter_delivery_duration_seconds_count", (("route", "mx"),))], 1)
        self.assertEqual(found[("dcrouter_processing_duration_seconds_count", (("stage", "dkim"),))], 1)
        self.assertEqual(found[("dcrouter_processing_duration_seconds_count", (("stage", "total"),))], 1)
        self.assertEqual(
            found[("dcrouter_scanner_verdicts_total", (("scanner", "spam"), ("verdict", "clean")))], 1
        )


class QueueCollectorTests(SynchronousTestCase):
    """A scrape never waits for the queue: it reports the last reading and starts a new one when stale."""

    def test_last_reading_is_reported(self) -> None:
        from twisted.internet.defer import Deferred

        clock = Clock()
        clock.advance(100)
        readings: list[Deferred[Any]] = []

        def summary() -> Deferred[Any]:
            readings.append(Deferred())
            return readings[-1]

        metrics = RouterMetrics()
        metrics.watch_queue(summary, clock.seconds)
        found = samples(metrics)
        self.assertEqual(found[("dcrouter_queue_items", (("status", "queued"),))], 0)
        self.assertEqual(len(readings), 1)
        samples(metrics)
        self.assertEqual(len(readings), 1)  # one reading at a time
        readings[0].callback({"queued": (3, 40.0), "delivered": (5, 10.0)})
        found = samples(metrics)
        self.assertEqual(found[("dcrouter_queue_items", (("status", "queued"),))], 3)
        self.assertEqual(found[("dcrouter_queue_oldest_age_seconds", ())], 60)  # delivered is not live
        self.assertEqual(len(readings), 1)  # fresh: not read again
        clock.advance(QUEUE_READ_INTERVAL)
        samples(metrics)
        self.assertEqual(len(readings), 2)


class DocumentedTests(SynchronousTestCase):
    """docs/operations.md lists every event type and every metric the router exports."""

    def setUp(self) -> None:
        path = os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "operations.md"
        )
        with open(path, encoding="utf-8") as page:
            self.page = page.read()

    def test_every_event_type(self) -> None:
        for name in EVENT_TYPES:
            self.assertIn(f"| `{name}` |", self.page)

    def test_every_metric(self) -> None:
        metrics = RouterMetrics()
        metrics.watch_queue(lambda: succeed({}), lambda: 0.0)
        metrics.watch_proxy({})
        metrics.watch_proxy_targets(lambda: {("app", "10.0.0.1:80"): True, ("app", "10.0.0.2:80"): False})
        metrics.watch_certificates(list)
        families = list(text_string_to_metric_families(metrics.render().decode()))
        (targets,) = [f for f in families if f.name == "dcrouter_proxy_target_up"]
        self.assertEqual(
            {(s.labels["target"], s.value) for s in targets.samples},
            {("10.0.0.1:80", 1.0), ("10.0.0.2:80", 0.0)},
        )
        names = {family.name for family in families}
        for name in names:
            suffix = "_total" if f"`{name}_total`" in self.page else ""
            self.assertIn(f"`{name}{suffix}`", self.page)


class DeliveryEventTests(ManagerTestsBase):
    """What the DeliveryManager emits: attempts per route group, deferrals, bounces and DSNs."""

    def start(self, **changes: Any) -> Any:
        manager = super().start(**changes)
        self.bus = EventBus(self.clock.seconds)
        self.seen = collect(self.bus)
        manager.events = self.bus
        return manager

    def of(self, event_type: str) -> list[Event]:
        return [e for e in self.seen if e.type == event_type]

    def test_delivered_deferred_then_bounced(self) -> None:
        self.start(base_retry_delay=300_000, max_retries=2)
        self.transport.script["bob@a.test"] = ["451 4.2.0 Try later", "550 5.1.1 No such user"]
        qid = self.send("alice@senders.test", "bob@a.test", "carol@b.test")
        [deferred] = self.of("message.deferred")
        self.assertEqual((deferred.queue_id, deferred.fields["destination"]), (qid, "rule:a.test"))
        self.assertEqual((deferred.fields["attempts"], deferred.fields["pending"]), (1, 1))
        self.assertEqual(deferred.fields["nextAttemptIn"], 300)
        [delivered] = self.of("message.delivered")
        self.assertEqual((delivered.fields["route"], delivered.fields["recipients"]), ("rule:b.test", 1))
        [temporary] = self.of("error.delivery")
        self.assertEqual((temporary.fields["permanent"], temporary.fields["reply"]), (False, 451))
        self.advance_to(START + 300)
        attempts = [
            (e.fields["route"], e.fields["delivered"], e.fields["failed"], e.fields["deferred"])
            for e in self.of("delivery.attempt")
            if e.queue_id == qid
        ]
        self.assertEqual(
            attempts, [("rule:a.test", 0, 0, 1), ("rule:b.test", 1, 0, 0), ("rule:a.test", 0, 1, 0)]
        )
        [bounced] = self.of("message.bounced")
        self.assertEqual(
            (bounced.queue_id, bounced.fields["status"], bounced.fields["recipients"]), (qid, "bounced", 1)
        )
        [dsn] = self.of("message.dsn_sent")
        self.assertEqual((dsn.queue_id, dsn.fields["action"]), (qid, "failed"))
        self.assertNotIn("Try later", repr([e for e in self.seen if e.type != "message.deferred"]))

    def test_metrics_of_deliveries(self) -> None:
        self.start()
        metrics = RouterMetrics()
        metrics.subscribe(self.bus)
        self.transport.script["bob@a.test"] = ["550 5.1.1 No such user"]
        self.send("alice@senders.test", "bob@a.test", "carol@a.test")
        found = samples(metrics)
        self.assertEqual(
            found[("dcrouter_deliveries_total", (("outcome", "delivered"), ("route", "rule:a.test")))], 1
        )
        self.assertEqual(
            found[("dcrouter_deliveries_total", (("outcome", "failed"), ("route", "rule:a.test")))], 1
        )
        self.assertEqual(found[("dcrouter_messages_bounced_total", (("status", "bounced"),))], 1)
        self.assertEqual(found[("dcrouter_dsn_sent_total", (("action", "failed"),))], 1)


class ProcessingEventTests(ChainCase):
    """What the processing chain emits: verdicts, time per stage, the outcome, failures."""

    def setUp(self) -> None:
        super().setUp()
        self.bus = EventBus(self.clock.seconds)
        self.seen = collect(self.bus)

    def of(self, event_type: str) -> list[Event]:
        return [e for e in self.seen if e.type == event_type]

    def test_stages_verdicts_and_queued(self) -> None:
        def slow_clean(draft: Any) -> Any:
            self.clock.advance(0.25)  # the scan takes a quarter of a second of the processor's clock
            return verdict(Verdict.CLEAN)

        processor = self.processor(
            scanners=[ScannerStage(ScriptedScanner(slow_clean, "virus"))], events=self.bus
        )
        item = self.queued(processor)
        [scanned] = self.of("message.scanned")
        self.assertEqual(dict(scanned.fields), {"scanner": "virus", "verdict": "clean", "action": "pass"})
        [processed] = self.of("message.processed")
        self.assertEqual(processed.queue_id, item.id)
        self.assertEqual(processed.fields["outcome"], "queued")
        self.assertEqual(processed.fields["stages"]["scanner:virus"], 0.25)
        self.assertEqual(set(processed.fields["stages"]), {"metadata", "scanner:virus"})
        self.assertEqual(processed.fields["duration"], 0.25)
        [queued] = self.of("message.queued")
        self.assertEqual(
            (queued.queue_id, queued.fields["local"], queued.fields["status"]), (item.id, False, "queued")
        )

    def test_refusal_and_failure(self) -> None:
        spam = ScriptedScanner(verdict(Verdict.SPAM, "bulk", score=9.0), "spam")
        processor = self.processor(scanners=[ScannerStage(spam, "reject")], events=self.bus)
        self.refusal(self.process(processor))
        self.assertEqual([e.fields["outcome"] for e in self.of("message.processed")], ["refused"])
        broken = ScriptedScanner(RuntimeError("plugin bug"), "broken")
        processor = self.processor(scanners=[ScannerStage(broken, "reject")], events=self.bus)
        self.refusal(self.process(processor))
        self.flushLoggedErrors(RuntimeError)
        [error] = self.of("error.processing")
        self.assertEqual(error.fields["reason"], "RuntimeError")
        self.assertEqual(self.of("message.processed")[-1].fields["outcome"], "tempfailed")


class ProxyEventTests(SessionTestCase):
    """What proxy sessions emit: connect, refusals with their reason, disconnect with the route."""

    def test_connect_refuse_and_disconnect(self) -> None:
        bus = EventBus(self.reactor.seconds)
        seen = collect(bus, ("connection.*",))
        self.context(A, route("guarded", domains=("b.test",), block=["192.0.2.0/24"]))
        self.ctx.events = bus
        session, _ = self.connect("198.51.100.1", data=HELLO_A)
        self.accept()
        self.reactor.advance(2)
        session.connectionLost(Failure(ConnectionDone()))
        refused, _ = self.connect("192.0.2.9", data=HELLO_B)
        self.assertEqual(
            [(e.type, e.fields.get("peer")) for e in seen],
            [
                ("connection.connect", "198.51.100.1"),
                ("connection.disconnect", None),
                ("connection.connect", "192.0.2.9"),
                ("connection.error", "192.0.2.9"),
            ],
        )
        disconnect, error = seen[1], seen[3]
        self.assertEqual(
            dict(disconnect.fields), {"protocol": "proxy", "port": 443, "route": "a", "duration": 2}
        )
        self.assertEqual(error.fields["reason"], refused.refused)

    def test_no_event_when_only_the_metrics_listen(self) -> None:
        """The metrics count proxy connections from the sessions at scrape time: connects and disconnects
        of proxy connections are not built for them, and the gauge says the same as the events did."""
        bus = EventBus(self.reactor.seconds)
        metrics = RouterMetrics()
        metrics.subscribe(bus)
        self.context(A)
        self.ctx.events = bus
        metrics.watch_proxy_clients(lambda: len(self.ctx.sessions))
        built = []
        real_event = events_module.Event

        def counting_event(*args: Any) -> Event:
            built.append(args[0])
            return real_event(*args)

        self.patch(events_module, "Event", counting_event)
        gauge = ("dcrouter_proxy_client_connections", ())
        self.assertEqual(samples(metrics)[gauge], 0)
        first, _ = self.connect("198.51.100.1", data=HELLO_A)
        self.accept()
        second, _ = self.connect("198.51.100.2", data=HELLO_A)
        self.assertEqual(samples(metrics)[gauge], 2)
        first.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(samples(metrics)[gauge], 1)
        second.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(samples(metrics)[gauge], 0)
        self.assertEqual(built, [])
        # A subscriber to the proxy's connection events gets them again, the gauge unchanged.
        seen = collect(bus, ("connection.connect", "connection.disconnect"))
        third, _ = self.connect("198.51.100.3", data=HELLO_A)
        self.assertEqual(samples(metrics)[gauge], 1)
        third.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([e.type for e in seen], ["connection.connect", "connection.disconnect"])
        self.assertEqual(samples(metrics)[gauge], 0)

    def test_the_router_reads_the_gauge_from_its_proxy_sessions(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from dcrouter.router import DcRouter

        config = {"smartProxyConfig": {"bindAddress": "127.0.0.1", "fromPort": 8443, "targetIP": "127.0.0.1"}}
        router = DcRouter(config, reactor=MemoryReactorClock())
        assert router.proxy is not None
        gauge = ("dcrouter_proxy_client_connections", ())
        self.assertEqual(samples(router.metrics)[gauge], 0)
        router.proxy.context.sessions.update({object(), object()})  # type: ignore[arg-type]
        self.assertEqual(samples(router.metrics)[gauge], 2)
        self.assertFalse(router.events.wants("connection.connect", "proxy"))
        self.assertTrue(router.events.wants("connection.connect", "smtp"))


class AcmeEventTests(SynchronousTestCase):
    """ACME's events and the orders metric: a failed order, then the certificate issued."""

    def test_failed_then_issued(self) -> None:
        import time

        from dcrouter.acme.challenges import ChallengeResponder
        from dcrouter.acme.service import AcmeService
        from dcrouter.net.certstore import CertificateStore
        from tests.test_acme import DIRECTORY, ORDER, FakeIssuer, run_now

        self.clock = Clock()
        self.clock.advance(time.time())  # certificates carry real dates
        self.issuer = FakeIssuer(self.clock)
        bus = EventBus(self.clock.seconds)
        seen = collect(bus, ("certificate.*",))
        metrics = RouterMetrics()
        metrics.subscribe(bus)
        self.issuer.fail = 1
        service = AcmeService(
            [ORDER],
            store=CertificateStore(clock=self.clock),
            responder=ChallengeResponder(),
            state_directory=self.mktemp(),
            directory_url=DIRECTORY,
            email=None,
            renew_threshold_days=30,
            reactor=self.clock,  # type: ignore[arg-type]
            account=self.issuer,
            run_blocking=run_now,
            events=bus,
        )
        self.addCleanup(service.stopService)
        service.startService()
        self.clock.advance(3600)
        self.assertEqual([e.type for e in seen], ["certificate.order_failed", "certificate.issued"])
        failed, issued = seen
        self.assertEqual((failed.fields["name"], failed.fields["failures"]), ("www.example.com", 1))
        self.assertEqual((issued.fields["renewal"], issued.fields["name"]), (False, "www.example.com"))
        found = samples(metrics)
        self.assertEqual(found[("dcrouter_acme_orders_total", (("kind", "new"), ("result", "failed")))], 1)
        self.assertEqual(found[("dcrouter_acme_orders_total", (("kind", "new"), ("result", "issued")))], 1)


class RateLimitEventTests(SynchronousTestCase):
    def test_limit_alerts_become_events_and_metrics(self) -> None:
        from dcrouter.limits.alerts import Alerts
        from dcrouter.router import report_limit_alerts

        bus = EventBus()
        seen = collect(bus, ("security.*",))
        metrics = RouterMetrics()
        metrics.subscribe(bus)
        alerts = Alerts(hits=2)
        report_limit_alerts(alerts, bus, "smtp")
        for _ in range(2):
            alerts.refused("anonymous.messages.0 (messages per client address)", "192.0.2.9", 60.0, 1000.0)
        self.assertEqual([e.type for e in seen], ["security.rate_limit"] * 2)
        self.assertEqual([(e.fields["kind"], e.fields["count"]) for e in seen], [("100%", 1), ("hits", 2)])
        self.assertEqual({(e.fields["protocol"], e.fields["key"]) for e in seen}, {("smtp", "192.0.2.9")})
        found = samples(metrics)
        self.assertEqual(
            found[("dcrouter_security_events_total", (("rule", "hits"), ("type", "rate_limit")))], 1
        )
        self.assertEqual(
            found[("dcrouter_security_events_total", (("rule", "100%"), ("type", "rate_limit")))], 1
        )
