"""The daemon scanners (spamd, rspamd, clamd): their reply parsers and request framing in memory
(StringTransport, MemoryReactorClock). Against the real daemons, and local sockets that refuse, hang or answer
nonsense: tests/integration/test_scanner_daemons.py."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request as WebRequest
from zope.interface.verify import verifyObject

from dcrouter.config.processing import ScannerConfig
from dcrouter.interfaces import IScanner
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.headers import read_header_block
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.processing.message import Draft, Refusal, ScannerUnavailable, ScanResult, Verdict
from dcrouter.processing.processor import EmailProcessor, ScannerStage
from dcrouter.processing.scanners import clamd, rspamd, spamd
from dcrouter.processing.scanners.clamd import ClamdScanner
from dcrouter.processing.scanners.daemon import Exchange, Request
from dcrouter.processing.scanners.rspamd import RspamdScanner
from dcrouter.processing.scanners.spamd import SpamdScanner
from dcrouter.queue.memory import MemoryQueue
from tests import clamd_server

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
HEAD = (
    b"From: Alice <alice@example.test>\r\nTo: bob@example.test\r\nSubject: Lunch\r\n"
    b"Date: Wed, 25 Nov 2026 10:00:00 +0000\r\nMessage-ID: <lunch.1@example.test>\r\n"
)
PLAIN = HEAD + b"\r\nShall we meet at noon at the usual place?\r\n"
SPAM = HEAD + b"\r\n" + GTUBE + b"\r\n"
INFECTED = (
    HEAD + b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
    b"--b1\r\nContent-Type: text/plain\r\n\r\nThe file you asked for.\r\n"
    b'--b1\r\nContent-Type: application/octet-stream; name="eicar.com"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b'Content-Disposition: attachment; filename="eicar.com"\r\n\r\n'
    + base64.b64encode(clamd_server.EICAR)
    + b"\r\n--b1--\r\n"
)


def draft(data: bytes, path: str | None = None) -> Draft:
    """A Draft of ``data`` as received (from the file at ``path`` when given: a spooled big message)."""
    headers, offset = read_header_block(io.BytesIO(data), 256 * 1024)
    if path is not None:
        with open(path, "wb") as f:
            f.write(data)
        source = SpooledMessage(len(data), path=path)
    else:
        source = SpooledMessage(len(data), data=data)
    envelope = Envelope(
        "alice@example.test", ["bob@example.test"], helo="client.example.test", peer_host="192.0.2.7"
    )
    return Draft(
        queue_id="Q123",
        envelope=envelope,
        source=source,
        headers=headers,
        body_offset=offset,
        run_in_thread=maybeDeferred,
    )


def config(engine: str, **values: Any) -> ScannerConfig:
    return ScannerConfig(type="virus" if engine == "clamav" else "spam", engine=engine, **values)


# --- reply parsers -----------------------------------------------------------------------------------------


class SpamdReplyTests(SynchronousTestCase):
    def test_symbols(self) -> None:
        reply = spamd.parse_reply(
            b"SPAMD/1.1 0 EX_OK\r\nContent-length: 17\r\nSpam: True ; 1003.3 / 5.0\r\n\r\nGTUBE,NO_RECEIVED"
        )
        self.assertEqual(reply, spamd.SpamdReply(1003.3, 5.0, ("GTUBE", "NO_RECEIVED")))

    def test_no_symbols_negative_score(self) -> None:
        reply = spamd.parse_reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; -1.9 / 5.0\r\n\r\n")
        self.assertEqual(reply, spamd.SpamdReply(-1.9, 5.0, ()))

    def test_odd_symbol_names_dropped(self) -> None:
        reply = spamd.parse_reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 6 / 5\r\n\r\nA_B,x\x00y,C 1,D")
        self.assertEqual(reply.symbols, ("A_B", "D"))

    def test_unavailable(self) -> None:
        for data in [
            b"SPAMD/1.0 76 Bad header line: (EOF)\r\n",
            b"SPAMD/1.1 0 EX_OK\r\n\r\n",
            b"SPAMD/1.1 0 EX_OK\r\nSpam: maybe\r\n\r\n",
            b"SPAMD/1.1 0 EX_OK\r\nContent-length: 20\r\nSpam: True ; 6.0 / 5.0\r\n\r\nGTUBE",
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"\x00\xff garbage",
        ]:
            with self.subTest(data=data):
                self.assertRaises(ScannerUnavailable, spamd.parse_reply, data)

    def test_result_uses_configured_threshold(self) -> None:
        result = spamd.spam_result("spam", 3.0, 2.5, ("A", "B"))
        self.assertEqual(result.verdict, Verdict.SPAM)
        self.assertEqual(
            result.headers,
            (("X-Spam-Status", "Yes, score=3.0 required=2.5 tests=A,B"), ("X-Spam-Score", "3.0")),
        )
        self.assertEqual(spamd.spam_result("spam", 2.4, 2.5, ()).verdict, Verdict.CLEAN)
        self.assertEqual(
            spamd.spam_result("spam", 2.4, 2.5, ()).headers[0][1], "No, score=2.4 required=2.5 tests=none"
        )

    def test_tests_list_is_bounded(self) -> None:
        rules = [f"RULE_{i:03}" for i in range(500)]
        [(_, status), _] = spamd.spam_status(True, 9.0, 5.0, tuple(rules))
        tests = status.split("tests=")[1]
        self.assertLessEqual(len(tests), spamd.MAX_TESTS)
        self.assertGreater(len(tests), spamd.MAX_TESTS - 10)
        self.assertEqual(tests.split(","), rules[: tests.count(",") + 1])


class ClamdReplyTests(SynchronousTestCase):
    def test_clean(self) -> None:
        self.assertEqual(
            clamd.parse_reply("virus", b"stream: OK\0"),
            ScanResult("virus", Verdict.CLEAN, headers=(("X-Virus-Status", "Clean"),)),
        )

    def test_found(self) -> None:
        result = clamd.parse_reply("virus", b"stream: Win.Test.EICAR_HDB-1 FOUND\0")
        self.assertEqual(result.verdict, Verdict.VIRUS)
        self.assertEqual(result.reason, "Win.Test.EICAR_HDB-1")
        self.assertEqual(result.headers, (("X-Virus-Status", "Infected: Win.Test.EICAR_HDB-1"),))

    def test_signature_sanitised(self) -> None:
        result = clamd.parse_reply(
            "virus", b"stream: Evil\r\nX-Injected: 1\x1b[31m" + b"A" * 200 + b" FOUND\0"
        )
        self.assertEqual(result.verdict, Verdict.VIRUS)
        self.assertTrue(result.reason.startswith("Evil?X-Injected: 1?[31mAAA"), result.reason)
        self.assertEqual(len(result.reason), clamd.MAX_SIGNATURE)
        self.assertTrue(result.reason.isprintable() and result.reason.isascii())

    def test_size_limit_is_unscannable(self) -> None:
        result = clamd.parse_reply("virus", b"INSTREAM size limit exceeded. ERROR\0")
        self.assertEqual(result.verdict, Verdict.UNSCANNABLE)

    def test_unavailable(self) -> None:
        for data in [
            b"stream: Can't allocate memory ERROR\0",
            b"UNKNOWN COMMAND\0",
            b"stream: FOUND\0",
            b"stream: Something odd\0",
            b"PONG\0",
            b"",
        ]:
            with self.subTest(data=data):
                self.assertRaises(ScannerUnavailable, clamd.parse_reply, "virus", data)


class RspamdReplyTests(SynchronousTestCase):
    def test_reply(self) -> None:
        data = json.dumps(
            {
                "score": 15.0,
                "required_score": 15.0,
                "action": "reject",
                "symbols": {"GTUBE": {"score": 0}, "R_SPF_NA": {}, "bad name\n": {}},
            }
        ).encode()
        self.assertEqual(rspamd.parse_reply(data), (15.0, ("GTUBE", "R_SPF_NA")))

    def test_unavailable(self) -> None:
        for data in [b"<html>", b"[]", b'{"action": "reject"}', b'{"score": true}', b'{"score": "1"}', b""]:
            with self.subTest(data=data):
                self.assertRaises(ScannerUnavailable, rspamd.parse_reply, data)


# --- the exchange and the scanners, in memory ------------------------------------------------------------


class ExchangeTests(SynchronousTestCase):
    def test_clamd_framing_streamed(self) -> None:
        """The body goes chunk by chunk (FileSender's 16 KiB), each behind its length, then a zero chunk."""
        body = io.BytesIO(b"x" * 40000)
        exchange = Exchange(
            Request(
                clamd.COMMAND,
                body,
                frame=clamd.frame,
                tail=clamd.END_OF_STREAM,
                complete=clamd.reply_complete,
            )
        )
        transport = StringTransport()
        exchange.makeConnection(transport)
        while transport.producer is not None:
            transport.producer.resumeProducing()
        expected = b"zINSTREAM\0" + b"".join(
            len(chunk).to_bytes(4, "big") + chunk for chunk in (b"x" * 16384, b"x" * 16384, b"x" * 7232)
        )
        self.assertEqual(transport.value(), expected + b"\0\0\0\0")
        self.assertTrue(body.closed)
        exchange.dataReceived(b"stream: ")
        self.assertNoResult(exchange.reply)
        exchange.dataReceived(b"OK\0")
        self.assertEqual(self.successResultOf(exchange.reply), b"stream: OK\0")
        self.assertTrue(transport.disconnected)

    def test_closed_without_reply(self) -> None:
        exchange = Exchange(Request(b"PING\n"))
        exchange.makeConnection(StringTransport())
        exchange.connectionLost()
        self.failureResultOf(exchange.reply, ScannerUnavailable)

    def test_reply_too_long(self) -> None:
        exchange = Exchange(Request(b"PING\n"))
        exchange.makeConnection(StringTransport())
        exchange.dataReceived(b"x" * 300_000)
        self.failureResultOf(exchange.reply, ScannerUnavailable)


class ScannerInMemoryTests(SynchronousTestCase):
    """The scanners on a MemoryReactorClock: what they connect to, send, and make of the reply and of time."""

    def connected(self, memory: MemoryReactorClock) -> tuple[IProtocol, StringTransport]:
        factory = memory.tcpClients[-1][2]
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        while transport.producer is not None:
            transport.producer.resumeProducing()
        return protocol, transport

    def test_interfaces(self) -> None:
        memory = MemoryReactorClock()
        self.assertTrue(verifyObject(IScanner, SpamdScanner(config("spamassassin"), memory)))
        self.assertTrue(verifyObject(IScanner, ClamdScanner(config("clamav"), memory)))
        self.assertTrue(verifyObject(IScanner, RspamdScanner(config("rspamd"), memory)))

    def test_spamd_transcript(self) -> None:
        memory = MemoryReactorClock()
        scanner = SpamdScanner(config("spamassassin", port=7830, threshold=3.0, name="sa"), memory)
        d = scanner.scan(draft(PLAIN))
        self.assertEqual(memory.tcpClients[0][:2], ("127.0.0.1", 7830))
        protocol, transport = self.connected(memory)
        self.assertEqual(
            transport.value(), b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(PLAIN) + PLAIN
        )
        protocol.dataReceived(
            b"SPAMD/1.1 0 EX_OK\r\nContent-length: 11\r\nSpam: False ; 3.3 / 5.0\r\n\r\nMISSING_MID"
        )
        self.assertNoResult(d)
        protocol.connectionLost(None)  # type: ignore[arg-type]
        result = self.successResultOf(d)
        self.assertEqual(
            (result.scanner, result.verdict, result.score, result.threshold), ("sa", Verdict.SPAM, 3.3, 3.0)
        )

    def test_timeout(self) -> None:
        memory = MemoryReactorClock()
        d = ClamdScanner(config("clamav", timeout=2000), memory).scan(draft(PLAIN))
        _, transport = self.connected(memory)
        memory.advance(1.9)
        self.assertNoResult(d)
        memory.advance(0.1)
        failure = self.failureResultOf(d, ScannerUnavailable)
        self.assertIn("no answer within 2000 ms", str(failure.value))
        self.assertTrue(transport.disconnected)
        self.assertEqual(memory.getDelayedCalls(), [])

    def test_timeout_while_connecting(self) -> None:
        memory = MemoryReactorClock()
        d = SpamdScanner(config("spamassassin", timeout=1000), memory).scan(draft(PLAIN))
        memory.advance(1.0)
        self.failureResultOf(d, ScannerUnavailable)

    def test_unix_socket(self) -> None:
        memory = MemoryReactorClock()
        ClamdScanner(config("clamav", socket="/run/clamav/clamd.ctl"), memory).scan(draft(PLAIN))
        self.assertEqual(memory.unixClients[0][0], "/run/clamav/clamd.ctl")

    def test_too_large_not_sent(self) -> None:
        memory = MemoryReactorClock()
        spam = self.successResultOf(
            SpamdScanner(config("spamassassin", max_size=10), memory).scan(draft(SPAM))
        )
        self.assertEqual((spam.verdict, spam.reason), (Verdict.CLEAN, "too large, not checked"))
        virus = self.successResultOf(ClamdScanner(config("clamav", max_size=10), memory).scan(draft(PLAIN)))
        self.assertEqual(virus.verdict, Verdict.UNSCANNABLE)
        rspam = self.successResultOf(RspamdScanner(config("rspamd", max_size=10), memory).scan(draft(SPAM)))
        self.assertEqual((rspam.verdict, rspam.reason), (Verdict.CLEAN, "too large, not checked"))
        self.assertEqual((memory.tcpClients, memory.unixClients), ([], []))

    def test_cancelled_from_outside_is_not_unavailable(self) -> None:
        """processingTimeout cancelling the chain mid-scan is a cancellation, not a daemon failure: onError =
        accept must not carry on with the message."""
        memory = MemoryReactorClock()
        d = ClamdScanner(config("clamav", timeout=30_000), memory).scan(draft(PLAIN))
        _, transport = self.connected(memory)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(transport.disconnected)
        self.assertEqual(memory.getDelayedCalls(), [])

    def test_processing_timeout_during_a_scan_answers_4_4_1(self) -> None:
        memory = MemoryReactorClock()
        queue = MemoryQueue(clock=memory, spool_directory=self.mktemp())
        self.successResultOf(queue.load())
        scanner = ClamdScanner(config("clamav", timeout=30_000), memory)
        processor = EmailProcessor(
            queue,
            memory.seconds,
            reactor=memory,
            timeout=5.0,
            scanners=[ScannerStage(scanner, "reject", on_error="accept")],
        )
        d = processor.process(
            Envelope("a@example.org", ["b@example.com"]), SpooledMessage(len(PLAIN), data=PLAIN)
        )
        self.connected(memory)
        memory.advance(5.0)
        refusal = self.failureResultOf(d, Refusal).value
        self.assertEqual((refusal.reply.code, refusal.reply.enhanced), (451, "4.4.1"))
        self.assertEqual(self.successResultOf(queue.get_item_count()), 0)


class FakeCheck(Resource):
    """rspamd's /checkv2 as documented, recording what it was sent."""

    isLeaf = True

    def __init__(self, reply: bytes, code: int = 200) -> None:
        super().__init__()
        self.reply = reply
        self.code = code
        self.requests: list[tuple[bytes, dict[bytes, list[bytes]], bytes]] = []

    def render_POST(self, request: WebRequest) -> bytes:
        assert request.content is not None
        headers = dict(request.requestHeaders.getAllRawHeaders())
        self.requests.append((request.path, headers, request.content.read()))
        request.setResponseCode(self.code)
        return self.reply


class RspamdInMemoryTests(SynchronousTestCase):
    def scan(self, resource: FakeCheck, **values: Any) -> Deferred[ScanResult]:
        memory = MemoryReactorClock()
        agent = RequestTraversalAgent(resource)
        d = RspamdScanner(config("rspamd", **values), memory, agent=agent).scan(draft(SPAM))
        for _ in range(10):
            memory.advance(0)
            agent.flush()
        return d

    def test_request_and_verdict(self) -> None:
        resource = FakeCheck(
            b'{"score": 15.0, "required_score": 15.0, "action": "reject", "symbols": {"GTUBE": {}}}'
        )
        result = self.successResultOf(self.scan(resource, threshold=6.0))
        self.assertEqual((result.verdict, result.score, result.threshold), (Verdict.SPAM, 15.0, 6.0))
        self.assertEqual(result.headers[0], ("X-Spam-Status", "Yes, score=15.0 required=6.0 tests=GTUBE"))
        [(path, headers, body)] = resource.requests
        self.assertEqual((path, body), (b"/checkv2", SPAM))
        for name, value in [
            (b"From", b"alice@example.test"),
            (b"Rcpt", b"bob@example.test"),
            (b"Ip", b"192.0.2.7"),
            (b"Helo", b"client.example.test"),
            (b"Queue-Id", b"Q123"),
        ]:
            self.assertEqual(headers.get(name), [value], name)

    def test_http_error(self) -> None:
        failure = self.failureResultOf(self.scan(FakeCheck(b"oops", code=500)), ScannerUnavailable)
        self.assertIn("HTTP 500", str(failure.value))

    def test_not_json(self) -> None:
        self.failureResultOf(self.scan(FakeCheck(b"<html>hello</html>")), ScannerUnavailable)
