"""Real TLS ClientHellos, made by Python's ``ssl`` module over memory BIOs, and tools to re-frame and edit
them so tests can build variants a real client would not send (split records, other SNI contents).

The editing helpers are deliberately naive re-encoders with no validation: they exist to produce inputs,
and the parser under test is what judges them.
"""

from __future__ import annotations

import ssl
import struct
from collections.abc import Iterable, Sequence

RECORD_VERSION = b"\x03\x01"


def real_client_hello(
    server_hostname: str | None = None,
    *,
    alpn: Sequence[str] = (),
    maximum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
) -> bytes:
    """The bytes an OpenSSL client sends first: its ClientHello, in one or more TLS records.

    ``maximum`` TLSv1_2 makes a TLS 1.2-only client (no supported_versions extension).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # No server answers; verification never runs, and SNI-less hellos need check_hostname off.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = maximum
    if alpn:
        context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    else:
        raise AssertionError("a handshake with no server cannot complete")
    return outgoing.read()


def handshake_of(records: bytes) -> bytes:
    """The handshake payload carried by a run of TLS records (their headers removed)."""
    payload, offset = b"", 0
    while offset < len(records):
        (length,) = struct.unpack_from("!H", records, offset + 3)
        payload += records[offset + 5 : offset + 5 + length]
        offset += 5 + length
    return payload


def frame(handshake: bytes, sizes: Iterable[int] = ()) -> bytes:
    """``handshake`` in TLS handshake records of the given fragment sizes, the rest in one last record.

    Sizes beyond the end of ``handshake`` are ignored: no empty record is ever made.
    """
    out, offset = b"", 0
    for size in sizes:
        if offset >= len(handshake):
            break
        out += _record(handshake[offset : offset + size])
        offset += size
    if offset < len(handshake):
        out += _record(handshake[offset:])
    return out


def _record(fragment: bytes) -> bytes:
    return b"\x16" + RECORD_VERSION + struct.pack("!H", len(fragment)) + fragment


def extensions_of(handshake: bytes) -> list[tuple[int, bytes]]:
    """The (type, data) extensions of a ClientHello handshake message, in order."""
    _prefix, extensions = _split(handshake)
    return extensions


def with_extensions(handshake: bytes, extensions: Sequence[tuple[int, bytes]]) -> bytes:
    """The ClientHello handshake message with its extension block replaced, every length recomputed."""
    prefix, _extensions = _split(handshake)
    block = b"".join(struct.pack("!HH", kind, len(data)) + data for kind, data in extensions)
    body = prefix + struct.pack("!H", len(block)) + block
    return b"\x01" + len(body).to_bytes(3, "big") + body


def with_extension(handshake: bytes, kind: int, data: bytes | None) -> bytes:
    """Extension ``kind`` replaced by ``data`` (appended when absent; removed when ``data`` is None)."""
    extensions = [(k, d) for k, d in extensions_of(handshake) if k != kind or data is not None]
    if data is not None:
        if any(k == kind for k, _d in extensions):
            extensions = [(k, data if k == kind else d) for k, d in extensions]
        else:
            extensions.append((kind, data))
    return with_extensions(handshake, extensions)


def sni(*names: bytes, name_type: int = 0) -> bytes:
    """server_name extension data listing ``names``, each with ``name_type``."""
    entries = b"".join(struct.pack("!BH", name_type, len(name)) + name for name in names)
    return struct.pack("!H", len(entries)) + entries


def _split(handshake: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """(body up to the extensions, extensions) of a ClientHello handshake message."""
    body = handshake[4:]
    offset = 2 + 32
    offset += 1 + body[offset]  # session id
    offset += 2 + struct.unpack_from("!H", body, offset)[0]  # cipher suites
    offset += 1 + body[offset]  # compression methods
    prefix, extensions = body[:offset], []
    if offset < len(body):
        end = offset + 2 + struct.unpack_from("!H", body, offset)[0]
        offset += 2
        while offset < end:
            kind, length = struct.unpack_from("!HH", body, offset)
            extensions.append((kind, body[offset + 4 : offset + 4 + length]))
            offset += 4 + length
    return prefix, extensions
