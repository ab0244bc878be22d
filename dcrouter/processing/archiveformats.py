"""The archive formats the attachment inspector opens, each read as a sequence of :class:`Entry`.

- zip (:mod:`zipfile`): every entry from the central directory; content decompressed on demand.
- tar (:mod:`tarfile`, uncompressed: a compressed tar arrives here already decompressed): every member.
- gzip, bzip2, xz (:mod:`gzip`, :mod:`bz2`, :mod:`lzma`): one entry, the compressed file; its names are the
  original name a gzip header may carry and the attachment's names without the suffix (``x.exe.gz`` holds
  ``x.exe``, ``x.tgz`` holds ``x.tar``), as ``gunzip -N`` and ``gunzip`` would save it.
- RAR 4 and 5 (``rarfile``, pure Python, no external tool): every entry; the content of stored (uncompressed)
  entries. Compressed RAR content would need ``unrar``, which is not free software and is never run here.
- 7z, cab and zstd are recognised (:data:`UNLISTABLE`) but not read: no library the project can vouch for
  reads them without adding compiled decompressors for hostile input (docs/processing.md).

Nothing here decides policy: :mod:`dcrouter.processing.archive` counts, limits and recurses. Readers need a
seekable stream and raise on damage (the caller treats any exception as "cannot be read").
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import struct
import tarfile
import zipfile
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from functools import partial
from typing import IO, cast

import rarfile

ZIP, TAR, GZIP, BZIP2, XZ, RAR = "zip", "tar", "gzip", "bzip2", "xz", "rar"
SEVEN_ZIP, CAB, ZSTD = "7z", "cab", "zstd"
#: Single compressed files: their content may be a tar (one archive to its users: ``.tar.gz``).
COMPRESSED = frozenset({GZIP, BZIP2, XZ})
#: Recognised by their magic numbers but never listed: an attachment of these kinds is unscannable.
UNLISTABLE = frozenset({SEVEN_ZIP, CAB, ZSTD})
#: Leading bytes :func:`archive_kind` looks at (a tar header is one 512-byte block).
HEAD_BYTES = 512
#: Longest original name read from a gzip header.
_MAX_GZIP_NAME = 1024
#: RAR 5 headers are at most 2 MiB (the format's own limit); a larger size is damage.
_MAX_RAR5_HEADER = 2 * 1024 * 1024

_RAR4 = b"Rar!\x1a\x07\x00"
_RAR5 = b"Rar!\x1a\x07\x01\x00"
_CENTRAL_ENTRY = b"PK\x01\x02"
# Suffixes a compressed file's saved name loses, and what they leave (".tgz" → ".tar").
_SUFFIXES = {
    GZIP: ((".tgz", ".tar"), (".taz", ".tar"), (".gz", ""), (".gzip", ""), (".z", "")),
    BZIP2: ((".tbz2", ".tar"), (".tbz", ".tar"), (".bz2", ""), (".bz", "")),
    XZ: ((".txz", ".tar"), (".xz", "")),
}


class ArchiveError(Exception):
    """The archive cannot be read; the text says why."""


class EncryptedArchive(ArchiveError):
    """Entries or headers are encrypted: the content cannot be judged."""


class TooManyEntries(ArchiveError):
    """The archive declares more entries than the caller allows; it was not parsed."""


@dataclass(frozen=True)
class Entry:
    names: tuple[str, ...]  # usually one; a compressed file's possible names; empty when it has none
    size: int  # uncompressed size as declared (0: unknown, as for bzip2 and xz)
    packed: int | None  # compressed size when the format declares it
    encrypted: bool = False
    #: Opens the content (a binary stream, closed by the caller); None for directories and links.
    opener: Callable[[], IO[bytes]] | None = None
    #: Why the content cannot be opened (compressed RAR content), when it cannot.
    unopenable: str | None = None


def archive_kind(head: bytes) -> str | None:
    """The archive format content starting with ``head`` (up to :data:`HEAD_BYTES`) is in, or None."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return ZIP
    # gzip with deflate and no reserved flag bits; bzip2 with its block or end-of-stream magic: text that
    # merely starts with "BZh" is not taken for an archive.
    if head[:3] == b"\x1f\x8b\x08" and len(head) > 3 and not head[3] & 0xE0:
        return GZIP
    if head[:3] == b"BZh" and head[3:4] in b"123456789" and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
        return BZIP2
    if head.startswith(b"\xfd7zXZ\x00"):
        return XZ
    if head.startswith((_RAR4, _RAR5)):
        return RAR
    if head.startswith(b"7z\xbc\xaf\x27\x1c"):
        return SEVEN_ZIP
    if head.startswith(b"MSCF\x00\x00\x00\x00"):
        return CAB
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return ZSTD
    if len(head) >= 512 and _is_tar_header(head[:512]):
        return TAR
    return None


