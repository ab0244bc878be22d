"""Active health checks on a Clock: the rise/fall state machine, timeouts, the three probe kinds over
in-memory connections, and the target health the proxy orders targets by."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.net.healthcheck import HealthCheckRule, TargetCheck, make_probe
from dcrouter.net.targets import Target, TargetHealth

T = Target("b.test", "127.0.0.2", 8080)


class StateMachineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.results: list[bool] = []  # what the next probes answer (True: pass), then the last again
        self.probes = 0
        self.changes: list[tuple[bool, str]] = []
        rule = HealthCheckRule(interval=2.0, timeout=1.0, rise=2, fall=3)
        self.check = TargetCheck(T, rule, self.probe, self.clock, self.changed)

    def probe(self, target: Target) -> Deferred[None]:
        self.probes += 1
        ok = self.results.pop(0) if len(self.results) > 1 else self.results[0]
        return succeed(None) if ok else fail(ConnectionRefusedError("refused"))

    def changed(self, target: Target, up: bool, reason: str) -> None:
        self.assertEqual(target, T)
        self.changes.append((up, reason))

    def test_fall_failures_in_a_row_take_it_down(self) -> None:
        self.results = [False, False, True, False, False, False]
        self.check.start()  # probe 1 at once
        self.clock.advance(2)
        self.clock.advance(2)  # a pass resets the count
        self.assertEqual((self.check.up, self.changes), (True, []))
        self.clock.advance(2)
        self.clock.advance(2)
        self.assertTrue(self.check.up)
        self.clock.advance(2)  # the third failure in a row
        self.assertFalse(self.check.up)
        self.assertEqual(len(self.changes), 1)
        self.assertFalse(self.changes[0][0])
        self.assertIn("refused", self.changes[0][1])
        self.assertEqual(self.probes, 6)

    def test_rise_passes_in_a_row_bring_it_back(self) -> None:
        self.results = [False, False, False, True, False, True, True]
        self.check.start()
        self.clock.advance(2)
        self.clock.advance(2)
        self.assertFalse(self.check.up)
        self.clock.advance(2)  # one pass
        self.clock.advance(2)  # a failure resets
        self.clock.advance(2)
        self.assertFalse(self.check.up)
        self.clock.advance(2)  # the second pass in a row
        self.assertTrue(self.check.up)
        self.assertEqual([up for up, _ in self.changes], [False, True])

    def test_a_probe_that_does_not_answer_times_out(self) -> None:
        pending: list[Deferred[None]] = []

        def silent(target: Target) -> Deferred[None]:
            pending.append(Deferred())
            return pending[-1]

        rule = HealthCheckRule(interval=2.0, timeout=1.0, rise=1, fall=1)
        check = TargetCheck(T, rule, silent, self.clock, self.changed)
        check.start()
        self.clock.advance(0.9)
        self.assertEqual(self.changes, [])
        self.clock.advance(0.1)
        self.assertEqual(self.changes, [(False, "no answer within 1s")])
        # The next probe starts an interval after the last one ended.
        self.assertEqual(len(pending), 1)
        self.clock.advance(2)
        self.assertEqual(len(pending), 2)

    def test_stop_ends_the_timers(self) -> None:
        self.results = [True]
        self.check.start()
        self.check.stop()
        self.clock.advance(100)
        self.assertEqual((self.probes, self.clock.getDelayedCalls()), (1, []))


class FakeConnect:
    """Connects probe protocols to StringTransports; remembers them."""

    def __init__(self) -> None:
        self.protocols: list[Any] = []
        self.tls: list[bool] = []

    def __call__(self, target: Target, factory: Any, tls: bool) -> Deferred[Protocol]:
        protocol = factory()
        protocol.makeConnection(StringTransport())
        self.protocols.append(protocol)
        self.tls.append(tls)
        return succeed(protocol)


def verdict(deferred: Deferred[None]) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    return results[0] if results else "pending"


class ProbeTests(SynchronousTestCase):
    def test_tcp_passes_on_connect(self) -> None:
        connect = FakeConnect()
        probe = make_probe(HealthCheckRule(kind="tcp"), connect, tls=False)
        self.assertIsNone(verdict(probe(T)))
        self.assertTrue(connect.protocols[0].transport.disconnecting)

    def test_http_sends_get_and_checks_the_status(self) -> None:
        connect = FakeConnect()
        rule = HealthCheckRule(kind="http", path="/healthz", expect=(200, 204), host="app.test")
        probe = make_probe(rule, connect, tls=True)
        ok = probe(T)
        sent = connect.protocols[0].transport.value()
        self.assertTrue(sent.startswith(b"GET /healthz HTTP/1.1\r\nHost: app.test\r\n"), sent)
        self.assertEqual(connect.tls, [True])
        self.assertEqual(verdict(ok), "pending")
        connect.protocols[0].dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertIsNone(verdict(ok))

        bad = probe(T)
        connect.protocols[1].dataReceived(b"HTTP/1.1 503 Unavailable\r\n")
        self.assertIn("HTTP status 503", str(verdict(bad).value))

        garbage = probe(T)
        connect.protocols[2].dataReceived(b"SSH-2.0-OpenSSH\r\n")
        self.assertIn("no HTTP status line", str(verdict(garbage).value))

        closed = probe(T)
        connect.protocols[3].connectionLost(Failure(ConnectionDone()))
        self.assertIn("closed", str(verdict(closed).value))

    def test_http_host_defaults_to_the_target(self) -> None:
        connect = FakeConnect()
        make_probe(HealthCheckRule(kind="http"), connect, tls=False)(T)
        self.assertIn(b"Host: b.test\r\n", connect.protocols[0].transport.value())
        make_probe(HealthCheckRule(kind="http"), connect, tls=False)(Target("::1", "::1", 80))
        self.assertIn(b"Host: [::1]\r\n", connect.protocols[1].transport.value())

    def test_tls_waits_for_the_handshake(self) -> None:
        connect = FakeConnect()
        probe = make_probe(HealthCheckRule(kind="tls"), connect, tls=False)
        done = probe(T)
        self.assertEqual((connect.tls, verdict(done)), ([True], "pending"))
        connect.protocols[0].handshakeCompleted()
        self.assertIsNone(verdict(done))
        failed = probe(T)
        connect.protocols[1].connectionLost(Failure(ConnectionDone()))
        self.assertIn("TLS handshake failed", str(verdict(failed).value))


class TargetHealthTests(SynchronousTestCase):
    def test_a_checked_down_target_gets_no_connection_until_it_passes(self) -> None:
        health = TargetHealth(Clock(), 30)
        other = Target("c.test", "127.0.0.3", 8080)
        health.check_failed(T)
        self.assertEqual(health.arrange([T, other]), [other])
        self.assertEqual(health.order("r", [T, other]), [other])
        self.assertTrue(health.is_failing(T))
        health.mark_down(T)  # a passive mark too
        health.check_passed(T)
        self.assertEqual(health.arrange([T, other]), [T, other])  # both forgotten
