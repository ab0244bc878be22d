"""Byte-exact transcripts of the ESMTP server's state machine, limits and timers (StringTransport, Clock)."""

from __future__ import annotations

import dataclasses

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from dcrouter.config.auth import AuthConfig
from dcrouter.interfaces import IDeliveryQueue, QueueFull, QueueUnavailable
from dcrouter.mail.reply import Reply
from dcrouter.net.certfiles import generate_self_signed, server_tls_options
from dcrouter.smtp.policy import SessionPolicy
from tests.smtp_fixtures import (
    EHLO_PLAIN,
    GREETING,
    PEER_IP,
    BufferingTransport,
    ControlledQueue,
    connect,
    make_config,
    make_factory,
)

MAIL = b"MAIL FROM:<sender@example.net>\r\n"
RCPT = b"RCPT TO:<rcpt@example.org>\r\n"
MESSAGE = b"Subject: hi\r\n\r\nHello.\r\n.\r\n"


def queued(server) -> bytes:
    return b"250 2.0.0 Ok: queued as %s\r\n" % server.queue.items[-1].id.encode()


class GreetingTests(unittest.TestCase):
    def test_greeting(self) -> None:
        server = connect(greet=False)
        self.assertEqual(server.take(), GREETING)

    def test_banner(self) -> None:
        server = connect(make_config(banner="Welcome"), greet=False)
        self.assertEqual(server.take(), b"220 mx.example.test ESMTP Welcome\r\n")

    def test_policy_refusal_closes(self) -> None:
        config = make_config(max_connections_per_ip=1)
        policy = SessionPolicy(config)
        first = connect(config, policy=policy)
        second = connect(config, policy=policy, greet=False)
        self.assertEqual(
            second.take(),
            b"421 4.7.0 mx.example.test Too many connections from your address\r\n",
        )
        self.assertTrue(second.transport.disconnecting)
        self.assertEqual(second.exchange(b"EHLO x\r\n"), b"")
        second.protocol.connectionLost()
        self.assertEqual(policy.connections_from(PEER_IP), 1)
        self.assertFalse(first.transport.disconnecting)

    def test_connection_released_exactly_once(self) -> None:
        config = make_config()
        policy = SessionPolicy(config)
        first = connect(config, policy=policy)
        connect(config, policy=policy)
        self.assertEqual(policy.connections, 2)
        first.exchange(b"QUIT\r\n")
        first.protocol.connectionLost()
        first.protocol.connectionLost()
        self.assertEqual(policy.connections, 1)


class EhloTests(unittest.TestCase):
    def test_ehlo_without_tls(self) -> None:
        # AUTH is not offered before TLS, and STARTTLS only when there is a certificate.
        self.assertEqual(connect().exchange(b"EHLO client.example\r\n"), EHLO_PLAIN)

    def test_ehlo_offers_auth_when_insecure_allowed(self) -> None:
        server = connect(make_config(auth=AuthConfig(allow_insecure=True)))
        self.assertEqual(
            server.exchange(b"EHLO client.example\r\n"),
            EHLO_PLAIN.replace(b"250 SMTPUTF8", b"250-SMTPUTF8") + b"250 AUTH PLAIN LOGIN\r\n",
        )

    def test_ehlo_only_configured_mechanisms(self) -> None:
        server = connect(make_config(auth=AuthConfig(allow_insecure=True, methods=["LOGIN"])))
        self.assertTrue(server.exchange(b"EHLO c\r\n").endswith(b"250-SMTPUTF8\r\n250 AUTH LOGIN\r\n"))

    def test_ehlo_no_auth_without_authenticator(self) -> None:
        server = connect(make_config(auth=AuthConfig(allow_insecure=True)), authenticator=None)
        self.assertEqual(server.exchange(b"EHLO c\r\n"), EHLO_PLAIN)
        self.assertEqual(
            server.exchange(b"AUTH PLAIN\r\n"),
            b"502 5.5.1 Error: authentication not enabled\r\n",
        )

    def test_ehlo_offers_starttls(self) -> None:
        cert, key = generate_self_signed("mx.example.test")
        server = connect(tls_options=server_tls_options(cert, key))
        self.assertEqual(
            server.exchange(b"EHLO c\r\n"),
            EHLO_PLAIN.replace(b"250 SMTPUTF8", b"250-SMTPUTF8") + b"250 STARTTLS\r\n",
        )

    def test_implicit_tls_port_never_offers_starttls(self) -> None:
        cert, key = generate_self_signed("mx.example.test")
        server = connect(port=465, tls_options=server_tls_options(cert, key), authenticator=None)
        self.assertEqual(server.exchange(b"EHLO c\r\n"), EHLO_PLAIN)
        self.assertEqual(server.exchange(b"STARTTLS\r\n"), b"503 5.5.1 Error: TLS already active\r\n")

    def test_starttls_unavailable(self) -> None:
        server = connect()
        self.assertEqual(
            server.exchange(b"EHLO c\r\nSTARTTLS\r\n"),
            EHLO_PLAIN + b"454 4.7.0 TLS not available\r\n",
        )

    def test_helo(self) -> None:
        self.assertEqual(connect().exchange(b"HELO client.example\r\n"), b"250 mx.example.test\r\n")

    def test_ehlo_syntax(self) -> None:
        server = connect()
        self.assertEqual(server.exchange(b"EHLO\r\n"), b"501 5.5.4 Syntax: EHLO hostname\r\n")
        self.assertEqual(server.exchange(b"HELO a b\r\n"), b"501 5.5.4 Syntax: HELO hostname\r\n")


