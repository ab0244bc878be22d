"""A streaming MIME rewriter: replaces leaf parts (attachments) and appends footers to the text bodies,
copying everything else through, with bounded memory whatever the size of the message.

:func:`rewrite_mime` reads the structure exactly as :mod:`dcrouter.processing.mime` does (same delimiter
rules, same header-block rules, same part numbers), so a part found there by its ``path`` is the part seen
here. What a caller may rely on:

- Parts that are neither replaced nor given a footer are copied byte for byte (line endings made CRLF; a bare
  CR dropped; a line over 998 octets broken, never into something that could be read as a delimiter).
- A replaced part becomes a short ``text/plain; charset=utf-8`` part (7bit, or quoted-printable when the text
  needs it); the top-level header fields change through the ``headers`` object when the message itself is the
  part. Encapsulated messages (``message/rfc822``) are entered for replacements, never for footers.
- A footer goes into the first ``text/plain`` and the first ``text/html`` body part that are not attachments,
  in the part's own charset and transfer encoding when these can carry it; otherwise the part is re-encoded
  (quoted-printable) or transcoded to UTF-8. Transcoding holds the part in a spooled temporary file, so it is
  done only up to :attr:`RewriteLimits.max_recode_bytes`; a larger part keeps no footer.
- Any structure that different readers could see differently (an unclosed multipart, conflicting fields, a
  limit crossed) leaves the message unchanged: :func:`rewrite_mime` returns False and the caller keeps the
  original body.
- Output: CRLF line endings only, no line over 998 octets; the result does not depend on how the input is
  chunked.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO, Protocol

from dcrouter.processing.headers import HeaderBlock, encode_field
from dcrouter.processing.mime import (
    _FIELD,
    _IDENTITY,
    _MAX_BOUNDARY,
    _MAX_DELIMITER_LINE,
    CHUNK_SIZE,
    MimeLimits,
    _Base64Decoder,
    _clean,
    _exact_text,
    _QuotedPrintableDecoder,
    decode_encoded_words,
    parse_structured,
)
from dcrouter.processing.sniff import SNIFF_BYTES, sniff_type

CRLF = b"\r\n"
MAX_LINE = 998  # octets, CRLF excluded (RFC 5322 §2.1.1)
_FRAGMENT = 64 * 1024  # a longer line is passed on in pieces (it can be neither a delimiter nor a header)
_HOLD = 64 * 1024  # raw bytes of a part held while its first bytes are sniffed
_TAIL = 16 * 1024  # decoded bytes held at the end of a footer part: where "</body>" is looked for
_SPOOL_MEMORY = 1024 * 1024  # a part being transcoded goes to disk beyond this
_TYPE = re.compile(r"[!#-'*+.0-9A-Z^-~-]+/[!#-'*+.0-9A-Z^-~-]+")
_BODY_END = re.compile(rb"</body\s*>", re.IGNORECASE)
_QP_UNSAFE = re.compile(rb"[^\x21-\x3c\x3e-\x7e \t]")
_SEVEN_BIT_TEXT = re.compile(rb"[\x20-\x7e\t]*")
_CONTENT_FIELDS = (b"content-type", b"content-transfer-encoding", b"content-disposition")
#: Content-Type parameters of a text body kept when its charset is changed (names make a part an attachment).
_KEPT_PARAMS = ("format", "delsp", "reply-type")
_HEADERS, _LEAF, _IGNORE = "headers", "leaf", "ignore"


@dataclass(frozen=True)
class RewriteLimits:
    """Like :class:`~dcrouter.processing.mime.MimeLimits` (beyond these the message is left unchanged), plus
    the largest part transcoded to UTF-8 for a footer."""

    max_header_bytes: int = MimeLimits.max_header_bytes
    max_depth: int = MimeLimits.max_depth
    max_parts: int = MimeLimits.max_parts
    max_recode_bytes: int = 10 * 1024 * 1024

    @classmethod
    def from_mime(cls, limits: MimeLimits, max_recode_bytes: int = 10 * 1024 * 1024) -> RewriteLimits:
        return cls(limits.max_header_bytes, limits.max_depth, limits.max_parts, max_recode_bytes)


DEFAULT_LIMITS = RewriteLimits()


@dataclass(frozen=True)
class PartView:
    """A leaf part as :func:`rewrite_mime` shows it to ``replace``: the same ``path`` and reading of its
    fields as :class:`dcrouter.processing.mime.Part`."""

    path: str
    declared_type: str
    disposition: str | None
    names: tuple[str, ...]
    transfer_encoding: str
    sniffed_type: str | None  # from the first decoded bytes, as the MIME walker sniffs them
    in_message: bool  # inside an encapsulated message

    @property
    def filename(self) -> str | None:
        return self.names[0] if self.names else None

    @property
    def is_attachment(self) -> bool:
        """The rule of :attr:`dcrouter.processing.mime.Part.is_attachment`."""
        if self.disposition == "attachment" or self.names:
            return True
        if self.declared_type not in ("text/plain", "text/html"):
            return True
        return self.sniffed_type not in (None, "text/html", "application/xml")


Replace = Callable[[PartView], "str | None"]


def rewrite_mime(
    headers: HeaderBlock,
    body_in: BinaryIO,
    body_out: BinaryIO,
    *,
    replace: Replace | None = None,
    footer_text: str | None = None,
    footer_html: str | None = None,
    limits: RewriteLimits = DEFAULT_LIMITS,
    chunk_size: int = CHUNK_SIZE,
) -> bool:
    """Copy the body ``body_in`` (after the top-level ``headers``) to ``body_out``, replacing each leaf part
    for which ``replace`` gives a text and adding the footers. True when anything changed; the changes to
    ``headers`` are made only then. False leaves ``headers`` as they were and ``body_out`` to be thrown away
    (the message's structure is broken, a limit was crossed, or there was nothing to do)."""
    footers = {}
    if footer_text is not None:
        footers["text/plain"] = footer_text
    if footer_html is not None:
        footers["text/html"] = footer_html
    rewriter = _Rewriter(headers, _Output(body_out), replace, footers, limits)
    try:
        rewriter.run(body_in, chunk_size)
    except _Unchanged:
        return False
    if not rewriter.changed:
        return False
    for change in rewriter.top_changes:
        change(headers)
    return True


class _Unchanged(Exception):
    """The message is left as it is."""


# -- output --


class _Output:
    """Writes CRLF-terminated lines, breaking any longer than :data:`MAX_LINE`: with ``CRLF SP`` (folding in a
    header block, white space elsewhere), or a soft line break in quoted-printable text. A broken line never
    starts with ``-``, so it cannot become a delimiter."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._col = 0

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


class _Encoder(Protocol):
    def feed(self, data: bytes) -> None: ...

    def finish(self) -> None: ...


class _QuotedPrintableEncoder:
    """Decoded text in, quoted-printable lines out (CRLF and LF in the text are line breaks). The output ends
    without a line break unless the text did: the one before a delimiter belongs to the delimiter."""

    def __init__(self, out: _Output) -> None:
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
        if len(buf) - start > _FRAGMENT:  # a very long line: soft breaks, keeping a CR that may end it
            cut = len(buf) - 1 if buf[-1] == 0x0D else len(buf)
            pieces.append(_qp_line(bytes(buf[start:cut]), False) + CRLF)
            start = cut
        del buf[:start]
        self._out.write(b"".join(pieces), qp=True)

    def finish(self) -> None:
        if self._line:
            self._out.write(_qp_line(bytes(self._line), True), qp=True)
            self._line.clear()


class _Base64Encoder:
    """Bytes in, base64 lines of 76 characters out; the last line without its line break."""

    def __init__(self, out: _Output) -> None:
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


class _IdentityEncoder:
    """CRLF text copied as it is (a CR at the end of a piece waits for its LF)."""

    def __init__(self, out: _Output) -> None:
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


def _encode_text(text: str) -> tuple[str, bytes]:
    """A replacement text as (transfer encoding, body without a final line break)."""
    lines = [line.encode("utf-8") for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    if all(
        len(line) <= 76 and _SEVEN_BIT_TEXT.fullmatch(line) and not line.startswith(b"-") for line in lines
    ):
        return "7bit", CRLF.join(lines)
    return "quoted-printable", CRLF.join(_qp_line(line, True) for line in lines)


# -- input --


def _lines(stream: BinaryIO, chunk_size: int) -> Iterator[tuple[bytes, bool, bool]]:
    """(line without its LF, CR kept; ended by an LF; continued in the next item). A line longer than
    :data:`_FRAGMENT` comes in pieces, never cut between a CR and its LF."""
    buf = bytearray()
    pos = 0
    eof = False
    while True:
        nl = buf.find(b"\n", pos)
        if nl >= 0:
            yield bytes(buf[pos:nl]), True, False
            pos = nl + 1
        elif len(buf) - pos > _FRAGMENT:
            cut = pos + _FRAGMENT
            if buf[cut - 1] == 0x0D:
                cut -= 1
            yield bytes(buf[pos:cut]), False, True
            pos = cut
        elif eof:
            if pos < len(buf):
                yield bytes(buf[pos:]), False, False
            return
        else:
            del buf[:pos]
            pos = 0
            chunk = stream.read(chunk_size)
            if chunk:
                buf += chunk
            else:
                eof = True


# -- structure --


class _Entity:
    """A header block: the message's own, a body part's or an encapsulated message's."""

    def __init__(
        self, depth: int, path: str, leaf_path: str, default_type: str, in_message: bool, top: bool = False
    ) -> None:
        self.depth = depth
        self.path = path
        self.leaf_path = leaf_path
        self.default_type = default_type
        self.in_message = in_message
        self.top = top
        self.header_bytes = 0
        #: (lower-case name or None for a stray line, the field as written out: CRLF lines)
        self.fields: list[tuple[bytes | None, bytearray]] = []
        self._values: list[tuple[bytes, list[bytes]]] = []  # exact value bytes as the MIME walker reads them
        self.end = b""  # the empty line, as written out
        self.owes_eol = False  # the last line break belongs to a delimiter that ends the block

    def start_field(self, name: bytes, rest: bytes, raw: bytes) -> None:
        self.fields.append((name, bytearray(raw)))
        self._values.append((name, [rest]))

    def continue_field(self, line: bytes, raw: bytes) -> None:
        if self.fields and self.fields[-1][0] is not None:
            self.fields[-1][1].extend(raw)
            self._values[-1][1].append(line)
        else:
            self.fields.append((None, bytearray(raw)))

    def values(self, name: bytes) -> list[bytes]:
        return [b"".join(parts).strip(b" \t") for field, parts in self._values if field == name]

    def header_bytes_out(self, dropped: tuple[bytes, ...] = ()) -> bytes:
        data = b"".join(bytes(raw) for name, raw in self.fields if name not in dropped) + self.end
        return data[:-2] if self.owes_eol and not dropped and data.endswith(CRLF) else data

    def content(self) -> tuple[str, dict[str, list[str]], str, str | None, tuple[str, ...]]:
        """(type, parameters, transfer encoding, disposition, names) read as the MIME walker reads them."""
        types = [_exact_text(v) for v in self.values(b"content-type")]
        encodings = [
            v.decode("utf-8", "replace").replace("\x00", "\ufffd").strip().lower()
            for v in self.values(b"content-transfer-encoding")
        ]
        dispositions = [_exact_text(v) for v in self.values(b"content-disposition")]
        if len(set(types)) > 1 or len(set(encodings)) > 1:
            raise _Unchanged("conflicting fields")
        kind, params = self.default_type, dict[str, list[str]]()
        if types:
            kind, params, _ = parse_structured(types[0])
            if not _TYPE.fullmatch(kind):
                kind, params = "text/plain", {}
        cte = encodings[0] if encodings else "7bit"
        disposition = None
        names: list[str] = []
        if dispositions:
            disposition, disposition_params, _ = parse_structured(dispositions[0])
            names += disposition_params.get("filename", [])
        names += params.get("name", [])
        decoded = tuple(dict.fromkeys(_clean(decode_encoded_words(name)) for name in names if name))
        return kind, params, cte, disposition or None, decoded


class _Frame:
    def __init__(self, boundary: bytes, depth: int, path: str, digest: bool, in_message: bool) -> None:
        self.delimiter = b"--" + boundary
        self.depth = depth
        self.path = path
        self.digest = digest
        self.in_message = in_message
        self.children = 0


class _Sink(Protocol):
    def feed(self, data: bytes) -> None: ...

    def finish(self) -> None: ...


class _Discard:
    def feed(self, data: bytes) -> None:
        pass

    def finish(self) -> None:
        pass


class _Passthrough:
    def __init__(self, out: _Output, qp: bool) -> None:
        self._out = out
        self._qp = qp

    def feed(self, data: bytes) -> None:
        self._out.write(data, self._qp)

    def finish(self) -> None:
        pass


class _Leaf:
    """A leaf part's body: held until its first bytes are sniffed, then handed to the sink chosen for it."""

    def __init__(self, rewriter: _Rewriter, entity: _Entity, view: PartView, params: dict[str, list[str]]):
        self._rewriter = rewriter
        self._entity = entity
        self._view = view
        self._params = params
        self._held = bytearray()
        self._head = bytearray()
        self._decoder: _Base64Decoder | _QuotedPrintableDecoder | None = None
        if view.transfer_encoding == "base64":
            self._decoder = _Base64Decoder()
        elif view.transfer_encoding == "quoted-printable":
            self._decoder = _QuotedPrintableDecoder()
        self._sink: _Sink | None = None

    def feed(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink.feed(data)
            return
        self._held += data
        self._sniff(self._decoder.feed(data) if self._decoder is not None else data)
        if len(self._head) >= SNIFF_BYTES or len(self._held) >= _HOLD:
            self._decide()

    def finish(self) -> None:
        if self._sink is None:
            if self._decoder is not None:
                self._sniff(self._decoder.flush())
            self._decide()
        assert self._sink is not None
        self._sink.finish()

    def _sniff(self, decoded: bytes) -> None:
        if len(self._head) < SNIFF_BYTES:
            self._head += decoded[: SNIFF_BYTES - len(self._head)]

    def _decide(self) -> None:
        view = replace(self._view, sniffed_type=sniff_type(bytes(self._head)))
        self._sink = self._rewriter.sink_for(self._entity, view, self._params)
        held, self._held = bytes(self._held), bytearray()
        if held:
            self._sink.feed(held)


class _Rewriter:
    """The line machine: the rules of :class:`dcrouter.processing.mime._Walker`, on lines."""

    def __init__(
        self,
        headers: HeaderBlock,
        out: _Output,
        replace: Replace | None,
        footers: dict[str, str],
        limits: RewriteLimits,
    ) -> None:
        self.headers = headers
        self.out = out
        self.replace = replace
        self.footers = footers
        self.limits = limits
        self.changed = False
        self.top_changes: list[Callable[[HeaderBlock], None]] = []
        self.frames: list[_Frame] = []
        self._footered: set[str] = set()
        self._entity: _Entity | None = None
        self._leaf: _Leaf | None = None
        self._mode = _IGNORE
        self._pending_eol = False  # a line break read but not yet passed on: it may belong to a delimiter
        self._header_line = bytearray()
        self._entities = 0

    def run(self, stream: BinaryIO, chunk_size: int) -> None:
        top = _Entity(0, "", "1", "text/plain", in_message=False, top=True)
        for field in self.headers:
            name, _, rest = field.raw.partition(b":")
            top.start_field(name.strip(b" \t").lower(), rest.replace(CRLF, b""), b"")
        self._entity = top
        self._end_headers()
        continued = False
        for line, newline, partial in _lines(stream, chunk_size):
            self._line(line, newline, partial, continued)
            continued = partial
        self._finish()

    # -- lines --

    def _line(self, line: bytes, newline: bool, partial: bool, continued: bool) -> None:
        if self._mode == _HEADERS:
            self._header_line += line
            self._header_piece(len(line) + newline, newline, partial)
            return
        if not (continued or partial) and line.startswith(b"--") and len(line) <= _MAX_DELIMITER_LINE:
            content = line[:-1] if line.endswith(b"\r") else line
            hit = self._match(content)
            if hit is not None:
                self._delimiter(content, newline, hit)
                return
        self._body(line, newline)

    def _body(self, line: bytes, newline: bool) -> None:
        data = line.replace(b"\r", b"")
        if self._pending_eol:
            data = CRLF + data
        self._pending_eol = newline
        if self._mode == _LEAF:
            assert self._leaf is not None
            self._leaf.feed(data)
        else:
            self.out.write(data)

    def _header_piece(self, size: int, newline: bool, partial: bool) -> None:
        entity = self._entity
        assert entity is not None
        entity.header_bytes += size
        if entity.header_bytes > self.limits.max_header_bytes:
            raise _Unchanged("header block too large")
        if partial:
            return
        line = bytes(self._header_line)
        self._header_line.clear()
        content = line[:-1] if line.endswith(b"\r") else line
        if content.startswith(b"--") and (hit := self._match(content)) is not None:
            if entity.fields and entity.fields[-1][1].endswith(CRLF):
                entity.owes_eol = self._pending_eol = True
            self._delimiter(content, newline, hit)
            return
        if self._pending_eol:
            self.out.write(CRLF)
            self._pending_eol = False
        raw = content.replace(b"\r", b"") + (CRLF if newline else b"")
        if not content:
            entity.end = raw
            self._end_headers()
        elif content[0] in b" \t":
            entity.continue_field(content, raw)
        elif (field := _FIELD.match(content)) is not None:
            entity.start_field(field.group(1).lower(), content[field.end() :], raw)
        else:
            # Not a header field: the block ended without its empty line and this line is the body's first.
            self._end_headers()
            self._line(line, newline, False, False)

    def _match(self, line: bytes) -> tuple[int, bool] | None:
        for index in range(len(self.frames) - 1, -1, -1):
            delimiter = self.frames[index].delimiter
            if line.startswith(delimiter):
                rest = line[len(delimiter) :]
                if not rest.strip(b" \t"):
                    return index, False
                if rest.startswith(b"--") and not rest[2:].strip(b" \t"):
                    return index, True
        return None

    def _delimiter(self, line: bytes, newline: bool, hit: tuple[int, bool]) -> None:
        index, close = hit
        self._finish_current()
        if index < len(self.frames) - 1:
            raise _Unchanged("multipart not closed before its enclosing multipart's boundary")
        if self._pending_eol:
            self.out.write(CRLF)
        self.out.write(line.replace(b"\r", b""))
        self._pending_eol = newline
        frame = self.frames[index]
        if close:
            self.frames.pop()
            return
        frame.children += 1
        path = f"{frame.path}.{frame.children}" if frame.path else str(frame.children)
        default = "message/rfc822" if frame.digest else "text/plain"
        self._begin_entity(frame.depth + 1, path, path, default, frame.in_message)

    def _finish(self) -> None:
        if self._pending_eol:
            self._pending_eol = False
            if self._mode == _LEAF:
                assert self._leaf is not None
                self._leaf.feed(CRLF)
            else:
                self.out.write(CRLF)
        self._finish_current()
        if self.frames:
            raise _Unchanged("multipart not closed")

    # -- entities --

    def _begin_entity(self, depth: int, path: str, leaf_path: str, default: str, in_message: bool) -> None:
        self._entities += 1
        if self._entities > self.limits.max_parts or depth > self.limits.max_depth:
            raise _Unchanged("too many parts or too deep")
        self._entity = _Entity(depth, path, leaf_path, default, in_message)
        self._mode = _HEADERS

    def _finish_current(self) -> None:
        while self._mode == _HEADERS:
            self._end_headers()
        if self._mode == _LEAF and self._leaf is not None:
            leaf, self._leaf = self._leaf, None
            leaf.finish()
        self._mode = _IGNORE

    def _end_headers(self) -> None:
        entity, self._entity = self._entity, None
        assert entity is not None
        kind, params, cte, disposition, names = entity.content()
        self._mode = _IGNORE
        if kind.startswith("multipart/"):
            boundaries = params.get("boundary", [])
            boundary = boundaries[0].encode("utf-8", "surrogateescape") if boundaries else b""
            if len(set(boundaries)) > 1 or not boundary or len(boundary) > _MAX_BOUNDARY:
                raise _Unchanged("multipart without a usable boundary")
            self._write_header(entity)
            self.frames.append(
                _Frame(boundary, entity.depth, entity.path, kind == "multipart/digest", entity.in_message)
            )
            return
        if kind in ("message/rfc822", "message/global") and cte in _IDENTITY:
            self._write_header(entity)
            inner = f"{entity.path}.1" if entity.path else "1"
            self._begin_entity(entity.depth + 1, entity.path, inner, "text/plain", True)
            return
        if kind == "message/partial":
            raise _Unchanged("message/partial")
        view = PartView(entity.leaf_path, kind, disposition, names, cte, None, entity.in_message)
        self._leaf = _Leaf(self, entity, view, params)
        self._mode = _LEAF

    def _write_header(self, entity: _Entity) -> None:
        if not entity.top:
            self.out.write(entity.header_bytes_out())

    def sink_for(self, entity: _Entity, view: PartView, params: dict[str, list[str]]) -> _Sink:
        """What becomes of a leaf part's body (its header block is written here or by the sink)."""
        text = self.replace(view) if self.replace is not None else None
        if text is not None:
            self._write_replacement(entity, text)
            return _Discard()
        kind = view.declared_type
        footer = self.footers.get(kind)
        if (
            footer is not None
            and kind not in self._footered
            and not view.in_message
            and not view.is_attachment
        ):
            self._footered.add(kind)
            sink = _footer_sink(self, entity, view, params, footer)
            if sink is not None:
                return sink
        self._write_header(entity)
        return _Passthrough(self.out, qp=view.transfer_encoding == "quoted-printable")

    def _write_replacement(self, entity: _Entity, text: str) -> None:
        self.changed = True
        cte, body = _encode_text(text)
        kind = "text/plain; charset=utf-8"
        if entity.top:

            def change(headers: HeaderBlock) -> None:
                headers.set("Content-Type", kind)
                headers.set("Content-Transfer-Encoding", cte)
                headers.remove("Content-Disposition")
                if headers.get("MIME-Version") is None:
                    headers.add("MIME-Version", "1.0")

            self.top_changes.append(change)
            self.out.write(body + CRLF)
            return
        # An encapsulated message keeps its own fields (From, Subject...); a body part has no others.
        kept = entity.header_bytes_out(dropped=_CONTENT_FIELDS) if entity.path != entity.leaf_path else b""
        if kept.endswith(CRLF + CRLF) or kept == CRLF:
            kept = kept[:-2]  # its empty line comes after the new fields
        elif kept and not kept.endswith(CRLF):
            kept += CRLF  # the block ended the input without a line break
        fields = encode_field("Content-Type", kind) + encode_field("Content-Transfer-Encoding", cte)
        self.out.write(kept + fields + CRLF + body)

    def collides(self, lines: list[bytes]) -> bool:
        """Could one of ``lines``, written as it is, be read as a delimiter of an open multipart?"""
        return any(line.startswith(frame.delimiter) for line in lines for frame in self.frames)


# -- footers --


def _text_codec(charset: str) -> str | None:
    """The codec name of a declared charset; None when unknown or not a text encoding."""
    try:
        info = codecs.lookup(charset.strip())
    except (LookupError, ValueError):
        return None
    if not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


def _ascii_compatible(codec: str) -> bool:
    """Line breaks, markup and ASCII letters are their ASCII bytes (not UTF-16, UTF-7, EBCDIC...)."""
    probe = "\r\n-</body>= azAZ09"
    try:
        return probe.encode(codec) == probe.encode("ascii")
    except (UnicodeError, LookupError):
        return False


def _content_type(kind: str, params: dict[str, list[str]], charset: str) -> str:
    value = f"{kind}; charset={charset}"
    for name in _KEPT_PARAMS:
        found = params.get(name)
        if found and re.fullmatch(r"[A-Za-z0-9._-]{1,40}", found[0]):
            value += f"; {name}={found[0]}"
    return value


def _footer_sink(
    rewriter: _Rewriter, entity: _Entity, view: PartView, params: dict[str, list[str]], footer: str
) -> _FooterSink | None:
    """How ``footer`` goes into this part; None when it cannot (an unknown charset or transfer encoding)."""
    cte = view.transfer_encoding
    if cte not in _IDENTITY and cte not in ("quoted-printable", "base64"):
        return None
    charsets = params.get("charset")
    charset = charsets[0] if charsets else None
    codec = _text_codec(charset or "us-ascii")
    if codec is None:
        return None
    text = footer.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
    out_charset, transcode = charset, None
    if codec == "ascii":
        if not text.isascii():
            out_charset = "utf-8"  # a superset: the content stays as it is
    elif _ascii_compatible(codec):
        try:
            text.encode(codec)
        except UnicodeError:
            out_charset, transcode = "utf-8", codec
    else:
        out_charset, transcode = "utf-8", codec
    encoded = text.encode(codec if out_charset == charset else "utf-8")
    out_cte = cte
    if cte in _IDENTITY and (
        transcode is not None
        or (cte == "7bit" and not encoded.isascii())
        or rewriter.collides(encoded.split(CRLF))
    ):
        out_cte = "quoted-printable"
    kind = view.declared_type
    new_type = _content_type(kind, params, "utf-8") if out_charset != charset else None
    new_cte = out_cte if out_cte != cte else None
    header: bytes | None = None
    top_change: Callable[[HeaderBlock], None] | None = None
    if new_type is not None or new_cte is not None:
        if entity.top:

            def top_change(headers: HeaderBlock) -> None:
                if new_type is not None:
                    headers.set("Content-Type", new_type)
                if new_cte is not None:
                    headers.set("Content-Transfer-Encoding", new_cte)
                if headers.get("MIME-Version") is None:
                    headers.add("MIME-Version", "1.0")

        else:
            header = _changed_header(entity, new_type, new_cte)
    return _FooterSink(
        rewriter,
        entity,
        _Recoding(cte, out_cte, transcode, encoded, kind == "text/html"),
        header,
        top_change,
    )


def _changed_header(entity: _Entity, content_type: str | None, cte: str | None) -> bytes:
    """The part's header block with new Content-Type and/or Content-Transfer-Encoding values."""
    out: list[bytes] = []
    wanted = {
        b"content-type": ("Content-Type", content_type),
        b"content-transfer-encoding": ("Content-Transfer-Encoding", cte),
    }
    done: set[bytes] = set()
    for name, raw in entity.fields:
        if name in wanted and wanted[name][1] is not None:
            if name not in done:
                title, value = wanted[name]
                assert value is not None
                out.append(encode_field(title, value))
                done.add(name)
            continue
        out.append(bytes(raw))
    for name, (title, value) in wanted.items():
        if value is not None and name not in done:
            out.append(encode_field(title, value))
    return b"".join(out) + CRLF


@dataclass(frozen=True)
class _Recoding:
    in_cte: str
    out_cte: str
    transcode: str | None  # the codec the part is decoded from, to be re-encoded as UTF-8
    footer: bytes  # in the output charset, CRLF line breaks
    html: bool


class _FooterSink:
    """A body that gets a footer: decoded, maybe transcoded, held at its end, re-encoded. A part to transcode
    is first spooled (up to :attr:`RewriteLimits.max_recode_bytes`), so that a larger one can be copied
    unchanged instead."""

    def __init__(
        self,
        rewriter: _Rewriter,
        entity: _Entity,
        recoding: _Recoding,
        header: bytes | None,
        top_change: Callable[[HeaderBlock], None] | None,
    ) -> None:
        self._rewriter = rewriter
        self._entity = entity
        self._recoding = recoding
        self._header = header
        self._top_change = top_change
        self._qp = recoding.in_cte == "quoted-printable"
        self._passthrough = False
        self._size = 0
        self._spool: tempfile.SpooledTemporaryFile[bytes] | None = None
        self._pipeline: _Pipeline | None = None
        if recoding.transcode is not None:
            self._spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY)  # noqa: SIM115
        else:
            self._start()

    def _start(self) -> None:
        rewriter = self._rewriter
        rewriter.changed = True
        if self._top_change is not None:
            rewriter.top_changes.append(self._top_change)
        if self._header is not None:
            rewriter.out.write(self._header)
        else:
            rewriter._write_header(self._entity)
        self._pipeline = _Pipeline(rewriter.out, self._recoding)

    def feed(self, data: bytes) -> None:
        if self._passthrough:
            self._rewriter.out.write(data, self._qp)
        elif self._spool is not None:
            self._size += len(data)
            if self._size > self._rewriter.limits.max_recode_bytes:
                self._give_up(data)
            else:
                self._spool.write(data)
        else:
            assert self._pipeline is not None
            self._pipeline.feed(data)

    def _give_up(self, data: bytes) -> None:
        """Too large to transcode: the part as it was, without a footer."""
        assert self._spool is not None
        self._rewriter._write_header(self._entity)
        for chunk in _spooled(self._spool):
            self._rewriter.out.write(chunk, self._qp)
        self._rewriter.out.write(data, self._qp)
        self._spool.close()
        self._spool = None
        self._passthrough = True

    def finish(self) -> None:
        if self._passthrough:
            return
        if self._spool is not None:
            self._start()
            assert self._pipeline is not None
            for chunk in _spooled(self._spool):
                self._pipeline.feed(chunk)
            self._spool.close()
            self._spool = None
        assert self._pipeline is not None
        self._pipeline.finish()


def _spooled(spool: tempfile.SpooledTemporaryFile[bytes]) -> Iterator[bytes]:
    """The spooled bytes in chunks that do not split a CRLF."""
    spool.seek(0)
    while chunk := spool.read(CHUNK_SIZE):
        if chunk.endswith(b"\r"):
            chunk += spool.read(1)
        yield chunk


class _Pipeline:
    """Decoder, transcoder, the held tail where the footer goes, encoder."""

    def __init__(self, out: _Output, recoding: _Recoding) -> None:
        self._recoding = recoding
        self._decoder: _Base64Decoder | _QuotedPrintableDecoder | None = None
        if recoding.in_cte == "base64":
            self._decoder = _Base64Decoder()
        elif recoding.in_cte == "quoted-printable":
            self._decoder = _QuotedPrintableDecoder()
        self._transcoder = None
        if recoding.transcode is not None:
            self._transcoder = codecs.getincrementaldecoder(recoding.transcode)("replace")
        self._encoder: _Encoder
        if recoding.out_cte == "base64":
            self._encoder = _Base64Encoder(out)
        elif recoding.out_cte == "quoted-printable":
            self._encoder = _QuotedPrintableEncoder(out)
        else:
            self._encoder = _IdentityEncoder(out)
        self._tail = bytearray()

    def feed(self, data: bytes) -> None:
        if self._decoder is not None:
            data = self._decoder.feed(data)
        self._hold(self._transcoded(data, False))

    def _transcoded(self, data: bytes, final: bool) -> bytes:
        if self._transcoder is None:
            return data
        return self._transcoder.decode(data, final).encode("utf-8", "replace")

    def _hold(self, data: bytes) -> None:
        self._tail += data
        if len(self._tail) > 2 * _TAIL:
            cut = len(self._tail) - _TAIL
            self._encoder.feed(bytes(self._tail[:cut]))
            del self._tail[:cut]

    def finish(self) -> None:
        rest = self._decoder.flush() if self._decoder is not None else b""
        self._hold(self._transcoded(rest, True))
        self._encoder.feed(_with_footer(bytes(self._tail), self._recoding.footer, self._recoding.html))
        self._encoder.finish()


def _with_footer(tail: bytes, footer: bytes, html: bool) -> bytes:
    """The end of a decoded body with the footer: before the last ``</body>`` of HTML, else on lines of its
    own after the text (a final line break stays last)."""
    if html:
        ends = [match.start() for match in _BODY_END.finditer(tail)]
        if ends:
            before, after = tail[: ends[-1]], tail[ends[-1] :]
            gap = b"" if not before or before.endswith(b"\n") else CRLF
            return before + gap + footer + CRLF + after
    if not tail:
        return footer
    if tail.endswith(b"\n"):
        return tail + footer + CRLF
    return tail + CRLF + footer
