"""The PROXY protocol (HAProxy's, versions 1 and 2): headers the proxy writes towards backends so they see
the client's address, and headers the proxy and the SMTP listeners read from trusted load balancers in front
of them (here in ``net`` because both use it and neither may import the other).

Encoding is done here (Twisted has parsers only). Decoding uses ``twisted.protocols.haproxy``'s parsers,
behind :class:`IncomingHeader`, which adds what their wrapper leaves to the caller: a byte cap, and telling
"not a PROXY header at all" from "a PROXY header still arriving".
"""

from __future__ import annotations

import ipaddress
import struct

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

V1_PREFIX = b"PROXY "
V2_SIGNATURE = V2Parser.PREFIX
#: A v1 header is at most 107 bytes (the spec's bound); v2 with TLVs may be longer, capped here at 4 KiB.
V1_MAX = 107
V2_MAX = 16 + 4096

_V2_PROXY = 0x21  # version 2, command PROXY
_V2_LOCAL = 0x20  # version 2, command LOCAL (no address carried)
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21
_V2_UNSPEC = 0x00


class ProxyHeaderError(Exception):
    """An incoming PROXY header is malformed, too long, or from a peer not allowed to send one."""


def _ip_port(addr: IAddress | None) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    """The IP and port of a TCP address, with an IPv4-mapped IPv6 address turned back into IPv4 (a
    dual-stack listener reports IPv4 clients so, and a backend should see the plain form)."""
    if not isinstance(addr, (IPv4Address, IPv6Address)):
        return None
    try:
        ip = ipaddress.ip_address(addr.host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, int(addr.port)


def _pair(
    source: IAddress | None, destination: IAddress | None
) -> tuple[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], ...] | None:
    """Both endpoints, of one IP version, or None when the header must say "unknown"."""
    src, dst = _ip_port(source), _ip_port(destination)
    if src is None or dst is None:
        return None
    if src[0].version != dst[0].version:
        return None
    return src, dst


def encode_v1(source: IAddress | None, destination: IAddress | None) -> bytes:
    """A PROXY v1 line (``PROXY TCP4 src dst sport dport\\r\\n``) for a connection from ``source`` to
    ``destination``; ``PROXY UNKNOWN\\r\\n`` when they are not both IP addresses of one version."""
    pair = _pair(source, destination)
    if pair is None:
        return b"PROXY UNKNOWN\r\n"
    (src, sport), (dst, dport) = pair
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def encode_v2(source: IAddress | None, destination: IAddress | None) -> bytes:
    """A binary PROXY v2 header (command PROXY, stream) for ``source`` → ``destination``; a LOCAL header
    carrying no address when they are not both IP addresses of one version."""
    pair = _pair(source, destination)
    if pair is None:
        return V2_SIGNATURE + struct.pack("!BBH", _V2_LOCAL, _V2_UNSPEC, 0)
    (src, sport), (dst, dport) = pair
    body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    family = _V2_TCP4 if src.version == 4 else _V2_TCP6
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, family, len(body)) + body


def encode(version: str, source: IAddress | None, destination: IAddress | None) -> bytes:
    """The header ``proxyProtocol`` asks for: ``"v1"``, ``"v2"``, or ``"none"`` (no bytes)."""
    if version == "v1":
        return encode_v1(source, destination)
    if version == "v2":
        return encode_v2(source, destination)
    if version == "none":
        return b""
    raise ValueError(f"unknown PROXY protocol version {version!r}")


def may_start_header(data: bytes) -> bool:
    """Whether ``data`` (a connection's first bytes) is, or may still become, a PROXY v1 or v2 header."""
    if not data:
        return True
    return V1_PREFIX.startswith(data[:6]) or V2_SIGNATURE.startswith(data[:12])


def opens_with_header(data: bytes) -> bool | None:
    """Whether ``data`` (a connection's first bytes) opens a PROXY header: True once the v1 ``PROXY `` or
    the whole v2 signature is there, False as soon as neither can follow, None while it cannot be told yet
    (at most 11 bytes)."""
    if data.startswith((V1_PREFIX, V2_SIGNATURE)):
        return True
    return None if may_start_header(data) else False


def header_version(info: ProxyInfo) -> str:
    """``"v1"`` or ``"v2"``: which version of the protocol a parsed header came in."""
    return "v2" if info.header.startswith(V2_SIGNATURE) else "v1"


class IncomingHeader:
    """Reads one PROXY v1 or v2 header from a connection's first bytes.

    ``feed`` returns None while more bytes are needed, then ``(info, rest)``: the parsed header (its
    ``source`` None for ``UNKNOWN`` / ``LOCAL``) and the bytes after it. It raises
    :class:`ProxyHeaderError` for bytes that are not a PROXY header, a malformed one, or one longer than the
    protocol allows; after that the connection is to be closed.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> tuple[ProxyInfo, bytes] | None:
        self._buffer += data
        buffer = self._buffer
        if not may_start_header(buffer):
            raise ProxyHeaderError("not a PROXY protocol header")
        try:
            if buffer.startswith(V1_PREFIX):
                end = buffer.find(b"\r\n")
                if end == -1:
                    if len(buffer) > V1_MAX:
                        raise ProxyHeaderError(f"PROXY v1 header longer than {V1_MAX} bytes")
                    return None
                if end + 2 > V1_MAX:
                    raise ProxyHeaderError(f"PROXY v1 header longer than {V1_MAX} bytes")
                line = buffer[:end]
                if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
                    # Valid without addresses (the spec's own example); Twisted's parser wants more text.
                    return ProxyInfo(line, None, None), buffer[end + 2 :]
                return _checked(V1Parser.parse(buffer[:end])), buffer[end + 2 :]
            if buffer.startswith(V2_SIGNATURE) and len(buffer) >= 16:
                size = 16 + struct.unpack("!H", buffer[14:16])[0]
                if size > V2_MAX:
                    raise ProxyHeaderError(f"PROXY v2 header longer than {V2_MAX} bytes")
                if len(buffer) < size:
                    return None
                return _checked(V2Parser.parse(buffer[:size])), buffer[size:]
        except (InvalidProxyHeader, KeyError, ValueError, UnicodeDecodeError) as exc:
            # The parsers raise InvalidProxyHeader subclasses, but also ValueError (a bad port number) or
            # KeyError (an address family without a format): all mean the same to the peer.
            raise ProxyHeaderError(f"malformed PROXY header ({type(exc).__name__})") from None
        return None


def _checked(info: ProxyInfo) -> ProxyInfo:
    """``info`` if its addresses are real IP addresses: the parsers take any text, and a source that is
    not an address would match no block list."""
    for addr in (info.source, info.destination):
        if isinstance(addr, (IPv4Address, IPv6Address)):
            ip = ipaddress.ip_address(addr.host)  # ValueError for anything else
            if (ip.version == 4) != isinstance(addr, IPv4Address) or not 0 <= addr.port <= 65535:
                raise ValueError("address family or port out of range")
    return info


def client_address(info: ProxyInfo) -> IPv4Address | IPv6Address | None:
    """The client address a header carries, its host in the usual compressed spelling (Twisted's v2 parser
    writes IPv6 uncompressed); None for ``UNKNOWN``, ``LOCAL`` and UNIX-socket headers, where the
    connection's own peer stands."""
    source = info.source
    if isinstance(source, IPv4Address):
        return source
    if isinstance(source, IPv6Address):
        return IPv6Address(source.type, str(ipaddress.ip_address(source.host)), source.port)
    return None