class SimpleCommandTests(unittest.TestCase):
    def test_simple_commands(self) -> None:
        server = connect()
        self.assertEqual(
            server.exchange(b"NOOP\r\nRSET\r\nVRFY someone\r\nVRFY\r\nHELP\r\nRSET x\r\nnoop anything\r\n"),
            b"250 2.0.0 Ok\r\n"
            b"250 2.0.0 Ok\r\n"
            b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"
            b"501 5.5.4 Syntax: VRFY address\r\n"
            b"214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH\r\n"
            b"501 5.5.4 Syntax error: no parameters allowed\r\n"
            b"250 2.0.0 Ok\r\n",
        )

    def test_quit_closes_and_ignores_what_follows(self) -> None:
        server = connect()
        self.assertEqual(server.exchange(b"QUIT\r\nNOOP\r\n"), b"221 2.0.0 Bye\r\n")
        self.assertTrue(server.transport.disconnecting)
        self.assertEqual(server.exchange(b"NOOP\r\n"), b"")

    def test_http_request_ends_the_session_at_once(self) -> None:
        """A browser made to POST to the SMTP port: the request and its headers never run as commands."""
        for verb in (b"GET", b"POST", b"CONNECT", b"post"):
            server = connect()
            self.assertEqual(
                server.exchange(verb + b" / HTTP/1.1\r\nHost: x\r\n\r\nMAIL FROM:<a@b.example>\r\n"),
                b"421 4.7.0 Non-SMTP command, closing connection\r\n",
            )
            self.assertTrue(server.transport.disconnecting)

    def test_unknown_and_out_of_sequence(self) -> None:
        server = connect(make_config(max_bad_commands=10))
        self.assertEqual(
            server.exchange(b"FOO\r\nMAIL FROM:<a@b.example>\r\nEHLO c\r\n" + RCPT + b"DATA\r\n"),
            b"500 5.5.1 Error: command not recognized\r\n"
            b"503 5.5.1 Error: send HELO/EHLO first\r\n"
            + EHLO_PLAIN
            + b"503 5.5.1 Error: need MAIL command\r\n"
            b"503 5.5.1 Error: need MAIL command\r\n",
        )
        self.assertEqual(
            server.exchange(MAIL + MAIL + b"DATA\r\n"),
            b"250 2.1.0 Ok\r\n503 5.5.1 Error: nested MAIL command\r\n503 5.5.1 Error: need RCPT command\r\n",
        )

    def test_bare_lf_terminates_command_lines(self) -> None:
        self.assertEqual(connect().exchange(b"NOOP\nNOOP\r\n"), b"250 2.0.0 Ok\r\n" * 2)

    def test_bad_characters(self) -> None:
        server = connect()
        self.assertEqual(
            server.exchange(b"NOOP\rRSET\r\nNO\x00OP\r\nNOOP \xff\r\nNOOP\r\n"),
            b"500 5.5.2 Syntax error: bad characters in command line\r\n" * 3 + b"250 2.0.0 Ok\r\n",
        )

    def test_too_many_errors(self) -> None:
        server = connect()
        self.assertEqual(
            server.exchange(b"FOO\r\n" * 4 + b"DATA\r\nNOOP\r\n"),
            b"500 5.5.1 Error: command not recognized\r\n" * 4
            + b"503 5.5.1 Error: need MAIL command\r\n"
            + b"421 4.7.0 Too many errors\r\n",
        )
        self.assertTrue(server.transport.disconnecting)


