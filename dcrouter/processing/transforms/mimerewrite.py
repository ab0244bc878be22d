"""A streaming MIME rewriter: replaces leaf parts (attachments) and appends footers to the text bodies,
copying everything else through, with bounded memory whatever the size of the message.

:func:`rewrite_mime` reads the structure with the walker the inspector (:mod:`dcrouter.processing.mime`)
reads it with, :mod:`dcrouter.processing.mimewalk`, so a part found there by its ``path`` is the part seen
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

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import BinaryIO, Protocol

from dcrouter.mail.headers import HeaderBlock, encode_field
from dcrouter.processing.decoding import TransferDecoder, transfer_decoder
from dcrouter.processing.filetype import SNIFF_BYTES, sniff_type
from dcrouter.processing.mime import CHUNK_SIZE, MimeLimits, is_attachment
from dcrouter.processing.mimeheaders import ContentFields
from dcrouter.processing.mimewalk import Entity, MimeWalker
from dcrouter.processing.transforms.bodywriter import CRLF, LINE_FRAGMENT, BodyWriter, encode_replacement
from dcrouter.processing.transforms.footerpart import (
    FooterSink,
    changed_header,
    header_change,
    plan_footer,
)

_HOLD = 64 * 1024  # raw bytes of a part held while its first bytes are sniffed
_CONTENT_FIELDS = (b"content-type", b"content-transfer-encoding", b"content-disposition")


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


class _Lines:
    """Raw bytes cut anywhere, as lines: ``(line without its LF, bare CRs kept, ended by an LF)``. A line
    longer than :data:`LINE_FRAGMENT` comes in pieces, never cut between a CR and its LF. The rewriter writes
    a line at a time, so that no write ends inside a quoted-printable escape of an ordinary line."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def push(self, data: bytes) -> list[tuple[bytes, bool]]:
        buf = self._buf
        buf += data
        lines: list[tuple[bytes, bool]] = []
        pos = 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl >= 0:
                lines.append((bytes(buf[pos:nl]), True))
                pos = nl + 1
            elif len(buf) - pos > LINE_FRAGMENT:
                cut = pos + LINE_FRAGMENT
                if buf[cut - 1] == 0x0D:
                    cut -= 1
                lines.append((bytes(buf[pos:cut]), False))
                pos = cut
            else:
                break
        del buf[:pos]
        return lines

    def rest(self) -> bytes:
        """The line begun and not ended (emptied)."""
        rest, self._buf = bytes(self._buf), bytearray()
        return rest


def _written(line: bytes, newline: bool) -> bytes:
    """A header line as written out: bare CRs dropped, a CRLF for its line break."""
    return line.replace(b"\r", b"") + (CRLF if newline else b"")


# -- structure --


class _Entity(Entity):
    """A header block the rewriter may write out again: ``raw`` holds its fields as written out, each with its
    lower-case name (None for a stray continuation line), and ``end`` its empty line."""

    def __init__(
        self,
        depth: int,
        path: str,
        leaf_path: str,
        default_type: str,
        *,
        top: bool = False,
        in_message: bool = False,
    ) -> None:
        super().__init__(depth, path, leaf_path, default_type, top=top, in_message=in_message)
        self.raw: list[tuple[bytes | None, bytearray]] = []
        self.end = b""

    def start_field(self, name: bytes, rest: bytes, line: bytes, newline: bool) -> None:
        super().start_field(name, rest, line, newline)
        self.raw.append((name.lower(), bytearray(_written(line, newline))))

    def continue_field(self, line: bytes, newline: bool) -> bool:
        if self.raw and self.raw[-1][0] is not None:
            self.raw[-1][1].extend(_written(line, newline))
        else:
            self.raw.append((None, bytearray(_written(line, newline))))
        return super().continue_field(line, newline)

    def end_block(self, line: bytes, newline: bool) -> None:
        self.end = _written(line, newline)

    @property
    def owes_eol(self) -> bool:
        """A delimiter cut the block short: the line break ending its last line belongs to the delimiter."""
        return self.cut and bool(self.raw) and self.raw[-1][1].endswith(CRLF)

    def header_bytes_out(self, dropped: tuple[bytes, ...] = ()) -> bytes:
        data = b"".join(bytes(raw) for name, raw in self.raw if name not in dropped) + self.end
        return data[:-2] if self.owes_eol and not dropped and data.endswith(CRLF) else data

    def complete_header_bytes(self) -> bytes:
        """The block as written out for a part that is given content: ended by its empty line, which a block
        cut short by a delimiter or the end of the input lacks."""
        data = b"".join(bytes(raw) for _, raw in self.raw)
        if data and not data.endswith(CRLF):
            data += CRLF
        return data + (self.end or CRLF)


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


