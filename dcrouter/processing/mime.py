"""Metadata and MIME structure of a message, read once from a stream with bounded memory.

:func:`inspect_message` walks the raw bytes itself (``email.feedparser`` keeps the whole message in memory):
header blocks with folding, RFC 2047 encoded-words and RFC 2231 parameters; multipart boundaries per RFC 2046
(delimiter and close-delimiter lines, preamble, epilogue, transport padding), nested multiparts and
encapsulated ``message/rfc822`` messages; base64 and quoted-printable decoded incrementally. Each leaf part is
sized, hashed and sniffed as it goes by; text parts are decoded for scanners up to a budget.

Nothing here raises on hostile input. A limit crossed or a structure that different readers could see
differently makes the message *unscannable*: :attr:`MessageInfo.unscannable` says why, what was found until
then is kept, and the caller's policy decides (it must never be taken as clean). The result does not depend on
how the stream is chunked.

From, To and Cc are parsed strictly (:mod:`dcrouter.processing.mailboxes`): an address that parses
differently, or not at all, is left out rather than guessed, and an ambiguous ``From`` is reported as such.

This module is the walker and the public API. Header values are read by
:mod:`~dcrouter.processing.mimeheaders`, bodies decoded by :mod:`~dcrouter.processing.decoding`, text for
scanners kept by :mod:`~dcrouter.processing.mimetext`, delimiters found by
:mod:`~dcrouter.processing.multipart`; the header and address functions are importable from here too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from dcrouter.processing.archive import ArchiveCollector, ArchiveLimits, WorkBudget
from dcrouter.processing.decoding import IDENTITY_ENCODINGS, TransferDecoder, transfer_decoder
from dcrouter.processing.filetype import SNIFF_BYTES, sniff_type
from dcrouter.processing.mailboxes import originators, recipients, split_address_list, strict_mailboxes
from dcrouter.processing.mimeheaders import (
    FIELD_START,
    decode_encoded_words,
    parse_structured,
    read_content_fields,
    text_of,
)
from dcrouter.processing.mimetext import TextBudget, TextPart
from dcrouter.processing.multipart import MAX_BOUNDARY, MAX_DELIMITER_LINE, Frame, match_delimiter

__all__ = [
    "CHUNK_SIZE",
    "MessageInfo",
    "MimeLimits",
    "Part",
    "decode_encoded_words",
    "inspect_in_thread",
    "inspect_message",
    "is_attachment",
    "parse_structured",
    "split_address_list",
    "strict_mailboxes",
]

CHUNK_SIZE = 64 * 1024


@dataclass(frozen=True)
class MimeLimits:
    """How much of a message is inspected; beyond any of these the message is unscannable."""

    max_header_bytes: int = 256 * 1024  # any one header block (the message's, a part's)
    max_depth: int = 20  # nesting of multiparts and encapsulated messages
    max_parts: int = 1000  # body parts and encapsulated messages, all levels
    max_decoded_bytes: int = 64 * 1024 * 1024  # decoded content of all parts together
    max_text_bytes: int = 1024 * 1024  # UTF-8 text kept for scanners (beyond: truncated, not unscannable)
    # A part that is an archive (zip, tar, gzip, bzip2, xz, RAR) is kept up to this many decoded bytes to
    # list its entries (0: archives are not listed), and so is each archive inside it, down to
    # max_archive_depth levels; the entries and their sizes of all levels together are bounded by the next
    # two, and one entry's ratio by max_archive_ratio. Crossing them marks the part (Part.archive_problem),
    # not the message.
    max_archive_bytes: int = 16 * 1024 * 1024
    max_archive_expanded: int = 256 * 1024 * 1024
    max_archive_entries: int = 10_000
    max_archive_depth: int = 3
    max_archive_ratio: int = 100

    @property
    def archive(self) -> ArchiveLimits:
        return ArchiveLimits(
            self.max_archive_bytes,
            self.max_archive_expanded,
            self.max_archive_entries,
            self.max_archive_depth,
            self.max_archive_ratio,
        )


@dataclass(frozen=True)
class Part:
    """A leaf body part (not a multipart, not an encapsulated message's own header block)."""

    path: str  # IMAP-style part number: "1", "2.1", "3.1.2"
    depth: int
    declared_type: str  # lower-case type/subtype as declared (or its RFC 2045/2046 default)
    disposition: str | None  # "attachment", "inline", ... as declared, lower-case; None when absent
    filename: str | None  # Content-Disposition filename, else Content-Type name, decoded (RFC 2231 / 2047)
    names: tuple[str, ...]  # every distinct name declared for the part: scanners check them all
    transfer_encoding: str
    sniffed_type: str | None  # from the decoded content's first bytes; None when nothing known matched
    size: int  # decoded bytes (seen, when incomplete)
    sha256: str | None  # of the decoded content; None when incomplete
    complete: bool  # False when a limit stopped the inspection inside this part
    #: Entry names of an archive (by its content, whatever its name), archives inside it included as
    #: ``inner.zip/name`` (dcrouter.processing.archive); nothing is extracted to disk under these names.
    archive_names: tuple[str, ...] = ()
    #: Why the archive's entries cannot be trusted or listed ("encrypted archive", "zip bomb: ...", "archive
    #: too large", "corrupt archive: ...", "archives nested deeper than 3 levels", ...); None for a sound
    #: archive and for parts that are not archives.
    archive_problem: str | None = None

    @property
    def is_attachment(self) -> bool:
        return is_attachment(self.disposition, self.names, self.declared_type, self.sniffed_type)


def is_attachment(
    disposition: str | None, names: tuple[str, ...], declared: str, sniffed: str | None
) -> bool:
    """The part is an attachment: named, marked as one, not a text body, or text whose content is something
    else. One rule for the inspector and the rewriter, so both see the same parts."""
    if disposition == "attachment" or names:
        return True
    if declared not in ("text/plain", "text/html"):
        return True
    return sniffed not in (None, "text/html", "application/xml")


@dataclass(frozen=True)
class MessageInfo:
    #: top-level fields in order, unfolded; unstructured ones (Subject, X-...) RFC 2047-decoded
    headers: tuple[tuple[str, str], ...]
    from_addresses: tuple[str, ...]  # addr-specs of strictly parsed From fields; empty rather than guessed
    to: tuple[str, ...]
    cc: tuple[str, ...]
    subject: str | None
    message_id: str | None
    date: str | None
    #: not exactly one From field with exactly one strictly parsed mailbox: a policy input, never a guess
    from_ambiguous: bool
    parts: tuple[Part, ...]
    text: str  # text/plain and text/html (tags stripped) bodies, joined by newlines, up to max_text_bytes
    text_truncated: bool
    unscannable: str | None  # the first reason inspection is incomplete or untrustworthy; None when complete
    defects: tuple[str, ...]  # everything odd that was noticed, reasons for unscannable included
    size: int  # bytes read from the stream

    @property
    def attachments(self) -> tuple[Part, ...]:
        return tuple(p for p in self.parts if p.is_attachment)

    def get_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for field, value in self.headers if field.lower() == wanted]


