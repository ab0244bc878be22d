"""The TLS ClientHello a client opens with, read without terminating TLS: enough to route by SNI.

Follows RFC 8446 §4.1.2 and §5.1 (records, handshake framing), RFC 5246 §7.4.1.2 (TLS 1.2 hellos without
extensions), RFC 6066 §3 (server_name), RFC 7301 §3.1 (ALPN). Every length is checked against its container;
hostile input only ever produces ``None`` (need more bytes), a ``ClientHello`` or ``MalformedClientHello``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache

from dcrouter.net.domains import normalize_domain

_RECORD_HEADER = 5
_HANDSHAKE_HEADER = 4
_CONTENT_TYPE_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_MAX_FRAGMENT = 2**14  # RFC 8446 §5.1: a plaintext record carries at most 2^14 bytes
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43
_NAME_TYPE_HOST_NAME = 0
_PRINTABLE = bytes(range(0x21, 0x7F))


class MalformedClientHello(Exception):
    """The bytes can never become a valid ClientHello, or the hello would need more than ``max_bytes``.

    ``str(exc)`` says why, for logs.
    """


@dataclass(frozen=True)
class ClientHello:
    """What routing needs from a ClientHello.

    ``server_name`` is the SNI host_name normalised by ``normalize_domain`` (lower case, A-labels, no trailing
    dot), or None when the client sent none or one that cannot be routed on (several host_names, an empty
    or invalid name, an IP address); ``server_name_reason`` then says which, and is "" when a name is given.
    ``alpn`` holds the offered protocol names in the client's order (decoded as Latin-1, so any byte string
    survives); ``supported_versions`` the raw values of that extension (GREASE included), () when absent.
    """

    server_name: str | None
    alpn: tuple[str, ...]
    legacy_version: int
    supported_versions: tuple[int, ...]
    server_name_reason: str = ""


def parse_client_hello(data: bytes, *, max_bytes: int = 16384) -> ClientHello | None:
    """Parse the ClientHello at the start of ``data`` (the bytes received so far, from the first record).

    Returns None while the hello is incomplete; every strict prefix of a valid hello gives None. Bytes after
    the record that completes the hello (early data, say) are ignored. Raises MalformedClientHello when no
    continuation can make a valid hello, or when the hello would need more than ``max_bytes`` bytes on the
    wire (record headers included).
    """
    return ClientHelloReader(max_bytes=max_bytes).feed(data)


class ClientHelloReader:
    """``parse_client_hello`` for bytes that arrive in pieces: each ``feed`` costs time in proportion to
    the bytes it is given (plus one parse when the hello completes), not to all bytes so far.

    ``feed`` returns None until the hello is complete, then that ClientHello on every later call. Once it
    has raised MalformedClientHello it raises the same exception on every later call.
    """

    def __init__(self, *, max_bytes: int = 16384) -> None:
        self._max_bytes = max_bytes
        self._pending = bytearray()  # the record being received, header included
        self._handshake = bytearray()  # handshake bytes from complete records
        self._wire = 0  # bytes of complete records
        self._hello: ClientHello | None = None
        self._error: MalformedClientHello | None = None

    def feed(self, data: bytes) -> ClientHello | None:
        """Add bytes received from the client; see the class docstring for what comes back."""
        if self._error is not None:
            raise self._error
        if self._hello is not None:
            return self._hello
        try:
            if not self._pending and not self._wire and _whole_hello(data, self._max_bytes):
                # The usual first piece: one record holding the whole ClientHello. What _advance would
                # parse, without copying it through the buffers.
                end = _RECORD_HEADER + ((data[3] << 8) | data[4])
                self._hello = _parse_body(data[_RECORD_HEADER + _HANDSHAKE_HEADER : end])
            else:
                self._pending += data
                self._hello = self._advance()
        except MalformedClientHello as exc:
            self._error = exc
            raise
        return self._hello

    def _advance(self) -> ClientHello | None:
        while True:
            length = _record_length(self._pending)
            if length is None:
                return None
            self._check_limits(length)
            end = _RECORD_HEADER + length
            if len(self._pending) < end:
                return None
            self._handshake += self._pending[_RECORD_HEADER:end]
            del self._pending[:end]
            self._wire += end
            total = _handshake_total(self._handshake)
            if total is not None and len(self._handshake) == total:
                return _parse_body(bytes(self._handshake[_HANDSHAKE_HEADER:]))

    def _check_limits(self, record_length: int) -> None:
        """Refuse as soon as the record now arriving proves the hello malformed or too large."""
        wire_after = self._wire + _RECORD_HEADER + record_length
        if wire_after > self._max_bytes:
            raise MalformedClientHello(f"ClientHello needs more than {self._max_bytes} bytes")
        head = bytes(self._handshake[:_HANDSHAKE_HEADER])
        if len(head) < _HANDSHAKE_HEADER:
            missing = _HANDSHAKE_HEADER - len(head)
            head += self._pending[_RECORD_HEADER : _RECORD_HEADER + min(missing, record_length)]
        if head and head[0] != _HANDSHAKE_CLIENT_HELLO:
            raise MalformedClientHello(f"handshake message type {head[0]}, not ClientHello (1)")
        total = _handshake_total(head)
        if total is None:
            return
        have_after = len(self._handshake) + record_length
        if have_after > total:
            raise MalformedClientHello("handshake records continue past the end of the ClientHello")
        # The rest still to come needs at least one more record header.
        if have_after < total and wire_after + _RECORD_HEADER + (total - have_after) > self._max_bytes:
            raise MalformedClientHello(f"ClientHello needs more than {self._max_bytes} bytes")


def _whole_hello(data: bytes, max_bytes: int) -> bool:
    """Whether ``data`` starts with one handshake record, within the limits, that holds exactly one whole
    ClientHello message (the checks of _record_length and _check_limits pass, and the hello ends with the
    record)."""
    if len(data) < _RECORD_HEADER + _HANDSHAKE_HEADER or data[0] != _CONTENT_TYPE_HANDSHAKE or data[1] != 3:
        return False
    if not 1 <= data[2] <= 4 or data[5] != _HANDSHAKE_CLIENT_HELLO:
        return False
    length = (data[3] << 8) | data[4]
    end = _RECORD_HEADER + length
    return (
        length <= _MAX_FRAGMENT
        and end <= len(data)
        and end <= max_bytes
        and _HANDSHAKE_HEADER + ((data[6] << 16) | (data[7] << 8) | data[8]) == length
    )


def _record_length(pending: bytearray) -> int | None:
    """The fragment length of the record at the start of ``pending``, None while its header is incomplete;
    raises MalformedClientHello as soon as the header's first bytes rule out a handshake record."""
    if pending and pending[0] != _CONTENT_TYPE_HANDSHAKE:
        raise MalformedClientHello(f"record content type {pending[0]}, not handshake (22)")
    if len(pending) > 1 and pending[1] != 3:
        raise MalformedClientHello(f"record version major byte {pending[1]}, not 3")
    if len(pending) > 2 and not 1 <= pending[2] <= 4:
        raise MalformedClientHello(f"record version 0x03{pending[2]:02x} outside 0x0301-0x0304")
    if len(pending) < _RECORD_HEADER:
        return None
    length = int.from_bytes(pending[3:5], "big")
    if length == 0:
        # RFC 8446 §5.1: zero-length handshake fragments MUST NOT be sent.
        raise MalformedClientHello("empty handshake record")
    if length > _MAX_FRAGMENT:
        raise MalformedClientHello(f"record of {length} bytes exceeds 2^14")
    return length


