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

This module is the inspection and the public API. The structure is read by
:mod:`~dcrouter.processing.mimewalk` (the walker the rewriter uses too), header values by
:mod:`~dcrouter.processing.mimeheaders`, bodies decoded by :mod:`~dcrouter.processing.decoding`, text for
scanners kept by :mod:`~dcrouter.processing.mimetext`; the header and address functions are importable from
here too.
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
from dcrouter.processing.decoding import TransferDecoder, transfer_decoder
from dcrouter.processing.filetype import SNIFF_BYTES, sniff_type
from dcrouter.processing.mailboxes import originators, recipients, split_address_list, strict_mailboxes
from dcrouter.processing.mimeheaders import ContentFields, decode_encoded_words, parse_structured, text_of
from dcrouter.processing.mimetext import TextBudget, TextPart
from dcrouter.processing.mimewalk import Entity, MimeWalker

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
    inspection = _Inspection(limits, budget)
    walker = inspection.walker
    while chunk := stream.read(chunk_size):
        walker.feed(chunk)
    walker.finish()
    return inspection.result()


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


# -- the inspection --

_UNSTRUCTURED = frozenset({"subject", "comments", "keywords", "content-description", "thread-topic"})
_MAX_DEFECTS = 100


class _Leaf:
    """The decoded content of one leaf part as it streams by: counted, hashed, sniffed, maybe read as text."""

    def __init__(self, inspection: _Inspection, entity: Entity, content: ContentFields) -> None:
        self._inspection = inspection
        self._entity = entity
        self._kind = kind = content.kind
        self._cte = content.transfer_encoding
        self._disposition = content.disposition
        self._names = content.names
        self._decoder: TransferDecoder | None = transfer_decoder(self._cte)
        self._head = bytearray()
        self._sha = hashlib.sha256()
        self.size = 0
        self.truncated = False
        self.stop_reason: str | None = None
        self._done = False
        self._text: TextPart | None = None
        self._archive: ArchiveCollector | None = None
        limits = inspection.limits
        if limits.max_archive_bytes > 0:
            self._archive = ArchiveCollector(limits.archive, self._names, inspection.budget)
        if kind in ("text/plain", "text/html") and self._disposition != "attachment":
            charsets = content.params.get("charset")
            charset = charsets[0] if charsets else None
            self._text = TextPart(charset, kind == "text/html", inspection.text)

    def feed(self, data: bytes) -> None:
        self._take(self._decoder.feed(data) if self._decoder is not None else data)
        self._check_budget()

    def _take(self, decoded: bytes) -> None:
        if not decoded or self.truncated:
            return
        allowed = self._inspection.take_budget(len(decoded))
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

    def _check_budget(self) -> None:
        if self.truncated:
            self.stop_reason = (
                f"decoded content larger than {self._inspection.limits.max_decoded_bytes} bytes"
            )

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
                self._inspection.defect(f"part {path}: {defect}")
        complete = complete and not self.truncated
        listing = self._archive.finish(complete) if self._archive is not None else None
        self._archive = None
        self._inspection.parts.append(
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
        self._check_budget()


class _Inspection:
    """The walk's reader: leaf parts described, defects and the first reason the result is incomplete kept,
    the result assembled at the end. Everything it decides depends on the bytes only, never on where the
    chunks were cut."""

    wants_other = False  # preambles and epilogues say nothing about the message

    def __init__(self, limits: MimeLimits, budget: WorkBudget | None = None) -> None:
        self.limits = limits
        self.budget = budget
        self.parts: list[Part] = []
        self.text = TextBudget(limits.max_text_bytes)
        self.unscannable: str | None = None
        self._defects: dict[str, None] = {}
        self._decoded = 0
        self.walker = MimeWalker(self, limits)
        self.walker.start(Entity(0, "", "1", "text/plain", top=True))

    # -- the walker's reader --

    def entity(self, depth: int, path: str, leaf_path: str, default_type: str, in_message: bool) -> Entity:
        return Entity(depth, path, leaf_path, default_type, in_message=in_message)

    def defect(self, text: str) -> None:
        if len(self._defects) < _MAX_DEFECTS:
            self._defects[text] = None

    def problem(self, text: str) -> None:
        """Inspection goes on, but the result cannot be trusted as complete."""
        self.defect(text)
        if self.unscannable is None:
            self.unscannable = text

    def container(self, entity: Entity) -> None:
        pass

    def leaf(self, entity: Entity, content: ContentFields) -> _Leaf:
        return _Leaf(self, entity, content)

    def other(self, data: bytes) -> None:
        pass

    def delimiter(self, eol_before: bytes, line: bytes, newline: bool, cut: Entity | None) -> None:
        pass

    def take_budget(self, wanted: int) -> int:
        allowed = min(wanted, self.limits.max_decoded_bytes - self._decoded)
        self._decoded += allowed
        return allowed

    # -- result --

    def result(self) -> MessageInfo:
        assert self.walker.top is not None
        top_fields = self.walker.top.fields  # as far as they were read when a limit stopped the walk
        headers: list[tuple[str, str]] = []
        for raw_name, raw_value in top_fields:
            name = text_of(raw_name)
            value = text_of(raw_value)
            if name.lower() in _UNSTRUCTURED or name.lower().startswith("x-"):
                value = decode_encoded_words(value)
            headers.append((name, value))
        fields: dict[str, list[str]] = {}
        for name, value in headers:
            fields.setdefault(name.lower(), []).append(value)
        from_fields = [text_of(v) for n, v in top_fields if n.lower() == b"from"]
        from_addresses, from_ambiguous = originators(from_fields, self.defect)

        def first(name: str) -> str | None:
            values = fields.get(name)
            return values[0].strip() if values else None

        to, cc = self._recipients(top_fields, "to"), self._recipients(top_fields, "cc")
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
            size=self.walker.size,
        )

    def _recipients(self, fields: list[tuple[bytes, bytes]], name: str) -> tuple[str, ...]:
        wanted = name.encode()
        return recipients(name, [text_of(v) for n, v in fields if n.lower() == wanted], self.defect)
