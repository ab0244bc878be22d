"""The ``spamassassin`` spam engine: SpamAssassin's spamd, spoken as spamc does (SPAMC/1.5).

One connection per message: ``SYMBOLS SPAMC/1.5`` with ``Content-length``, the message as received, then
spamd's reply (``SPAMD/1.1 0 EX_OK``, ``Spam: True ; 1003.3 / 5.0``, and the names of the rules that hit as
the body). The verdict uses the configured threshold, not spamd's: the same spamd may serve several
gateways with different policies. Messages over ``maxSize`` are not sent, as ``spamc -s`` does: they pass
unchecked (spam is small; the daemon's cost grows with size).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from dcrouter.interfaces import IScanner
from dcrouter.processing.message import Draft, ScannerUnavailable, ScanResult, Verdict
from dcrouter.processing.scanners.daemon import Request, StreamDaemonScanner, exchange, printable, within

DEFAULT_PORT = 783
DEFAULT_MAX_SIZE = 1024 * 1024
#: Longest ``tests=`` list put in X-Spam-Status (the field is folded only at whitespace).
MAX_TESTS = 800

_STATUS = re.compile(rb"SPAMD/(\d+)\.(\d+) +(\d+) +(.*)")
_SPAM = re.compile(rb"(True|False|Yes|No) *; *(-?\d+(?:\.\d+)?) */ *(-?\d+(?:\.\d+)?)", re.IGNORECASE)
#: A rule (symbol) name worth repeating in a header field; others are dropped.
SYMBOL_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,80}")


@dataclass(frozen=True)
class SpamdReply:
    """What spamd said: its score, its own threshold (informative only) and the rules that hit."""

    score: float
    threshold: float
    symbols: tuple[str, ...]


def parse_reply(data: bytes) -> SpamdReply:
    """Parse a complete spamd reply to SYMBOLS; anything else (an error code, a missing or malformed
    ``Spam`` header, a body shorter than its ``Content-length``) is ScannerUnavailable."""
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        head, separator, body = data.partition(b"\n\n")
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    status = _STATUS.fullmatch(lines[0])
    if status is None:
        raise ScannerUnavailable(f"spamd: not a spamd reply: {printable(lines[0].decode('latin-1'), 80)!r}")
    if status.group(3) != b"0":
        message = printable(status.group(4).decode("latin-1"), 80)
        raise ScannerUnavailable(f"spamd: error {int(status.group(3))} {message}")
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise ScannerUnavailable("spamd: malformed reply header")
        fields[name.strip().lower()] = value.strip()
    spam = _SPAM.fullmatch(fields.get(b"spam", b""))
    if not separator or spam is None:
        raise ScannerUnavailable("spamd: reply without a valid Spam header")
    length = fields.get(b"content-length")
    if length is not None:
        if not length.isdigit() or len(body) < int(length):
            raise ScannerUnavailable("spamd: reply cut short")
        body = body[: int(length)]
    names = body.decode("ascii", "replace").strip().split(",")
    symbols = tuple(name.strip() for name in names if SYMBOL_NAME.fullmatch(name.strip()))
    return SpamdReply(float(spam.group(2)), float(spam.group(3)), symbols)


def spam_status(
    spam: bool, score: float, threshold: float, symbols: tuple[str, ...]
) -> tuple[tuple[str, str], ...]:
    """SpamAssassin's own tag fields (``X-Spam-Status``, ``X-Spam-Score``) for a result; shared with the
    rspamd engine so that downstream filters need not know which engine ran."""
    tests = ""
    for symbol in symbols:
        more = symbol if not tests else f"{tests},{symbol}"
        if len(more) > MAX_TESTS:
            break
        tests = more
    status = f"{'Yes' if spam else 'No'}, score={score:.1f} required={threshold:.1f} tests={tests or 'none'}"
    return (("X-Spam-Status", status), ("X-Spam-Score", f"{score:.1f}"))


def spam_result(name: str, score: float, threshold: float, symbols: tuple[str, ...]) -> ScanResult:
    """The ScanResult of an engine's score against the configured ``threshold``."""
    spam = score >= threshold
    return ScanResult(
        scanner=name,
        verdict=Verdict.SPAM if spam else Verdict.CLEAN,
        reason=f"score {score:.1f}, required {threshold:.1f}",
        score=score,
        threshold=threshold,
        headers=spam_status(spam, score, threshold, symbols),
    )


@implementer(IScanner)
class SpamdScanner(StreamDaemonScanner):
    """An IScanner asking spamd at ``config.host``/``config.port`` (default 783) or ``config.socket``."""

    daemon = "spamd"
    default_port = DEFAULT_PORT
    default_max_size = DEFAULT_MAX_SIZE

    def scan(self, message: Draft) -> Deferred[ScanResult]:
        if message.source.size > self._max_size:
            return succeed(ScanResult(self.name, Verdict.CLEAN, reason="too large, not checked"))
        return within(self._check(message), self._config.timeout, self._reactor, self._where)

    async def _check(self, message: Draft) -> ScanResult:
        head = f"SYMBOLS SPAMC/1.5\r\nContent-length: {message.source.size}\r\n\r\n".encode("ascii")
        reply = parse_reply(await exchange(self._endpoint, Request(head, message.open_received())))
        return spam_result(self.name, reply.score, self._config.threshold, reply.symbols)