class LineLimitTests(unittest.TestCase):
    def test_long_line_then_noop(self) -> None:
        server = connect()
        self.assertEqual(
            server.exchange(b"NOOP " + b"x" * 10240 + b"\r\nNOOP\r\n"),
            b"500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n",
        )

    def test_long_line_in_small_chunks(self) -> None:
        server = connect()
        out = b""
        for _ in range(20):
            out += server.exchange(b"A" * 512)
        out += server.exchange(b"still the same line\r\nNOOP\r\n")
        self.assertEqual(out, b"500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n")

    def test_limit_is_exact(self) -> None:
        # 512 octets including CRLF is allowed; 513 is not.
        server = connect()
        ok = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
        self.assertEqual(len(ok), 512)
        self.assertEqual(server.exchange(ok), b"250 2.0.0 Ok\r\n")
        self.assertEqual(
            server.exchange(b"NOOP " + b"x" * (512 - 6) + b"\r\n"),
            b"500 5.5.2 Line too long\r\n",
        )

    def test_line_without_crlf_never_grows_the_buffer(self) -> None:
        server = connect(make_config(max_bad_commands=1000))
        for _ in range(1000):
            server.protocol.dataReceived(b"x" * 1024)
            self.assertLessEqual(len(server.protocol._in), 512)
        self.assertEqual(server.take(), b"500 5.5.2 Line too long\r\n")
        self.assertEqual(server.exchange(b"\r\nNOOP\r\n"), b"250 2.0.0 Ok\r\n")


