"""What an idle SMTP session keeps in memory: its per-instance state is in slots, not dictionaries, and
sessions accepted between two changes of their factory share one copy of it (docs/performance.md, "Open files
and idle sessions"; 100,000 sessions held is an aim of issue 14)."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.trial import unittest

from dcrouter.smtp.framing import CommandReceiver
from dcrouter.smtp.protocol import ESMTPServerProtocol
from dcrouter.smtp.session import Session
from tests.smtp_fixtures import PEER_IP, connect, make_factory


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