def _is_tar_header(block: bytes) -> bool:
    """A tar header block: its checksum field (octal, at 148) matches the sum of its bytes with that field
    read as spaces. Holds for ustar, GNU and the old v7 format alike, which has no magic string."""
    field = block[148:156].replace(b"\x00", b" ").strip()
    if not field or any(c not in b"01234567" for c in field):
        return False
    return int(field, 8) == sum(block[:148]) + 8 * 0x20 + sum(block[156:])


def entries(
    kind: str, stream: IO[bytes], names: tuple[str, ...], max_entries: int
) -> Generator[Entry, None, None]:
    """The entries of the ``kind`` archive in ``stream`` (seekable, at its start). ``names``: what the archive
    itself is called (a compressed file's content is named after it). An archive declaring more than
    ``max_entries`` entries raises :class:`TooManyEntries` before its directory is parsed."""
    if kind == ZIP:
        return _zip(stream, max_entries)
    if kind == TAR:
        return _tar(stream)
    if kind in COMPRESSED:
        return _compressed(kind, stream, names)
    if kind == RAR:
        return _rar(stream, max_entries)
    raise ArchiveError(f"{kind} archives cannot be listed")


# -- zip --


def central_entries(stream: IO[bytes], chunk_size: int = 64 * 1024) -> int:
    """How many central directory signatures ``stream`` holds (an upper bound of the zip's entries), read in
    chunks, so that :mod:`zipfile` (an object per entry) is never asked to parse an unbounded directory."""
    count = 0
    tail = b""
    while data := stream.read(chunk_size):
        count += (tail + data[:3]).count(_CENTRAL_ENTRY) + data.count(_CENTRAL_ENTRY)
        tail = (tail + data)[-3:]
    stream.seek(0)
    return count


def _zip(stream: IO[bytes], max_entries: int) -> Generator[Entry, None, None]:
    if central_entries(stream) > max_entries:
        raise TooManyEntries(max_entries)
    with zipfile.ZipFile(stream) as archive:
        for info in archive.infolist():
            yield Entry(
                (info.filename,),
                info.file_size,
                info.compress_size,
                encrypted=bool(info.flag_bits & 0x1),
                opener=None if info.is_dir() else partial(archive.open, info),
            )


# -- tar --


#: Longest run of digits a pax extended header may hold. CPython before 3.11.10 and 3.12.6 searches pax
#: headers with patterns that take quadratic time on a long digit run (CVE-2024-6232): 64 KiB of digits is
#: minutes of CPU. Real headers hold numbers of at most ~30 digits (a time with nanoseconds, a size).
MAX_PAX_DIGITS = 64
#: Largest pax extended header read (real ones are a few hundred bytes: a long path, times, ids).
MAX_PAX_HEADER = 64 * 1024
_PAX_TYPES = frozenset({b"x", b"g", b"X"})
_DIGIT_RUN = re.compile(rb"[0-9]{%d}" % (MAX_PAX_DIGITS + 1))


def _tar_size(block: bytes) -> int:
    """The size field of a header block: octal text, or GNU's base-256 form (high bit of the first byte)."""
    field = block[124:136]
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.replace(b"\x00", b" ").strip()
    return int(text, 8) if text else 0


