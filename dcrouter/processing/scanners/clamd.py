"""The ``clamav`` virus engine: clamd's ``INSTREAM`` command over TCP or a Unix socket.

One connection per message: ``zINSTREAM\\0``, the message as received in chunks each behind its length (4
bytes, network order), a zero-length chunk to end it, then clamd's NUL-terminated answer: ``stream: OK``,
``stream: <signature> FOUND``, or ``... ERROR``. clamd decodes the MIME structure itself, so an attachment in
base64 is scanned as the file it carries. A message over ``maxSize`` is unscannable without being sent (a
virus scanner that cannot see everything must not say clean); so is one clamd refuses as over its own
``StreamMaxLength``.
"""

from __future__ import annotations

import struct

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from dcrouter.interfaces import IScanner
from dcrouter.processing.message import Draft, ScannerUnavailable, ScanResult, Verdict
from dcrouter.processing.scanners.daemon import Request, StreamDaemonScanner, exchange, printable, within

DEFAULT_PORT = 3310
DEFAULT_MAX_SIZE = 25 * 1024 * 1024
#: Longest signature name kept (in the reason and the tag field).
MAX_SIGNATURE = 80

COMMAND = b"zINSTREAM\0"
END_OF_STREAM = struct.pack(">I", 0)
SIZE_LIMIT_EXCEEDED = "INSTREAM size limit exceeded"


def frame(chunk: bytes) -> bytes:
    """One INSTREAM chunk: its length, then the bytes."""
    return struct.pack(">I", len(chunk)) + chunk


def reply_complete(data: bytes) -> bool:
    """A ``z`` command's reply ends at its NUL."""
    return b"\0" in data


def parse_reply(name: str, data: bytes) -> ScanResult:
    """The ScanResult of clamd's reply to INSTREAM. An error other than clamd's stream size limit, or
    anything that is not a clamd reply, is ScannerUnavailable."""
    line = data.split(b"\0", 1)[0].decode("latin-1").strip()
    if line.endswith("ERROR"):
        if SIZE_LIMIT_EXCEEDED in line:
            return ScanResult(name, Verdict.UNSCANNABLE, reason="over clamd's StreamMaxLength")
        raise ScannerUnavailable(f"clamd: {printable(line, 120)}")
    label, colon, result = line.partition(": ")
    if not colon or label != "stream":
        raise ScannerUnavailable(f"clamd: not a clamd reply: {printable(line, 80)!r}")
    if result == "OK":
        return ScanResult(name, Verdict.CLEAN, headers=(("X-Virus-Status", "Clean"),))
    signature, space, found = result.rpartition(" ")
    signature = printable(signature, MAX_SIGNATURE)
    if not space or found != "FOUND" or not signature:
        raise ScannerUnavailable(f"clamd: not a clamd reply: {printable(line, 80)!r}")
    return ScanResult(
        name, Verdict.VIRUS, reason=signature, headers=(("X-Virus-Status", f"Infected: {signature}"),)
    )


@implementer(IScanner)
class ClamdScanner(StreamDaemonScanner):
    """An IScanner asking clamd at ``config.host``/``config.port`` (default 3310) or ``config.socket``."""

    daemon = "clamd"
    default_port = DEFAULT_PORT
    default_max_size = DEFAULT_MAX_SIZE

    def scan(self, message: Draft) -> Deferred[ScanResult]:
        if message.source.size > self._max_size:
            reason = f"too large to scan (over {self._max_size} bytes)"
            return succeed(ScanResult(self.name, Verdict.UNSCANNABLE, reason=reason))
        return within(self._check(message), self._config.timeout, self._reactor, self._where)

    async def _check(self, message: Draft) -> ScanResult:
        request = Request(
            COMMAND, message.open_received(), frame=frame, tail=END_OF_STREAM, complete=reply_complete
        )
        return parse_reply(self.name, await exchange(self._endpoint, request))
