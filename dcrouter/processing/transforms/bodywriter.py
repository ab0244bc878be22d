"""Writing a rewritten MIME body: :class:`BodyWriter` keeps every line within :data:`MAX_LINE` octets and
never lets a broken line start a delimiter; the transfer encoders write decoded content through it, and
:func:`encode_replacement` encodes the short text that replaces a part.

Everything written is CRLF-terminated lines; an encoder's output ends without a line break (the one before a
delimiter belongs to the delimiter), and does not depend on how its input was cut.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import BinaryIO, Protocol

CRLF = b"\r\n"
MAX_LINE = 998  # octets, CRLF excluded (RFC 5322 §2.1.1)
#: A longer line is passed on in pieces (it can be neither a delimiter nor a header).
LINE_FRAGMENT = 64 * 1024
_QP_UNSAFE = re.compile(rb"[^\x21-\x3c\x3e-\x7e \t]")
_SEVEN_BIT_TEXT = re.compile(rb"[\x20-\x7e\t]*")


class BodyWriter:
    """Writes CRLF-terminated lines, breaking any longer than :data:`MAX_LINE`: with ``CRLF SP`` (folding in a
    header block, white space elsewhere), or a soft line break in quoted-printable text. A broken line never
    starts with ``-``, so it cannot become a delimiter."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._col = 0

    @property
    def at_line_start(self) -> bool:
        """Nothing has been written since the last line break."""
        return self._col == 0

    def write(self, data: bytes, qp: bool = False) -> None:
        if not data:
            return
        limit = MAX_LINE - 1 if qp else MAX_LINE
        lines = data.split(CRLF)
        if self._col + len(lines[0]) <= limit and max(map(len, lines)) <= limit:
            self._stream.write(data)
            self._col = self._col + len(lines[0]) if len(lines) == 1 else len(lines[-1])
            return
        for index, line in enumerate(lines):
            if index:
                self._stream.write(CRLF)
                self._col = 0
            self._segment(line, qp, limit)

    def _segment(self, data: bytes, qp: bool, limit: int) -> None:
        while self._col + len(data) > limit:
            room = max(limit - self._col, 0)
            if qp:
                escape = data.rfind(b"=", max(0, room - 2), room)
                if escape >= 0:
                    room = escape  # never split "=XX"
                self._stream.write(data[:room] + b"=" + CRLF)
                data = data[room:]
                if data.startswith(b"-"):
                    data = b"=2D" + data[1:]
                self._col = 0
            else:
                self._stream.write(data[:room] + CRLF + b" ")
                data = data[room:]
                self._col = 1
        self._stream.write(data)
        self._col += len(data)


def _qp_line(line: bytes, hard: bool) -> bytes:
    """One line of text (no line break) as quoted-printable physical lines joined by CRLF, soft-broken at 76
    characters; with ``hard`` False the last one ends in a soft break too. No output line starts with ``-``
    (it could be read as a delimiter) nor ends in white space."""
    esc = _QP_UNSAFE.sub(lambda m: b"=%02X" % m[0][0], line)
    if hard and esc[-1:] in (b" ", b"\t"):
        esc = esc[:-1] + b"=%02X" % esc[-1]
    out: list[bytes] = []
    pos, n = 0, len(esc)
    while True:
        prefix = b""
        if esc.startswith(b"-", pos):
            prefix, pos = b"=2D", pos + 1
        room = 75 - len(prefix)
        if n - pos <= room + (1 if hard else 0):
            out.append(prefix + esc[pos:] + (b"" if hard else b"="))
            return CRLF.join(out)
        cut = pos + room
        escape = esc.rfind(b"=", cut - 2, cut)
        if escape > pos:
            cut = escape
        out.append(prefix + esc[pos:cut] + b"=")
        pos = cut


class Encoder(Protocol):
    """Decoded content in (:meth:`feed` any pieces, then :meth:`finish`), encoded lines out."""

    def feed(self, data: bytes) -> None: ...

    def finish(self) -> None: ...


class QuotedPrintableEncoder:
    """Decoded text in, quoted-printable lines out (CRLF and LF in the text are line breaks). The output ends
    without a line break unless the text did: the one before a delimiter belongs to the delimiter."""

    def __init__(self, out: BodyWriter) -> None:
        self._out = out
        self._line = bytearray()

    def feed(self, data: bytes) -> None:
        buf = self._line
        buf += data
        pieces: list[bytes] = []
        start = 0
        while (nl := buf.find(b"\n", start)) >= 0:
            end = nl - 1 if nl > start and buf[nl - 1] == 0x0D else nl
            pieces.append(_qp_line(bytes(buf[start:end]), True) + CRLF)
            start = nl + 1
        if len(buf) - start > LINE_FRAGMENT:  # a very long line: soft breaks, keeping a CR that may end it
            cut = len(buf) - 1 if buf[-1] == 0x0D else len(buf)
            pieces.append(_qp_line(bytes(buf[start:cut]), False) + CRLF)
            start = cut
        del buf[:start]
        self._out.write(b"".join(pieces), qp=True)

    def finish(self) -> None:
        if self._line:
            self._out.write(_qp_line(bytes(self._line), True), qp=True)
            self._line.clear()


class Base64Encoder:
    """Bytes in, base64 lines of 76 characters out; the last line without its line break."""

    def __init__(self, out: BodyWriter) -> None:
        self._out = out
        self._buf = bytearray()
        self._owed = False

    def feed(self, data: bytes) -> None:
        self._buf += data
        whole = len(self._buf) - len(self._buf) % 57
        if whole:
            lines = base64.encodebytes(bytes(self._buf[:whole])).replace(b"\n", CRLF)
            del self._buf[:whole]
            self._out.write((CRLF if self._owed else b"") + lines[:-2])
            self._owed = True

    def finish(self) -> None:
        if self._buf:
            self._out.write(
                (CRLF if self._owed else b"") + binascii.b2a_base64(bytes(self._buf), newline=False)
            )
            self._buf.clear()


class IdentityEncoder:
    """CRLF text copied as it is (a CR at the end of a piece waits for its LF)."""

    def __init__(self, out: BodyWriter) -> None:
        self._out = out
        self._cr = False

    def feed(self, data: bytes) -> None:
        if self._cr:
            data, self._cr = b"\r" + data, False
        if data.endswith(b"\r"):
            data, self._cr = data[:-1], True
        self._out.write(data)

    def finish(self) -> None:
        self._cr = False


def encode_replacement(text: str) -> tuple[str, bytes]:
    """A replacement text as (transfer encoding, body without a final line break)."""
    lines = [line.encode("utf-8") for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    if all(
        len(line) <= 76 and _SEVEN_BIT_TEXT.fullmatch(line) and not line.startswith(b"-") for line in lines
    ):
        return "7bit", CRLF.join(lines)
    return "quoted-printable", CRLF.join(_qp_line(line, True) for line in lines)
