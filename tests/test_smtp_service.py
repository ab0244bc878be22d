"""SmtpService: binding the SMTP listeners paused and resuming them, and stopping SMTP ingress as an MTA
does. The listening ports stop first, idle sessions get 421 4.3.2 at once, transactions in flight get up to
the grace period, and the stop's Deferred fires once every session is gone (or, with a peer that never lets
go, a bounded time after the grace period)."""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from dcrouter.net.certfiles import generate_self_signed, server_tls_options
from dcrouter.net.listen import LISTEN_BACKLOG, ListenError
from dcrouter.smtp.protocol import ESMTPServerFactory
from dcrouter.smtp.service import CLOSE_WAIT, SmtpService
from tests.smtp_fixtures import START_TIME, Server, connect, make_config, make_factory
from tests.test_net_listen import PortsReactor
from tests.test_smtp_lifetime import MESSAGE, SHUTTING_DOWN, in_data, queued

GRACE = 20.0


class FakePort:
    """A listening port whose stop the test may hold; records when it was asked to stop."""

    def __init__(self, log: list[str], held: bool = False) -> None:
        self.log = log
        self.stopped: Deferred[None] = Deferred() if held else succeed(None)

    def stopListening(self) -> Deferred[None]:
        self.log.append("port stopped")
        return self.stopped


class SmtpServiceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START_TIME)
        config = make_config(shutdown_grace_period=int(GRACE * 1000))
        self.service = SmtpService(config, reactor=self.clock, factory_for=partial(make_factory, config))
        self.assertEqual(self.service.grace_period, GRACE)
        self.service.startService()

    def connect(self) -> Server:
        return connect(clock=self.clock, sessions=self.service.sessions)

    def test_ports_stop_before_sessions_are_told(self) -> None:
        log: list[str] = []
        port = FakePort(log, held=True)
        self.service.add_port(port)
        server = self.connect()
        stopping = self.service.stopService()
        self.assertEqual(log, ["port stopped"])
        self.assertEqual(server.take(), b"")
        port.stopped.callback(None)
        self.assertEqual(server.take(), SHUTTING_DOWN)
        self.assertNoResult(stopping)
        server.protocol.connectionLost()
        self.assertIsNone(self.successResultOf(stopping))

    def test_nothing_open_stops_at_once(self) -> None:
        self.service.add_port(FakePort([]))
        self.assertIsNone(self.successResultOf(self.service.stopService()))
        self.assertFalse(self.service.running)

    def test_transaction_in_flight_finishes_within_grace(self) -> None:
        idle, busy = self.connect(), self.connect()
        in_data(busy)
        stopping = self.service.stopService()
        self.assertEqual(idle.take(), SHUTTING_DOWN)
        idle.protocol.connectionLost()
        self.clock.advance(GRACE - 1)
        self.assertEqual(busy.take(), b"")
        self.assertEqual(busy.exchange(MESSAGE), queued(busy) + SHUTTING_DOWN)
        self.assertNoResult(stopping)
        busy.protocol.connectionLost()
        self.successResultOf(stopping)
        self.assertEqual(len(busy.queue.items), 1)

    def test_grace_over_closes_what_is_left(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        server = self.connect()
        in_data(server)
        server.exchange(b"Subject: slow\r\n")
        stopping = self.service.stopService()
        self.clock.advance(GRACE - 0.5)
        self.assertEqual(server.take(), b"")
        self.clock.advance(0.5)
        self.assertEqual(server.take(), SHUTTING_DOWN)
        self.assertTrue(server.transport.disconnecting)
        self.assertNoResult(stopping)
        server.protocol.connectionLost()
        self.successResultOf(stopping)
        self.assertEqual(server.queue.items, [])
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("SMTP: 1 session(s) open; transactions in flight have up to 20 s", text)
        self.assertIn("SMTP: grace period over; closing 1 session(s) with 421 4.3.2", text)

    def test_peer_that_never_lets_go_is_aborted(self) -> None:
        server = self.connect()
        in_data(server)
        stopping = self.service.stopService()
        self.clock.advance(GRACE)
        self.assertEqual(server.take(), SHUTTING_DOWN)
        self.assertFalse(server.transport.disconnected)  # asked to close, flushing first
        self.clock.advance(CLOSE_WAIT)
        self.assertTrue(server.transport.disconnected)  # aborted
        self.assertNoResult(stopping)
        self.clock.advance(CLOSE_WAIT)
        self.successResultOf(stopping)  # bounded even if the transport never reports the loss

    def test_stop_is_idempotent(self) -> None:
        server = self.connect()
        in_data(server)
        first = self.service.stopService()
        second = self.service.stopService()
        server.exchange(MESSAGE)
        server.protocol.connectionLost()
        self.successResultOf(first)
        self.successResultOf(second)

    def test_restart_greets_again(self) -> None:
        self.successResultOf(self.service.stopService())
        self.service.startService()
        server = connect(clock=self.clock, sessions=self.service.sessions, greet=False)
        self.assertTrue(server.take().startswith(b"220 "))
        in_data(server)


class BindingTests(unittest.SynchronousTestCase):
    """Binding: every port of smtpConfig.ports on bindAddress, paused, TLS from the first byte on implicit-TLS
    ports; once; resumed and logged by startService."""

    def service(self, reactor: Any, **config: Any) -> SmtpService:
        smtp = make_config(bind_address="127.0.0.1", **config)
        cert, key = generate_self_signed(smtp.hostname)
        self.tls_loads = 0

        def load_tls() -> Any:
            self.tls_loads += 1
            return server_tls_options(cert, key)

        return SmtpService(
            smtp,
            reactor=reactor,
            factory_for=partial(make_factory, smtp, authenticator=None),
            load_tls=load_tls,
        )

    def test_binds_every_port_with_its_factory(self) -> None:
        reactor = MemoryReactorClock()
        service = self.service(reactor)
        self.assertEqual((reactor.tcpServers, self.tls_loads), ([], 0))
        service.bind()
        self.assertEqual(self.tls_loads, 1)
        self.assertEqual(
            [(port, backlog, interface) for port, _, backlog, interface in reactor.tcpServers],
            [
                (25, LISTEN_BACKLOG, "127.0.0.1"),
                (587, LISTEN_BACKLOG, "127.0.0.1"),
                (465, LISTEN_BACKLOG, "127.0.0.1"),
            ],
        )
        factories = {port: factory for port, factory, _, _ in reactor.tcpServers}
        self.assertIsInstance(factories[25], ESMTPServerFactory)
        self.assertIsNotNone(factories[25].tls_options)
        self.assertIsInstance(factories[465], TLSMemoryBIOFactory)
        self.assertIsInstance(factories[465].wrappedFactory, ESMTPServerFactory)
        # One registry of open sessions for every port: a stop drains them all.
        self.assertIs(factories[25].sessions, service.sessions)
        self.assertIs(factories[465].wrappedFactory.sessions, service.sessions)
        self.assertEqual(service.ports, {25: 25, 587: 587, 465: 465})
        self.assertEqual(
            [(listener.configured_port, listener.description) for listener in service.listeners],
            [
                (25, "mx, STARTTLS"),
                (587, "submission, STARTTLS, AUTH required"),
                (465, "submission, implicit TLS, AUTH required"),
            ],
        )

    def test_binds_once_until_stopped(self) -> None:
        reactor = MemoryReactorClock()
        service = self.service(reactor, ports=[25])
        service.bind()
        service.bind()
        self.assertEqual((len(reactor.tcpServers), self.tls_loads), (1, 1))
        service.startService()
        self.successResultOf(service.stopService())
        self.assertEqual(service.listeners, [])
        service.bind()
        self.assertEqual((len(reactor.tcpServers), self.tls_loads), (2, 2))

    def test_paused_until_started_then_logged(self) -> None:
        reactor = PortsReactor()
        service = self.service(reactor, ports=[25, 465])
        service.bind()
        self.assertEqual(reactor.log, ["25 bound", "25 paused", "465 bound", "465 paused"])
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(reactor.log[4:], ["25 reading", "465 reading"])
        self.assertEqual(
            [formatEvent(event) for event in events if "listening" in event.get("log_format", "")],
            [
                "SMTP listening on 127.0.0.1:25 (mx, STARTTLS)",
                "SMTP listening on 127.0.0.1:465 (submission, implicit TLS, AUTH required)",
            ],
        )

    def test_a_port_in_use_is_named_and_nothing_stays_bound(self) -> None:
        reactor = PortsReactor(taken=(587,))
        service = self.service(reactor)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        error = self.assertRaises(ListenError, service.bind)
        message = "cannot listen for SMTP on 127.0.0.1:587: [Errno 98] Address already in use"
        self.assertEqual(str(error), message)
        self.assertEqual(reactor.log, ["25 bound", "25 paused", "25 closed"])
        self.assertEqual((service.ports, service.listeners), ({}, []))
        critical = [formatEvent(event) for event in events if event["log_level"] == LogLevel.critical]
        self.assertEqual(critical, [message])
