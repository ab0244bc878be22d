"""The client against real peers in memory (iosim, with real TLS): STARTTLS, dcrouter's own server end to
end, and twisted.mail's server. Against aiosmtpd over 127.0.0.1 sockets: tests/integration/."""

from __future__ import annotations

import io
from collections.abc import Coroutine
from typing import Any, TypeVar

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.mail import smtp
from twisted.test.iosim import FakeTransport, connectedServerAndClient
from twisted.trial import unittest
from zope.interface import implementer

from dcrouter.delivery.client import ESMTPClient, SMTPClientError
from dcrouter.delivery.dotstuff import CHUNK_SIZE
from dcrouter.mail.reply import Reply
from dcrouter.net.certfiles import generate_self_signed, server_tls_options
from tests.smtp_fixtures import (
    HOSTNAME,
    PASSWORD,
    PEER_IP,
    START_TIME,
    ControlledQueue,
    StartTLSFakeTransport,
    make_config,
    make_factory,
)

T = TypeVar("T")
CERT, KEY = generate_self_signed(HOSTNAME)
OTHER_CERT, _ = generate_self_signed(HOSTNAME)


def run(work: Coroutine[Any, Any, T]) -> Deferred[T]:
    return Deferred.fromCoroutine(work)


def client_tls(cert: bytes = CERT, name: str = HOSTNAME) -> Any:
    return optionsForClientTLS(name, trustRoot=Certificate.loadPEM(cert))


