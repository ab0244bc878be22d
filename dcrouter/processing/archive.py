"""The entry names of a zip attachment, and whether the zip is one to distrust, without extracting anything.

The MIME walker hands a :class:`ZipCollector` the decoded bytes of a part that starts like a zip; they are
kept in a spooled temporary file (in memory up to :data:`MEMORY_BYTES`, on disk after) up to a cap, and at
the part's end :func:`list_zip` reads the central directory with :mod:`zipfile`. Only the central directory
is read: the declared sizes, flags and names of the entries. An archive inside the archive is not opened (one
level); the attachment scanner judges it by its name.

The listing is a :class:`ZipListing`: every entry name (kept even when there is a problem, so an encrypted
zip holding ``setup.exe`` can still be refused for that name) and the first ``problem`` found: too large to
keep, not a readable zip, an encrypted entry, too many entries, a zip bomb by its declared sizes. A problem
means the content cannot be judged: the scanner's policy decides, it is never taken as clean. Nothing here
raises on hostile input."""

from __future__ import annotations

import tempfile
import zipfile
from dataclasses import dataclass
from typing import IO

#: Leading bytes of a zip (a local file header, or the end record of an empty archive).
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
#: How many leading bytes :func:`is_zip` needs.
MAGIC_BYTES = 4
#: Decoded bytes kept in memory before the spooled copy moves to a temporary file.
MEMORY_BYTES = 1024 * 1024
#: An entry that expands more than this many times its compressed size...
MAX_RATIO = 100
#: ...and to more than this many bytes is a zip bomb (real documents rarely pass both).
RATIO_FLOOR = 1024 * 1024
#: Longest entry name kept; longer ones keep their end (where the extension is).
MAX_NAME_CHARS = 1024

_CENTRAL_ENTRY = b"PK\x01\x02"


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int = 16 * 1024 * 1024  # decoded archive kept for listing; over it: "archive too large"
    max_expanded: int = 256 * 1024 * 1024  # declared uncompressed size of all entries together
    max_entries: int = 10_000


@dataclass(frozen=True)
class ZipListing:
    names: tuple[str, ...] = ()
    problem: str | None = None


def is_zip(head: bytes) -> bool:
    """Whether content starting with ``head`` (at least 4 bytes) is read as a zip archive."""
    return head.startswith(ZIP_MAGIC)


class ZipCollector:
    """Keeps the decoded bytes of one part, fed in any pieces, and lists them as a zip at the end. Memory use
    is bounded by :data:`MEMORY_BYTES` plus the listing of at most ``max_entries`` entries: the central
    directory signatures are counted as the bytes go by, and :mod:`zipfile` is not asked to read a directory
    that could hold more entries than that (it builds an object per entry)."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self._limits = limits
        self._file: tempfile.SpooledTemporaryFile[bytes] | None = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=MEMORY_BYTES
        )
        self._size = 0
        self._signatures = 0
        self._tail = b""
        self._too_large = False

    def feed(self, data: bytes) -> None:
        if self._file is None or not data:
            return
        if self._size + len(data) > self._limits.max_bytes:
            self._too_large = True
            self.close()
            return
        # A signature cut by the end of one piece is completed by the next: count across the seam.
        self._signatures += (self._tail + data[:3]).count(_CENTRAL_ENTRY) + data.count(_CENTRAL_ENTRY)
        self._tail = (self._tail + data)[-3:] if len(data) < 3 else data[-3:]
        self._file.write(data)
        self._size += len(data)

    def finish(self, complete: bool) -> ZipListing:
        """The listing of what was fed (``complete``: the part ended normally, not cut by a limit)."""
        try:
            if self._too_large:
                return ZipListing(problem="archive too large")
            if not complete or self._file is None:
                return ZipListing(problem="archive incomplete")
            if self._signatures > self._limits.max_entries:
                return ZipListing(problem=f"too many archive entries (over {self._limits.max_entries})")
            self._file.seek(0)
            return list_zip(self._file, self._limits)
        finally:
            self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def list_zip(stream: IO[bytes], limits: ArchiveLimits = ArchiveLimits()) -> ZipListing:
    """The entry names of the zip in ``stream`` (seekable) and the first problem found, from the central
    directory alone. The caller bounds the directory's size (see :class:`ZipCollector`)."""
    try:
        with zipfile.ZipFile(stream) as archive:
            entries = archive.infolist()
    except Exception as e:  # noqa: BLE001 (hostile input: zipfile raises many kinds; all mean "unreadable")
        return ZipListing(problem=f"corrupt archive: {printable(str(e) or type(e).__name__, 80)}")
    names = tuple(_kept_name(entry.filename) for entry in entries)
    if len(entries) > limits.max_entries:
        return ZipListing(
            names[: limits.max_entries], f"too many archive entries (over {limits.max_entries})"
        )
    return ZipListing(names, _problem(entries, limits))


def _problem(entries: list[zipfile.ZipInfo], limits: ArchiveLimits) -> str | None:
    expanded = 0
    for entry in entries:
        if entry.flag_bits & 0x1:
            return "encrypted archive"
        ratio = entry.file_size / max(entry.compress_size, 1)
        if ratio > MAX_RATIO and entry.file_size > RATIO_FLOOR:
            return f"zip bomb: ratio {int(ratio)}:1 in {printable(entry.filename, 60)}"
        expanded += entry.file_size
    if expanded > limits.max_expanded:
        return f"zip bomb: expands to {expanded} bytes"
    return None


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