def inspect_message(
    stream: BinaryIO,
    limits: MimeLimits = MimeLimits(),
    chunk_size: int = CHUNK_SIZE,
    budget: WorkBudget | None = None,
) -> MessageInfo:
    """Read ``stream`` to its end once, in chunks, and describe the message. Only the stream's own I/O errors
    propagate, and :class:`~dcrouter.processing.archive.ArchiveWorkExceeded` when listing archives would
    decompress more than ``budget`` allows. Memory stays within a few buffers of ``chunk_size`` plus the
    header and text budgets (archives are spooled to disk beyond 1 MiB)."""
    walker = _Walker(limits, budget)
    while chunk := stream.read(chunk_size):
        walker.feed(chunk)
    walker.finish()
    return walker.result()


def inspect_in_thread(
    reactor: IReactorThreads,
    threadpool: ThreadPool,
    open_stream: Callable[[], BinaryIO],
    limits: MimeLimits = MimeLimits(),
) -> Deferred[MessageInfo]:
    """:func:`inspect_message` in ``threadpool``, off the reactor thread; ``open_stream`` (e.g.
    ``SpooledMessage.open``) is called there too and the stream closed after."""

    def work() -> MessageInfo:
        with open_stream() as stream:
            return inspect_message(stream, limits)

    return deferToThreadPool(reactor, threadpool, work)


# -- the walker --

