"""The entry names of an archive attachment, archives inside it to a bounded depth, and whether the archive is
one to distrust.

The MIME walker hands each leaf part's decoded bytes to an :class:`ArchiveCollector`. Its first
:data:`HEAD_BYTES` say whether it is an archive (zip, tar, gzip, bzip2, xz, RAR; 7z, cab and zstd are
recognised but cannot be listed, see :mod:`~dcrouter.processing.archiveformats`); an archive is kept in a
spooled temporary file (in memory up to :data:`MEMORY_BYTES`, on disk after) up to ``max_bytes``, and at the
part's end :func:`list_archive` lists it.

Listing reads each format's directory (a zip's central directory, tar headers, RAR block headers) for the
names and declared sizes, and looks at the first bytes of every entry's content: an entry that is an archive
itself is decompressed into its own spooled file (again at most ``max_bytes``) and listed in turn, its names
given as ``outer.zip/inner name``, down to ``max_depth`` levels (the attachment is level 1; a tar inside a
gzip, bzip2 or xz file is the same level, as users see ``.tar.gz`` as one archive). Entries, and their
declared sizes, are counted across all levels together.

The listing is an :class:`ArchiveListing`: every entry name (kept even when there is a problem, so an
encrypted zip holding ``setup.exe`` can still be refused for that name) and the first ``problem`` found: too
large to keep, not readable, an encrypted entry, too many entries, a bomb by declared or actual sizes or by
one entry's ratio, archives nested too deep, a format that cannot be listed, content that cannot be opened.
A problem means the content cannot be judged: the scanner's policy decides, it is never taken as clean. Once
there is a problem no further content is decompressed. Nothing here raises on hostile input, except
:class:`ArchiveWorkExceeded` when the caller set a :class:`WorkBudget`.
"""

from __future__ import annotations

import tempfile
from contextlib import closing
from dataclasses import dataclass
from typing import IO

from dcrouter.processing.archiveformats import (
    COMPRESSED,
    HEAD_BYTES,
    TAR,
    UNLISTABLE,
    EncryptedArchive,
    Entry,
    TooManyEntries,
    archive_kind,
    entries,
)

__all__ = [
    "HEAD_BYTES",
    "ArchiveCollector",
    "ArchiveLimits",
    "ArchiveListing",
    "ArchiveWorkExceeded",
    "WorkBudget",
    "archive_kind",
    "list_archive",
    "printable",
]

#: Decoded bytes kept in memory before a spooled copy moves to a temporary file.
MEMORY_BYTES = 1024 * 1024
#: An entry expanding to more than ``max_ratio`` times its compressed size *and* to more than this many bytes
#: is a bomb (real documents rarely pass both).
RATIO_FLOOR = 1024 * 1024
#: Longest entry name kept; longer ones keep their end (where the extension is).
MAX_NAME_CHARS = 1024
#: Octets read from an entry at a time when it is decompressed into a spooled file.
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int = 16 * 1024 * 1024  # an archive kept to be listed: the attachment, each one inside it
    max_expanded: int = 256 * 1024 * 1024  # uncompressed size of all entries of all levels together
    max_entries: int = 10_000  # entries of all levels together
    max_depth: int = 3  # archive levels opened (1: the attachment only)
    max_ratio: int = 100  # one entry's uncompressed / compressed size (beyond RATIO_FLOOR bytes)


@dataclass(frozen=True)
class ArchiveListing:
    names: tuple[str, ...] = ()
    problem: str | None = None


class ArchiveWorkExceeded(Exception):
    """Listing would decompress more than the caller's :class:`WorkBudget` allows here."""