def check_pax_headers(stream: IO[bytes]) -> None:
    """Walk the tar headers in ``stream`` (seekable, at its start; left there) and refuse, before
    :mod:`tarfile` sees them, pax extended headers that would make it spend unbounded time: larger than
    :data:`MAX_PAX_HEADER` or holding a run of more than :data:`MAX_PAX_DIGITS` digits. A damaged header ends
    the walk: :mod:`tarfile` judges the rest. Costs one 512-byte read per member plus the pax headers.

    :raises ArchiveError: such a header was found.
    """
    start = stream.tell()
    try:
        while True:
            block = stream.read(512)
            if len(block) < 512 or not _is_tar_header(block):
                return
            try:
                size = _tar_size(block)
            except ValueError:
                return
            if block[156:157] in _PAX_TYPES:
                if size > MAX_PAX_HEADER:
                    raise ArchiveError(f"a tar pax header of {size} bytes (more than {MAX_PAX_HEADER})")
                if _DIGIT_RUN.search(stream.read(size)):
                    raise ArchiveError(f"a tar pax header with a run of over {MAX_PAX_DIGITS} digits")
                stream.seek(-size % 512, 1)
            else:
                stream.seek(size + (-size % 512), 1)
    finally:
        stream.seek(start)


def _tar(stream: IO[bytes]) -> Generator[Entry, None, None]:
    check_pax_headers(stream)
    with tarfile.open(fileobj=stream, mode="r:") as archive:
        for member in archive:
            opener = _tar_opener(archive, member) if member.isfile() else None
            yield Entry((member.name,), member.size if member.isfile() else 0, None, opener=opener)


def _tar_opener(archive: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], IO[bytes]]:
    def open_member() -> IO[bytes]:
        member_stream = archive.extractfile(member)
        if member_stream is None:  # not a regular file after all
            raise ArchiveError(f"tar member {member.name!r} cannot be read")
        return member_stream

    return open_member


# -- gzip, bzip2, xz --


def _compressed(kind: str, stream: IO[bytes], names: tuple[str, ...]) -> Generator[Entry, None, None]:
    stream.seek(0, 2)
    packed = stream.tell()
    stream.seek(0)
    found: list[str] = []
    size = 0
    if kind == GZIP:
        original, size = _gzip_header(stream, packed)
        if original:
            found.append(original)
    for name in names:
        lowered = name.lower()
        for suffix, replacement in _SUFFIXES[kind]:
            if lowered.endswith(suffix) and len(name) > len(suffix):
                found.append(name[: -len(suffix)] + replacement)
                break
    yield Entry(tuple(dict.fromkeys(found)), size, packed, opener=partial(_decompressed, kind, stream))


def _decompressed(kind: str, stream: IO[bytes]) -> IO[bytes]:
    """The content of the compressed file in ``stream``, decompressed as it is read."""
    stream.seek(0)
    if kind == GZIP:
        return cast("IO[bytes]", gzip.GzipFile(fileobj=stream, mode="rb"))
    if kind == BZIP2:
        return bz2.BZ2File(stream)
    return lzma.LZMAFile(stream)


def _gzip_header(stream: IO[bytes], packed: int) -> tuple[str | None, int]:
    """The original file name of a gzip header (RFC 1952 FNAME, Latin-1) and the declared size (ISIZE of
    the trailer: the size modulo 2**32 of the last member)."""
    fixed = stream.read(10)
    if len(fixed) < 10:
        raise ArchiveError("gzip header cut short")
    flags = fixed[3]
    if flags & 0x04:  # FEXTRA
        (length,) = struct.unpack("<H", stream.read(2).ljust(2, b"\x00"))
        stream.seek(length, 1)
    name = None
    if flags & 0x08:  # FNAME: zero-terminated
        raw = stream.read(_MAX_GZIP_NAME + 1)
        end = raw.find(b"\x00")
        name = (raw[:end] if end >= 0 else raw[:_MAX_GZIP_NAME]).decode("latin-1")
    size = 0
    if packed >= 18:
        stream.seek(packed - 4)
        (size,) = struct.unpack("<I", stream.read(4))
    stream.seek(0)
    return name, size


# -- RAR --


