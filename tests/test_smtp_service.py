"""SmtpService: stopping SMTP ingress as an MTA does. The listening ports stop first, idle sessions get
421 4.3.2 at once, transactions in flight get up to the grace period, and the stop's Deferred fires once every
session is gone (or, with a peer that never lets go, a bounded time after the grace period)."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from dcrouter.smtp.service import CLOSE_WAIT, SmtpService
from tests.smtp_fixtures import START_TIME, Server, connect
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
        self.service = SmtpService(clock=self.clock, grace_period=GRACE)
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
