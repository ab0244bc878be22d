"""Why dcrouter has its own ESMTP server and client: twisted.mail's defects, reproduced against the installed
Twisted (docs/decisions.md, "Why not twisted.mail.smtp", names each test).

These tests exercise ``twisted.mail.smtp`` itself, not dcrouter. Each asserts the defective behaviour byte
for byte; when a Twisted release no longer shows it, the test is skipped with a message saying so, which is
the cue to revisit the decision. A behaviour that is neither the known defect nor its fix fails the test.

The transcripts run in memory on ``StringTransport``. Where a defect is about STARTTLS, the transport records
the point at which the protocol called ``startTLS``: a real transport encrypts every byte written after it, so
what the protocol does with input it had buffered before that point is exactly what matters. The one defect
that needs a real TLS connection (STARTTLS offered on an implicit-TLS port) is in
tests/integration/test_twisted_mail_defects.py.
"""

from __future__ import annotations

import base64
import io
import os
import pickle
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.mail import relaymanager, smtp
from twisted.mail.imap4 import PLAINCredentials  # the SASL PLAIN challenger twisted.mail exports
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from twisted.protocols.basic import FileSender, LineOnlyReceiver
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface import implementer

from dcrouter.net.certfiles import generate_self_signed, server_tls_options

TWISTED = __import__("twisted").__version__


def fixed(what: str) -> SkipTest:
    """The skip raised when the installed Twisted no longer shows a defect."""
    return SkipTest(f"twisted.mail {TWISTED} no longer {what} — revisit docs/decisions.md")


@implementer(ITLSTransport)
class StartTLSRecorder(StringTransport):
    """A StringTransport that notes where the protocol started TLS: a real transport would encrypt every byte
    written after that point."""

    tls_started_at: int | None = None

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        self.tls_started_at = len(self.value())

    def before_tls(self) -> bytes:
        return self.value()[: self.tls_started_at]

    def after_tls(self) -> bytes:
        assert self.tls_started_at is not None, "startTLS was not called"
        return self.value()[self.tls_started_at :]


@implementer(IMessageSMTP)
class Message:
    """A message sink whose end of data answers ``eom``."""

    def __init__(self, eom: Deferred[Any]) -> None:
        self.eom = eom
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> Deferred[Any]:
        return self.eom

    def connectionLost(self) -> None:
        pass


@implementer(IMessageDelivery)
class Delivery:
    """Accepts every sender and recipient; ``sender_check`` and ``end_of_data`` say how the checks answer."""

    def __init__(self) -> None:
        self.sender_check: Deferred[Any] | None = None
        self.end_of_data: Deferred[Any] = succeed(None)

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin if self.sender_check is None else self.sender_check.addCallback(lambda _: origin)

    def validateTo(self, user: Any) -> Any:
        return lambda: Message(self.end_of_data)


@implementer(IRealm)
class Realm:
    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        return IMessageDelivery, Delivery(), lambda: None


def tls_context() -> Any:
    cert, key = generate_self_signed("mx.test")
    return server_tls_options(cert, key)


def server(challengers: dict[bytes, Any] | None = None, portal: Portal | None = None) -> tuple[Any, Any]:
    """A twisted.mail ESMTP server that can STARTTLS, connected to a StartTLSRecorder, after EHLO."""
    protocol = smtp.ESMTP(challengers, tls_context())
    protocol.callLater = Clock().callLater  # its idle timeout, never on the global reactor
    protocol.delivery = Delivery()
    protocol.portal = portal
    transport = StartTLSRecorder()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"EHLO client.example\r\n")
    return protocol, transport