def _rar(stream: IO[bytes], max_entries: int) -> Generator[Entry, None, None]:
    _count_rar_files(stream, max_entries)
    try:
        # part_only: never look for further volumes (rarfile would open files named after this one).
        archive = rarfile.RarFile(stream, part_only=True)
    except rarfile.PasswordRequired as e:
        raise EncryptedArchive(str(e)) from e
    with archive:
        for info in archive.infolist():
            if info.is_dir() or info.file_redir is not None:
                # A directory, a link, or a copy of another entry (which is listed and opened itself).
                yield Entry((info.filename,), 0, None)
            elif info.needs_password():
                yield Entry((info.filename,), info.file_size, info.compress_size, encrypted=True)
            elif info.compress_type != rarfile.RAR_M0:
                yield Entry(
                    (info.filename,),
                    info.file_size,
                    info.compress_size,
                    unopenable="compressed RAR content cannot be opened",
                )
            else:
                yield Entry(
                    (info.filename,), info.file_size, info.compress_size, opener=partial(archive.open, info)
                )


def _count_rar_files(stream: IO[bytes], max_entries: int) -> None:
    """Walk the block headers (without parsing them) and raise :class:`TooManyEntries` past ``max_entries``
    file blocks, or :class:`EncryptedArchive` for encrypted headers: rarfile parses every header into an
    object when it opens an archive, with no limit of its own."""
    signature = stream.read(8)
    walk = _rar5_blocks if signature == _RAR5 else _rar4_blocks
    files = 0
    for blocks, is_file in enumerate(walk(stream), 1):
        files += is_file
        # Other blocks (service data such as ACLs and streams, at most a few per file) are bounded too, so
        # that a junk archive of tiny blocks costs no more to walk than a real one.
        if files > max_entries or blocks > 4 * max_entries + 16:
            raise TooManyEntries(max_entries)
    stream.seek(0)


def _rar5_blocks(stream: IO[bytes]) -> Iterator[bool]:
    position = len(_RAR5)
    while True:
        stream.seek(position)
        start = stream.read(4 + 3)  # CRC32, then the header size (a vint of at most 3 bytes)
        if len(start) < 5:
            return
        size, after = _vint(start, 4)  # the header starts ``after`` bytes into the block
        if size > _MAX_RAR5_HEADER or size == 0:
            raise ArchiveError("RAR header of an impossible size")
        header = start[after:] + stream.read(max(0, min(size, 40) - (len(start) - after)))
        kind, at = _vint(header, 0)
        flags, at = _vint(header, at)
        if flags & 0x1:
            _, at = _vint(header, at)
        data = 0
        if flags & 0x2:
            data, at = _vint(header, at)
        if kind == 4:
            raise EncryptedArchive("RAR headers are encrypted")
        yield kind == 2
        if kind == 5:
            return
        position += after + size + data


def _rar4_blocks(stream: IO[bytes]) -> Iterator[bool]:
    position = len(_RAR4)
    while True:
        stream.seek(position)
        header = stream.read(36)
        if len(header) < 7:
            return
        kind, flags, size = header[2], *struct.unpack("<HH", header[3:7])
        if size < 7:
            raise ArchiveError("RAR header of an impossible size")
        data = 0
        if kind in (0x74, 0x7A) or flags & 0x8000:
            if len(header) < 11:
                return
            (data,) = struct.unpack("<I", header[7:11])
            if kind == 0x74 and flags & 0x100 and len(header) >= 36:
                data += struct.unpack("<I", header[32:36])[0] << 32
        if kind == 0x73 and flags & 0x80:
            raise EncryptedArchive("RAR headers are encrypted")
        yield kind == 0x74
        if kind == 0x7B:
            return
        position += size + data


def _vint(data: bytes, at: int) -> tuple[int, int]:
    """A RAR 5 variable-length integer at ``at``: (value, position after it)."""
    value = shift = 0
    for index in range(at, min(at + 10, len(data))):
        value |= (data[index] & 0x7F) << shift
        shift += 7
        if not data[index] & 0x80:
            return value, index + 1
    raise ArchiveError("RAR header cut short")
