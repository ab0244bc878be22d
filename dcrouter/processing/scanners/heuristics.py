"""Built-in spam heuristics: scored rules over the walker's metadata, no daemon needed.

Each rule that matches adds its score, as SpamAssassin does; a message whose total reaches the configured
``threshold`` is spam. The rules look only at what :class:`~dcrouter.processing.mime.MessageInfo` already
holds (the top-level fields, the decoded text of the text parts, the parts' names and sniffed types) and the
envelope, so a scan costs a few regular expression passes over at most :data:`MAX_TEXT` characters. It runs
synchronously, or in ``Draft.run_in_thread`` when the text is longer than :data:`THREAD_TEXT`. GTUBE scores
1000, like SpamAssassin, so a test message is spam at any sane threshold.

The result carries SpamAssassin's fields, for clean messages too: ``X-Spam-Status: Yes, score=7.2
required=5.0 tests=GTUBE,MISSING_DATE`` and ``X-Spam-Score: 7.2``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from twisted.internet.defer import Deferred
from zope.interface import implementer

from dcrouter.config.processing import ScannerConfig
from dcrouter.interfaces import IScanner
from dcrouter.processing.filetype import EXECUTABLE_TYPES
from dcrouter.processing.message import Draft, ScanResult, Verdict
from dcrouter.processing.mime import MessageInfo
from dcrouter.processing.scanners.attachment import name_forms

#: Characters of decoded text the rules read (the walker keeps up to ``maxTextBytes``).
MAX_TEXT = 1024 * 1024
#: Above this many characters of text the rules run in a thread (a megabyte takes tens of milliseconds).
THREAD_TEXT = 128 * 1024
MAX_REASON = 100
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

#: Phrases common in spam and rare elsewhere; scored by how many distinct ones a message uses.
SPAM_PHRASES = (
    "act now",
    "limited time offer",
    "100% free",
    "risk-free",
    "risk free",
    "click here",
    "viagra",
    "cialis",
    "you have been selected",
    "you are a winner",
    "claim your prize",
    "congratulations you won",
    "lottery",
    "million dollars",
    "inheritance",
    "wire transfer",
    "double your money",
    "no credit check",
    "work from home",
    "earn money fast",
    "lowest price",
    "miracle",
    "100% guaranteed",
    "dear friend",
    "verify your account",
    "your account has been suspended",
    "urgent response",
    "cheap meds",
    "online pharmacy",
    "weight loss",
)
# Matched against the lower-cased text. A case-insensitive alternation of every phrase, tried at each
# position, was the most expensive step of the whole processing chain (py-spy, bench/processing): a substring
# test in C first, the word-boundary check only for phrases that occur.
_PHRASES = {p: re.compile(r"(?<!\w)" + re.escape(p) + r"(?!\w)") for p in SPAM_PHRASES}
_NUMERIC_URL = re.compile(r"\bhttps?://(?:\d{1,3}\.){3}\d{1,3}(?![\w.])")
_URL = re.compile(r"\bhttps?://[^\s<>\"')]+")
_MANY_URLS = 30
_EXECUTABLE_EXTENSIONS = (
    ".exe", ".scr", ".com", ".pif", ".bat", ".cmd", ".vbs", ".vbe", ".js", ".jse", ".wsf", ".wsh", ".hta",
    ".lnk", ".msi", ".jar", ".ps1", ".cpl", ".reg", ".iso", ".img",
)  # fmt: skip
#: Seconds a Date may be ahead of / behind the time the message was received.
_FUTURE = 12 * 3600
_PAST = 96 * 3600


@dataclass(frozen=True)
class Rule:
    name: str
    score: float
    description: str


@dataclass(frozen=True)
class _Context:
    info: MessageInfo
    text: str
    lowered: str  # ``text`` lower-cased, for the case-insensitive rules
    mail_from: str
    authenticated: bool
    received_at: float
    phrases: int  # distinct spam phrases in ``text``


def _missing_date(c: _Context) -> bool:
    return c.info.date is None


def _missing_mid(c: _Context) -> bool:
    return c.info.message_id is None


def _missing_from(c: _Context) -> bool:
    return not c.info.get_all("from")


def _from_ambiguous(c: _Context) -> bool:
    return bool(c.info.get_all("from")) and c.info.from_ambiguous


def _missing_subject(c: _Context) -> bool:
    return c.info.subject is None


def _missing_to(c: _Context) -> bool:
    return not c.info.get_all("to") and not c.info.get_all("cc")


def _subject_all_caps(c: _Context) -> bool:
    cased = [ch for ch in c.info.subject or "" if ch.isupper() or ch.islower()]
    return len(cased) >= 8 and all(ch.isupper() for ch in cased)


def _subject_exclamations(c: _Context) -> bool:
    return (c.info.subject or "").count("!") >= 3


def _fake_reply(c: _Context) -> bool:
    subject = (c.info.subject or "").lstrip().lower()
    return (
        subject.startswith("re:") and not c.info.get_all("in-reply-to") and not c.info.get_all("references")
    )


def _html_only(c: _Context) -> bool:
    bodies = [p.declared_type for p in c.info.parts if not p.is_attachment]
    return "text/html" in bodies and "text/plain" not in bodies


def _date_offset(c: _Context) -> float | None:
    """Seconds the Date field is ahead of the reception time; None when either is unknown."""
    if c.info.date is None or c.received_at <= 0:
        return None
    try:
        stamp = parsedate_to_datetime(c.info.date)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if stamp.tzinfo is None:
        return None
    return stamp.timestamp() - c.received_at


def _invalid_date(c: _Context) -> bool:
    if c.info.date is None:
        return False
    try:
        stamp = parsedate_to_datetime(c.info.date)
    except (TypeError, ValueError, IndexError, OverflowError):
        return True
    return stamp.tzinfo is None


def _date_in_future(c: _Context) -> bool:
    offset = _date_offset(c)
    return offset is not None and offset > _FUTURE


def _date_in_past(c: _Context) -> bool:
    offset = _date_offset(c)
    return offset is not None and offset < -_PAST


def _numeric_url(c: _Context) -> bool:
    return "http" in c.lowered and _NUMERIC_URL.search(c.lowered) is not None


def _many_urls(c: _Context) -> bool:
    if c.lowered.count("http") <= _MANY_URLS:
        return False
    seen: set[str] = set()
    for match in _URL.finditer(c.lowered):
        seen.add(match.group(0))
        if len(seen) > _MANY_URLS:
            return True
    return False


def _domain(address: str) -> str:
    return address.rpartition("@")[2].strip().rstrip(".").lower()


def _envelope_mismatch(c: _Context) -> bool:
    if c.authenticated or not c.mail_from or c.info.from_ambiguous or len(c.info.from_addresses) != 1:
        return False
    header, envelope = _domain(c.info.from_addresses[0]), _domain(c.mail_from)
    if not header or not envelope:
        return False
    return not (header == envelope or header.endswith("." + envelope) or envelope.endswith("." + header))


def _executable(c: _Context) -> bool:
    for part in c.info.attachments:
        if part.sniffed_type in EXECUTABLE_TYPES:
            return True
        for name in part.names:
            if any(form.endswith(_EXECUTABLE_EXTENSIONS) for form in name_forms(name)):
                return True
    return False


#: (rule, test) in the order they are evaluated; scores have one decimal, so sums are exact at one decimal.
RULES: tuple[tuple[Rule, Callable[[_Context], bool]], ...] = (
    (Rule("GTUBE", 1000.0, "Generic Test for Unsolicited Bulk Email"), lambda c: GTUBE in c.text),
    (Rule("MISSING_DATE", 1.4, "No Date field"), _missing_date),
    (Rule("MISSING_MID", 0.5, "No Message-ID field"), _missing_mid),
    (Rule("MISSING_FROM", 1.0, "No From field"), _missing_from),
    (Rule("FROM_AMBIGUOUS", 1.5, "From is not exactly one strictly parsable mailbox"), _from_ambiguous),
    (Rule("MISSING_SUBJECT", 0.5, "No Subject field"), _missing_subject),
    (Rule("MISSING_HEADERS", 1.0, "No To or Cc field"), _missing_to),
    (Rule("SUBJ_ALL_CAPS", 1.5, "Subject is all capitals"), _subject_all_caps),
    (Rule("SUBJ_EXCESS_EXCL", 1.0, "Subject has three or more exclamation marks"), _subject_exclamations),
    (Rule("FAKE_REPLY", 0.8, "Subject says Re: with no In-Reply-To or References"), _fake_reply),
    (Rule("MIME_HTML_ONLY", 0.7, "HTML body with no plain text alternative"), _html_only),
    (Rule("INVALID_DATE", 1.0, "Date field not in RFC 5322 form"), _invalid_date),
    (Rule("DATE_IN_FUTURE", 1.5, "Date more than 12 hours after reception"), _date_in_future),
    (Rule("DATE_IN_PAST", 1.0, "Date more than 96 hours before reception"), _date_in_past),
    (Rule("SPAM_PHRASES_1", 1.0, "One or two spam phrases"), lambda c: 1 <= c.phrases <= 2),
    (Rule("SPAM_PHRASES_3", 2.0, "Three or four spam phrases"), lambda c: 3 <= c.phrases <= 4),
    (Rule("SPAM_PHRASES_5", 3.5, "Five or more spam phrases"), lambda c: c.phrases >= 5),
    (Rule("NUMERIC_HTTP_ADDR", 1.5, "A URL with a numeric IP address"), _numeric_url),
    (Rule("URI_MANY", 0.5, f"More than {_MANY_URLS} distinct URLs"), _many_urls),
    (Rule("ENVFROM_MISMATCH", 0.5, "Unauthenticated, envelope and From domains differ"), _envelope_mismatch),
    (Rule("EXECUTABLE_ATTACHMENT", 2.5, "An executable attachment"), _executable),
)


def evaluate(draft: Draft, info: MessageInfo) -> list[Rule]:
    """The rules ``draft`` matches, in :data:`RULES` order."""
    text = info.text[:MAX_TEXT]
    lowered = text.lower()
    context = _Context(
        info=info,
        text=text,
        lowered=lowered,
        mail_from=draft.envelope.mail_from,
        authenticated=draft.envelope.auth_user is not None,
        received_at=draft.envelope.received_at,
        phrases=sum(1 for p, pattern in _PHRASES.items() if p in lowered and pattern.search(lowered)),
    )
    return [rule for rule, test in RULES if test(context)]


@implementer(IScanner)
class HeuristicSpamScanner:
    """The ``spam`` scanner with ``engine = "builtin"``: :data:`RULES` scored against ``threshold``."""

    def __init__(self, config: ScannerConfig) -> None:
        self.config = config
        self.name = config.label
        self.threshold = float(config.threshold)

    def scan(self, message: Draft) -> ScanResult | Deferred[ScanResult]:
        """The result at once for a short text, else a Deferred firing with it."""
        info = message.info
        if info is None:
            return ScanResult(scanner=self.name, verdict=Verdict.UNSCANNABLE, reason="message not inspected")
        if len(info.text) > THREAD_TEXT:
            scored: Deferred[ScanResult] = message.run_in_thread(lambda: self._score(message, info))
            return scored
        return self._score(message, info)

    def _score(self, message: Draft, info: MessageInfo) -> ScanResult:
        hits = evaluate(message, info)
        score = round(sum(rule.score for rule in hits), 1)
        spam = score >= self.threshold
        names = sorted(rule.name for rule in hits)
        status = (
            f"{'Yes' if spam else 'No'}, score={score:.1f} required={self.threshold:.1f} "
            f"tests={','.join(names) or 'none'}"
        )
        return ScanResult(
            scanner=self.name,
            verdict=Verdict.SPAM if spam else Verdict.CLEAN,
            reason=_reason(score, hits),
            score=score,
            threshold=self.threshold,
            headers=(("X-Spam-Status", status), ("X-Spam-Score", f"{score:.1f}")),
        )


def _reason(score: float, hits: list[Rule]) -> str:
    """``score 7.2 (GTUBE, MISSING_DATE)``: the heaviest rules first, as many as fit in :data:`MAX_REASON`."""
    reason = f"score {score:.1f}"
    names: list[str] = []
    for rule in sorted(hits, key=lambda r: (-r.score, r.name)):
        candidate = f"{reason} ({', '.join([*names, rule.name])}, ...)"
        if len(candidate) > MAX_REASON:
            return f"{reason} ({', '.join(names)}, ...)" if names else reason
        names.append(rule.name)
    return f"{reason} ({', '.join(names)})" if names else reason
