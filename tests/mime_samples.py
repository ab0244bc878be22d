"""Byte-level sample messages for the MIME inspector, friendly and hostile. Each builder returns the exact
bytes (or writes them to a stream, for the big ones) so a test says precisely what went over the wire."""

from __future__ import annotations

import base64
from typing import BinaryIO

CRLF = b"\r\n"

# The first bytes of files of each kind, as the sniffer should name them.
MAGIC_SAMPLES: dict[str, bytes] = {
    "application/x-msdownload": b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + bytes(48),
    "application/x-executable": b"\x7fELF\x02\x01\x01\x00" + bytes(56),
    "application/x-mach-binary": b"\xcf\xfa\xed\xfe\x07\x00\x00\x01" + bytes(24),
    "application/zip": b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(20) + b"notes.txt" + bytes(30),
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": (
        b"PK\x03\x04\x14\x00\x06\x00\x08\x00"
        + bytes(20)
        + b"[Content_Types].xml"
        + bytes(40)
        + b"word/document.xml"
    ),
    "application/java-archive": b"PK\x03\x04\x14\x00\x08\x08\x08\x00" + bytes(20) + b"META-INF/MANIFEST.MF",
    "application/vnd.rar": b"Rar!\x1a\x07\x01\x00" + bytes(16),
    "application/x-7z-compressed": b"7z\xbc\xaf\x27\x1c\x00\x04" + bytes(24),
    "application/gzip": b"\x1f\x8b\x08\x00" + bytes(16),
    "application/pdf": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n",
    "image/png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "image/jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    "image/gif": b"GIF89a\x01\x00\x01\x00\x80\x00\x00",
    "text/html": b"\xef\xbb\xbf\r\n  <!DOCTYPE html>\n<html><body>hi</body></html>",
    "application/x-shellscript": b"#!/bin/sh\nrm -rf ~\n",
    "application/java-vm": b"\xca\xfe\xba\xbe\x00\x00\x00\x34" + bytes(16),
    "application/x-ole-storage": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(24),
    "image/svg+xml": b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"><script>x()</script></svg>',
}


BASE64_OCTETS = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"


def headers(*fields: tuple[str, str | bytes]) -> bytes:
    out = b""
    for name, value in fields:
        raw = value if isinstance(value, bytes) else value.encode()
        out += name.encode() + b": " + raw + CRLF
    return out


def entity(fields: bytes, body: bytes) -> bytes:
    """A header block, its blank line and a body (no trailing line break added)."""
    return fields + CRLF + body


