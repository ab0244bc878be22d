"""The daemon scanners (spamd, rspamd, clamd) against the real daemons on 127.0.0.1 (tests/*_server.py), and
against local sockets that refuse, hang or answer nonsense. Each daemon's tests are skipped, saying what to
install, where it is missing."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.trial.unittest import TestCase

from dcrouter.processing.message import ScannerUnavailable, ScanResult, Verdict
from dcrouter.processing.scanners.clamd import ClamdScanner
from dcrouter.processing.scanners.rspamd import RspamdScanner
from dcrouter.processing.scanners.spamd import SpamdScanner
from tests import clamd_server, rspamd_server, spamd_server
from tests.redis_server import free_port
from tests.test_scanner_daemons import GTUBE, HEAD, INFECTED, PLAIN, SPAM, config, draft

#: A short deadline for the tests that wait for it on the real reactor.
SHORT_TIMEOUT_MS = 500


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