class _LeafLines:
    """A leaf part as the walker feeds it (raw bytes cut anywhere), passed to its :class:`_Leaf` a line at a
    time, CRLF-ended."""

    stop_reason: str | None = None

    def __init__(self, rewriter: _Rewriter, leaf: _Leaf) -> None:
        self._rewriter = rewriter
        self._leaf = leaf
        self._lines = _Lines()

    def feed(self, data: bytes) -> None:
        for line, newline in self._lines.push(data):
            self._rewriter.body(line, newline, self._leaf)

    def finish(self, complete: bool) -> None:
        rewriter = self._rewriter
        rest = self._lines.rest()
        if rest:
            rewriter.body(rest, False, self._leaf)
        # A line break owed at the part's end is its own: the one before a delimiter never reaches it.
        rewriter.flush_eol(self._leaf)
        self._leaf.finish()


class _Rewriter:
    """The walk's reader: writes everything out again as it streams by, changing the leaf parts ``replace``
    and the footers ask for. Any problem the walker reports leaves the message unchanged."""

    wants_other = True  # preambles and epilogues are copied

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
        self._footered: set[str] = set()
        self._walker = MimeWalker(self, limits)
        self._other = _Lines()
        self._pending_eol = False  # a line break read but not yet passed on: it may belong to a delimiter

    def run(self, stream: BinaryIO, chunk_size: int) -> None:
        top = _Entity(0, "", "1", "text/plain", top=True)
        for field in self.headers:
            name, _, rest = field.raw.partition(b":")
            top.start_field(name.strip(b" \t"), rest.replace(CRLF, b""), b"", False)
        walker = self._walker
        walker.start_body(top)
        while chunk := stream.read(chunk_size):
            walker.feed(chunk)
        walker.finish()
        rest = self._other.rest()
        if rest:
            self.body(rest, False, None)
        self.flush_eol(None)

    # -- lines --

    def body(self, line: bytes, newline: bool, leaf: _Leaf | None) -> None:
        """A line (or a piece of a long one) of a leaf part or of what lies outside parts, written out with
        CRLF line breaks; its own line break waits for the next line, as it may belong to a delimiter."""
        data = line.replace(b"\r", b"")
        if self._pending_eol:
            data = CRLF + data
        self._pending_eol = newline
        if leaf is not None:
            leaf.feed(data)
        else:
            self.out.write(data)

    def flush_eol(self, leaf: _Leaf | None) -> None:
        """The line break waiting at the end of a part (or of the message) is written where the line was."""
        if self._pending_eol:
            self._pending_eol = False
            if leaf is not None:
                leaf.feed(CRLF)
            else:
                self.out.write(CRLF)

    # -- the walker's reader --

    def entity(self, depth: int, path: str, leaf_path: str, default_type: str, in_message: bool) -> _Entity:
        return _Entity(depth, path, leaf_path, default_type, in_message=in_message)

    def defect(self, text: str) -> None:
        pass

    def problem(self, text: str) -> None:
        raise _Unchanged(text)

    def container(self, entity: Entity) -> None:
        assert isinstance(entity, _Entity)
        self._write_header(entity)

    def leaf(self, entity: Entity, content: ContentFields) -> _LeafLines:
        assert isinstance(entity, _Entity)
        view = PartView(
            entity.leaf_path,
            content.kind,
            content.disposition,
            content.names,
            content.transfer_encoding,
            None,
            entity.in_message,
        )
        return _LeafLines(self, _Leaf(self, entity, view, content.params))

    def other(self, data: bytes) -> None:
        for line, newline in self._other.push(data):
            self.body(line, newline, None)

    def delimiter(self, eol_before: bytes, line: bytes, newline: bool, cut: Entity | None) -> None:
        owes = isinstance(cut, _Entity) and cut.owes_eol
        # A delimiter starts a line: also after a part that had no content and was given some.
        if eol_before or owes or self._pending_eol or not self.out.at_line_start:
            self.out.write(CRLF)
        self._pending_eol = False
        self.out.write(line.replace(b"\r", b"") + (CRLF if newline else b""))

    # -- output --

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
                header = changed_header(entity.raw, recoding.new_type, recoding.new_cte)

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
        return any(line.startswith(frame.delimiter) for line in lines for frame in self._walker.frames)