def multipart(boundary: bytes, parts: list[bytes], preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    """The body of a multipart: each part after a delimiter line, then the close delimiter."""
    out = preamble + CRLF if preamble else b""
    for part in parts:
        out += b"--" + boundary + CRLF + part + CRLF
    return out + b"--" + boundary + b"--" + CRLF + epilogue


def message(body_headers: bytes, body: bytes, *, sender: str = "Alice <alice@example.org>") -> bytes:
    top = headers(
        ("From", sender),
        ("To", "bob@example.com"),
        ("Subject", "sample"),
        ("Message-ID", "<sample@example.org>"),
        ("Date", "Mon, 1 Jan 2024 00:00:00 +0000"),
        ("MIME-Version", "1.0"),
    )
    return entity(top + body_headers, body)


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", CRLF)


def attachment(name: str, data: bytes, kind: str = "application/octet-stream") -> bytes:
    fields = headers(
        ("Content-Type", f'{kind}; name="{name}"'),
        ("Content-Disposition", f'attachment; filename="{name}"'),
        ("Content-Transfer-Encoding", "base64"),
    )
    return entity(fields, b64(data))


def text_part(text: str, kind: str = "text/plain", charset: str = "utf-8") -> bytes:
    fields = headers(("Content-Type", f"{kind}; charset={charset}"), ("Content-Transfer-Encoding", "8bit"))
    return entity(fields, text.encode(charset))


def simple_mixed() -> bytes:
    body = multipart(
        b"outer",
        [text_part("Hello world"), attachment("invoice.pdf", b"%PDF-1.4\n" + bytes(100), "application/pdf")],
        preamble=b"This is a multi-part message in MIME format.",
        epilogue=b"trailing epilogue" + CRLF,
    )
    return message(headers(("Content-Type", 'multipart/mixed; boundary="outer"')), body)


# -- hostile --


def unclosed_boundary() -> bytes:
    exe = attachment("x.exe", b"MZ" + bytes(64))
    body = b"--b1" + CRLF + text_part("first") + CRLF + b"--b1" + CRLF + exe
    return message(headers(("Content-Type", "multipart/mixed; boundary=b1")), body)


def deep_nesting(depth: int = 1000) -> bytes:
    """``depth`` multiparts inside each other, each with its own boundary, an executable at the bottom."""
    inner = attachment("deep.exe", b"MZ" + bytes(64))
    for level in range(depth, 0, -1):
        boundary = f"d{level}".encode()
        fields = headers(("Content-Type", f"multipart/mixed; boundary={boundary.decode()}"))
        inner = entity(fields, multipart(boundary, [inner]))
    return headers(("From", "alice@example.org"), ("To", "bob@example.com"), ("Subject", "nested")) + inner


def many_parts(count: int = 100_000) -> bytes:
    part = b"--m" + CRLF + b"Content-Type: text/plain" + CRLF + CRLF + b"x" + CRLF
    return message(headers(("Content-Type", "multipart/mixed; boundary=m")), part * count + b"--m--" + CRLF)


def broken_base64() -> bytes:
    parts = [
        entity(BASE64_OCTETS, body)
        for body in (
            b"TVqQ!!!AAMA**AAAA$$" + CRLF + b"AAAA=AAA=" + CRLF + b"Q",  # junk, padding inside, a lone char
            b"====" + CRLF + b"=" * 5000,
            b"\x00\xff\x80" * 1000,
        )
    ]
    return message(headers(("Content-Type", "multipart/mixed; boundary=bb")), multipart(b"bb", parts))


def huge_header_line(size: int = 2 * 1024 * 1024) -> bytes:
    return message(headers(("X-Huge", b"a" * size)), b"body" + CRLF)


def huge_part_header(size: int = 2 * 1024 * 1024) -> bytes:
    part = entity(headers(("Content-Type", b"text/plain; x=" + b"y" * size)), b"body")
    return message(headers(("Content-Type", "multipart/mixed; boundary=hh")), multipart(b"hh", [part]))


def boundary_inside_base64() -> bytes:
    """The boundary string inside base64 lines (not a delimiter) and, later, a delimiter line in the middle of
    what the sender meant as one base64 body: by RFC 2046 that line ends the part."""
    encoded = b64(b"MZ" + bytes(200)).rstrip(CRLF)
    body = encoded + b"--bnd" + CRLF + b"QUJD--bnd--" + CRLF + b"--bnd" + CRLF + b"QUJD" + CRLF
    part = entity(BASE64_OCTETS, body)
    return message(headers(("Content-Type", 'multipart/mixed; boundary="bnd"')), multipart(b"bnd", [part]))


def mixed_line_endings() -> bytes:
    return (
        b"From: alice@example.org\nTo: bob@example.com\r\nSubject: mixed\n"
        b'Content-Type: multipart/alternative;\n\tboundary="mx"\r\n\n'
        b"--mx\nContent-Type: text/plain\r\n\r\nline one\nline two\r\n--mx\r\n"
        b"Content-Type: text/html\n\n<p>html\rpart</p>\n--mx--\n"
    )


def nul_bytes() -> bytes:
    return (
        b"From: alice@exa\x00mple.org\r\nTo: bob@example.com\r\nSubject: nul\x00here\r\n"
        b'Content-Type: multipart/mixed; boundary="n\x00n"\r\n\r\n'
        b"--n\x00n\r\nContent-Type: text/plain\r\n\r\nbody\x00with nul\r\n--n\x00n--\r\n"
    )


def huge_rfc2231(segments: int = 8_000) -> bytes:
    rest = "".join(f";\r\n name*{i}*=%41%42" for i in range(1, segments))
    params = ";\r\n name*0*=utf-8''%41" + rest
    part = entity(b"Content-Type: application/octet-stream" + params.encode() + CRLF, b"data")
    return message(headers(("Content-Type", "multipart/mixed; boundary=r")), multipart(b"r", [part]))


def many_encoded_words(count: int = 3_000) -> bytes:
    words = " ".join("=?utf-8?q?a=C3=A9?=" for _ in range(count))
    fields = headers(("X-Words", words), ("Comments", words))
    return message(fields, b"body" + CRLF, sender=f"{words} <a@b.example>")


def write_big_message(stream: BinaryIO, megabytes: int) -> None:
    """A message with a ``megabytes`` MB base64 attachment, written in pieces (never whole in memory)."""
    stream.write(
        message(headers(("Content-Type", 'multipart/mixed; boundary="big"')), b"")
        + b"--big" + CRLF + text_part("see attached") + CRLF
        + b"--big" + CRLF
        + headers(("Content-Type", 'application/zip; name="big.zip"'))
        + headers(("Content-Transfer-Encoding", "base64"))
        + CRLF
    )  # fmt: skip
    line = b64(b"PK\x03\x04" + bytes(53))
    block = b64(bytes(range(256)) * 57)
    stream.write(line)
    written = len(line)
    while written < megabytes * 1024 * 1024:
        stream.write(block)
        written += len(block)
    stream.write(b"--big--" + CRLF)
