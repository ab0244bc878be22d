"""The structure of a MIME message as it streams by: the one walker that both the inspector
(:mod:`dcrouter.processing.mime`) and the rewriter (:mod:`~dcrouter.processing.transforms.mimerewrite`)
build on.

:class:`MimeWalker` is a push parser: :meth:`~MimeWalker.feed` it chunks cut anywhere, then
:meth:`~MimeWalker.finish`. It reads header blocks (folding, the empty line, a block that ends without one),
multipart delimiters and close-delimiters (RFC 2046, by :mod:`dcrouter.processing.multipart`), preambles and
epilogues, nested multiparts and encapsulated ``message/rfc822`` messages; it numbers parts IMAP-style and
enforces the limits of a header block's size, of nesting and of the number of parts. What becomes of the
content is its :class:`Reader`'s business: the inspector decodes, hashes and sniffs each leaf part; the
rewriter copies, replaces or extends it. Because both see a message through this one walker, a part the one
finds at a ``path`` is the part the other sees there.

The bytes reach the reader in order, each exactly once:

- header lines go to the block's :class:`Entity` (made by :meth:`Reader.entity`);
- a leaf part's content goes to its :class:`Leaf` (made by :meth:`Reader.leaf`), without the line break
  before a delimiter, which belongs to the delimiter (RFC 2046 §5.1.1);
- delimiter lines go to :meth:`Reader.delimiter`, with that line break;
- the rest (preambles, epilogues, the body of a multipart whose boundary cannot be used or of a part nested
  too deep) goes to :meth:`Reader.other` when the reader sets :attr:`Reader.wants_other`.

Decisions depend on the bytes only (lines, fixed limits), never on where the chunks were cut. Memory stays
within a chunk, the line being looked at and the header block being read (at most ``max_header_bytes``).

Nothing here raises on hostile input. A structure that different readers could see differently (conflicting
fields or boundaries, a multipart left open, a limit crossed) is reported to :meth:`Reader.problem`; the walk
goes on where it can (the inspector then calls the message unscannable), and after a crossed limit reads on
without looking. A reader may also raise from its methods to abandon the walk (the rewriter does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from dcrouter.processing.decoding import IDENTITY_ENCODINGS
from dcrouter.processing.mimeheaders import FIELD_START, ContentFields, read_content_fields, text_of
from dcrouter.processing.multipart import MAX_BOUNDARY, MAX_DELIMITER_LINE, Frame, match_delimiter

_HEADERS, _LEAF, _IGNORE, _DRAIN = "headers", "leaf", "ignore", "drain"
#: The fields a part's header block is read for (the message's own keeps every field).
PART_FIELDS = frozenset({b"content-type", b"content-transfer-encoding", b"content-disposition"})


class Limits(Protocol):
    """What bounds a walk (:class:`~dcrouter.processing.mime.MimeLimits` has these, among others)."""

    @property
    def max_header_bytes(self) -> int: ...  # any one header block

    @property
    def max_depth(self) -> int: ...  # nesting of multiparts and encapsulated messages

    @property
    def max_parts(self) -> int: ...  # body parts and encapsulated messages, all levels


class Entity:
    """A header block as it is read: the message's own (``top``), a body part's, or an encapsulated message's.

    ``fields`` holds ``(name as written, unfolded value)`` of every field of the message's own block and of
    the Content-* fields of any other (what the walker reads a part for), in order. A reader that needs more
    (the rewriter writes the block out again) subclasses this and extends the ``*_field`` methods.
    ``in_message``: the block is inside an encapsulated message. ``cut``: a delimiter ended the block.
    """

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
        self.depth = depth
        self.path = path
        self.leaf_path = leaf_path
        self.default_type = default_type
        self.top = top
        self.in_message = in_message
        self.cut = False
        self.header_bytes = 0
        self.fields: list[tuple[bytes, bytes]] = []
        self._name: bytes | None = None
        self._value: list[bytes] | None = None

    def start_field(self, name: bytes, rest: bytes, line: bytes, newline: bool) -> None:
        """A field starts: ``name`` and the ``rest`` of the ``line`` after its colon (``line`` without its
        line break; ``newline``: it had one)."""
        self.close_field()
        self._name = name
        self._value = [rest] if self.top or name.lower() in PART_FIELDS else None

    def continue_field(self, line: bytes, newline: bool) -> bool:
        """A continuation line; False when no field precedes it."""
        if self._name is None:
            return False
        if self._value is not None:
            self._value.append(line)
        return True

    def end_block(self, line: bytes, newline: bool) -> None:
        """The empty line that ends the block (``line`` is empty, or a lone CR's remains)."""

    def close_field(self) -> None:
        if self._name is not None and self._value is not None:
            self.fields.append((self._name, b"".join(self._value).strip(b" \t")))
        self._name = self._value = None

    def values(self, name: bytes) -> list[bytes]:
        """The values of the kept fields named ``name`` (lower-case), in order."""
        return [value for field, value in self.fields if field.lower() == name]


class Leaf(Protocol):
    """What a reader does with a leaf part's content."""

    #: Set by ``feed`` or ``finish`` to stop the walk: what was read so far stands, the rest is skipped.
    stop_reason: str | None

    def feed(self, data: bytes) -> None: ...

    def finish(self, complete: bool) -> None:
        """The part ended: at a delimiter or the end of the message (``complete``), or a limit stopped the
        walk inside it."""


class Reader(Protocol):
    """What a walk hands its findings to (see the module docstring for the order)."""

    #: Whether :meth:`other` is called: the inspector skips those bytes without copying them.
    wants_other: bool

    def entity(self, depth: int, path: str, leaf_path: str, default_type: str, in_message: bool) -> Entity:
        """A header block begins (a part's or an encapsulated message's)."""

    def defect(self, text: str) -> None:
        """Something odd that does not change what the message is."""

    def problem(self, text: str) -> None:
        """The structure cannot be trusted as read (``text`` says why): the walk goes on, or stops reading
        after a limit."""

    def container(self, entity: Entity) -> None:
        """``entity``'s block ended and it is a multipart or an encapsulated message: its parts follow."""

    def leaf(self, entity: Entity, content: ContentFields) -> Leaf:
        """``entity``'s block ended and it is a leaf part of this type; its content follows."""

    def other(self, data: bytes) -> None:
        """Bytes that belong to no leaf and no header block (only when :attr:`wants_other`)."""

    def delimiter(self, eol_before: bytes, line: bytes, newline: bool, cut: Entity | None) -> None:
        """A delimiter line (``line`` without its line break or a CR before it; ``newline``: it had one),
        after the part before it is finished. ``eol_before``: the line break before it, withheld from that
        leaf part's content (empty when it went to :meth:`other`); ``cut``: the header block it ended."""


class MimeWalker:
    """The push parser: :meth:`start` (or :meth:`start_body`), :meth:`feed` any chunks, then :meth:`finish`.

    ``top`` is the message's own header block; ``size`` counts the bytes fed."""

    def __init__(self, reader: Reader, limits: Limits) -> None:
        self.reader = reader
        self.limits = limits
        self.size = 0
        self.top: Entity | None = None
        self._buf = bytearray()
        self._pos = 0
        self._at_line_start = True
        self._pending_eol = b""
        self._frames: list[Frame] = []
        self._entity: Entity | None = None
        self._leaf: Leaf | None = None
        self._mode = _IGNORE
        self._entities = 0

    @property
    def frames(self) -> Sequence[Frame]:
        """The multiparts open where the walk is, innermost last."""
        return self._frames

    def start(self, top: Entity) -> None:
        """The stream begins with the message's header block, read into ``top``."""
        self.top = self._entity = top
        self._mode = _HEADERS

    def start_body(self, top: Entity) -> None:
        """The message's header block was read elsewhere (its fields given to ``top``); the stream is the body
        after it."""
        self.top = self._entity = top
        self._end_headers()

    # -- problems --

    def broken(self, reason: str) -> None:
        """The walk goes on, but what it finds cannot be trusted as complete."""
        self.reader.problem(reason)

    def stop(self, reason: str) -> None:
        """A limit: keep what was found and read the rest without looking."""
        self.broken(reason)
        if self._entity is not None and self._entity.top:
            # The field being read is kept as far as it fit (its continuation may be cut).
            self._entity.close_field()
        if self._leaf is not None:
            self._leaf.finish(complete=False)
            self._leaf = None
        self._entity = None
        self._mode = _DRAIN
        self._buf = bytearray()
        self._pos = 0

    # -- input --

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._mode == _DRAIN:
            return
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += chunk
        self._run(final=False)

    def finish(self) -> None:
        """The end of the message: the part being read ends here; a multipart still open is a problem."""
        if self._mode != _DRAIN:
            self._run(final=True)
        if self._mode == _DRAIN:
            return
        if self._mode == _LEAF and self._pending_eol:
            self._feed_leaf(self._pending_eol)
            self._pending_eol = b""
            if self._mode == _DRAIN:
                return
        self._finish_current(complete=True)
        if self._frames and self._mode != _DRAIN:
            self.broken("multipart not closed: the message ends before its close delimiter")
        self._frames.clear()

    def _run(self, final: bool) -> None:
        while self._mode != _DRAIN:
            step = self._header_step if self._mode == _HEADERS else self._body_step
            if not step(final):
                return

    # -- header blocks --

    def _header_step(self, final: bool) -> bool:
        buf, pos, entity = self._buf, self._pos, self._entity
        assert entity is not None
        n = len(buf)
        if pos >= n:
            return False
        limit = self.limits.max_header_bytes
        end = buf.find(b"\n", pos)
        if end < 0:
            if entity.header_bytes + (n - pos) > limit:
                self.stop(f"header block larger than {limit} bytes")
                return False
            if not final:
                return False
            end = following = n
        else:
            following = end + 1
            if entity.header_bytes + (following - pos) > limit:
                self.stop(f"header block larger than {limit} bytes")
                return False
        newline = following > end
        line = bytes(buf[pos:end])
        if line.endswith(b"\r"):
            line = line[:-1]
        if b"\x00" in line:
            self.reader.defect("NUL byte in a header block")
        if b"\r" in line:
            # Readers differ on a bare CR: many (Python's email, MUAs) end a line there, so "\r\r\n" is an
            # empty line to them, ending the block, and to us a line that is not a field: two structures.
            self.broken(f"part {entity.leaf_path}: bare CR in a header block")
        if line.startswith(b"--") and (hit := match_delimiter(self._frames, line)) is not None:
            self._pos, self._at_line_start = following, True
            entity.cut = True
            self._delimiter(*hit, b"", line, newline, entity)
            return True
        if not line:
            self._pos, self._at_line_start = following, True
            entity.header_bytes += following - pos
            entity.end_block(line, newline)
            self._end_headers()
            return True
        if line[0] in b" \t":
            if not entity.continue_field(line, newline):
                self.reader.defect("header block starts with a continuation line")
        elif (field := FIELD_START.match(line)) is not None:
            if field.group(2):
                self.reader.defect(f"white space before the colon of {text_of(field.group(1)[:40])!r}")
            entity.start_field(field.group(1), line[field.end() :], line, newline)
        else:
            # Not a header field: the block ended without its empty line and this line is the body's first.
            self.reader.defect("header block not ended by a blank line")
            self._end_headers()
            return True
        self._pos, self._at_line_start = following, True
        entity.header_bytes += following - pos
        return True

    def _end_headers(self) -> None:
        entity = self._entity
        assert entity is not None
        entity.close_field()
        self._entity = None
        content = self._content(entity)
        kind = content.kind
        self._mode = _IGNORE
        if kind.startswith("multipart/"):
            boundaries = content.params.get("boundary", [])
            boundary = boundaries[0].encode("utf-8", "surrogateescape") if boundaries else b""
            if len(set(boundaries)) > 1:
                self.broken(f"part {entity.leaf_path}: conflicting multipart boundaries")
            elif not boundary or len(boundary) > MAX_BOUNDARY:
                self.broken(f"part {entity.leaf_path}: multipart without a usable boundary")
            else:
                self.reader.container(entity)
                digest = kind == "multipart/digest"
                self._frames.append(Frame(boundary, entity.depth, entity.path, digest, entity.in_message))
            return
        if kind in ("message/rfc822", "message/global") and content.transfer_encoding in IDENTITY_ENCODINGS:
            self.reader.container(entity)
            inner = f"{entity.path}.1" if entity.path else "1"
            self._begin_entity(entity.depth + 1, entity.path, inner, "text/plain", in_message=True)
            return
        if kind == "message/partial":
            self.broken(f"part {entity.leaf_path}: message/partial (content split across messages)")
        self._leaf = self.reader.leaf(entity, content)
        self._mode = _LEAF

    def _content(self, entity: Entity) -> ContentFields:
        where = f"part {entity.leaf_path}"
        content = read_content_fields(entity.values, entity.default_type)
        for field in content.conflicts:
            self.broken(f"{where}: conflicting {field} fields")
        for defect in content.defects:
            self.reader.defect(f"{where}: {defect}")
        return content

    def _begin_entity(
        self, depth: int, path: str, leaf_path: str, default_type: str, in_message: bool
    ) -> None:
        self._entities += 1
        if self._entities > self.limits.max_parts:
            self.stop(f"more than {self.limits.max_parts} MIME parts")
        elif depth > self.limits.max_depth:
            self.broken(f"MIME nesting deeper than {self.limits.max_depth}")
            self._mode = _IGNORE
        else:
            self._entity = self.reader.entity(depth, path, leaf_path, default_type, in_message)
            self._mode = _HEADERS

    # -- bodies --

    def _body_step(self, final: bool) -> bool:
        buf, start = self._buf, self._pos
        n = len(buf)
        if start >= n:
            return False
        line = start if self._at_line_start else self._next_candidate(start)
        while line >= 0:
            if n - line < 2 and not final:
                return self._hold(start, line)
            if buf[line : line + 2] != b"--":
                line = self._next_candidate(line)
                continue
            end = buf.find(b"\n", line, line + MAX_DELIMITER_LINE + 1)
            if end < 0:
                if n - line > MAX_DELIMITER_LINE:
                    line = self._next_candidate(line)
                    continue
                if not final:
                    return self._hold(start, line)
                end = following = n
            else:
                following = end + 1
            text = bytes(buf[line:end])
            if text.endswith(b"\r"):
                text = text[:-1]
            hit = match_delimiter(self._frames, text)
            if hit is None:
                line = self._next_candidate(end) if end < n else -1
                continue
            self._emit(start, line)
            # The line break before a delimiter belongs to the delimiter.
            eol_before, self._pending_eol = self._pending_eol, b""
            if self._mode == _DRAIN:
                return False
            self._pos, self._at_line_start = following, True
            self._delimiter(*hit, eol_before, text, following > end, None)
            return True
        # No delimiter in sight: pass everything on but a tail that could begin one.
        stop = n if final else n - self._tail(start, n)
        self._emit(start, stop)
        if stop > start:
            self._pos, self._at_line_start = stop, buf[stop - 1] == 0x0A
        return False

    def _next_candidate(self, at: int) -> int:
        found = self._buf.find(b"\n--", at)
        return found + 1 if found >= 0 else -1

    def _tail(self, start: int, n: int) -> int:
        buf = self._buf
        if buf.endswith(b"\n-"):
            tail = 2
        elif buf.endswith((b"\n", b"\r")):
            tail = 1
        else:
            return 0
        if buf[n - 1] != 0x0D and n - tail - 1 >= 0 and buf[n - tail - 1] == 0x0D:
            tail += 1
        return min(tail, n - start)

    def _hold(self, start: int, line: int) -> bool:
        """Wait for more input to tell whether the line at ``line`` is a delimiter."""
        self._emit(start, line)
        if line > start:
            self._pos, self._at_line_start = line, True
        return False

    def _emit(self, start: int, stop: int) -> None:
        if stop <= start:
            return
        if self._mode != _LEAF:
            self._pending_eol = b""
            if self.reader.wants_other:
                self.reader.other(bytes(self._buf[start:stop]))
            return
        data = bytes(self._buf[start:stop])
        pending = self._pending_eol
        if data.endswith(b"\n"):
            cut = 2 if data.endswith(b"\r\n") else 1
            self._pending_eol, data = data[-cut:], data[:-cut]
        else:
            self._pending_eol = b""
        self._feed_leaf(pending + data if pending else data)

    def _feed_leaf(self, data: bytes) -> None:
        leaf = self._leaf
        assert leaf is not None
        if data:
            leaf.feed(data)
            if leaf.stop_reason is not None:
                self.stop(leaf.stop_reason)

    def _delimiter(
        self, index: int, close: bool, eol_before: bytes, line: bytes, newline: bool, cut: Entity | None
    ) -> None:
        self._finish_current(complete=True)
        if self._mode == _DRAIN:
            return
        if index < len(self._frames) - 1:
            self.broken("multipart not closed before its enclosing multipart's boundary")
            del self._frames[index + 1 :]
        self.reader.delimiter(eol_before, line, newline, cut)
        frame = self._frames[index]
        self._mode = _IGNORE
        if close:
            self._frames.pop()
            return
        path = frame.next_part()
        self._begin_entity(frame.depth + 1, path, path, frame.default_type, frame.in_message)

    def _finish_current(self, complete: bool) -> None:
        """The current entity ends here (a delimiter, the end of the message)."""
        while self._mode == _HEADERS:  # a header block with no body (an encapsulated message's may nest)
            self._end_headers()
        if self._mode == _LEAF and self._leaf is not None:
            leaf, self._leaf = self._leaf, None
            leaf.finish(complete)
            if leaf.stop_reason is not None:
                self.stop(leaf.stop_reason)
                return
        if self._mode != _DRAIN:
            self._mode = _IGNORE