class MailTests(unittest.TestCase):
    def setUp(self) -> None:
        self.server = connect()
        self.server.exchange(b"EHLO client.example\r\n")

    def test_mail_parameters(self) -> None:
        cases = [
            (
                b"MAIL FROM:<a@b.example> SIZE=10001\r\n",
                b"552 5.3.4 Message size exceeds fixed maximum message size\r\n",
            ),
            (b"MAIL FROM:<a@b.example> SIZE=abc\r\n", b"501 5.5.4 Syntax: SIZE=<number>\r\n"),
            (
                b"MAIL FROM:<a@b.example> BODY=BINARYMIME\r\n",
                b"501 5.5.4 Syntax: BODY=7BIT or BODY=8BITMIME\r\n",
            ),
            (b"MAIL FROM:<a@b.example> FOO=1\r\n", b"555 5.5.4 Unsupported parameter FOO\r\n"),
            (b"MAIL FROM:<a@b.example> SMTPUTF8=x\r\n", b"501 5.5.4 Syntax: SMTPUTF8 takes no value\r\n"),
        ]
        for command, reply in cases:
            self.assertEqual(self.server.exchange(command), reply, command)
        self.assertEqual(
            self.server.exchange(b"MAIL FROM:<a@b.example> SIZE=10000 BODY=8BITMIME SMTPUTF8\r\n"),
            b"250 2.1.0 Ok\r\n",
        )

    def test_address_errors_come_from_the_parser(self) -> None:
        reply = self.server.exchange(b"MAIL FROM:a@b.example\r\n")
        self.assertTrue(reply.startswith(b"501 5.1.7 "), reply)

    def test_parameters_need_ehlo(self) -> None:
        server = connect()
        server.exchange(b"HELO c\r\n")
        self.assertEqual(
            server.exchange(b"MAIL FROM:<a@b.example> SIZE=10\r\n"),
            b"555 5.5.4 Error: parameters need EHLO\r\n",
        )

    def test_submission_port_requires_auth(self) -> None:
        server = connect(port=587)
        server.exchange(b"EHLO c\r\n")
        self.assertEqual(server.exchange(MAIL), b"530 5.7.0 Authentication required\r\n")

    def test_auth_required_everywhere(self) -> None:
        server = connect(make_config(auth=AuthConfig(required=True)))
        server.exchange(b"EHLO c\r\n")
        self.assertEqual(server.exchange(MAIL), b"530 5.7.0 Authentication required\r\n")

    def test_relay_denied(self) -> None:
        self.server.exchange(MAIL)
        self.assertEqual(
            self.server.exchange(b"RCPT TO:<victim@elsewhere.example>\r\n"),
            b"554 5.7.1 <victim@elsewhere.example>: Relay access denied\r\n",
        )

    def test_rcpt_parameters_refused(self) -> None:
        self.server.exchange(MAIL)
        self.assertEqual(
            self.server.exchange(b"RCPT TO:<a@example.org> NOTIFY=NEVER\r\n"),
            b"555 5.5.4 Unsupported parameter NOTIFY\r\n",
        )

    def test_too_many_recipients_and_duplicates(self) -> None:
        self.server.exchange(MAIL)
        replies = self.server.exchange(
            b"RCPT TO:<a@example.org>\r\nRCPT TO:<A@Example.org>\r\nRCPT TO:<a@EXAMPLE.ORG>\r\n"
            b"RCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\n"
        )
        self.assertEqual(replies, b"250 2.1.5 Ok\r\n" * 4 + b"452 4.5.3 Too many recipients\r\n")
        self.server.exchange(b"DATA\r\n" + MESSAGE)
        self.assertEqual(
            self.server.queue.items[0].envelope.recipients,
            ["a@example.org", "A@example.org", "b@example.org"],
        )

    def test_rset_ends_transaction(self) -> None:
        self.server.exchange(MAIL + RCPT)
        self.assertEqual(
            self.server.exchange(b"RSET\r\nDATA\r\n"),
            b"250 2.0.0 Ok\r\n503 5.5.1 Error: need MAIL command\r\n",
        )

    def test_data_with_argument(self) -> None:
        self.server.exchange(MAIL + RCPT)
        self.assertEqual(
            self.server.exchange(b"DATA x\r\n"),
            b"501 5.5.4 Syntax error: no parameters allowed\r\n",
        )


class TransactionTests(unittest.TestCase):
    def test_whole_pipelined_transaction(self) -> None:
        server = connect()
        out = server.exchange(b"EHLO client.example\r\n" + MAIL + RCPT + b"DATA\r\n" + MESSAGE + b"QUIT\r\n")
        self.assertEqual(
            out,
            EHLO_PLAIN
            + b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
            + queued(server)
            + b"221 2.0.0 Bye\r\n",
        )
        item = server.queue.items[0]
        self.assertEqual(item.envelope.mail_from, "sender@example.net")
        self.assertEqual(item.envelope.recipients, ["rcpt@example.org"])
        self.assertEqual(item.envelope.helo, "client.example")
        self.assertEqual(item.envelope.peer_host, PEER_IP)
        self.assertIsNone(item.envelope.tls)
        self.assertTrue(server.queue.bodies[0].endswith(b"\r\nSubject: hi\r\n\r\nHello.\r\n"))
        self.assertEqual(len(item.id), 20)

    def test_two_messages_in_one_session(self) -> None:
        server = connect()
        server.exchange(b"EHLO c\r\n")
        for _ in range(2):
            out = server.exchange(MAIL + RCPT + b"DATA\r\n" + MESSAGE)
            self.assertTrue(out.endswith(queued(server)))
        self.assertEqual(len(server.queue.items), 2)
        self.assertNotEqual(server.queue.items[0].id, server.queue.items[1].id)