_HEADERS, _LEAF, _IGNORE, _DRAIN = "headers", "leaf", "ignore", "drain"
_PART_FIELDS = frozenset({b"content-type", b"content-transfer-encoding", b"content-disposition"})
_UNSTRUCTURED = frozenset({"subject", "comments", "keywords", "content-description", "thread-topic"})
_MAX_DEFECTS = 100


class _Entity:
    """A header block being read: the message's own (``top``), a body part's, or an encapsulated message's."""

    def __init__(self, depth: int, path: str, leaf_path: str, default_type: str, top: bool) -> None:
        self.depth = depth
        self.path = path
        self.leaf_path = leaf_path
        self.default_type = default_type
        self.top = top
        self.header_bytes = 0
        self.fields: list[tuple[bytes, bytes]] = []
        self._name: bytes | None = None
        self._value: list[bytes] | None = None

    def start_field(self, name: bytes, rest: bytes) -> None:
        self.close_field()
        self._name = name
        self._value = [rest] if self.top or name.lower() in _PART_FIELDS else None

    def continue_field(self, line: bytes) -> bool:
        if self._name is None:
            return False
        if self._value is not None:
            self._value.append(line)
        return True

    def close_field(self) -> None:
        if self._name is not None and self._value is not None:
            self.fields.append((self._name, b"".join(self._value).strip(b" \t")))
        self._name = self._value = None

    def values(self, name: bytes) -> list[bytes]:
        return [value for field, value in self.fields if field.lower() == name]


class _Leaf:
    """The decoded content of one leaf part as it streams by: counted, hashed, sniffed, maybe read as text."""

    def __init__(
        self,
        walker: _Walker,
        entity: _Entity,
        kind: str,
        cte: str,
        params: dict[str, list[str]],
        disposition: str | None,
        names: tuple[str, ...],
    ) -> None:
        self._walker = walker
        self._entity = entity
        self._kind = kind
        self._cte = cte
        self._disposition = disposition
        self._names = names
        self._decoder: TransferDecoder | None = transfer_decoder(cte)
        self._head = bytearray()
        self._sha = hashlib.sha256()
        self.size = 0
        self.truncated = False
        self._done = False
        self._text: TextPart | None = None
        self._archive: ArchiveCollector | None = None
        if walker.limits.max_archive_bytes > 0:
            self._archive = ArchiveCollector(walker.limits.archive, names, walker.budget)
        if kind in ("text/plain", "text/html") and disposition != "attachment":
            charsets = params.get("charset")
            charset = charsets[0] if charsets else None
            self._text = TextPart(charset, kind == "text/html", walker.text)

    def feed(self, data: bytes) -> None:
        self._take(self._decoder.feed(data) if self._decoder is not None else data)

    def _take(self, decoded: bytes) -> None:
        if not decoded or self.truncated:
            return
        allowed = self._walker.take_budget(len(decoded))
        if allowed < len(decoded):
            decoded = decoded[:allowed]
            self.truncated = True
        if self._archive is not None:
            self._archive.feed(decoded)
        if len(self._head) < SNIFF_BYTES:
            self._head += decoded[: SNIFF_BYTES - len(self._head)]
        self._sha.update(decoded)
        self.size += len(decoded)
        if self._text is not None:
            self._text.feed(decoded)

    def finish(self, complete: bool) -> None:
        if self._done:
            return
        if complete and self._decoder is not None:
            self._take(self._decoder.flush())
        self._done = True
        if self._text is not None:
            self._text.feed(b"", final=True)
        path = self._entity.leaf_path
        if self._decoder is not None:
            for defect in sorted(self._decoder.defects):
                self._walker.defect(f"part {path}: {defect}")
        complete = complete and not self.truncated
        listing = self._archive.finish(complete) if self._archive is not None else None
        self._archive = None
        self._walker.parts.append(
            Part(
                path=path,
                depth=self._entity.depth,
                declared_type=self._kind,
                disposition=self._disposition,
                filename=self._names[0] if self._names else None,
                names=self._names,
                transfer_encoding=self._cte,
                sniffed_type=sniff_type(bytes(self._head)),
                size=self.size,
                sha256=self._sha.hexdigest() if complete else None,
                complete=complete,
                archive_names=listing.names if listing is not None else (),
                archive_problem=listing.problem if listing is not None else None,
            )
        )


