"""The outbound ESMTP client as byte-exact transcripts on a StringTransport, with a Clock for every timer."""

from __future__ import annotations

import base64
import io
from collections.abc import Coroutine
from typing import Any, TypeVar

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from dcrouter.delivery.client import (
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    Capabilities,
    ESMTPClient,
    ProbeReplies,
    SMTPClientError,
    StaleSession,
    TransactionResult,
)
from dcrouter.log import levels, set_level
from dcrouter.mail.reply import Reply

T = TypeVar("T")
EHLO_FULL = (
    b"250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n"
    b"250-SMTPUTF8\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n"
)
EHLO_BIG = b"250-mx.example.test\r\n250-PIPELINING\r\n250 SIZE 100000000\r\n"
#: No PIPELINING, no 8BITMIME, no SMTPUTF8: one command at a time.
EHLO_BASIC = b"250-mx.example.test\r\n250-SIZE\r\n250 ENHANCEDSTATUSCODES\r\n"
USER, PASSWORD = "relay-user", "hunter2-Secret!"


def run(work: Coroutine[Any, Any, T]) -> Deferred[T]:
    return Deferred.fromCoroutine(work)


class ClientTestCase(unittest.TestCase):
    reply_timeout = 30.0
    send_timeout = 300.0

    def setUp(self) -> None:
        self.clock = Clock()
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.25", 25))
        self.client = ESMTPClient(
            clock=self.clock, reply_timeout=self.reply_timeout, send_timeout=self.send_timeout
        )
        self.client.makeConnection(self.transport)

    def server(self, data: bytes) -> None:
        self.client.dataReceived(data)

    def sent(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def ready(self, ehlo: bytes = EHLO_FULL) -> Capabilities:
        """Greeting and EHLO done; returns the capabilities."""
        self.server(b"220 mx.example.test ESMTP\r\n")
        done = run(self.client.ehlo("client.example"))
        self.assertEqual(self.sent(), b"EHLO client.example\r\n")
        self.server(ehlo)
        return self.successResultOf(done)

    def error(self, done: Deferred[Any]) -> SMTPClientError:
        failure = self.failureResultOf(done, SMTPClientError)
        assert isinstance(failure.value, SMTPClientError)
        return failure.value

    def aborted(self) -> bool:
        return bool(self.transport.disconnecting)


class ReplyParserTests(ClientTestCase):
    def test_greeting(self) -> None:
        done = run(self.client.wait_greeting())
        self.assertNoResult(done)
        self.server(b"220 mx.example.test ESMTP ready\r\n")
        self.assertEqual(self.successResultOf(done), Reply(220, "", "mx.example.test ESMTP ready"))
        self.assertEqual(self.client.peer, "192.0.2.25:25")
        self.assertFalse(self.client.is_tls)

    def test_multiline_reply_with_enhanced_codes(self) -> None:
        self.ready()
        done = run(self.client.reset())
        self.assertEqual(self.sent(), b"RSET\r\n")
        self.server(b"250-2.0.0 first\r\n250-2.0.0 second\r\n250 2.0.0 third\r\n")
        self.assertEqual(self.successResultOf(done), Reply(250, "2.0.0", ("first", "second", "third")))

    def test_reply_in_single_bytes_and_bare_lf(self) -> None:
        self.ready()
        done = run(self.client.reset())
        for byte in b"250-2.1.0 a\n250 2.1.0 b\r\n":
            self.assertNoResult(done)
            self.server(bytes([byte]))
        self.assertEqual(self.successResultOf(done), Reply(250, "2.1.0", ("a", "b")))

    def test_enhanced_code_only_when_it_matches_the_class(self) -> None:
        self.ready()
        done = run(self.client.reset())
        self.server(b"250 5.1.1 odd\r\n")
        self.assertEqual(self.successResultOf(done), Reply(250, "", "5.1.1 odd"))
        done = run(self.client.reset())
        self.server(b"250\r\n")
        self.assertEqual(self.successResultOf(done), Reply(250, "", ""))

    def assert_protocol_error(self, data: bytes) -> SMTPClientError:
        self.ready()
        done = run(self.client.reset())
        self.server(data)
        error = self.error(done)
        self.assertEqual((error.reply.code, error.reply.enhanced), (421, "4.5.0"))
        self.assertTrue(error.temporary)
        self.assertTrue(self.aborted())
        # The session is over: every later call says so.
        self.assertIs(self.error(run(self.client.reset())), error)
        return error

    def test_garbage_lines(self) -> None:
        for garbage in (
            b"hello\r\n",
            b"250x\r\n",
            b"199 too low\r\n",
            b"650 too high\r\n",
            b"25 short\r\n",
            b"250 bare\rcr\r\n",
        ):
            self.setUp()
            self.assert_protocol_error(garbage)

    def test_code_changes_within_multiline_reply(self) -> None:
        self.assert_protocol_error(b"250-first\r\n251 second\r\n")

    def test_line_too_long(self) -> None:
        error = self.assert_protocol_error(b"250 " + b"x" * MAX_REPLY_LINE)
        self.assertIn("too long", error.reply.lines()[0])

    def test_too_many_lines(self) -> None:
        self.assert_protocol_error(b"250-x\r\n" * MAX_REPLY_LINES)

    def test_unsolicited_reply_is_a_protocol_error(self) -> None:
        self.ready()
        self.server(b"250 2.0.0 nobody asked\r\n")
        self.assertTrue(self.aborted())
        error = self.error(run(self.client.reset()))
        self.assertEqual(error.reply.code, 421)
        self.assertIn("unsolicited", error.reply.lines()[0])
        self.assertEqual(self.sent(), b"")

    def test_unsolicited_421_ends_the_session_with_its_reply(self) -> None:
        self.ready()
        self.server(b"421 4.3.2 Shutting down\r\n")
        error = self.error(run(self.client.reset()))
        self.assertEqual(error.reply, Reply(421, "4.3.2", "Shutting down"))


class GreetingAndEhloTests(ClientTestCase):
    def test_capabilities(self) -> None:
        capabilities = self.ready(
            b"250-mx.example.test Hello\r\n250-pipelining\r\n250-Size 5000\r\n250-AUTH=LOGIN\r\n"
            b"250-auth plain cram-md5\r\n250-starttls\r\n250-enhancedStatusCodes\r\n250 8bitmime\r\n"
        )
        self.assertEqual(
            capabilities,
            Capabilities(
                esmtp=True,
                size=5000,
                pipelining=True,
                eightbitmime=True,
                smtputf8=False,
                starttls=True,
                auth=frozenset({"LOGIN", "PLAIN", "CRAM-MD5"}),
                enhanced_status_codes=True,
            ),
        )
        self.assertIs(self.client.capabilities, capabilities)
        self.assertIn("STARTTLS", capabilities)
        self.assertIn("size", capabilities)
        self.assertNotIn("SMTPUTF8", capabilities)

    def test_size_without_value_and_no_size(self) -> None:
        self.assertEqual(self.ready(b"250-mx\r\n250 SIZE\r\n").size, 0)
        self.setUp()
        capabilities = self.ready(b"250 mx.example.test\r\n")
        self.assertIsNone(capabilities.size)
        self.assertFalse(capabilities.pipelining or capabilities.starttls or capabilities.auth)

    def test_helo_fallback(self) -> None:
        self.server(b"220 old.example.test SMTP\r\n")
        done = run(self.client.ehlo("client.example"))
        self.assertEqual(self.sent(), b"EHLO client.example\r\n")
        self.server(b"502 5.5.2 Command not recognized\r\n")
        self.assertEqual(self.sent(), b"HELO client.example\r\n")
        self.server(b"250 old.example.test\r\n")
        capabilities = self.successResultOf(done)
        self.assertFalse(capabilities.esmtp)
        self.assertIsNone(capabilities.size)

    def test_ehlo_temporary_refusal_ends_the_session(self) -> None:
        self.server(b"220 mx\r\n")
        done = run(self.client.ehlo("client.example"))
        self.server(b"421 4.7.0 Go away\r\n")
        error = self.error(done)
        self.assertEqual(error.reply, Reply(421, "4.7.0", "Go away"))
        self.assertTrue(error.temporary)
        self.assertEqual(self.sent(), b"EHLO client.example\r\nQUIT\r\n")

    def test_helo_permanent_refusal(self) -> None:
        self.server(b"220 mx\r\n")
        done = run(self.client.ehlo("client.example"))
        self.server(b"500 5.5.1 what\r\n550 5.7.1 Not you\r\n")
        error = self.error(done)
        self.assertEqual(error.reply.code, 550)
        self.assertFalse(error.temporary)

    def test_refusing_greeting(self) -> None:
        done = run(self.client.ehlo("client.example"))
        self.server(b"554 5.7.1 No SMTP service here\r\n")
        error = self.error(done)
        self.assertEqual(error.reply, Reply(554, "5.7.1", "No SMTP service here"))
        self.assertTrue(error.temporary)
        # RFC 5321 §3.1: the client sends QUIT after a 554 greeting, and no EHLO.
        self.assertEqual(self.sent(), b"QUIT\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_greeting_timeout(self) -> None:
        done = run(self.client.wait_greeting())
        self.clock.advance(self.reply_timeout - 0.1)
        self.assertNoResult(done)
        self.clock.advance(0.1)
        error = self.error(done)
        self.assertEqual((error.reply.code, error.reply.enhanced), (421, "4.4.2"))
        self.assertIn("timeout", error.reply.lines()[0])
        self.assertTrue(self.transport.disconnected)  # aborted, not closed politely


class PipelinedTransactionTests(ClientTestCase):
    def test_commands_written_together_and_replies_matched_in_order(self) -> None:
        self.ready()
        body = io.BytesIO(b"Subject: t\r\n\r\n.dot\r\nend")
        done = run(self.client.send("a@sender.test", ["x@example.org", "y@example.org"], body, 40))
        # Everything up to DATA before any reply (RFC 2920).
        self.assertEqual(
            self.sent(),
            b"MAIL FROM:<a@sender.test> SIZE=40\r\nRCPT TO:<x@example.org>\r\nRCPT TO:<y@example.org>\r\n"
            b"DATA\r\n",
        )
        self.server(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 No such user\r\n")
        self.assertEqual(self.sent(), b"")
        self.server(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertEqual(self.sent(), b"Subject: t\r\n\r\n..dot\r\nend\r\n.\r\n")
        self.assertNoResult(done)
        self.server(b"250 2.0.0 Ok: queued as 123\r\n")
        self.assertEqual(
            self.successResultOf(done),
            TransactionResult(
                mail=Reply(250, "2.1.0", "Ok"),
                recipients={
                    "x@example.org": Reply(250, "2.1.5", "Ok"),
                    "y@example.org": Reply(550, "5.1.1", "No such user"),
                },
                data=Reply(250, "2.0.0", "Ok: queued as 123"),
            ),
        )
        self.assertIsNone(self.transport.producer)

    def test_no_recipient_accepted(self) -> None:
        self.ready()
        done = run(self.client.send("a@sender.test", ["x@example.org"], io.BytesIO(b"x\r\n"), 3))
        self.sent()
        self.server(b"250 2.1.0 Ok\r\n550 5.1.1 No such user\r\n554 5.5.1 No valid recipients\r\n")
        # DATA's refusal is consumed, then RSET leaves the connection clean for the next message.
        self.assertEqual(self.sent(), b"RSET\r\n")
        self.server(b"250 2.0.0 Ok\r\n")
        result = self.successResultOf(done)
        self.assertEqual(result.recipients, {"x@example.org": Reply(550, "5.1.1", "No such user")})
        self.assertIsNone(result.data)
        self.assertEqual(self.sent(), b"")

    def test_mail_refused(self) -> None:
        self.ready()
        done = run(self.client.send("a@sender.test", ["x@example.org"], io.BytesIO(b"x\r\n"), 3))
        self.sent()
        self.server(b"451 4.7.1 Greylisted\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n")
        self.assertEqual(self.sent(), b"RSET\r\n")
        self.server(b"250 2.0.0 Ok\r\n")
        self.assertEqual(
            self.successResultOf(done),
            TransactionResult(mail=Reply(451, "4.7.1", "Greylisted"), recipients={}, data=None),
        )

    def test_data_refused(self) -> None:
        self.ready()
        done = run(self.client.send("a@sender.test", ["x@example.org"], io.BytesIO(b"x\r\n"), 3))
        self.sent()
        self.server(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n451 4.3.0 Try later\r\n")
        self.assertEqual(self.sent(), b"RSET\r\n")
        self.server(b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.successResultOf(done).data, Reply(451, "4.3.0", "Try later"))

    def test_354_without_recipients_gets_an_empty_text(self) -> None:
        self.ready()
        done = run(self.client.send("a@sender.test", ["x@example.org"], io.BytesIO(b"secret\r\n"), 8))
        self.sent()
        self.server(b"250 2.1.0 Ok\r\n550 5.1.1 No\r\n354 go ahead\r\n")
        self.assertEqual(self.sent(), b".\r\n")
        self.server(b"554 5.5.1 No recipients\r\n")
        self.assertEqual(self.sent(), b"RSET\r\n")
        self.server(b"250 2.0.0 Ok\r\n")
        self.assertIsNone(self.successResultOf(done).data)

    def test_parameters(self) -> None:
        self.ready()
        done = run(self.client.send("ü@sender.test", ["x@example.org"], io.BytesIO(b"x"), 1, eight_bit=True))
        self.assertEqual(
            self.sent().split(b"\r\n")[0],
            "MAIL FROM:<ü@sender.test> SIZE=1 BODY=8BITMIME SMTPUTF8".encode(),
        )
        self.server(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n250 2.0.0 Ok\r\n")
        self.successResultOf(done)

    def test_duplicate_recipients_sent_once(self) -> None:
        self.ready()
        run(self.client.send("", ["x@example.org", "x@example.org"], io.BytesIO(b"x"), 1))
        self.assertEqual(self.sent(), b"MAIL FROM:<> SIZE=1\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")


class WriteCountTests(ClientTestCase):
    """A pipelined group is one write, a small body and its end another (within one reactor turn Twisted
    joins writes into one send() anyway, but each write costs its own bookkeeping)."""

    def test_a_transaction_is_two_writes(self) -> None:
        self.ready()
        writes: list[bytes] = []
        self.transport.write = writes.append  # type: ignore[method-assign]
        done = run(
            self.client.send("a@b.test", ["x@example.org", "y@example.org"], io.BytesIO(b".hi\r\n"), 5)
        )
        self.assertEqual(
            writes,
            [
                (
                    b"MAIL FROM:<a@b.test> SIZE=5\r\n"
                    b"RCPT TO:<x@example.org>\r\nRCPT TO:<y@example.org>\r\nDATA\r\n"
                )
            ],
        )
        self.server(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        self.assertEqual(writes[1:], [b"..hi\r\n.\r\n"])
        self.server(b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.successResultOf(done).data, Reply(250, "2.0.0", "Ok"))


class ResetDueTests(ClientTestCase):
    """A session a pool hands out unprobed (``reset_due``) begins its next transaction with RSET."""

    def start(self, ehlo: bytes = EHLO_FULL) -> Deferred[TransactionResult]:
        self.ready(ehlo)
        self.client.reset_due = True
        return run(self.client.send("a@b.test", ["x@example.org"], io.BytesIO(b"hi\r\n"), 4))

    def test_pipelined_in_front_of_the_transaction(self) -> None:
        done = self.start()
        self.assertEqual(
            self.sent(), b"RSET\r\nMAIL FROM:<a@b.test> SIZE=4\r\nRCPT TO:<x@example.org>\r\nDATA\r\n"
        )
        self.assertFalse(self.client.reset_due)
        self.server(b"250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        self.assertEqual(self.sent(), b"hi\r\n.\r\n")
        self.server(b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.successResultOf(done).data, Reply(250, "2.0.0", "Ok"))

    def test_on_its_own_without_pipelining(self) -> None:
        done = self.start(EHLO_BASIC)
        self.assertEqual(self.sent(), b"RSET\r\n")
        self.server(b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.sent(), b"MAIL FROM:<a@b.test> SIZE=4\r\n")
        self.server(b"250 2.1.0 Ok\r\n")
        self.assertEqual(self.sent(), b"RCPT TO:<x@example.org>\r\n")
        self.server(b"250 2.1.5 Ok\r\n")
        self.assertEqual(self.sent(), b"DATA\r\n")
        self.server(b"354 go\r\n250 2.0.0 Ok\r\n")
        self.assertEqual(self.successResultOf(done).data, Reply(250, "2.0.0", "Ok"))

    def test_connection_lost_is_a_stale_session(self) -> None:
        done = self.start()
        self.client.connectionLost(Failure(ConnectionLost("Connection reset by peer")))
        error = self.failureResultOf(done, StaleSession).value
        self.assertEqual(error.reply.code, 421)
        self.assertIsInstance(error, SMTPClientError)

    def test_a_refused_reset_is_a_stale_session_and_ends_it(self) -> None:
        done = self.start()
        self.sent()
        self.server(b"421 4.3.2 Going away\r\n")
        error = self.failureResultOf(done, StaleSession).value
        self.assertEqual(error.reply.code, 421)
        self.assertFalse(self.client.is_open)
        self.assertTrue(self.transport.disconnecting)

    def test_a_session_that_already_ended_is_stale(self) -> None:
        self.ready()
        self.client.connectionLost(Failure(ConnectionLost()))
        self.client.reset_due = True
        done = run(self.client.send("a@b.test", ["x@example.org"], io.BytesIO(b"hi\r\n"), 4))
        self.failureResultOf(done, StaleSession)
        self.assertEqual(self.transport.value(), b"")

    def test_failures_after_a_good_reset_are_ordinary(self) -> None:
        done = self.start()
        self.server(b"250 2.0.0 Ok\r\n")
        self.client.connectionLost(Failure(ConnectionLost()))
        failure = self.failureResultOf(done, SMTPClientError)
        self.assertNotIsInstance(failure.value, StaleSession)


class LocalRefusalTests(ClientTestCase):
    def refused(self, ehlo: bytes, *args: Any, **kwargs: Any) -> TransactionResult:
        self.ready(ehlo)
        result = self.successResultOf(run(self.client.send(*args, **kwargs)))
        self.assertEqual(self.sent(), b"")
        self.assertIsNone(result.data)
        self.assertEqual(result.recipients, {})
        # Nothing went wrong with the session itself.
        run(self.client.reset())
        self.assertEqual(self.sent(), b"RSET\r\n")
        return result

    def test_smtputf8_not_offered(self) -> None:
        result = self.refused(EHLO_BASIC, "a@b.test", ["x@example.org"], io.BytesIO(b"x"), 1, smtputf8=True)
        self.assertEqual((result.mail.code, result.mail.enhanced), (553, "5.6.7"))

    def test_non_ascii_address_needs_smtputf8(self) -> None:
        result = self.refused(EHLO_BASIC, "a@b.test", ["jürgen@example.org"], io.BytesIO(b"x"), 1)
        self.assertEqual((result.mail.code, result.mail.enhanced), (553, "5.6.7"))

    def test_eight_bit_without_8bitmime(self) -> None:
        result = self.refused(
            EHLO_BASIC, "a@b.test", ["x@example.org"], io.BytesIO(b"\xe9"), 1, eight_bit=True
        )
        self.assertEqual((result.mail.code, result.mail.enhanced), (554, "5.6.3"))

    def test_over_the_servers_size(self) -> None:
        result = self.refused(EHLO_FULL, "a@b.test", ["x@example.org"], io.BytesIO(b"x"), 10001)
        self.assertEqual((result.mail.code, result.mail.enhanced), (552, "5.3.4"))

    def test_sender_with_control_characters(self) -> None:
        result = self.refused(
            EHLO_FULL, "a@b.test>\r\nRCPT TO:<victim@example.org", ["x@example.org"], io.BytesIO(b"x"), 1
        )
        self.assertEqual((result.mail.code, result.mail.enhanced), (553, "5.1.7"))

    def test_which_characters_an_address_may_not_carry(self) -> None:
        from dcrouter.delivery.client import _bad_address

        for bad in ("a\x00@b", "a\x1f@b", "a\x7f@b", "a<@b", "a>@b", "a@b\r", "\n"):
            self.assertTrue(_bad_address(bad), repr(bad))
        for good in ("", "a@b.test", "ü@bücher.example", "a b@c", "\x80@b", "~!#$%&'*+/=?^_`{|}@b"):
            self.assertFalse(_bad_address(good), repr(good))

    def test_recipient_with_control_characters_is_skipped(self) -> None:
        self.ready()
        done = run(self.client.send("a@b.test", ["ok@example.org", "x\r\nDATA"], io.BytesIO(b"x"), 1))
        self.assertEqual(self.sent(), b"MAIL FROM:<a@b.test> SIZE=1\r\nRCPT TO:<ok@example.org>\r\nDATA\r\n")
        self.server(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n250 2.0.0 Ok\r\n")
        result = self.successResultOf(done)
        self.assertEqual(result.recipients["x\r\nDATA"].code, 553)


class OneAtATimeTests(ClientTestCase):
    def test_each_command_waits_for_its_reply(self) -> None:
        self.ready(EHLO_BASIC)
        done = run(self.client.send("a@b.test", ["x@example.org", "y@example.org"], io.BytesIO(b".\r\n"), 3))
        self.assertEqual(self.sent(), b"MAIL FROM:<a@b.test> SIZE=3\r\n")
        self.server(b"250 2.1.0 Ok\r\n")
        self.assertEqual(self.sent(), b"RCPT TO:<x@example.org>\r\n")
        self.server(b"450 4.2.0 Mailbox busy\r\n")
        self.assertEqual(self.sent(), b"RCPT TO:<y@example.org>\r\n")
        self.server(b"250 2.1.5 Ok\r\n")
        self.assertEqual(self.sent(), b"DATA\r\n")
        self.server(b"354 go\r\n")
        self.assertEqual(self.sent(), b"..\r\n.\r\n")
        self.server(b"250 2.0.0 Ok\r\n")
        result = self.successResultOf(done)
        self.assertEqual(result.recipients["x@example.org"].code, 450)
        self.assertEqual(result.data, Reply(250, "2.0.0", "Ok"))

    def test_mail_refused_ends_there(self) -> None:
        self.ready(EHLO_BASIC)
        done = run(self.client.send("a@b.test", ["x@example.org"], io.BytesIO(b"x"), 1))
        self.sent()
        self.server(b"550 5.7.1 Sender refused\r\n")
        self.assertEqual(self.sent(), b"")
        self.assertEqual(self.successResultOf(done).mail.code, 550)

    def test_no_recipient_accepted_means_no_data(self) -> None:
        self.ready(EHLO_BASIC)
        done = run(self.client.send("a@b.test", ["x@example.org"], io.BytesIO(b"x"), 1))
        self.server(b"250 2.1.0 Ok\r\n550 5.1.1 No\r\n")
        self.assertEqual(self.sent(), b"MAIL FROM:<a@b.test> SIZE=1\r\nRCPT TO:<x@example.org>\r\nRSET\r\n")
        self.server(b"250 2.0.0 Ok\r\n")
        self.assertIsNone(self.successResultOf(done).data)

    def test_helo_session_sends_no_parameters(self) -> None:
        self.server(b"220 old.example.test\r\n")
        done = run(self.client.ehlo("client.example"))
        self.server(b"502 5.5.2 EHLO?\r\n250 old.example.test\r\n")
        self.assertFalse(self.successResultOf(done).esmtp)
        self.assertEqual(self.sent(), b"EHLO client.example\r\nHELO client.example\r\n")
        run(self.client.send("a@b.test", ["x@example.org"], io.BytesIO(b"x"), 1))
        self.assertEqual(self.sent(), b"MAIL FROM:<a@b.test>\r\n")


class FailingBody(io.BytesIO):
    """A body file whose disk fails after the first read."""

    def read(self, size: int | None = -1) -> bytes:
        if self.tell():
            raise OSError(5, "Input/output error")
        return super().read(size)


class TimeoutAndLossTests(ClientTestCase):
    reply_timeout = 30.0
    send_timeout = 100.0

    def ready(self, ehlo: bytes = EHLO_BIG) -> Capabilities:
        return super().ready(ehlo)

    def start_send(self, body: bytes = b"x\r\n") -> Deferred[TransactionResult]:
        self.ready()
        done = run(self.client.send("a@b.test", ["x@example.org"], io.BytesIO(body), len(body)))
        self.sent()
        return done

    def assert_timeout(self, done: Deferred[Any]) -> SMTPClientError:
        error = self.error(done)
        self.assertEqual((error.reply.code, error.reply.enhanced), (421, "4.4.2"))
        self.assertIn("timeout", error.reply.lines()[0])
        self.assertTrue(error.temporary)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        return error

    def test_reply_timeout(self) -> None:
        done = self.start_send()
        self.clock.advance(self.reply_timeout - 1)
        self.assertNoResult(done)
        self.clock.advance(1)
        self.assert_timeout(done)
        self.assertEqual(self.error(run(self.client.reset())).reply.code, 421)

    def test_each_pipelined_reply_gets_its_own_timeout(self) -> None:
        done = self.start_send()
        # 4 x 24 s: more than one reply timeout in all, less than the send timeout.
        for reply in (b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n", b"354 go\r\n"):
            self.clock.advance(24)
            self.server(reply)
        self.clock.advance(24)
        self.server(b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.successResultOf(done).data, Reply(250, "2.0.0", "Ok"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_pipelined_reply_times_out_on_its_own_deadline(self) -> None:
        done = self.start_send()
        self.clock.advance(10)
        self.server(b"250 2.1.0 Ok\r\n")
        # The RCPT reply is due from t=10: not timed out at t=39.9, timed out at t=40.
        self.clock.advance(29.9)
        self.assertNoResult(done)
        self.clock.advance(0.1)
        self.assert_timeout(done)

    def test_send_timeout_while_the_body_is_held_back(self) -> None:
        done = self.start_send(b"y" * 5_000_000)
        self.server(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        # The peer stops reading: the transport pauses its producer; no reply is due, the send timer runs.
        self.transport.producer.pauseProducing()
        self.clock.advance(self.send_timeout - 1)
        self.assertNoResult(done)
        self.clock.advance(1)
        error = self.assert_timeout(done)
        self.assertIn("transaction", error.reply.lines()[0])
        self.assertNotIn(b"\r\n.\r\n", self.transport.value())

    def test_connection_lost_mid_command(self) -> None:
        done = self.start_send()
        self.server(b"250 2.1.0 Ok\r\n")
        self.client.connectionLost(Failure(ConnectionLost("Connection reset by peer")))
        error = self.error(done)
        self.assertEqual((error.reply.code, error.reply.enhanced), (421, "4.4.2"))
        self.assertIn("lost", error.reply.lines()[0])
        self.assertTrue(error.temporary)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_lost_during_the_body(self) -> None:
        done = self.start_send(b"y" * 5_000_000)
        self.server(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        producer = self.transport.producer
        producer.pauseProducing()
        # What a TCP transport does on loss: stop its producer, then tell the protocol.
        producer.stopProducing()
        self.client.connectionLost(Failure(ConnectionLost()))
        error = self.error(done)
        self.assertEqual((error.reply.code, error.reply.enhanced), (421, "4.4.2"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_read_error_mid_body(self) -> None:
        self.ready()
        done = run(self.client.send("a@b.test", ["x@example.org"], FailingBody(b"z" * 200_000), 200_000))
        self.sent()
        self.server(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        error = self.error(done)
        self.assertEqual((error.reply.code, error.reply.enhanced), (451, "4.3.0"))
        written = self.sent()
        self.assertEqual(written, b"z" * 65536)  # one chunk, and no terminator that would deliver half of it
        self.assertTrue(self.transport.disconnected)
        self.flushLoggedErrors(OSError)

    def test_abort(self) -> None:
        done = self.start_send()
        self.client.abort()
        self.assertEqual(self.error(done).reply.code, 421)
        self.assertTrue(self.transport.disconnected)


class AuthAndLoggingTests(ClientTestCase):
    def setUp(self) -> None:
        super().setUp()
        # The client's protocol trace is at debug level, which dcrouter's loggers drop by default.
        set_level("debug", "dcrouter.delivery.client")
        self.addCleanup(levels.clearLogLevels)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def secrets(self) -> list[bytes]:
        plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
        return [PASSWORD.encode(), plain, base64.b64encode(PASSWORD.encode()), plain[8:-4]]

    def assert_no_secret_logged(self) -> None:
        self.assertTrue(self.events)
        for event in self.events:
            text = (formatEvent(event) + repr(event)).encode()
            for secret in self.secrets():
                self.assertNotIn(secret, text)

    def test_plain(self) -> None:
        self.ready()
        done = run(self.client.authenticate(USER, PASSWORD))
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
        self.assertEqual(self.sent(), b"AUTH PLAIN " + token + b"\r\n")
        self.server(b"235 2.7.0 Authentication successful\r\n")
        self.successResultOf(done)
        logged = [formatEvent(e) for e in self.events if e["log_level"] == LogLevel.debug]
        self.assertIn("C: AUTH PLAIN <redacted>", logged)
        self.assert_no_secret_logged()

    def test_plain_without_initial_response(self) -> None:
        self.ready()
        done = run(self.client.authenticate(USER, PASSWORD))
        self.sent()
        self.server(b"334 \r\n")
        self.assertEqual(self.sent(), base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()) + b"\r\n")
        self.server(b"235 2.7.0 Ok\r\n")
        self.successResultOf(done)
        self.assert_no_secret_logged()

    def test_login_when_plain_is_not_offered(self) -> None:
        self.ready(b"250-mx\r\n250 AUTH LOGIN\r\n")
        done = run(self.client.authenticate(USER, PASSWORD))
        self.assertEqual(self.sent(), b"AUTH LOGIN\r\n")
        self.server(b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(self.sent(), base64.b64encode(USER.encode()) + b"\r\n")
        self.server(b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(self.sent(), base64.b64encode(PASSWORD.encode()) + b"\r\n")
        self.server(b"235 2.7.0 Ok\r\n")
        self.successResultOf(done)
        self.assert_no_secret_logged()

    def test_rejected_credentials(self) -> None:
        self.ready()
        done = run(self.client.authenticate(USER, PASSWORD))
        self.server(b"535 5.7.8 Authentication credentials invalid\r\n")
        error = self.error(done)
        self.assertEqual(error.reply, Reply(535, "5.7.8", "Authentication credentials invalid"))
        self.assertTrue(error.temporary)
        self.assertNotIn(PASSWORD, str(error))
        self.assert_no_secret_logged()

    def test_endless_challenges_are_cancelled(self) -> None:
        self.ready(b"250-mx\r\n250 AUTH LOGIN\r\n")
        done = run(self.client.authenticate(USER, PASSWORD))
        self.server(b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n334 bW9yZQ==\r\n")
        self.assertTrue(self.sent().endswith(b"\r\n*\r\n"))
        self.server(b"501 5.7.0 Cancelled\r\n")
        self.assertEqual(self.error(done).reply.code, 501)
        self.assert_no_secret_logged()

    def test_no_supported_mechanism(self) -> None:
        self.ready(b"250-mx\r\n250 AUTH CRAM-MD5\r\n")
        error = self.error(run(self.client.authenticate(USER, PASSWORD)))
        self.assertEqual((error.reply.code, error.reply.enhanced), (454, "4.7.0"))
        self.assertEqual(self.sent(), b"")

    def test_commands_and_replies_logged_at_debug(self) -> None:
        self.ready()
        run(self.client.reset())
        self.server(b"250 2.0.0 Ok\r\n")
        debug = [(formatEvent(e), e["peer"]) for e in self.events if e["log_level"] == LogLevel.debug]
        self.assertIn(("C: RSET", "192.0.2.25:25"), debug)
        self.assertIn(("S: 250 Ok", "192.0.2.25:25"), debug)
        self.assertEqual({e["log_namespace"] for e in self.events}, {"dcrouter.delivery.client"})


class ProbeTests(ClientTestCase):
    """``probe``: MAIL, RCPT and RSET, never DATA; the session is left clean for the next use."""

    def test_pipelined_probe(self) -> None:
        self.ready()
        done = run(self.client.probe("", "alice@example.test"))
        self.assertEqual(self.sent(), b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nRSET\r\n")
        self.server(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
        self.assertNoResult(done)
        self.server(b"250 2.0.0 Ok\r\n")
        self.assertEqual(
            self.successResultOf(done),
            ProbeReplies(Reply(250, "2.1.0", "Ok"), Reply(250, "2.1.5", "Ok"), Reply(250, "2.0.0", "Ok")),
        )
        self.assertTrue(self.client.is_open)

    def test_unknown_recipient(self) -> None:
        self.ready()
        done = run(self.client.probe("probe@mx.example.test", "nobody@example.test"))
        self.assertEqual(
            self.sent(),
            b"MAIL FROM:<probe@mx.example.test>\r\nRCPT TO:<nobody@example.test>\r\nRSET\r\n",
        )
        self.server(b"250 2.1.0 Ok\r\n550 5.1.1 No such user\r\n250 2.0.0 Ok\r\n")
        self.assertEqual(self.successResultOf(done).rcpt, Reply(550, "5.1.1", "No such user"))

    def test_mail_refused_makes_the_rcpt_reply_meaningless(self) -> None:
        self.ready()
        done = run(self.client.probe("", "alice@example.test"))
        self.sent()
        self.server(b"550 5.7.1 No null sender\r\n503 5.5.1 Need MAIL\r\n250 2.0.0 Ok\r\n")
        replies = self.successResultOf(done)
        self.assertEqual((replies.mail.code, replies.rcpt), (550, None))

    def test_one_command_at_a_time_without_pipelining(self) -> None:
        self.ready(EHLO_BASIC)
        done = run(self.client.probe("", "alice@example.test"))
        self.assertEqual(self.sent(), b"MAIL FROM:<>\r\n")
        self.server(b"250 2.1.0 Ok\r\n")
        self.assertEqual(self.sent(), b"RCPT TO:<alice@example.test>\r\n")
        self.server(b"450 4.2.0 Greylisted\r\n")
        self.assertEqual(self.sent(), b"RSET\r\n")
        self.server(b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.successResultOf(done).rcpt, Reply(450, "4.2.0", "Greylisted"))

    def test_refused_mail_without_pipelining_sends_nothing_more(self) -> None:
        self.ready(EHLO_BASIC)
        done = run(self.client.probe("", "alice@example.test"))
        self.sent()
        self.server(b"421 4.3.2 Busy\r\n")
        self.assertEqual(self.successResultOf(done), ProbeReplies(Reply(421, "4.3.2", "Busy"), None, None))
        self.assertEqual(self.sent(), b"")

    def test_non_ascii_address(self) -> None:
        self.ready()
        done = run(self.client.probe("", "jörg@example.test"))
        self.assertEqual(
            self.sent(), "MAIL FROM:<> SMTPUTF8\r\nRCPT TO:<jörg@example.test>\r\nRSET\r\n".encode()
        )
        self.server(b"250 Ok\r\n250 Ok\r\n250 Ok\r\n")
        self.assertEqual(self.successResultOf(done).rcpt, Reply(250, "", "Ok"))

    def test_non_ascii_address_without_smtputf8_sends_nothing(self) -> None:
        self.ready(EHLO_BASIC)
        replies = self.successResultOf(run(self.client.probe("", "jörg@example.test")))
        self.assertEqual((replies.mail.code, replies.mail.enhanced, replies.rcpt), (553, "5.6.7", None))
        self.assertEqual(self.sent(), b"")

    def test_control_characters_send_nothing(self) -> None:
        self.ready()
        replies = self.successResultOf(run(self.client.probe("", "a\r\nDATA@example.test")))
        self.assertEqual((replies.mail.code, replies.mail.enhanced), (553, "5.1.3"))
        self.assertEqual(self.sent(), b"")

    def test_connection_lost_mid_probe(self) -> None:
        self.ready()
        done = run(self.client.probe("", "alice@example.test"))
        self.server(b"250 2.1.0 Ok\r\n")
        self.client.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.error(done).reply.code, 421)


class QuitTests(ClientTestCase):
    def test_quit(self) -> None:
        self.ready()
        done = run(self.client.quit())
        self.assertEqual(self.sent(), b"QUIT\r\n")
        self.assertFalse(self.transport.disconnecting)
        self.server(b"221 2.0.0 Bye\r\n")
        self.successResultOf(done)
        self.assertTrue(self.transport.disconnecting)
        self.client.connectionLost(Failure(ConnectionLost()))
        self.assertFalse(self.client.connected)

    def test_quit_after_the_server_hung_up_never_raises(self) -> None:
        self.ready()
        done = run(self.client.quit())
        self.client.connectionLost(Failure(ConnectionLost()))
        self.assertIsNone(self.successResultOf(done))
        self.assertIsNone(self.successResultOf(run(self.client.quit())))


class EnhancedStripTests(unittest.TestCase):
    """Reply texts lose their RFC 3463 prefix exactly as the regular expression used to cut it."""

    def test_same_as_the_pattern(self) -> None:
        import re

        from dcrouter.delivery.client import _build_reply

        def model(code: int, texts: list[str]) -> tuple[str, object]:
            match = re.match(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: |$)", texts[0])
            if match is None or match.group(1) != str(code)[0]:
                return "", texts[0] if len(texts) == 1 else tuple(texts)
            enhanced = ".".join(match.groups())
            prefix = re.compile(re.escape(enhanced) + "(?: |$)")
            stripped = [text[m.end() :] if (m := prefix.match(text)) else text for text in texts]
            return enhanced, stripped[0] if len(stripped) == 1 else tuple(stripped)

        cases = [
            (250, ["2.0.0 Ok"]),
            (250, ["2.0.0"]),
            (250, ["2.0.0\n"]),
            (250, ["2.0.0x"]),
            (250, ["2.0.0  two spaces"]),
            (550, ["5.1.1 no such user", "5.1.1 really", "5.1.10 other", "5.1.1", "plain", "5.1.1\n"]),
            (550, ["2.0.0 class differs"]),
            (250, ["2.1.5 a", "2.1.5b", ""]),
            (421, ["4.7.0"]),
            (250, ["mx.example ESMTP"]),
        ]
        for code, texts in cases:
            reply = _build_reply(code, texts)
            self.assertEqual((reply.enhanced, reply.text), model(code, texts), texts)
