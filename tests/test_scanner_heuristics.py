"""Tests for dcrouter.processing.scanners.heuristics: each rule on a real message walked by the MIME
inspector, the score against the threshold, and SpamAssassin's header format."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from dcrouter.config.processing import ScannerConfig
from dcrouter.interfaces import IScanner
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.headers import HeaderBlock, check_value
from dcrouter.processing.message import ScanResult, Verdict
from dcrouter.processing.scanners.heuristics import GTUBE, RULES, HeuristicSpamScanner
from tests.mime_samples import CRLF, attachment, b64, entity, headers, message, multipart, text_part
from tests.test_scanner_attachment import make_draft

DATE = "Mon, 1 Jan 2024 00:00:00 +0000"
RECEIVED = 1704067200.0 + 60  # a minute after DATE
SCORES = {rule.name: rule.score for rule, _ in RULES}


def envelope(
    mail_from: str = "alice@example.org", auth_user: str | None = None, received_at: float = RECEIVED
) -> Envelope:
    return Envelope(mail_from, ["bob@example.com"], auth_user=auth_user, received_at=received_at)


def raw_message(*fields: tuple[str, str], body: bytes = b"Hello Bob," + CRLF) -> bytes:
    """A single-part message with exactly these header fields."""
    return headers(*fields) + CRLF + body


FULL = (
    ("From", "Alice <alice@example.org>"),
    ("To", "bob@example.com"),
    ("Subject", "lunch"),
    ("Message-ID", "<1@example.org>"),
    ("Date", DATE),
)


def without(*names: str) -> list[tuple[str, str]]:
    return [field for field in FULL if field[0] not in names]


def replaced(**values: str) -> list[tuple[str, str]]:
    return [(name, values.get(name.replace("-", "_"), value)) for name, value in FULL]


class HeuristicsTestCase(SynchronousTestCase):
    def scan(self, data: bytes, env: Envelope | None = None, **given: Any) -> ScanResult:
        given.setdefault("type", "spam")
        scanner = HeuristicSpamScanner(ScannerConfig(**given))
        result = scanner.scan(make_draft(data, envelope=env or envelope()))
        assert isinstance(result, ScanResult)
        self.assertRegex(result.reason, r"\A[ -~]{1,100}\Z")
        for _name, value in result.headers:
            check_value(value)
        return result

    def matched(self, data: bytes, env: Envelope | None = None) -> set[str]:
        status = dict(self.scan(data, env).headers)["X-Spam-Status"]
        listed = status.rpartition("tests=")[2]
        return set() if listed == "none" else set(listed.split(","))

    def assertRules(self, data: bytes, expected: set[str], env: Envelope | None = None) -> None:
        self.assertEqual(self.matched(data, env), expected)


class ScoringTests(HeuristicsTestCase):
    def test_provides_iscanner(self) -> None:
        scanner = HeuristicSpamScanner(ScannerConfig(type="spam", name="heur"))
        self.assertTrue(verifyObject(IScanner, scanner))
        self.assertEqual(scanner.name, "heur")

    def test_clean_message_has_status_headers_too(self) -> None:
        result = self.scan(raw_message(*FULL))
        self.assertEqual(
            (result.scanner, result.verdict, result.score, result.threshold, result.reason),
            ("spam", Verdict.CLEAN, 0.0, 5.0, "score 0.0"),
        )
        self.assertEqual(
            result.headers,
            (("X-Spam-Status", "No, score=0.0 required=5.0 tests=none"), ("X-Spam-Score", "0.0")),
        )

    def test_gtube_and_missing_date(self) -> None:
        result = self.scan(raw_message(*without("Date"), body=GTUBE.encode() + CRLF))
        self.assertEqual(result.verdict, Verdict.SPAM)
        self.assertEqual(result.score, 1001.4)
        self.assertEqual(result.reason, "score 1001.4 (GTUBE, MISSING_DATE)")
        self.assertEqual(
            result.headers,
            (
                ("X-Spam-Status", "Yes, score=1001.4 required=5.0 tests=GTUBE,MISSING_DATE"),
                ("X-Spam-Score", "1001.4"),
            ),
        )

    def test_gtube_in_a_base64_html_part(self) -> None:
        html = entity(
            b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n",
            b64(f"<html><body><p>{GTUBE}</p></body></html>".encode()),
        )
        data = message(headers(("Content-Type", "multipart/mixed; boundary=g")), multipart(b"g", [html]))
        self.assertEqual(self.scan(data).verdict, Verdict.SPAM)

    def test_threshold(self) -> None:
        data = raw_message(*without("Date", "Message-ID"))  # 1.4 + 0.5
        self.assertEqual(self.scan(data, threshold=1.9).verdict, Verdict.SPAM)  # at the threshold is spam
        result = self.scan(data, threshold=2.0)
        self.assertEqual((result.verdict, result.score, result.threshold), (Verdict.CLEAN, 1.9, 2.0))
        self.assertEqual(
            dict(result.headers)["X-Spam-Status"], "No, score=1.9 required=2.0 tests=MISSING_DATE,MISSING_MID"
        )

    def test_long_reason_is_cut(self) -> None:
        body = (GTUBE + " act now, click here, viagra, lottery, http://10.0.0.1/x").encode()
        data = raw_message(("Subject", "RE: WINNER WINNER!!!"), body=body)
        result = self.scan(data)
        self.assertTrue(result.reason.startswith("score 1010.7 (GTUBE, SPAM_PHRASES_3, "), result.reason)
        self.assertTrue(result.reason.endswith(", ...)"), result.reason)
        self.assertLessEqual(len(result.reason), 100)

    def test_long_text_is_scored_in_a_thread(self) -> None:
        ran: list[object] = []

        def run_in_thread(work: Callable[[], object]) -> Deferred[object]:
            ran.append(work)
            return succeed(work())

        body = b"Lorem ipsum dolor sit amet, click here. " * 5000 + GTUBE.encode()
        draft = make_draft(raw_message(*FULL, body=body))
        draft.run_in_thread = run_in_thread
        scanned = HeuristicSpamScanner(ScannerConfig(type="spam")).scan(draft)
        assert isinstance(scanned, Deferred)
        result = self.successResultOf(scanned)
        self.assertEqual(
            (len(ran), result.verdict, result.reason),
            (1, Verdict.SPAM, "score 1001.0 (GTUBE, SPAM_PHRASES_1)"),
        )
        short = HeuristicSpamScanner(ScannerConfig(type="spam")).scan(make_draft(raw_message(*FULL)))
        self.assertIsInstance(short, ScanResult)
        self.assertEqual(len(ran), 1)

    def test_headers_can_be_added_to_a_block(self) -> None:
        block = HeaderBlock.parse(headers(*FULL))
        for name, value in self.scan(raw_message(*without("Date", "To"))).headers:
            block.add(name, value)
        self.assertIn(b"X-Spam-Status: No, score=2.4", block.to_bytes())


class HeaderRuleTests(HeuristicsTestCase):
    def test_missing_fields(self) -> None:
        self.assertRules(raw_message(*without("Date")), {"MISSING_DATE"})
        self.assertRules(raw_message(*without("Message-ID")), {"MISSING_MID"})
        self.assertRules(raw_message(*without("Subject")), {"MISSING_SUBJECT"})
        self.assertRules(raw_message(*without("To")), {"MISSING_HEADERS"})
        self.assertRules(raw_message(*without("To"), ("Cc", "carol@example.com")), set())
        self.assertRules(raw_message(*without("From")), {"MISSING_FROM"})

    def test_ambiguous_from(self) -> None:
        self.assertRules(
            raw_message(*replaced(From="alice@example.org, eve@example.net")), {"FROM_AMBIGUOUS"}
        )
        self.assertRules(raw_message(*FULL, ("From", "eve@example.net")), {"FROM_AMBIGUOUS"})

    def test_subject_caps_and_exclamations(self) -> None:
        self.assertRules(raw_message(*replaced(Subject="FREE MONEY INSIDE")), {"SUBJ_ALL_CAPS"})
        self.assertRules(raw_message(*replaced(Subject="Buy now!!!")), {"SUBJ_EXCESS_EXCL"})
        self.assertRules(
            raw_message(*replaced(Subject="=?utf-8?q?GRATUIT_=C3=89T=C3=89!_!_!?=")),
            {"SUBJ_ALL_CAPS", "SUBJ_EXCESS_EXCL"},
        )
        for subject in ("Meeting at 10 AM", "FYI", "Q3 OKR", "Wow!!"):
            self.assertRules(raw_message(*replaced(Subject=subject)), set())

    def test_fake_reply(self) -> None:
        self.assertRules(raw_message(*replaced(Subject="Re: your invoice")), {"FAKE_REPLY"})
        self.assertRules(
            raw_message(*replaced(Subject="Re: your invoice"), ("In-Reply-To", "<0@example.org>")), set()
        )
        self.assertRules(
            raw_message(*replaced(Subject="RE: lunch"), ("References", "<0@example.org>")), set()
        )

    def test_dates(self) -> None:
        self.assertRules(raw_message(*replaced(Date="yesterday")), {"INVALID_DATE"})
        self.assertRules(raw_message(*replaced(Date="Tue, 2 Jan 2024 13:00:00 +0000")), {"DATE_IN_FUTURE"})
        self.assertRules(raw_message(*replaced(Date="Wed, 27 Dec 2023 00:00:00 +0000")), {"DATE_IN_PAST"})
        self.assertRules(raw_message(*replaced(Date="Mon, 1 Jan 2024 11:00:00 +0000")), set())
        # Without a reception time, only the form of the field is judged (no wall clock).
        future = raw_message(*replaced(Date="Tue, 2 Jan 2030 13:00:00 +0000"))
        self.assertRules(future, set(), env=envelope(received_at=0.0))

    def test_envelope_sender_domain(self) -> None:
        data = raw_message(*FULL)
        self.assertRules(data, {"ENVFROM_MISMATCH"}, env=envelope("bounce@mailer.example.net"))
        self.assertRules(data, set(), env=envelope("bounce@mailer.example.net", auth_user="alice"))
        self.assertRules(data, set(), env=envelope("bounce@bulk.example.org"))
        self.assertRules(data, set(), env=envelope(""))  # the null sender of a bounce
        self.assertRules(data, set(), env=envelope("Alice@EXAMPLE.ORG"))


class BodyRuleTests(HeuristicsTestCase):
    def test_html_only(self) -> None:
        html = message(headers(("Content-Type", "text/html; charset=utf-8")), b"<p>Hello</p>" + CRLF)
        self.assertRules(html, {"MIME_HTML_ONLY"})
        alternative = message(
            headers(("Content-Type", "multipart/alternative; boundary=a")),
            multipart(b"a", [text_part("Hello"), text_part("<p>Hello</p>", "text/html")]),
        )
        self.assertRules(alternative, set())

    def test_phrases_by_count(self) -> None:
        self.assertRules(raw_message(*FULL, body=b"Please CLICK HERE."), {"SPAM_PHRASES_1"})
        self.assertRules(raw_message(*FULL, body=b"act now! click here for viagra"), {"SPAM_PHRASES_3"})
        body = b"Dear friend, act now: click here, claim your prize, lottery winner of a million dollars"
        self.assertRules(raw_message(*FULL, body=body), {"SPAM_PHRASES_5"})
        # Words, not substrings; a phrase used twice counts once.
        self.assertRules(
            raw_message(*FULL, body=b"transact nowhere; miracles; click here click here"), {"SPAM_PHRASES_1"}
        )

    def test_urls(self) -> None:
        self.assertRules(
            raw_message(*FULL, body=b"see http://192.168.10.20/login now"), {"NUMERIC_HTTP_ADDR"}
        )
        self.assertRules(raw_message(*FULL, body=b"see http://192.168.10.20.example.com/"), set())
        many = " ".join(f"https://example.com/{i}" for i in range(31)).encode()
        self.assertRules(raw_message(*FULL, body=many), {"URI_MANY"})
        self.assertRules(raw_message(*FULL, body=b" ".join([b"https://example.com/x"] * 40)), set())

    def test_executable_attachment(self) -> None:
        def mixed(*parts: bytes) -> bytes:
            return message(
                headers(("Content-Type", "multipart/mixed; boundary=m")), multipart(b"m", list(parts))
            )

        self.assertRules(
            mixed(text_part("hi"), attachment("photo.jpg", b"MZ" + bytes(64))), {"EXECUTABLE_ATTACHMENT"}
        )
        self.assertRules(
            mixed(text_part("hi"), attachment("Invoice.PDF.js", b"alert(1)")), {"EXECUTABLE_ATTACHMENT"}
        )
        self.assertRules(mixed(text_part("hi"), attachment("invoice.pdf", b"%PDF-1.4\n")), set())