class _Walker:
    """The push parser: :meth:`feed` any chunks, then :meth:`finish`. Everything it decides depends on the
    bytes only (lines, fixed limits), never on where the chunks were cut."""

    def __init__(self, limits: MimeLimits, budget: WorkBudget | None = None) -> None:
        self.limits = limits
        self.budget = budget
        self.size = 0
        self.parts: list[Part] = []
        self.text = TextBudget(limits.max_text_bytes)
        self.unscannable: str | None = None
        self._defects: dict[str, None] = {}
        self.top_fields: list[tuple[bytes, bytes]] = []
        self._buf = bytearray()
        self._pos = 0
        self._at_line_start = True
        self._pending_eol = b""
        self._frames: list[Frame] = []
        self._entity: _Entity | None = _Entity(0, "", "1", "text/plain", top=True)
        self._leaf: _Leaf | None = None
        self._mode = _HEADERS
        self._entities = 0
        self._decoded = 0

    # -- bookkeeping --

    def defect(self, text: str) -> None:
        if len(self._defects) < _MAX_DEFECTS:
            self._defects[text] = None

    def broken(self, reason: str) -> None:
        """Inspection goes on, but the result cannot be trusted as complete."""
        self.defect(reason)
        if self.unscannable is None:
            self.unscannable = reason

    def _stop(self, reason: str) -> None:
        """A limit: keep what was found and read the rest without looking."""
        self.broken(reason)
        if self._entity is not None and self._entity.top:
            # The field being read is kept as far as it fit (its continuation may be cut).
            self._entity.close_field()
            self.top_fields = list(self._entity.fields)
        if self._leaf is not None:
            self._leaf.finish(complete=False)
            self._leaf = None
        self._entity = None
        self._mode = _DRAIN
        self._buf = bytearray()
        self._pos = 0

    def take_budget(self, wanted: int) -> int:
        allowed = min(wanted, self.limits.max_decoded_bytes - self._decoded)
        self._decoded += allowed
        return allowed

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
                self._stop(f"header block larger than {limit} bytes")
                return False
            if not final:
                return False
            end = following = n
        else:
            following = end + 1
            if entity.header_bytes + (following - pos) > limit:
                self._stop(f"header block larger than {limit} bytes")
                return False
        line = bytes(buf[pos:end])
        if line.endswith(b"\r"):
            line = line[:-1]
        if b"\x00" in line:
            self.defect("NUL byte in a header block")
        if line.startswith(b"--") and (hit := match_delimiter(self._frames, line)) is not None:
            self._pos, self._at_line_start = following, True
            self._delimiter(*hit)
            return True
        if not line:
            self._pos, self._at_line_start = following, True
            entity.header_bytes += following - pos
            self._end_headers()
            return True
        if line[0] in b" \t":
            if not entity.continue_field(line):
                self.defect("header block starts with a continuation line")
        elif (field := FIELD_START.match(line)) is not None:
            if field.group(2):
                self.defect(f"white space before the colon of {text_of(field.group(1)[:40])!r}")
            entity.start_field(field.group(1), line[field.end() :])
        else:
            # Not a header field: the block ended without its blank line and this line is the body's first.
            self.defect("header block not ended by a blank line")
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
        if entity.top:
            self.top_fields = entity.fields
        kind, params, cte, disposition, names = self._content(entity)
        self._mode = _IGNORE
        if kind.startswith("multipart/"):
            boundaries = params.get("boundary", [])
            boundary = boundaries[0].encode("utf-8", "surrogateescape") if boundaries else b""
            if len(set(boundaries)) > 1:
                self.broken(f"part {entity.leaf_path}: conflicting multipart boundaries")
            elif not boundary or len(boundary) > MAX_BOUNDARY:
                self.broken(f"part {entity.leaf_path}: multipart without a usable boundary")
            else:
                self._frames.append(Frame(boundary, entity.depth, entity.path, kind == "multipart/digest"))
            return
        if kind in ("message/rfc822", "message/global") and cte in IDENTITY_ENCODINGS:
            inner = f"{entity.path}.1" if entity.path else "1"
            self._begin_entity(entity.depth + 1, entity.path, inner, "text/plain")
            return
        if kind == "message/partial":
            self.broken(f"part {entity.leaf_path}: message/partial (content split across messages)")
        self._leaf = _Leaf(self, entity, kind, cte, params, disposition, names)
        self._mode = _LEAF

    def _content(self, entity: _Entity) -> tuple[str, dict[str, list[str]], str, str | None, tuple[str, ...]]:
        where = f"part {entity.leaf_path}"
        content = read_content_fields(entity.values, entity.default_type)
        for field in content.conflicts:
            self.broken(f"{where}: conflicting {field} fields")
        for defect in content.defects:
            self.defect(f"{where}: {defect}")
        return content.kind, content.params, content.transfer_encoding, content.disposition, content.names

    def _begin_entity(self, depth: int, path: str, leaf_path: str, default_type: str) -> None:
        self._entities += 1
        if self._entities > self.limits.max_parts:
            self._stop(f"more than {self.limits.max_parts} MIME parts")
        elif depth > self.limits.max_depth:
            self.broken(f"MIME nesting deeper than {self.limits.max_depth}")
            self._mode = _IGNORE
        else:
            self._entity = _Entity(depth, path, leaf_path, default_type, top=False)
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
            hit = match_delimiter(self._frames, text[:-1] if text.endswith(b"\r") else text)
            if hit is None:
                line = self._next_candidate(end) if end < n else -1
                continue
            self._emit(start, line)
            self._pending_eol = b""  # the line break before a delimiter belongs to the delimiter
            if self._mode == _DRAIN:
                return False
            self._pos, self._at_line_start = following, True
            self._delimiter(*hit)
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
        assert self._leaf is not None
        if data:
            self._leaf.feed(data)
            if self._leaf.truncated:
                self._stop(f"decoded content larger than {self.limits.max_decoded_bytes} bytes")

    def _delimiter(self, index: int, close: bool) -> None:
        self._finish_current(complete=True)
        if self._mode == _DRAIN:
            return
        if index < len(self._frames) - 1:
            self.broken("multipart not closed before its enclosing multipart's boundary")
            del self._frames[index + 1 :]
        frame = self._frames[index]
        self._mode = _IGNORE
        if close:
            self._frames.pop()
            return
        path = frame.next_part()
        self._begin_entity(frame.depth + 1, path, path, frame.default_type)

    def _finish_current(self, complete: bool) -> None:
        """The current entity ends here (a delimiter, the end of the message)."""
        while self._mode == _HEADERS:  # a header block with no body (an encapsulated message's may nest)
            self._end_headers()
        if self._mode == _LEAF and self._leaf is not None:
            leaf, self._leaf = self._leaf, None
            leaf.finish(complete)
            if leaf.truncated:
                self._stop(f"decoded content larger than {self.limits.max_decoded_bytes} bytes")
                return
        if self._mode != _DRAIN:
            self._mode = _IGNORE

    # -- result --

    def result(self) -> MessageInfo:
        headers: list[tuple[str, str]] = []
        for raw_name, raw_value in self.top_fields:
            name = text_of(raw_name)
            value = text_of(raw_value)
            if name.lower() in _UNSTRUCTURED or name.lower().startswith("x-"):
                value = decode_encoded_words(value)
            headers.append((name, value))
        fields: dict[str, list[str]] = {}
        for name, value in headers:
            fields.setdefault(name.lower(), []).append(value)
        from_fields = [text_of(v) for n, v in self.top_fields if n.lower() == b"from"]
        from_addresses, from_ambiguous = originators(from_fields, self.defect)

        def first(name: str) -> str | None:
            values = fields.get(name)
            return values[0].strip() if values else None

        to, cc = self._recipients("to"), self._recipients("cc")
        return MessageInfo(
            headers=tuple(headers),
            from_addresses=tuple(from_addresses),
            to=to,
            cc=cc,
            subject=first("subject"),
            message_id=first("message-id"),
            date=first("date"),
            from_ambiguous=from_ambiguous,
            parts=tuple(self.parts),
            text="".join(self.text.pieces),
            text_truncated=self.text.truncated,
            unscannable=self.unscannable,
            defects=tuple(self._defects),
            size=self.size,
        )

    def _recipients(self, name: str) -> tuple[str, ...]:
        wanted = name.encode()
        return recipients(name, [text_of(v) for n, v in self.top_fields if n.lower() == wanted], self.defect)
