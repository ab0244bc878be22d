"""The daemon scanners (spamd, rspamd, clamd): their reply parsers and request framing in memory
(StringTransport, Clock), then against the real daemons on 127.0.0.1 (tests/*_server.py), and against local
sockets that refuse, hang or answer nonsense."""

from __future__ import annotations

import base64
import io
import json
import os
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IProtocol
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
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
from tests import clamd_server, rspamd_server, spamd_server
from tests.redis_server import free_port

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
#: A short deadline for the tests that wait for it on the real reactor.
SHORT_TIMEOUT_MS = 500


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
        verifyObject(IScanner, SpamdScanner(config("spamassassin"), memory))
        verifyObject(IScanner, ClamdScanner(config("clamav"), memory))
        verifyObject(IScanner, RspamdScanner(config("rspamd"), memory))

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
        queue = MemoryQueue(clock=memory)
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


# --- real daemons and misbehaving peers on 127.0.0.1 -------------------------------------------------------


class Silent(Protocol):
    """Reads everything, answers nothing."""


class Garbage(Protocol):
    """Answers the first bytes with nonsense and closes."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"\x00\x01 HELLO? this is not the daemon you are looking for\r\n\r\n")
        self.transport.loseConnection()


class PeersMixin:
    """Local peers that misbehave: shared by the three daemon test cases."""

    def listen(self, protocol: type[Protocol]) -> int:
        port: IListeningPort = reactor.listenTCP(
            0, ServerFactory.forProtocol(protocol), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)  # type: ignore[attr-defined]
        return int(port.getHost().port)  # type: ignore[attr-defined]

    def scanner(self, **values: Any) -> Any:
        raise NotImplementedError

    async def unavailable(self, **values: Any) -> str:
        try:
            result = await self.scanner(**values).scan(draft(PLAIN))
        except ScannerUnavailable as e:
            return str(e)
        raise AssertionError(f"expected ScannerUnavailable, got {result}")

    async def test_port_closed(self) -> None:
        reason = await self.unavailable(port=free_port())
        self.assertIn("127.0.0.1", reason)  # type: ignore[attr-defined]

    async def test_never_answers(self) -> None:
        reason = await self.unavailable(port=self.listen(Silent), timeout=SHORT_TIMEOUT_MS)
        self.assertIn(f"no answer within {SHORT_TIMEOUT_MS} ms", reason)  # type: ignore[attr-defined]

    async def test_garbage(self) -> None:
        await self.unavailable(port=self.listen(Garbage), timeout=5000)


class SpamdTests(PeersMixin, TestCase):
    skip = spamd_server.SKIP_REASON

    def scanner(self, **values: Any) -> SpamdScanner:
        values.setdefault("port", spamd_server.shared_spamd().port)
        return SpamdScanner(config("spamassassin", **values), reactor)

    async def scan(self, data: bytes, **values: Any) -> ScanResult:
        return await self.scanner(**values).scan(draft(data))

    async def test_gtube_is_spam(self) -> None:
        result = await self.scan(SPAM)
        self.assertEqual(result.verdict, Verdict.SPAM)
        assert result.score is not None
        self.assertGreaterEqual(result.score, 1000.0)
        status = dict(result.headers)["X-Spam-Status"]
        self.assertTrue(status.startswith("Yes, score=10"), status)
        self.assertIn("required=5.0 tests=", status)
        self.assertIn("GTUBE", status)
        self.assertEqual(dict(result.headers)["X-Spam-Score"], f"{result.score:.1f}")

    async def test_plain_is_clean_with_a_score(self) -> None:
        result = await self.scan(PLAIN)
        self.assertEqual(result.verdict, Verdict.CLEAN)
        assert result.score is not None
        self.assertLess(result.score, 5.0)
        self.assertTrue(dict(result.headers)["X-Spam-Status"].startswith("No, score="))

    async def test_configured_threshold_decides(self) -> None:
        result = await self.scan(PLAIN, threshold=-100.0)
        self.assertEqual((result.verdict, result.threshold), (Verdict.SPAM, -100.0))

    async def test_spooled_file(self) -> None:
        # SpamAssassin reads the first 50 KB of a part for body rules: GTUBE goes first.
        big = HEAD + b"\r\n" + GTUBE + b"\r\n" + b"Quite a long letter about nothing much.\r\n" * 3000
        result = await self.scan_file(big)
        self.assertEqual(result.verdict, Verdict.SPAM)

    async def scan_file(self, data: bytes) -> ScanResult:
        return await self.scanner().scan(draft(data, path=os.path.abspath(self.mktemp())))

    async def test_too_large_not_checked(self) -> None:
        result = await self.scan(SPAM, max_size=len(SPAM) - 1)
        self.assertEqual((result.verdict, result.reason), (Verdict.CLEAN, "too large, not checked"))


class ClamdTests(PeersMixin, TestCase):
    skip = clamd_server.SKIP_REASON

    def scanner(self, **values: Any) -> ClamdScanner:
        values.setdefault("port", clamd_server.shared_clamd().port)
        return ClamdScanner(config("clamav", **values), reactor)

    async def scan(self, data: bytes, **values: Any) -> ScanResult:
        return await self.scanner(**values).scan(draft(data, path=os.path.abspath(self.mktemp())))

    async def test_eicar_attachment_is_a_virus(self) -> None:
        result = await self.scan(INFECTED)
        self.assertEqual(result.verdict, Verdict.VIRUS)
        self.assertEqual(result.reason, clamd_server.REPORTED_SIGNATURE)
        self.assertEqual(
            result.headers, (("X-Virus-Status", f"Infected: {clamd_server.REPORTED_SIGNATURE}"),)
        )

    async def test_plain_is_clean(self) -> None:
        result = await self.scan(PLAIN)
        self.assertEqual(result, ScanResult("virus", Verdict.CLEAN, headers=(("X-Virus-Status", "Clean"),)))

    async def test_many_chunks(self) -> None:
        filler = b"Line after line of harmless text.\r\n" * 20000  # 700 KB: about 43 chunks
        data = INFECTED.replace(b"The file you asked for.\r\n", filler)
        self.assertEqual((await self.scan(data)).verdict, Verdict.VIRUS)

    async def test_too_large_is_unscannable_unsent(self) -> None:
        result = await self.scan(INFECTED, max_size=100)
        self.assertEqual(result.verdict, Verdict.UNSCANNABLE)

    async def test_over_clamd_limit_is_unscannable(self) -> None:
        data = HEAD + b"\r\n" + b"y" * (clamd_server.STREAM_MAX_LENGTH + 100_000)
        result = await self.scan(data, max_size=4 * clamd_server.STREAM_MAX_LENGTH)
        self.assertEqual(result.verdict, Verdict.UNSCANNABLE)


class RspamdTests(PeersMixin, TestCase):
    skip = rspamd_server.SKIP_REASON

    def scanner(self, **values: Any) -> RspamdScanner:
        values.setdefault("port", rspamd_server.shared_rspamd().port)
        return RspamdScanner(config("rspamd", **values), reactor)

    async def scan(self, data: bytes, **values: Any) -> ScanResult:
        return await self.scanner(**values).scan(draft(data))

    async def test_gtube_is_spam(self) -> None:
        result = await self.scan(SPAM)
        self.assertEqual((result.verdict, result.score), (Verdict.SPAM, rspamd_server.REJECT_SCORE))
        status = dict(result.headers)["X-Spam-Status"]
        self.assertEqual(status, "Yes, score=15.0 required=5.0 tests=GTUBE")

    async def test_plain_is_clean_with_a_score(self) -> None:
        result = await self.scan(PLAIN)
        self.assertEqual((result.verdict, result.score), (Verdict.CLEAN, 0.0))
        self.assertEqual(dict(result.headers)["X-Spam-Score"], "0.0")

    async def test_null_sender(self) -> None:
        message = draft(SPAM)
        message.envelope.mail_from = ""
        result = await self.scanner().scan(message)
        self.assertEqual(result.verdict, Verdict.SPAM)