def _handshake_total(handshake: bytes | bytearray) -> int | None:
    """Header plus body length of the handshake message, None while its header is incomplete."""
    if len(handshake) < _HANDSHAKE_HEADER:
        return None
    return _HANDSHAKE_HEADER + int.from_bytes(handshake[1:4], "big")


class _Cursor:
    """Reads big-endian integers and length-prefixed vectors, refusing to read past its container.

    Written for the proxy's per-connection path: field names are formatted into a message only when a
    read fails."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, size: int, field: str) -> bytes:
        start = self._pos
        end = start + size
        if end > len(self._data):
            raise MalformedClientHello(f"{field} runs past the end of {self._what}")
        self._pos = end
        return self._data[start:end]

    def uint(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "big")

    def vector(self, length_size: int, field: str) -> _Cursor:
        """The vector whose length is in the next ``length_size`` bytes, as a cursor of its own."""
        data = self._data
        start = self._pos
        end = start + length_size
        if end > len(data):
            raise MalformedClientHello(f"length of {field} runs past the end of {self._what}")
        length = int.from_bytes(data[start:end], "big")
        if end + length > len(data):
            raise MalformedClientHello(f"{field} runs past the end of {self._what}")
        self._pos = end + length
        return _Cursor(data[end : end + length], field)

    def rest(self) -> bytes:
        return self.take(self.remaining, self._what)

    def expect_end(self) -> None:
        if self.remaining:
            raise MalformedClientHello(f"{self.remaining} trailing bytes in {self._what}")


def _parse_body(body: bytes) -> ClientHello:
    """The ClientHello of a handshake body. A well-formed hello (what clients send) is read by index,
    without a cursor per field; anything irregular goes to :func:`_parse_body_checked`, which names the
    first fault, so the result and every error are that function's."""
    end = len(body)
    if end < 35:
        return _parse_body_checked(body)
    legacy_version = (body[0] << 8) | body[1]
    session_id = body[34]
    if legacy_version >> 8 != 3 or legacy_version & 0xFF == 0 or session_id > 32:
        return _parse_body_checked(body)
    pos = 35 + session_id
    if pos + 2 > end:
        return _parse_body_checked(body)
    suites = (body[pos] << 8) | body[pos + 1]
    pos += 2 + suites
    if suites == 0 or suites % 2 or pos >= end or body[pos] == 0:
        return _parse_body_checked(body)
    pos += 1 + body[pos]
    if pos == end:
        extensions: dict[int, bytes] = {}  # a TLS 1.2 hello may end here
    elif pos + 2 <= end and pos + 2 + ((body[pos] << 8) | body[pos + 1]) == end:
        extensions = _extension_map(body[pos + 2 :])
    else:
        return _parse_body_checked(body)
    server_name, reason = None, "no server_name extension"
    if _EXT_SERVER_NAME in extensions:
        server_name, reason = _server_name(extensions[_EXT_SERVER_NAME])
    alpn = _alpn(extensions[_EXT_ALPN]) if _EXT_ALPN in extensions else ()
    versions: tuple[int, ...] = ()
    if _EXT_SUPPORTED_VERSIONS in extensions:
        versions = _supported_versions(extensions[_EXT_SUPPORTED_VERSIONS])
    return ClientHello(server_name, alpn, legacy_version, versions, reason)