class _DeferredPolicy(SessionPolicy):
    """The real policy whose recipient answers are held until the test releases them."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.waiting: list[tuple[Deferred, Reply | None]] = []

    def check_recipient(self, session, address, sender=None, accepted=()):
        verdict = super().check_recipient(session, address, sender, accepted)
        held: Deferred = Deferred()
        self.waiting.append((held, verdict))
        return held

    def release(self) -> None:
        held, verdict = self.waiting.pop(0)
        held.callback(verdict)


class _CountingTransport(StringTransport):
    """A StringTransport that counts its writes: one write is one send() on a TCP connection."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class PipeliningTests(unittest.TestCase):
    def test_replies_wait_for_pending_check(self) -> None:
        # RFC 2920 §3.2: while a check waits with more pipelined commands behind it, the replies before it
        # are held; the whole group goes out once nothing is left to run.
        config = make_config()
        policy = _DeferredPolicy(config)
        server = connect(config, policy=policy)
        out = server.exchange(b"EHLO c\r\n" + MAIL + RCPT + b"RCPT TO:<x@elsewhere.example>\r\nNOOP\r\n")
        self.assertEqual(out, b"")
        self.assertEqual(len(policy.waiting), 1)
        policy.release()
        self.assertEqual(server.take(), b"")
        policy.release()
        self.assertEqual(
            server.take(),
            EHLO_PLAIN
            + b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
            + b"554 5.7.1 <x@elsewhere.example>: Relay access denied\r\n250 2.0.0 Ok\r\n",
        )

    def test_replies_before_a_wait_with_nothing_behind_it_go_out(self) -> None:
        # Nothing more to run: the client is owed what is answered so far, whatever the last command waits on.
        config = make_config()
        policy = _DeferredPolicy(config)
        server = connect(config, policy=policy)
        self.assertEqual(server.exchange(b"EHLO c\r\n" + MAIL + RCPT), EHLO_PLAIN + b"250 2.1.0 Ok\r\n")
        policy.release()
        self.assertEqual(server.take(), b"250 2.1.5 Ok\r\n")

    def test_one_write_per_pipelined_group(self) -> None:
        server = connect(transport_class=_CountingTransport)
        transport = server.transport
        assert isinstance(transport, _CountingTransport)
        del transport.writes[:]
        out = server.exchange(b"EHLO c\r\n" + MAIL + RCPT + RCPT + b"DATA\r\n")
        self.assertEqual(
            out,
            EHLO_PLAIN
            + b"250 2.1.0 Ok\r\n"
            + b"250 2.1.5 Ok\r\n" * 2
            + b"354 End data with <CR><LF>.<CR><LF>\r\n",
        )
        self.assertEqual(len(transport.writes), 1)
        # The text and the commands after its end: the final reply, then the next group, in one write.
        del transport.writes[:]
        out = server.exchange(MESSAGE + b"NOOP\r\nRSET\r\n")
        self.assertEqual(out, queued(server) + b"250 2.0.0 Ok\r\n" * 2)
        self.assertEqual(len(transport.writes), 1)

    def test_group_held_behind_a_check_is_one_write(self) -> None:
        config = make_config()
        policy = _DeferredPolicy(config)
        server = connect(config, policy=policy, transport_class=_CountingTransport)
        transport = server.transport
        assert isinstance(transport, _CountingTransport)
        del transport.writes[:]
        server.exchange(MAIL.replace(b"MAIL", b"EHLO c\r\nMAIL") + RCPT + b"DATA\r\n")
        self.assertEqual(transport.writes, [])
        policy.release()
        self.assertEqual(
            transport.writes,
            [EHLO_PLAIN + b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"],
        )

    def test_replies_wait_for_queue(self) -> None:
        queue = ControlledQueue(auto=False)
        server = connect(queue=queue)
        out = server.exchange(b"EHLO c\r\n" + MAIL + RCPT + b"DATA\r\n" + MESSAGE + b"NOOP\r\nQUIT\r\n")
        # The queue answers the text while more commands wait behind it: the group is held (RFC 2920 §3.2).
        self.assertEqual(out, b"")
        self.assertEqual(server.exchange(b"RSET\r\n"), b"")
        queue.pending[0].callback(queue.items[0])
        self.assertEqual(
            server.take(),
            EHLO_PLAIN
            + b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
            + queued(server)
            + b"250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n",
        )

    def test_waiting_is_not_idleness(self) -> None:
        queue = ControlledQueue(auto=False)
        server = connect(queue=queue)
        server.exchange(b"EHLO c\r\n" + MAIL + RCPT + b"DATA\r\n" + MESSAGE)
        server.clock.advance(100)
        self.assertEqual(server.take(), b"")
        queue.pending[0].callback(queue.items[0])
        self.assertEqual(server.take(), queued(server))
        server.clock.advance(29)
        self.assertEqual(server.take(), b"")
        server.clock.advance(1)
        self.assertEqual(server.take(), b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n")

    def test_input_is_bounded_while_waiting(self) -> None:
        queue = ControlledQueue(auto=False)
        # 11,900 NOOPs fill the buffer; the junk command limit is not what this test is about.
        server = connect(make_config(max_junk_commands=20_000), queue=queue)
        server.exchange(b"EHLO c\r\n" + MAIL + RCPT + b"DATA\r\n" + MESSAGE)
        for _ in range(70):
            server.protocol.dataReceived(b"NOOP\r\n" * 170)
        self.assertEqual(server.transport.producerState, "paused")
        queue.pending[0].callback(queue.items[0])
        self.assertEqual(server.take(), queued(server) + b"250 2.0.0 Ok\r\n" * 70 * 170)
        self.assertEqual(server.transport.producerState, "producing")

    def test_replies_wait_for_a_client_that_does_not_read(self) -> None:
        # Found by fuzzing (tests/test_fuzz_smtp.py): a client that pipelines and never reads had every reply
        # buffered in the server: duplicate RCPTs (answered 250, counted as neither errors nor junk) made 14
        # bytes of reply each, without bound. Like a TCP transport, BufferingTransport pauses its producer
        # past 64 KiB unread; the session then stops answering and reading until the client reads.
        server = connect(transport_class=BufferingTransport)
        transport = server.transport
        assert isinstance(transport, BufferingTransport)
        commands = 20_000
        data = b"EHLO c\r\n" + MAIL + RCPT * commands
        sent = 0
        # The client writes 16 KiB at a time while the server reads, and reads nothing itself.
        while sent < len(data) and transport.producerState == "producing":
            server.protocol.dataReceived(data[sent : sent + 16384])
            sent += 16384
            self.assertLessEqual(len(transport.value()), transport.buffer_size + 512)
        self.assertLess(sent, len(data) // 2)  # the server stopped reading long before the end
        # Now it reads: everything is answered, in order, never more than the buffer at a time.
        replies = b""
        while sent < len(data) or transport.output_paused:
            if transport.producerState == "producing" and sent < len(data):
                server.protocol.dataReceived(data[sent : sent + 16384])
                sent += 16384
            else:
                replies += transport.drain()
            self.assertLessEqual(len(transport.value()), transport.buffer_size + 512)
        replies += transport.drain()
        self.assertEqual(replies.count(b"250 2.1.5 Ok\r\n"), commands)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(server.exchange(b"QUIT\r\n"), b"221 2.0.0 Bye\r\n")

    def test_queue_failures_are_temporary(self) -> None:
        for error, reply in [
            (QueueFull(), b"452 4.3.1 Insufficient system storage\r\n"),
            (QueueUnavailable(), b"451 4.3.0 Requested action aborted: local error in processing\r\n"),
            (RuntimeError("bug"), b"451 4.3.0 Requested action aborted: local error in processing\r\n"),
        ]:
            queue = ControlledQueue(auto=False)
            server = connect(queue=queue)
            server.exchange(b"EHLO c\r\n" + MAIL + RCPT + b"DATA\r\n" + MESSAGE + b"NOOP\r\n")
            queue.pending[0].errback(error)
            self.assertTrue(
                server.take().endswith(
                    b"354 End data with <CR><LF>.<CR><LF>\r\n" + reply + b"250 2.0.0 Ok\r\n"
                )
            )
        # Only the bug gets a traceback; a store that cannot take mail is one error line
        # (tests/test_smtp_disk_full.py).
        self.assertEqual(len(self.flushLoggedErrors(QueueUnavailable, RuntimeError)), 1)

    def test_controlled_queue_is_a_queue(self) -> None:
        self.assertTrue(verifyObject(IDeliveryQueue, ControlledQueue()))


class TimeoutTests(unittest.TestCase):
    TIMEOUT = b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n"

    def test_idle_timeout(self) -> None:
        server = connect()
        server.clock.advance(29)
        server.exchange(b"NOOP\r\n")
        server.clock.advance(29)
        self.assertEqual(server.take(), b"")
        server.clock.advance(1)
        self.assertEqual(server.take(), self.TIMEOUT)
        self.assertTrue(server.transport.disconnecting)

    def test_data_timeout_counts_the_whole_transfer(self) -> None:
        server = connect()
        server.exchange(b"EHLO c\r\n" + MAIL + RCPT + b"DATA\r\n")
        for _ in range(5):
            server.clock.advance(11)
            server.exchange(b"line\r\n")
        self.assertEqual(server.take(), b"")
        server.clock.advance(5)
        self.assertEqual(server.take(), self.TIMEOUT)
        self.assertEqual(server.exchange(b".\r\n"), b"")
        self.assertEqual(server.queue.items, [])

    def test_session_timeout(self) -> None:
        server = connect()
        for _ in range(39):
            server.clock.advance(15)
            self.assertEqual(server.exchange(b"NOOP\r\n"), b"250 2.0.0 Ok\r\n")
        server.clock.advance(14)
        self.assertEqual(server.exchange(b"NOOP\r\n"), b"250 2.0.0 Ok\r\n")
        server.clock.advance(1)
        self.assertEqual(server.take(), self.TIMEOUT)

    def test_timers_stop_after_disconnect(self) -> None:
        server = connect()
        server.protocol.connectionLost()
        self.assertEqual(server.clock.getDelayedCalls(), [])


class PeerAddressTests(unittest.TestCase):
    def test_peer_from_transport(self) -> None:
        factory = make_factory()
        protocol = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.7", 1234))
        protocol.makeConnection(transport)
        self.assertEqual((protocol.session.peer_host, protocol.session.peer_port), ("198.51.100.7", 1234))
        self.assertEqual(protocol.session.local_port, 25)
        self.assertFalse(protocol.session.submission)
        self.assertTrue(dataclasses.is_dataclass(protocol.session))


class LoggingTests(unittest.TestCase):
    def test_structured_events_without_bodies(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        server = connect()
        server.exchange(
            b"EHLO c\r\n" + MAIL + RCPT + b"RCPT TO:<x@elsewhere.example>\r\nDATA\r\nSubject: secret\r\n\r\n"
            b"Confidential body\r\n.\r\nQUIT\r\n"
        )
        server.protocol.connectionLost()
        ours = [e for e in events if e.get("log_namespace", "").startswith("dcrouter.smtp")]
        messages = [formatEvent(e) for e in ours]
        item = server.queue.items[0]
        self.assertEqual(
            [m.split(" ")[0] for m in messages],
            ["Connection", "Recipient", f"{item.id}:", "Disconnected"],
        )
        self.assertEqual(
            messages[2], f"{item.id}: queued from=<sender@example.net> size=38 nrcpt=1 peer={PEER_IP}"
        )
        queued_event = ours[2]
        self.assertEqual(
            {
                k: queued_event[k]
                for k in ("session_id", "peer", "tls", "auth_user", "queue_id", "size", "recipients")
            },
            {
                "session_id": server.protocol.session.session_id,
                "peer": PEER_IP,
                "tls": None,
                "auth_user": None,
                "queue_id": item.id,
                "size": len(b"Subject: secret\r\n\r\nConfidential body\r\n"),
                "recipients": 1,
            },
        )
        self.assertEqual(ours[1]["reply"], 554)
        self.assertEqual({e["queue_id"] for e in ours[1:3]}, {item.id})
        for event in events:
            self.assertNotIn("Confidential", formatEvent(event) + repr(event))
