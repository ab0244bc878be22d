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

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO, Protocol

from dcrouter.mail.headers import HeaderBlock, encode_field
from dcrouter.processing.decoding import IDENTITY_ENCODINGS, TransferDecoder, transfer_decoder
from dcrouter.processing.filetype import SNIFF_BYTES, sniff_type
from dcrouter.processing.mime import CHUNK_SIZE, MimeLimits, is_attachment
from dcrouter.processing.mimeheaders import FIELD_START, read_content_fields
from dcrouter.processing.multipart import MAX_BOUNDARY, MAX_DELIMITER_LINE, Frame, match_delimiter
from dcrouter.processing.transforms.bodywriter import CRLF, LINE_FRAGMENT, BodyWriter, encode_replacement
from dcrouter.processing.transforms.footerpart import (
    FooterSink,
    changed_header,
    header_change,
    plan_footer,
)

_HOLD = 64 * 1024  # raw bytes of a part held while its first bytes are sniffed
_CONTENT_FIELDS = (b"content-type", b"content-transfer-encoding", b"content-disposition")
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
        return is_attachment(self.disposition, self.names, self.declared_type, self.sniffed_type)


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
    rewriter = _Rewriter(headers, BodyWriter(body_out), replace, footers, limits)
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


# -- input --


def _lines(stream: BinaryIO, chunk_size: int) -> Iterator[tuple[bytes, bool, bool]]:
    """(line without its LF, CR kept; ended by an LF; continued in the next item). A line longer than
    :data:`LINE_FRAGMENT` comes in pieces, never cut between a CR and its LF."""
    buf = bytearray()
    pos = 0
    eof = False
    while True:
        nl = buf.find(b"\n", pos)
        if nl >= 0:
            yield bytes(buf[pos:nl]), True, False
            pos = nl + 1
        elif len(buf) - pos > LINE_FRAGMENT:
            cut = pos + LINE_FRAGMENT
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

    def complete_header_bytes(self) -> bytes:
        """The block as written out for a part that is given content: ended by its empty line, which a block
        cut short by a delimiter or the end of the input lacks."""
        data = b"".join(bytes(raw) for _, raw in self.fields)
        if data and not data.endswith(CRLF):
            data += CRLF
        return data + (self.end or CRLF)

    def content(self) -> tuple[str, dict[str, list[str]], str, str | None, tuple[str, ...]]:
        """(type, parameters, transfer encoding, disposition, names) read as the MIME walker reads them."""
        content = read_content_fields(self.values, self.default_type)
        if content.conflicts:
            raise _Unchanged("conflicting fields")
        return content.kind, content.params, content.transfer_encoding, content.disposition, content.names


class _Sink(Protocol):
    def feed(self, data: bytes) -> None: ...

    def finish(self) -> None: ...


class _Discard:
    def feed(self, data: bytes) -> None:
        pass

    def finish(self) -> None:
        pass


class _Passthrough:
    def __init__(self, out: BodyWriter, qp: bool) -> None:
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
        self._decoder: TransferDecoder | None = transfer_decoder(view.transfer_encoding)
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
        out: BodyWriter,
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
        self.frames: list[Frame] = []
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
        if not (continued or partial) and line.startswith(b"--") and len(line) <= MAX_DELIMITER_LINE:
            content = line[:-1] if line.endswith(b"\r") else line
            hit = match_delimiter(self.frames, content)
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
        if self._pending_eol:  # the line break after the delimiter before this block
            self.out.write(CRLF)
            self._pending_eol = False
        if content.startswith(b"--") and (hit := match_delimiter(self.frames, content)) is not None:
            if entity.fields and entity.fields[-1][1].endswith(CRLF):
                entity.owes_eol = self._pending_eol = True
            self._delimiter(content, newline, hit)
            return
        raw = content.replace(b"\r", b"") + (CRLF if newline else b"")
        if not content:
            entity.end = raw
            self._end_headers()
        elif content[0] in b" \t":
            entity.continue_field(content, raw)
        elif (field := FIELD_START.match(content)) is not None:
            entity.start_field(field.group(1).lower(), content[field.end() :], raw)
        else:
            # Not a header field: the block ended without its empty line and this line is the body's first.
            self._end_headers()
            self._line(line, newline, False, False)

    def _delimiter(self, line: bytes, newline: bool, hit: tuple[int, bool]) -> None:
        index, close = hit
        self._finish_current()
        if index < len(self.frames) - 1:
            raise _Unchanged("multipart not closed before its enclosing multipart's boundary")
        # A delimiter starts a line: also after a part that had no content and was given some.
        if self._pending_eol or not self.out.at_line_start:
            self.out.write(CRLF)
        self.out.write(line.replace(b"\r", b""))
        self._pending_eol = newline
        frame = self.frames[index]
        if close:
            self.frames.pop()
            return
        path = frame.next_part()
        self._begin_entity(frame.depth + 1, path, path, frame.default_type, frame.in_message)

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
            if len(set(boundaries)) > 1 or not boundary or len(boundary) > MAX_BOUNDARY:
                raise _Unchanged("multipart without a usable boundary")
            self._write_header(entity)
            self.frames.append(
                Frame(boundary, entity.depth, entity.path, kind == "multipart/digest", entity.in_message)
            )
            return
        if kind in ("message/rfc822", "message/global") and cte in IDENTITY_ENCODINGS:
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
            sink = self._footer_sink(entity, view, params, footer)
            if sink is not None:
                return sink
        self._write_header(entity)
        return _Passthrough(self.out, qp=view.transfer_encoding == "quoted-printable")

    def _write_replacement(self, entity: _Entity, text: str) -> None:
        self.changed = True
        cte, body = encode_replacement(text)
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

    def _footer_sink(
        self, entity: _Entity, view: PartView, params: dict[str, list[str]], footer: str
    ) -> FooterSink | None:
        """How ``footer`` goes into this part; None when it cannot (unknown charset or transfer encoding)."""
        recoding = plan_footer(view.declared_type, view.transfer_encoding, params, footer, self.collides)
        if recoding is None:
            return None
        header: bytes | None = None
        top_change: Callable[[HeaderBlock], None] | None = None
        if recoding.new_type is not None or recoding.new_cte is not None:
            if entity.top:
                top_change = header_change(recoding.new_type, recoding.new_cte)
            else:
                header = changed_header(entity.fields, recoding.new_type, recoding.new_cte)

        def begin() -> None:
            self.changed = True
            if top_change is not None:
                self.top_changes.append(top_change)
            if header is not None:
                self.out.write(header)
            elif not entity.top:
                self.out.write(entity.complete_header_bytes())

        return FooterSink(
            self.out, recoding, self.limits.max_recode_bytes, begin, lambda: self._write_header(entity)
        )

    def collides(self, lines: list[bytes]) -> bool:
        """Could one of ``lines``, written as it is, be read as a delimiter of an open multipart?"""
        return any(line.startswith(frame.delimiter) for line in lines for frame in self.frames)
