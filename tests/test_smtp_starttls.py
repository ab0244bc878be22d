"""STARTTLS and implicit TLS through real in-memory TLS handshakes (iosim + TLSMemoryBIOProtocol)."""

from __future__ import annotations

import base64
import re

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.trial import unittest

from dcrouter.net.certfiles import generate_self_signed, server_tls_options
from tests.smtp_fixtures import (
    GREETING,
    HOSTNAME,
    PASSWORD,
    PEER_IP,
    START_TIME,
    ControlledQueue,
    StartTLSFakeTransport,
    make_factory,
)

CERT, KEY = generate_self_signed(HOSTNAME)
EHLO_BEFORE_TLS = (
    b"250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n"
    b"250-SMTPUTF8\r\n250 STARTTLS\r\n"
)
EHLO_IN_TLS = (
    b"250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n"
    b"250-SMTPUTF8\r\n250 AUTH PLAIN LOGIN\r\n"
)
PLAIN = base64.b64encode(b"\0alice\0" + PASSWORD.encode())


class Client(Protocol):
    """Collects what the server sends."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def take(self) -> bytes:
        out, self.received = self.received, b""
        return out


def client_tls() -> object:
    return optionsForClientTLS(HOSTNAME, trustRoot=Certificate.loadPEM(CERT))


class StartTLSTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START_TIME)
        self.queue = ControlledQueue()
        factory = make_factory(tls_options=server_tls_options(CERT, KEY), clock=self.clock, queue=self.queue)
        self.client, self.server, self.pump = connectedServerAndClient(
            lambda: factory.buildProtocol(None),
            Client,
            clientTransportFactory=lambda p: StartTLSFakeTransport(p, False),
            serverTransportFactory=lambda p: StartTLSFakeTransport(
                p, True, peerAddress=IPv4Address("TCP", PEER_IP, 40000)
            ),
            clock=self.clock,
        )
        self.assertEqual(self.client.take(), GREETING)

    def send(self, data: bytes) -> bytes:
        self.client.transport.write(data)
        self.pump.flush()
        return self.client.take()

    def start_tls(self) -> None:
        self.assertEqual(self.send(b"STARTTLS\r\n"), b"220 2.0.0 Ready to start TLS\r\n")
        self.client.transport.startTLS(client_tls())
        self.pump.flush()
        self.assertIsNotNone(self.server.session.tls)

    def test_pipelined_bytes_after_starttls_are_discarded(self) -> None:
        self.assertEqual(self.send(b"EHLO client.example\r\n"), EHLO_BEFORE_TLS)
        self.assertEqual(
            self.send(b"STARTTLS\r\nMAIL FROM:<x@y.example>\r\nRCPT TO:<a@example.org>\r\n"),
            b"220 2.0.0 Ready to start TLS\r\n",
        )
        self.client.transport.startTLS(client_tls())
        self.pump.flush()
        self.assertRegex(self.server.session.tls, r"^TLSv1\.[23] \S+$")
        # The session was reset: MAIL needs a new EHLO; nothing pipelined before the handshake took effect.
        self.assertEqual(
            self.send(b"MAIL FROM:<a@b.example>\r\n"),
            b"503 5.5.1 Error: send HELO/EHLO first\r\n",
        )
        self.assertEqual(self.send(b"EHLO client.example\r\n"), EHLO_IN_TLS)
        self.assertEqual(self.send(b"RCPT TO:<a@example.org>\r\n"), b"503 5.5.1 Error: need MAIL command\r\n")

    def test_replies_held_before_starttls_go_out_in_plaintext(self) -> None:
        # EHLO and STARTTLS in one read: their replies are one write, made before the handshake begins.
        self.assertEqual(
            self.send(b"EHLO client.example\r\nSTARTTLS\r\n"),
            EHLO_BEFORE_TLS + b"220 2.0.0 Ready to start TLS\r\n",
        )
        self.client.transport.startTLS(client_tls())
        self.pump.flush()
        self.assertIsNotNone(self.server.session.tls)
        self.assertEqual(self.send(b"EHLO client.example\r\n"), EHLO_IN_TLS)

    def test_plaintext_injected_before_handshake_is_never_executed(self) -> None:
        self.send(b"EHLO client.example\r\n")
        self.assertEqual(self.send(b"STARTTLS\r\n"), b"220 2.0.0 Ready to start TLS\r\n")
        # A man in the middle answers for the client in plain text: the server's TLS layer refuses it.
        self.assertEqual(self.send(b"MAIL FROM:<x@y.example>\r\nNOOP\r\n"), b"")
        self.assertTrue(self.server.transport.disconnecting or self.server.transport.disconnected)
        self.assertEqual(self.server.session.helo, None)

    def test_auth_only_after_tls_and_message_through_tls(self) -> None:
        self.send(b"EHLO client.example\r\n")
        self.assertEqual(
            self.send(b"AUTH PLAIN " + PLAIN + b"\r\n"),
            b"538 5.7.11 Encryption required for requested authentication mechanism\r\n",
        )
        self.start_tls()
        self.assertEqual(self.send(b"EHLO client.example\r\n"), EHLO_IN_TLS)
        self.assertEqual(self.send(b"STARTTLS\r\n"), b"503 5.5.1 Error: TLS already active\r\n")
        self.assertEqual(
            self.send(b"AUTH PLAIN " + PLAIN + b"\r\n"),
            b"235 2.7.0 Authentication successful\r\n",
        )
        out = self.send(
            b"MAIL FROM:<alice@example.net>\r\nRCPT TO:<bob@elsewhere.example>\r\n"
            b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n"
        )
        item = self.queue.items[0]
        self.assertEqual(
            out,
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
            b"250 2.0.0 Ok: queued as " + item.id.encode() + b"\r\n",
        )
        self.assertEqual(item.envelope.auth_user, "alice")
        self.assertEqual(item.envelope.tls, self.server.session.tls)
        received = self.queue.bodies[0].split(b"\r\nSubject:")[0].decode()
        self.assertRegex(received, r"with ESMTPSA \(TLSv1\.[23] [A-Z0-9_-]+\)\r\n\tid " + item.id)
        self.assertNotIn("alice", received)


class ImplicitTLSTests(unittest.TestCase):
    def test_implicit_tls(self) -> None:
        clock = Clock()
        factory = make_factory(port=465, tls_options=server_tls_options(CERT, KEY), clock=clock)
        server_tls = TLSMemoryBIOFactory(server_tls_options(CERT, KEY), False, factory, clock=clock)
        client_tls_factory = TLSMemoryBIOFactory(client_tls(), True, Factory.forProtocol(Client), clock=clock)
        client_wrapper, server_wrapper, pump = connectedServerAndClient(
            lambda: server_tls.buildProtocol(IPv4Address("TCP", PEER_IP, 40000)),
            lambda: client_tls_factory.buildProtocol(None),
            serverTransportFactory=lambda p: StartTLSFakeTransport(
                p, True, peerAddress=IPv4Address("TCP", PEER_IP, 40000)
            ),
            clock=clock,
        )
        client, server = client_wrapper.wrappedProtocol, server_wrapper.wrappedProtocol
        self.assertEqual(client.take(), GREETING)
        self.assertTrue(re.match(r"^TLSv1\.[23] \S+$", server.session.tls))
        self.assertTrue(server.session.implicit_tls)
        client_wrapper.write(b"EHLO client.example\r\nSTARTTLS\r\n")
        pump.flush()
        self.assertEqual(client.take(), EHLO_IN_TLS + b"503 5.5.1 Error: TLS already active\r\n")