def _parse_body_checked(body: bytes) -> ClientHello:
    cursor = _Cursor(body, "ClientHello")
    legacy_version = cursor.uint(2, "legacy_version")
    if legacy_version >> 8 != 3 or legacy_version & 0xFF == 0:
        raise MalformedClientHello(f"legacy_version 0x{legacy_version:04x} is not TLS")
    cursor.take(32, "random")
    if cursor.vector(1, "legacy_session_id").remaining > 32:
        raise MalformedClientHello("legacy_session_id longer than 32 bytes")
    suites = cursor.vector(2, "cipher_suites").remaining
    if suites == 0 or suites % 2:
        raise MalformedClientHello(f"cipher_suites of {suites} bytes")
    if cursor.vector(1, "legacy_compression_methods").remaining == 0:
        raise MalformedClientHello("no compression methods")
    # A TLS 1.2 hello may end here (RFC 5246 §7.4.1.2); otherwise the extensions fill the rest exactly.
    extensions = _extensions(cursor.vector(2, "extensions")) if cursor.remaining else {}
    cursor.expect_end()
    server_name, reason = None, "no server_name extension"
    if _EXT_SERVER_NAME in extensions:
        server_name, reason = _server_name(extensions[_EXT_SERVER_NAME])
    alpn = _alpn(extensions[_EXT_ALPN]) if _EXT_ALPN in extensions else ()
    versions: tuple[int, ...] = ()
    if _EXT_SUPPORTED_VERSIONS in extensions:
        versions = _supported_versions(extensions[_EXT_SUPPORTED_VERSIONS])
    return ClientHello(server_name, alpn, legacy_version, versions, reason)


def _extensions(cursor: _Cursor) -> dict[int, bytes]:
    return _extension_map(cursor.rest())


def _extension_map(data: bytes) -> dict[int, bytes]:
    # Walked by index (a hello has a dozen or more extensions): the checks and messages of
    # ``cursor.uint(2, "extension type")`` and ``cursor.vector(2, f"extension {kind}")``, without a cursor
    # and two formatted names per extension.
    end = len(data)
    pos = 0
    found: dict[int, bytes] = {}
    while pos < end:
        if pos + 2 > end:
            raise MalformedClientHello("extension type runs past the end of extensions")
        kind = (data[pos] << 8) | data[pos + 1]
        if pos + 4 > end:
            raise MalformedClientHello(f"length of extension {kind} runs past the end of extensions")
        start = pos + 4
        pos = start + ((data[pos + 2] << 8) | data[pos + 3])
        if pos > end:
            raise MalformedClientHello(f"extension {kind} runs past the end of extensions")
        if kind in found:
            # RFC 8446 §4.2 and RFC 5246 §7.4.1.4: at most one extension of each type.
            raise MalformedClientHello(f"extension {kind} appears twice")
        found[kind] = data[start:pos]
    return found


