"""Archives built in the tests: zip, tar (plain or compressed), gzip with or without an original name, and RAR
4 and 5 written block by block (no RAR tool is free software, so the bytes are made here as the format
documents them, and rarfile reads them back)."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct
import tarfile
import zipfile
import zlib

EXE = b"MZ\x90\x00" + bytes(200)


def make_zip(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return out.getvalue()


def zip_bomb(megabytes: int = 50, name: str = "a.txt") -> bytes:
    """One entry of ``megabytes`` MB of zeros, deflated (about 50 KB), written a megabyte at a time."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive, archive.open(name, "w") as entry:
        zeros = bytes(1024 * 1024)
        for _ in range(megabytes):
            entry.write(zeros)
    return out.getvalue()


def nested_zips(depth: int, payload: dict[str, bytes]) -> bytes:
    """``payload`` in a zip, that zip in another, ``depth`` zips in all (``level2.zip`` is the outermost
    one's entry, ``level3.zip`` is in that, ...)."""
    data = make_zip(payload)
    for level in range(depth, 1, -1):
        data = make_zip({f"level{level}.zip": data})
    return data


def make_tar(entries: dict[str, bytes], compression: str = "") -> bytes:
    """A tar (ustar) of ``entries``; ``compression`` "gz", "bz2" or "xz" for a compressed one."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=f"w:{compression}", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def pax_tar(entries: dict[str, bytes], pax: dict[str, str]) -> bytes:
    """A POSIX.1-2001 (pax) tar whose members carry the extended header fields ``pax``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = dict(pax)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def v7_tar(entries: dict[str, bytes]) -> bytes:
    """An old-style (v7) tar: no "ustar" magic, only the header checksum says it is a tar."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    data = bytearray(out.getvalue())
    # Blank the magic and version of each header and fix its checksum.
    position = 0
    while position + 512 <= len(data) and any(data[position : position + 512]):
        header = data[position : position + 512]
        header[257:265] = bytes(8)
        header[148:156] = b" " * 8
        header[148:156] = b"%06o\x00 " % sum(header)
        data[position : position + 512] = header
        size = int(bytes(header[124:136]).strip(b"\x00 ") or b"0", 8)
        position += 512 + (size + 511) // 512 * 512
    return bytes(data)


def make_gzip(data: bytes, original_name: str | None = None) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(filename=original_name or "", fileobj=out, mode="wb", mtime=0) as f:
        f.write(data)
    return out.getvalue()


def make_bz2(data: bytes) -> bytes:
    return bz2.compress(data)


def make_xz(data: bytes) -> bytes:
    return lzma.compress(data)


# -- RAR 5 (www.rarlab.com/technote.htm): blocks of CRC32, vint size, vint type, vint flags, fields --


def _vint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _rar5_block(kind: int, flags: int, fields: bytes, data: bytes = b"") -> bytes:
    body = _vint(kind) + _vint(flags) + (_vint(len(data)) if flags & 0x2 else b"") + fields
    header = _vint(len(body)) + body
    return struct.pack("<I", zlib.crc32(header)) + header + data


def rar5(entries: dict[str, bytes], method: int = 0, encrypted_headers: bool = False) -> bytes:
    """A RAR 5 archive of ``entries`` stored as they are. ``method`` other than 0 only labels them as
    compressed (the data stays as given): enough for a reader to list them and refuse to open them."""
    out = b"Rar!\x1a\x07\x01\x00"
    if encrypted_headers:
        # An archive encryption header: everything after it is encrypted (here: junk).
        return out + _rar5_block(4, 0, _vint(0) + _vint(0) + _vint(15) + bytes(16) + bytes(16)) + bytes(64)
    out += _rar5_block(1, 0, _vint(0))
    for name, data in entries.items():
        raw = name.encode()
        fields = (
            _vint(0x4)  # file flags: CRC32 present
            + _vint(len(data))
            + _vint(0x20)  # attributes
            + struct.pack("<I", zlib.crc32(data))
            + _vint(method << 7)  # compression information: version 0, solid no, method
            + _vint(0)  # host OS: Windows
            + _vint(len(raw))
            + raw
        )
        out += _rar5_block(2, 0x2, fields, data)
    return out + _rar5_block(5, 0, _vint(0))


# -- RAR 4: blocks of CRC16 (low half of CRC32), type, flags, size --


def _rar4_block(kind: int, flags: int, fields: bytes, data: bytes = b"") -> bytes:
    rest = struct.pack("<BHH", kind, flags, 7 + len(fields)) + fields
    return struct.pack("<H", zlib.crc32(rest) & 0xFFFF) + rest + data


def rar4(entries: dict[str, bytes]) -> bytes:
    """A RAR 4 archive of ``entries`` stored (method 0x30) as they are."""
    out = b"Rar!\x1a\x07\x00"
    out += _rar4_block(0x73, 0, bytes(6))
    for name, data in entries.items():
        raw = name.encode()
        fields = struct.pack(
            "<IIBIIBBHI", len(data), len(data), 2, zlib.crc32(data), 0x21000000, 29, 0x30, len(raw), 0x20
        )
        out += _rar4_block(0x74, 0x8000, fields + raw, data)
    return out + _rar4_block(0x7B, 0x4000, b"")