def replies(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\r\n") if line]


class ServerTests(SynchronousTestCase):
    """twisted.mail.smtp.ESMTP, the server."""

    def test_ehlo_advertises_only_auth_and_starttls(self) -> None:
        """No SIZE, PIPELINING, 8BITMIME, SMTPUTF8 or ENHANCEDSTATUSCODES: a gateway needs every one."""
        _, transport = server({b"PLAIN": PLAINCredentials})
        _greeting, _hello, *extensions = replies(transport.value())
        keywords = {line[4:].split(b" ")[0] for line in extensions}
        wanted = {b"SIZE", b"PIPELINING", b"8BITMIME", b"SMTPUTF8", b"ENHANCEDSTATUSCODES"}
        if keywords & wanted:
            raise fixed(f"advertises only AUTH and STARTTLS (it now offers {sorted(keywords & wanted)})")
        self.assertEqual(keywords, {b"AUTH", b"STARTTLS"})

    def test_noop_and_vrfy_are_unknown_commands(self) -> None:
        protocol, transport = server()
        transport.clear()
        protocol.dataReceived(b"NOOP\r\nVRFY postmaster\r\n")
        if not transport.value().startswith(b"500"):
            raise fixed("answers NOOP with 500")
        self.assertEqual(replies(transport.value()), [b"500 Command not implemented"] * 2)

    def test_commands_pipelined_after_starttls_run_inside_tls(self) -> None:
        """CVE-2011-0411's class: a command injected in plaintext behind STARTTLS (by anyone on the path) runs
        after the handshake, inside the encrypted session, and its state (the sender) stays."""
        protocol, transport = server()
        transport.clear()
        protocol.dataReceived(b"STARTTLS\r\nMAIL FROM:<injected@attacker.example>\r\n")
        self.assertEqual(transport.before_tls(), b"220 Begin TLS negotiation now\r\n")
        if protocol._from is None:
            raise fixed("runs commands pipelined after STARTTLS")
        self.assertEqual(transport.after_tls(), b"250 Sender address accepted\r\n")
        self.assertEqual(str(protocol._from), "injected@attacker.example")

    def test_auth_offered_and_accepted_before_tls(self) -> None:
        """AUTH is in the EHLO reply before STARTTLS, and a password sent in plaintext is accepted."""
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        portal = Portal(Realm(), [checker])
        protocol, transport = server({b"PLAIN": PLAINCredentials}, portal)
        self.assertIn(b"250-AUTH PLAIN\r\n", transport.value())
        self.assertIn(b"250 STARTTLS\r\n", transport.value())
        transport.clear()
        protocol.dataReceived(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret") + b"\r\n")
        if not transport.value().startswith(b"235"):
            raise fixed(f"accepts AUTH before TLS (it answered {transport.value()!r})")
        self.assertEqual(transport.value(), b"235 Authentication successful.\r\n")
        self.assertIsNone(transport.tls_started_at)

    def test_replies_out_of_order_when_a_check_is_a_deferred(self) -> None:
        """Twisted #8126: while the sender check waits, the pipelined RCPT runs, is refused for want of a
        sender, and its reply goes out before MAIL's."""
        protocol, transport = server()
        check: Deferred[None] = Deferred()
        protocol.delivery.sender_check = check
        transport.clear()
        protocol.dataReceived(b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<b@example.com>\r\n")
        check.callback(None)
        answers = replies(transport.value())
        if answers[:1] == [b"250 Sender address accepted"]:
            raise fixed("answers pipelined commands out of order (#8126)")
        self.assertEqual(answers, [b"503 Must have sender before recipient", b"250 Sender address accepted"])

    def test_every_failed_delivery_is_550(self) -> None:
        """A temporary failure at the end of DATA (451: try again) is answered 550: the client gives the
        message up."""
        protocol, transport = server()
        protocol.delivery.end_of_data = fail(smtp.SMTPServerError(451, "4.3.0 Try again later"))
        protocol.dataReceived(b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        transport.clear()
        protocol.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        if transport.value().startswith(b"451"):
            raise fixed("turns a 451 at the end of DATA into 550")
        self.assertEqual(transport.value(), b"550 Could not send e-mail\r\n")
        self.flushLoggedErrors(smtp.SMTPServerError)

    def test_long_data_line_turns_the_rest_of_the_body_into_commands(self) -> None:
        """A message line over 16 KiB drops the server back to command mode: the following body lines run as
        SMTP commands (here a HELO; a MAIL/RCPT/DATA would smuggle a second message)."""
        protocol, transport = server()
        protocol.dataReceived(b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        transport.clear()
        protocol.dataReceived(b"X-Long: " + b"x" * (LineOnlyReceiver.MAX_LENGTH + 100) + b"\r\n")
        protocol.dataReceived(b"HELO smuggled.example\r\n")
        answers = replies(transport.value())
        if not any(b"Hello" in answer for answer in answers):
            raise fixed("runs the rest of a message as commands after a long DATA line")
        peer = transport.getPeer().host.encode()
        hello = b"250 " + protocol.host + b" Hello " + peer + b", nice to meet you"
        self.assertEqual(answers, [b"500 Line too long", hello])

    def test_a_line_without_crlf_grows_the_buffer_without_bound(self) -> None:
        """Input with no line end is kept whole (answered with one 500 per read), and the connection stays
        open: 1 MiB sent, 1 MiB held, and it goes on."""
        protocol, transport = server()
        transport.clear()
        chunk = b"A" * LineOnlyReceiver.MAX_LENGTH
        for _ in range(64):
            protocol.dataReceived(chunk)
        held = len(protocol._buffer)
        if held <= 2 * LineOnlyReceiver.MAX_LENGTH or transport.disconnecting:
            raise fixed("keeps an unterminated line without bound")
        self.assertEqual(held, 64 * len(chunk))
        self.assertEqual(replies(transport.value()), [b"500 Line too long"] * 63)


def client(factory: Any) -> tuple[Any, StartTLSRecorder]:
    protocol = factory.buildProtocol(None)
    transport = StartTLSRecorder()
    protocol.makeConnection(transport)
    return protocol, transport


def sender_factory(message: bytes, result: Deferred[Any]) -> Any:
    return smtp.SMTPSenderFactory("a@sender.example", ["b@example.com"], io.BytesIO(message), result)


def wire_of_data(message: bytes) -> bytes:
    """What twisted.mail's client sends after ``DATA`` for ``message``: the file sent as it would be, chunk by
    chunk (FileSender reads 16 KiB at a time), and the end of data."""
    result: Deferred[Any] = Deferred()
    result.addErrback(lambda _: None)
    protocol, transport = client(sender_factory(message, result))
    for reply in (b"220 mx.test ESMTP", b"250 hello", b"250 sender ok", b"250 recipient ok", b"354 go on"):
        protocol.dataReceived(reply + b"\r\n")
    while transport.producer is not None:
        transport.producer.resumeProducing()
    return transport.value().split(b"DATA\r\n", 1)[1]


def end_of_data(wire: bytes) -> int:
    """Where a server ends DATA in ``wire``: just after the first line that is a lone ``.``."""
    offset = 0
    for line in wire.split(b"\r\n"):
        offset += len(line) + 2
        if line == b".":
            return offset
    raise AssertionError("no end of data")


class ClientTests(SynchronousTestCase):
    """twisted.mail.smtp's client (SMTPClient, ESMTPClient and their Sender factories)."""

    def test_first_line_is_not_dot_stuffed(self) -> None:
        """A message whose first line is "." ends DATA at once; what follows reaches the server as commands
        (outbound smuggling)."""
        message = b".\nRCPT TO:<smuggled@victim.example>\nSubject: x\n\nbody\n"
        wire = wire_of_data(message)
        if wire.startswith(b"..\r\n"):
            raise fixed("leaves the first line of a message unstuffed")
        self.assertEqual(end_of_data(wire), 3)
        self.assertTrue(wire[3:].startswith(b"RCPT TO:<smuggled@victim.example>\r\n"))

    def test_line_starting_a_new_chunk_is_not_dot_stuffed(self) -> None:
        """FileSender hands the message over in 16 KiB chunks and the stuffing looks for CRLF "." inside a
        chunk only: a "." line that starts a chunk is sent as is and ends DATA early."""
        first = b"x" * (FileSender.CHUNK_SIZE - 1) + b"\n"
        message = first + b".\nMAIL FROM:<smuggled@attacker.example>\n"
        wire = wire_of_data(message)
        cut = end_of_data(wire)
        if cut == len(wire):
            raise fixed("leaves a line that starts a new 16 KiB chunk unstuffed")
        self.assertEqual(wire[cut - 5 : cut], b"\r\n.\r\n")
        self.assertTrue(wire[cut:].startswith(b"MAIL FROM:<smuggled@attacker.example>\r\n"))

    def test_crlf_is_sent_as_cr_cr_lf(self) -> None:
        """Every LF becomes CRLF, so a message whose lines already end in CRLF (as received by SMTP) goes out
        with CR CR LF: a bare CR in every line."""
        wire = wire_of_data(b"Subject: x\r\n\r\nbody\r\n")
        if b"\r\r\n" not in wire:
            raise fixed("turns CRLF into CR CR LF")
        self.assertEqual(wire, b"Subject: x\r\r\n\r\r\nbody\r\r\n.\r\n")

    def test_plaintext_replies_injected_after_starttls_are_trusted(self) -> None:
        """Replies injected in plaintext behind the server's "220" to STARTTLS are read as the answer to the
        EHLO sent inside TLS: here a forged "AUTH PLAIN" makes the client send its password at once, without
        waiting for the server's real EHLO reply."""
        result: Deferred[Any] = Deferred()
        result.addErrback(lambda _: None)
        factory = smtp.ESMTPSenderFactory(
            b"alice",
            b"secret",
            "a@sender.example",
            ["b@example.com"],
            io.BytesIO(b"Subject: x\n\nbody\n"),
            result,
            contextFactory=object(),  # only handed to startTLS, which the recorder notes
        )
        protocol, transport = client(factory)
        protocol.dataReceived(b"220 mx.test ESMTP\r\n")
        protocol.dataReceived(b"250-mx.test\r\n250 STARTTLS\r\n")
        protocol.dataReceived(b"220 go ahead\r\n250-injected.example\r\n250 AUTH PLAIN\r\n")
        sent = transport.after_tls()
        if sent == b"EHLO " + protocol.identity + b"\r\n":
            raise fixed("reads plaintext injected after STARTTLS as replies inside TLS")
        credentials = base64.b64encode(b"alice\0alice\0secret")
        self.assertEqual(sent, b"EHLO " + protocol.identity + b"\r\nAUTH PLAIN " + credentials + b"\r\n")

    def test_auth_plain_credentials_in_the_session_log(self) -> None:
        """The client's session log (on by default) keeps the AUTH PLAIN line, and that log travels with the
        error the sender's Deferred fails with."""
        result: Deferred[Any] = Deferred()
        factory = smtp.ESMTPSenderFactory(
            b"alice",
            b"secret",
            "a@sender.example",
            ["b@example.com"],
            io.BytesIO(b"Subject: x\n\nbody\n"),
            result,
            retries=0,
            requireTransportSecurity=False,
        )
        protocol, transport = client(factory)
        protocol.dataReceived(b"220 mx.test ESMTP\r\n")
        protocol.dataReceived(b"250-mx.test\r\n250 AUTH PLAIN\r\n")
        # Refused twice: twisted.mail tries PLAIN once with and once without an authorisation identity.
        protocol.dataReceived(b"535 5.7.8 Authentication credentials invalid\r\n" * 2)
        failure = self.failureResultOf(result, smtp.AUTHDeclinedError)
        credentials = base64.b64encode(b"\0alice\0secret")
        self.assertIn(b"AUTH PLAIN " + credentials + b"\r\n", transport.value())
        if credentials not in protocol.log.str():
            raise fixed("keeps AUTH PLAIN credentials in the client's session log")
        self.assertIn(b">>> AUTH PLAIN " + credentials, failure.value.log)


class RelayManagerTests(SynchronousTestCase):
    def test_smart_host_relaying_manager_fails_on_python_3(self) -> None:
        """SmartHostSMTPRelayingManager.checkState with one message waiting fails on Python 2 idioms: it
        reverses ``dict.keys()``; after that come ``dict.iteritems`` and a ``map`` taken to be eager."""
        directory = self.mktemp()
        os.makedirs(directory)
        queue = relaymanager.Queue(directory)
        envelope, message = queue.createNewMessage()
        with envelope:
            pickle.dump(["a@sender.example", "b@example.com"], envelope)
        message.lineReceived(b"Subject: x")
        self.successResultOf(message.eomReceived())
        queue.readDirectory()
        manager = relaymanager.SmartHostSMTPRelayingManager(queue)
        # The failure comes before any lookup: the resolver is never asked (a real one would read the
        # machine's resolv.conf).
        manager.mxcalc = relaymanager.MXCalculator(resolver=object(), clock=Clock())
        try:
            manager.checkState()
        except AttributeError as error:
            self.assertIn(str(error), PYTHON_2_IDIOMS)
        else:
            raise fixed("fails in SmartHostSMTPRelayingManager.checkState on Python 3")


#: What SmartHostSMTPRelayingManager.checkState trips over, in the order it meets them.
PYTHON_2_IDIOMS = (
    "'dict_keys' object has no attribute 'reverse'",
    "'dict' object has no attribute 'iteritems'",
)