def _server_name(data: bytes) -> tuple[str | None, str]:
    """(name, "") or (None, why not). Broken framing raises; an unroutable name is a value."""
    end = len(data)
    # One host_name filling the list: what clients send.
    if (
        end > 5
        and data[2] == _NAME_TYPE_HOST_NAME
        and (data[0] << 8) | data[1] == end - 2
        and (data[3] << 8) | data[4] == end - 5
    ):
        return _host_name(data[5:])
    return _server_name_checked(data)


def _server_name_checked(data: bytes) -> tuple[str | None, str]:
    cursor = _Cursor(data, "server_name extension")
    entries = cursor.vector(2, "server_name_list")
    cursor.expect_end()
    if not entries.remaining:
        raise MalformedClientHello("empty server_name_list")
    host_names = []
    while entries.remaining:
        name_type = entries.uint(1, "name_type")
        name = entries.vector(2, "server name").rest()
        # Other name types are skipped as OpenSSL and Go do: none is defined, and guessing is worse.
        if name_type == _NAME_TYPE_HOST_NAME:
            host_names.append(name)
    if not host_names:
        return None, "server_name extension without a host_name"
    if len(host_names) > 1:
        # RFC 6066 §3: at most one name of each type; choosing one would be a guess.
        return None, f"{len(host_names)} host_names in server_name extension"
    return _host_name(host_names[0])


def _host_name(raw: bytes) -> tuple[str | None, str]:
    if raw.translate(None, _PRINTABLE):  # some byte outside 0x21-0x7E
        return None, f"SNI host_name {raw[:64]!r} is not printable ASCII"
    try:
        return routable_name(raw.decode("ascii")), ""
    except ValueError as exc:
        return None, f"SNI host_name: {exc}"


@lru_cache(maxsize=4096)  # asked per TLS connection and HTTP request, mostly for the same few names (pure)
def routable_name(text: str) -> str:
    """``text`` as a host name to route on, normalised by ``normalize_domain``.

    Raises ValueError with the reason for an empty or invalid name or an address literal (an IPv4 address,
    or any name whose last label is all digits, as ``127.1`` is to many resolvers): RFC 6066 §3 allows no
    address in SNI, and an address in ``Host`` names no domain.
    """
    bare = text[:-1] if text.endswith(".") else text
    if not bare:
        raise ValueError("empty host name")
    # Only a name with a colon (IPv6) or of digits and dots (IPv4) can be an address: the others are not
    # parsed (an exception raised and caught per connection).
    if ":" in bare or bare.replace(".", "").isdigit():
        try:
            ipaddress.ip_address(bare)
        except ValueError:
            pass
        else:
            raise ValueError(f"{text!r} is an IP address, not a host name")
    if bare.rsplit(".", 1)[-1].isdigit():
        raise ValueError(f"{text!r} looks like an address literal, not a host name")
    return normalize_domain(text)


def _alpn(data: bytes) -> tuple[str, ...]:
    cursor = _Cursor(data, "ALPN extension")
    names = cursor.vector(2, "protocol_name_list")
    cursor.expect_end()
    if not names.remaining:
        raise MalformedClientHello("empty ALPN protocol_name_list")
    protocols = []
    while names.remaining:
        name = names.vector(1, "ALPN protocol name").rest()
        if not name:
            raise MalformedClientHello("empty ALPN protocol name")
        protocols.append(name.decode("latin-1"))
    return tuple(protocols)


def _supported_versions(data: bytes) -> tuple[int, ...]:
    end = len(data)
    if end > 1 and data[0] == end - 1 and end % 2:  # a whole list of 2-byte versions: read by index
        return tuple([(data[i] << 8) | data[i + 1] for i in range(1, end, 2)])
    cursor = _Cursor(data, "supported_versions extension")
    versions = cursor.vector(1, "supported_versions list")
    cursor.expect_end()
    if versions.remaining == 0 or versions.remaining % 2:
        raise MalformedClientHello(f"supported_versions list of {versions.remaining} bytes")
    return tuple(versions.uint(2, "version") for _ in range(versions.remaining // 2))
