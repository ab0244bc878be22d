"""What an idle SMTP session keeps in memory: its per-instance state is in slots, not dictionaries, and
sessions accepted between two changes of their factory share one copy of it (docs/performance.md, "Open files
and idle sessions"; 100,000 sessions held is an aim of issue 14)."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.trial import unittest

from dcrouter.smtp.framing import CommandReceiver
from dcrouter.smtp.protocol import ESMTPServerProtocol
from dcrouter.smtp.session import Session
from tests.smtp_fixtures import PEER_IP, ControlledQueue, connect, make_config, make_factory


class SlotsTests(unittest.TestCase):
    def test_the_protocol_instance_has_no_dictionary(self) -> None:
        """Every attribute a connected, greeted session sets (its own, CommandReceiver's, Protocol's and
        TimeoutMixin's) is a slot: an instance dictionary would cost more than a KiB per session."""
        server = connect()
        server.exchange(b"EHLO client.example\r\n")
        self.assertIsInstance(server.protocol, ESMTPServerProtocol)
        self.assertEqual(vars(server.protocol), {})
        self.assertNotIn("__dict__", ESMTPServerProtocol.__slots__)
        self.assertIn("transport", CommandReceiver.__slots__)

    def test_the_session_state_has_no_dictionary(self) -> None:
        server = connect()
        self.assertIsInstance(server.protocol.session, Session)
        self.assertFalse(hasattr(server.protocol.session, "__dict__"))

    def test_a_new_protocol_starts_with_the_base_class_defaults(self) -> None:
        """The slots stand in for Protocol's and TimeoutMixin's class-level defaults."""
        protocol = make_factory().buildProtocol(IPv4Address("TCP", PEER_IP, 40000))
        self.assertIsNone(protocol.transport)
        self.assertEqual(protocol.connected, 0)
        self.assertIsNone(protocol.timeOut)


class FactorySnapshotTests(unittest.TestCase):
    def test_sessions_share_one_copy_until_the_factory_changes(self) -> None:
        factory = make_factory()
        address = IPv4Address("TCP", PEER_IP, 40000)
        first, second = factory.buildProtocol(address), factory.buildProtocol(address)
        self.assertIs(first._f, second._f)
        self.assertIsNot(first._f, factory)
        factory.authenticator = None
        third = factory.buildProtocol(address)
        self.assertIsNot(third._f, first._f)
        self.assertIsNone(third._f.authenticator)
        self.assertIsNotNone(first._f.authenticator)
        self.assertIs(first.factory, factory)


class OneTimerTests(unittest.TestCase):
    """connectionTimeout and socketTimeout share one timer per session, due at whichever comes first."""

    def test_an_idle_session_holds_one_timer(self) -> None:
        server = connect()
        server.exchange(b"EHLO client.example\r\n")
        self.assertEqual(len(server.clock.getDelayedCalls()), 1)

    def test_silence_ends_the_session_at_socket_timeout(self) -> None:
        server = connect(make_config(socket_timeout=30_000, connection_timeout=600_000))
        server.exchange(b"EHLO client.example\r\n")
        server.clock.advance(29.9)
        self.assertEqual(server.take(), b"")
        server.clock.advance(0.1)
        self.assertTrue(server.take().startswith(b"421 4.4.2 "))
        self.assertTrue(server.transport.disconnecting)
        self.assertEqual(server.clock.getDelayedCalls(), [])

    def test_input_moves_the_socket_timeout_on(self) -> None:
        server = connect(make_config(socket_timeout=30_000, connection_timeout=600_000))
        server.clock.advance(20)
        server.exchange(b"NOOP\r\n")
        server.clock.advance(20)
        self.assertFalse(server.transport.disconnecting)
        server.clock.advance(10)
        self.assertTrue(server.take().startswith(b"421 4.4.2 "))

    def test_a_talking_session_ends_at_connection_timeout(self) -> None:
        """A client that never falls silent for socketTimeout is still closed once the session has lasted
        connectionTimeout, counted from the connection."""
        server = connect(make_config(socket_timeout=30_000, connection_timeout=100_000))
        for _ in range(4):
            server.clock.advance(20)
            self.assertTrue(server.exchange(b"NOOP\r\n").startswith(b"250 "))
        server.clock.advance(19.9)  # 99.9 s since the connection
        self.assertFalse(server.transport.disconnecting)
        server.clock.advance(0.1)
        self.assertTrue(server.take().startswith(b"421 4.4.2 "))
        self.assertTrue(server.transport.disconnecting)

    def test_connection_timeout_also_runs_while_a_command_waits(self) -> None:
        """While a command waits, socketTimeout is suspended; connectionTimeout is not."""
        queue = ControlledQueue(auto=False)
        server = connect(make_config(socket_timeout=30_000, connection_timeout=100_000), queue=queue)
        server.exchange(b"EHLO client.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
        server.exchange(b"DATA\r\n")
        server.exchange(b"Subject: x\r\n\r\nbody\r\n.\r\n")  # the queue has not answered: the command waits
        self.assertIsNone(server.protocol.timeOut)
        server.clock.advance(99)
        self.assertFalse(server.transport.disconnecting)
        server.clock.advance(1)
        self.assertTrue(server.transport.disconnecting)