def dotted_message(size: int = 3 * CHUNK_SIZE) -> bytes:
    """A message with a line starting with "." on every chunk boundary, and ".", "..x" and 8-bit lines."""
    out = bytearray(b"Subject: dots\r\n\r\n.first body line\r\n.\r\n..x\r\nh\xc3\xa9llo w\xc3\xb6rld\r\n")
    for boundary in range(CHUNK_SIZE, size, CHUNK_SIZE):
        # Pad with short lines (the server allows 1000 octets) so that the next line starts at the boundary.
        gap = boundary - len(out)
        assert gap >= 2
        while gap > 200:
            out += b"a" * 98 + b"\r\n"
            gap -= 100
        if gap > 100:
            out += b"b" * (gap // 2 - 2) + b"\r\n"
            gap -= gap // 2
        out += b"c" * (gap - 2) + b"\r\n"
        out += b".dot at a chunk boundary\r\n"
    return bytes(out) + b".\r\nlast line\r\n"


def assert_same_bytes(test: unittest.TestCase, got: bytes, expected: bytes) -> None:
    """Equality of large messages, failing with the first difference (assertEqual would diff megabytes)."""
    if got == expected:
        return
    pairs = enumerate(zip(got, expected, strict=False))
    offset = next((i for i, (a, b) in pairs if a != b), min(len(got), len(expected)))
    test.fail(
        f"messages differ at offset {offset} (lengths {len(got)}, {len(expected)}):"
        f" {got[offset - 20 : offset + 20]!r} != {expected[offset - 20 : offset + 20]!r}"
    )


class DottedMessageTests(unittest.TestCase):
    def test_dots_start_every_chunk(self) -> None:
        message = dotted_message()
        for boundary in range(CHUNK_SIZE, len(message) - 20, CHUNK_SIZE):
            self.assertEqual(message[boundary - 2 : boundary + 1], b"\r\n.")
        self.assertTrue(all(len(line) < 998 for line in message.split(b"\r\n")))


class OwnServerTests(unittest.TestCase):
    """ESMTPClient against ESMTPServerProtocol, in memory, with a real TLS handshake."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START_TIME)
        self.queue = ControlledQueue()
        factory = make_factory(
            make_config(max_message_size=1_000_000),
            tls_options=server_tls_options(CERT, KEY),
            clock=self.clock,
            queue=self.queue,
        )
        self.client, self.server, self.pump = connectedServerAndClient(
            lambda: factory.buildProtocol(None),
            lambda: ESMTPClient(clock=self.clock, reply_timeout=30, send_timeout=600),
            clientTransportFactory=lambda p: StartTLSFakeTransport(p, False),
            serverTransportFactory=lambda p: StartTLSFakeTransport(
                p, True, peerAddress=IPv4Address("TCP", PEER_IP, 40000)
            ),
            clock=self.clock,
        )

    def wait(self, work: Coroutine[Any, Any, T]) -> T:
        done = run(work)
        self.pump.flush()
        return self.successResultOf(done)

    def test_starttls_auth_and_a_dotted_message_arrives_unchanged(self) -> None:
        self.assertEqual(self.wait(self.client.wait_greeting()).code, 220)
        before = self.wait(self.client.ehlo("client.example"))
        self.assertTrue(before.starttls)
        self.assertEqual(before.auth, frozenset())
        after = self.wait(self.client.starttls(client_tls(), "client.example"))
        self.assertTrue(self.client.is_tls)
        self.assertRegex(self.server.session.tls, r"^TLSv1\.[23] ")
        self.assertFalse(after.starttls)
        self.assertEqual(after.auth, frozenset({"PLAIN", "LOGIN"}))
        self.assertIsNone(self.wait(self.client.authenticate("alice", PASSWORD)))
        message = dotted_message()
        result = self.wait(
            self.client.send(
                "alice@example.net",
                ["bob@example.org", "carol@example.org"],
                io.BytesIO(message),
                len(message),
                eight_bit=True,
            )
        )
        self.assertEqual(result.data.code if result.data else None, 250)
        self.assertEqual(set(result.recipients), {"bob@example.org", "carol@example.org"})
        received, _, stored = self.queue.bodies[0].partition(b"\r\nSubject: dots\r\n")
        self.assertTrue(received.startswith(b"Received: "))
        assert_same_bytes(self, b"Subject: dots\r\n" + stored, message)
        self.assertEqual(
            self.queue.items[0].envelope.mail_params, {"SIZE": str(len(message)), "BODY": "8BITMIME"}
        )
        # The same connection takes a second message after RSET.
        self.assertEqual(self.wait(self.client.reset()), Reply(250, "2.0.0", "Ok"))
        result = self.wait(self.client.send("alice@example.net", ["bob@example.org"], io.BytesIO(b"x"), 1))
        self.assertTrue(self.queue.bodies[1].endswith(b"\r\nx\r\n"))
        self.wait(self.client.quit())
        self.assertFalse(self.client.connected)

    def test_failed_handshake_ends_the_session(self) -> None:
        self.wait(self.client.ehlo("client.example"))
        done = run(self.client.starttls(client_tls(OTHER_CERT), "client.example"))
        self.pump.flush()
        error = self.failureResultOf(done, SMTPClientError).value
        self.assertEqual((error.reply.code, error.reply.enhanced), (421, "4.4.2"))
        self.assertTrue(error.temporary)
        self.assertIsNone(self.server.session.helo)  # no EHLO ever reached the server, in clear or not


class ScriptedServer(Protocol):
    """A server that answers STARTTLS with ``starttls_reply`` (then starts TLS if it is a 220); EHLO inside
    TLS offers AUTH PLAIN; RSET says "real"."""

    def __init__(self, starttls_reply: bytes) -> None:
        self.starttls_reply = starttls_reply
        self.buffer = b""
        self.tls = False

    def connectionMade(self) -> None:
        self.transport.write(b"220 scripted.example ESMTP\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if line.startswith(b"EHLO"):
                offer = b"AUTH PLAIN" if self.tls else b"STARTTLS"
                self.transport.write(b"250-scripted.example\r\n250 " + offer + b"\r\n")
            elif line == b"STARTTLS":
                self.transport.write(self.starttls_reply)
                if self.starttls_reply.startswith(b"220"):
                    self.transport.startTLS(server_tls_options(CERT, KEY))
                    self.tls = True
            elif line == b"RSET":
                self.transport.write(b"250 2.0.0 real\r\n")


class InjectionTests(unittest.TestCase):
    def connect(self, starttls_reply: bytes) -> None:
        self.clock = Clock()
        self.client, self.server, self.pump = connectedServerAndClient(
            lambda: ScriptedServer(starttls_reply),
            lambda: ESMTPClient(clock=self.clock, reply_timeout=30, send_timeout=600),
            clientTransportFactory=lambda p: StartTLSFakeTransport(p, False),
            serverTransportFactory=lambda p: StartTLSFakeTransport(p, True),
            clock=self.clock,
        )
        done = run(self.client.ehlo("client.example"))
        self.pump.flush()
        self.assertTrue(self.successResultOf(done).starttls)

    def test_plaintext_injected_after_220_is_discarded(self) -> None:
        self.connect(b"220 go\r\n250 fake\r\n")
        done = run(self.client.starttls(client_tls(), "client.example"))
        self.pump.flush()
        # Had "250 fake" been read, it would have answered the EHLO sent inside TLS.
        self.assertEqual(self.successResultOf(done).auth, frozenset({"PLAIN"}))
        self.assertTrue(self.client.is_tls)
        done = run(self.client.reset())
        self.pump.flush()
        self.assertEqual(self.successResultOf(done), Reply(250, "2.0.0", "real"))

    def test_refused_starttls_leaves_the_session_usable(self) -> None:
        self.connect(b"454 4.7.0 TLS not available due to temporary reason\r\n")
        done = run(self.client.starttls(client_tls(), "client.example"))
        self.pump.flush()
        error = self.failureResultOf(done, SMTPClientError).value
        self.assertEqual(error.reply.code, 454)
        self.assertTrue(error.temporary)
        self.assertFalse(self.client.is_tls)
        done = run(self.client.reset())
        self.pump.flush()
        self.assertEqual(self.successResultOf(done).lines(), ("real",))


@implementer(smtp.IMessage)
class _Collected:
    def __init__(self, sink: list[bytes]) -> None:
        self.sink = sink
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> Deferred[bytes]:
        self.sink.append(b"".join(line + b"\r\n" for line in self.lines))
        done: Deferred[bytes] = Deferred()
        done.callback(b"ok")
        return done

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: Any) -> Any:
        return lambda: _Collected(self.messages)


class _DeliveringFactory(smtp.SMTPFactory):
    protocol = smtp.ESMTP

    def __init__(self, delivery: _Delivery) -> None:
        super().__init__()
        self.delivery = delivery

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        protocol.delivery = self.delivery
        return protocol


class TwistedMailServerTests(unittest.TestCase):
    """twisted.mail's ESMTP server (no PIPELINING, no SIZE), in memory: one command at a time."""

    def test_deliver(self) -> None:
        delivery = _Delivery()
        factory = _DeliveringFactory(delivery)
        clock = Clock()

        def server() -> Any:
            protocol = factory.buildProtocol(None)
            protocol.callLater = clock.callLater  # its idle timeout, on the test's clock
            return protocol

        client, _, pump = connectedServerAndClient(
            server,
            lambda: ESMTPClient(clock=clock, reply_timeout=10, send_timeout=20),
            serverTransportFactory=lambda p: FakeTransport(
                p, True, peerAddress=IPv4Address("TCP", PEER_IP, 40000)
            ),
            clock=clock,
        )
        # twisted.mail's server is 7-bit; same length, so the dots stay on the chunk boundaries.
        message = dotted_message(3 * CHUNK_SIZE).replace(b"h\xc3\xa9llo w\xc3\xb6rld", b"hello, world!")

        async def deliver() -> Any:
            capabilities = await client.ehlo("client.example")
            self.assertFalse(capabilities.pipelining)
            result = await client.send(
                "a@sender.test", ["x@example.org", "y@example.org"], io.BytesIO(message), len(message)
            )
            await client.quit()
            return result

        done = run(deliver())
        pump.flush()
        result = self.successResultOf(done)
        self.assertEqual(result.data.code if result.data else None, 250)
        self.assertEqual(len(result.recipients), 2)
        # twisted.mail hands each recipient its own copy.
        self.assertEqual(len(delivery.messages), 2)
        for received in delivery.messages:
            assert_same_bytes(self, received, message)