class WorkBudget:
    """How many bytes listing may decompress before :class:`ArchiveWorkExceeded` is raised: lets the caller
    list small messages on the reactor thread and move the rare costly one to a thread pool."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def spend(self, octets: int) -> None:
        self.left -= octets
        if self.left < 0:
            raise ArchiveWorkExceeded()


class ArchiveCollector:
    """Keeps the decoded bytes of one part, fed in any pieces, when they are an archive, and lists them at the
    end. Memory: :data:`HEAD_BYTES` until the kind is known, then at most :data:`MEMORY_BYTES` (the rest is
    on disk), plus what listing needs (bounded by ``max_entries``)."""

    def __init__(
        self, limits: ArchiveLimits, names: tuple[str, ...], budget: WorkBudget | None = None
    ) -> None:
        self._limits = limits
        self._names = names
        self._budget = budget
        self._head: bytearray | None = bytearray()  # until the kind is decided
        self._kind: str | None = None
        self._file: tempfile.SpooledTemporaryFile[bytes] | None = None
        self._size = 0
        self._too_large = False

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if self._head is not None:
            self._head += data
            if len(self._head) >= HEAD_BYTES:
                self._decide()
            return
        self._write(data)

    def _decide(self) -> None:
        head, self._head = bytes(self._head or b""), None
        self._kind = archive_kind(head[:HEAD_BYTES])
        if self._kind is not None:
            self._file = tempfile.SpooledTemporaryFile(max_size=MEMORY_BYTES)  # noqa: SIM115
            self._write(head)

    def _write(self, data: bytes) -> None:
        if self._file is None:
            return
        if self._size + len(data) > self._limits.max_bytes:
            self._too_large = True
            self.close()
            return
        self._file.write(data)
        self._size += len(data)

    def finish(self, complete: bool) -> ArchiveListing | None:
        """The listing of what was fed, None when it is not an archive (``complete``: the part ended
        normally, not cut by a limit)."""
        try:
            if self._head is not None:
                self._decide()
            if self._kind is None:
                return None
            if self._too_large:
                return ArchiveListing(problem="archive too large")
            if not complete or self._file is None:
                return ArchiveListing(problem="archive incomplete")
            self._file.seek(0)
            return list_archive(self._file, self._kind, self._names, self._limits, self._budget)
        finally:
            self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def list_archive(
    stream: IO[bytes],
    kind: str,
    names: tuple[str, ...] = (),
    limits: ArchiveLimits = ArchiveLimits(),
    budget: WorkBudget | None = None,
) -> ArchiveListing:
    """The entry names of the ``kind`` archive in ``stream`` (seekable, at its start), called ``names``, with
    the archives inside it, and the first problem found."""
    lister = _Lister(limits, budget)
    try:
        lister.list(stream, kind, names, 1, "")
    except _Stop:
        pass
    return ArchiveListing(tuple(lister.names), lister.problem)


class _Stop(Exception):
    """A limit was crossed: nothing more is listed."""


class _Lister:
    """One attachment's listing across levels: the names, the counts and the first problem."""

    def __init__(self, limits: ArchiveLimits, budget: WorkBudget | None) -> None:
        self.limits = limits
        self.budget = budget
        self.names: list[str] = []
        self.problem: str | None = None
        self.entries = 0
        self.expanded = 0

    def fail(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem

    def stop(self, problem: str) -> None:
        self.fail(problem)
        raise _Stop()

    def list(self, stream: IO[bytes], kind: str, names: tuple[str, ...], level: int, prefix: str) -> None:
        if kind in UNLISTABLE:
            self.fail(f"{kind} archive: cannot be listed")
            return
        try:
            remaining = self.limits.max_entries - self.entries
            with closing(entries(kind, stream, names, remaining)) as found:
                for entry in found:
                    self._entry(entry, kind, level, prefix)
        except (_Stop, ArchiveWorkExceeded):
            raise
        except TooManyEntries:
            self.stop(f"too many archive entries (over {self.limits.max_entries})")
        except EncryptedArchive:
            self.fail("encrypted archive")
        except Exception as e:  # noqa: BLE001 (hostile input: every reader raises many kinds; all mean "unreadable")
            self.fail(f"corrupt archive: {printable(str(e) or type(e).__name__, 80)}")

    def _entry(self, entry: Entry, kind: str, level: int, prefix: str) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            self.stop(f"too many archive entries (over {self.limits.max_entries})")
        for name in entry.names:
            self.names.append(_kept_name(prefix + name))
        label = printable(entry.names[0] if entry.names else kind, 60)
        ratio = entry.size / max(entry.packed or 0, 1)
        if entry.packed is not None and ratio > self.limits.max_ratio and entry.size > RATIO_FLOOR:
            self.fail(f"zip bomb: ratio {int(ratio)}:1 in {label}")
        self._grow(entry.size)
        if entry.encrypted:
            self.fail("encrypted archive")
        if self.problem is not None:
            return  # the content is not to be trusted: nothing more is decompressed
        if entry.unopenable is not None:
            self.fail(entry.unopenable)
            return
        if entry.opener is not None:
            self._open(entry, kind, level, prefix, label)

    def _grow(self, octets: int) -> None:
        self.expanded += octets
        if self.expanded > self.limits.max_expanded:
            self.fail(f"zip bomb: expands to {self.expanded} bytes")

    def _open(self, entry: Entry, outer: str, level: int, prefix: str, label: str) -> None:
        """Look at what the entry holds; an archive is decompressed into a spooled file and listed."""
        assert entry.opener is not None
        with entry.opener() as member:
            head = self._read(member, HEAD_BYTES)
            kind = archive_kind(head)
            if kind is None:
                return
            # A tar in a compressed file is one archive (.tar.gz), its entries listed as the file's own.
            same = outer in COMPRESSED and kind == TAR
            inner_level = level if same else level + 1
            if inner_level > self.limits.max_depth:
                self.fail(f"archives nested deeper than {self.limits.max_depth} levels")
                return
            if kind in UNLISTABLE:
                self.fail(f"{kind} archive inside an archive: cannot be listed")
                return
            copy = self._expand(head, member, entry, label)
        if copy is None:
            return
        with copy:
            copy.seek(0)
            inner_prefix = prefix if same or not entry.names else f"{prefix}{entry.names[0]}/"
            self.list(copy, kind, entry.names, inner_level, inner_prefix)

    def _read(self, member: IO[bytes], size: int) -> bytes:
        pieces = []
        left = size
        while left > 0:
            data = member.read(left)
            if not data:
                break
            pieces.append(data)
            left -= len(data)
        data = b"".join(pieces)
        if self.budget is not None:
            self.budget.spend(len(data))
        return data

    def _expand(
        self, head: bytes, member: IO[bytes], entry: Entry, label: str
    ) -> tempfile.SpooledTemporaryFile[bytes] | None:
        """The whole content in a spooled file, or None (and a problem) when it crosses a limit. Declared
        sizes were counted already; what a compressed file turns out to hold beyond its declared size is
        counted here, and its ratio checked as it grows."""
        copy: tempfile.SpooledTemporaryFile[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=MEMORY_BYTES
        )
        bomb = max(RATIO_FLOOR, (entry.packed or 0) * self.limits.max_ratio)
        try:
            size = len(head)
            copy.write(head)
            while data := self._read(member, _CHUNK):
                size += len(data)
                if size > self.limits.max_bytes:
                    self.fail("archive too large")
                elif entry.packed is not None and size > bomb:
                    self.fail(f"zip bomb: ratio over {self.limits.max_ratio}:1 in {label}")
                if self.problem is not None:
                    break
                copy.write(data)
            if self.problem is None and size > entry.size:
                self._grow(size - entry.size)
        except BaseException:
            copy.close()
            raise
        if self.problem is not None:
            copy.close()
            return None
        return copy


def _kept_name(name: str) -> str:
    return name if len(name) <= MAX_NAME_CHARS else name[-MAX_NAME_CHARS:]


def printable(text: str, limit: int) -> str:
    """``text`` as printable ASCII (anything else becomes ``?``), at most ``limit`` characters: safe in a log
    line or an SMTP reply. A longer text keeps its start and its end."""
    cleaned = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    if len(cleaned) <= limit:
        return cleaned
    head = (limit - 3) // 2
    return cleaned[:head] + "..." + cleaned[len(cleaned) - (limit - 3 - head) :]
