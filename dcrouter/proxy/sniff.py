"""What a connection's first bytes say about where it should go: a TLS ClientHello's SNI, an HTTP/1.x
request's ``Host``, or nothing (some other protocol).

The caller buffers what it feeds and replays it to the chosen backend; nothing here touches a transport.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from dcrouter.proxy.clienthello import ClientHello, ClientHelloReader, MalformedClientHello, routable_name

_TLS_HANDSHAKE = 0x16
# RFC 9110 §9 methods plus PATCH (RFC 5789). Others fall through to OTHER rather than being guessed at.
_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH")
_STARTS = tuple(method + b" " for method in _METHODS)
_LONGEST_START = max(len(start) for start in _STARTS)
_REQUEST_LINE = re.compile(rb"([A-Z]+) ([\x21-\x7e]+) HTTP/1\.[0-9]\Z")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 §5.6.2
_FIELD_VALUE = re.compile(rb"[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?\Z")  # visible ASCII, no obs-text
_ABSOLUTE_FORM = re.compile(rb"https?://([^/?#]*)", re.IGNORECASE)


class Kind(enum.Enum):
    """What the first bytes look like."""

    TLS = "tls"
    HTTP = "http"
    OTHER = "other"


@dataclass(frozen=True)
class Sniffed:
    """The verdict on a connection's first bytes.

    ``server_name`` is the SNI name (TLS) or the ``Host`` name without its port (HTTP), normalised by
    ``normalize_domain``; None whenever it is absent, ambiguous, malformed or an address, and ``reason`` then
    says why (for logs); ``reason`` is "" when a name is given. ``hello`` is the parsed ClientHello for TLS,
    None for a malformed or incomplete one and for other kinds.
    """

    kind: Kind
    server_name: str | None
    hello: ClientHello | None
    reason: str


class Sniffer:
    """Decides, from bytes fed as they arrive, whether a connection is TLS, HTTP/1.x or something else.

    ``feed`` returns None while more bytes are needed and a Sniffed once decided; after that it returns the
    same Sniffed whatever it is fed. At most ``max_bytes`` bytes are looked at: a ClientHello or request
    head that needs more is decided as having no name. Time in ``feed`` is proportional to the bytes fed.
    """

    def __init__(self, *, max_bytes: int = 16384) -> None:
        self._max_bytes = max_bytes
        self._buffer = bytearray()  # bytes seen, until the kind is TLS (then the reader keeps them)
        self._tls: ClientHelloReader | None = None
        self._http = False
        self._scanned = 0  # HTTP: the buffer before this offset holds no bare LF and no end of head
        self._verdict: Sniffed | None = None

    def feed(self, data: bytes) -> Sniffed | None:
        """Add bytes received from the client; see the class docstring."""
        if self._verdict is None:
            self._verdict = self._decide(data)
        return self._verdict

    def give_up(self) -> Sniffed:
        """The verdict when the caller's deadline passes: the one already reached, or no name.

        The kind stays TLS or HTTP when the first bytes already showed it (a partial hello is still TLS),
        and is OTHER when nothing, or too little to tell, arrived.
        """
        if self._verdict is None:
            if self._tls is not None:
                self._verdict = Sniffed(Kind.TLS, None, None, "incomplete ClientHello at the deadline")
            elif self._http:
                self._verdict = Sniffed(Kind.HTTP, None, None, "incomplete request head at the deadline")
            elif self._buffer:
                self._verdict = Sniffed(Kind.OTHER, None, None, "too few bytes to tell at the deadline")
            else:
                self._verdict = Sniffed(Kind.OTHER, None, None, "no bytes before the deadline")
        return self._verdict

    def _decide(self, data: bytes) -> Sniffed | None:
        if self._tls is not None:
            return _tls_verdict(self._tls, data)
        if not self._buffer and not self._http and data and data[0] == _TLS_HANDSHAKE:
            # TLS from the first byte (what the branch below does, without the copies through the buffer).
            self._tls = ClientHelloReader(max_bytes=self._max_bytes)
            return _tls_verdict(self._tls, data)
        self._buffer += data
        if not self._buffer:
            return None
        if not self._http:
            if self._buffer[0] == _TLS_HANDSHAKE:
                self._tls = ClientHelloReader(max_bytes=self._max_bytes)
                first, self._buffer = bytes(self._buffer), bytearray()
                return _tls_verdict(self._tls, first)
            head = bytes(self._buffer[:_LONGEST_START])
            if any(head.startswith(start) for start in _STARTS):
                self._http = True
            elif any(start.startswith(head) for start in _STARTS):
                return None
            else:
                return Sniffed(Kind.OTHER, None, None, "neither a TLS handshake nor an HTTP/1.x request")
        return self._feed_http()

    def _feed_http(self) -> Sniffed | None:
        limit = min(len(self._buffer), self._max_bytes)
        # Back up three bytes so a CRLFCRLF split across feeds is found.
        start = max(self._scanned - 3, 0)
        end = self._buffer.find(b"\r\n\r\n", start, limit)
        bare_lf = _find_bare_lf(self._buffer, self._scanned, limit if end == -1 else end + 4)
        if bare_lf:
            return Sniffed(Kind.HTTP, None, None, "bare LF in request head (RFC 9112 §2.2)")
        if end == -1:
            self._scanned = limit
            if limit >= self._max_bytes:
                return Sniffed(Kind.HTTP, None, None, f"request head longer than {self._max_bytes} bytes")
            return None
        name, reason = host_from_request_head(bytes(self._buffer[:end]))
        return Sniffed(Kind.HTTP, name, None, reason)


def _tls_verdict(reader: ClientHelloReader, data: bytes) -> Sniffed | None:
    try:
        hello = reader.feed(data)
    except MalformedClientHello as exc:
        return Sniffed(Kind.TLS, None, None, f"malformed ClientHello: {exc}")
    if hello is None:
        return None
    return Sniffed(Kind.TLS, hello.server_name, hello, hello.server_name_reason)


def _find_bare_lf(buffer: bytearray, start: int, end: int) -> bool:
    """True when an LF in buffer[start:end] is not preceded by CR."""
    index = buffer.find(b"\n", start, end)
    while index != -1:
        if index == 0 or buffer[index - 1] != 0x0D:
            return True
        index = buffer.find(b"\n", index + 1, end)
    return False


def host_from_request_head(head: bytes) -> tuple[str | None, str]:
    """(name, "") or (None, why not) for an HTTP/1.x request head: the request line and header lines up to,
    not including, the CRLFCRLF that ends them.

    The name comes from exactly one ``Host`` field, port stripped and normalised. A malformed head
    (request line, obs-fold, whitespace before a colon: RFC 9112 §3, §5.1, §5.2), no or several Host
    fields, an address literal, or an absolute-form target whose host differs from Host give None.
    """
    request_line, *field_lines = head.split(b"\r\n")
    request = _REQUEST_LINE.match(request_line)
    if request is None or request.group(1) not in _METHODS:
        return None, f"malformed request line {request_line[:80]!r}"
    hosts = []
    for line in field_lines:
        if line[:1] in (b" ", b"\t"):
            return None, "obs-fold in request head (RFC 9112 §5.2)"
        name, colon, value = line.partition(b":")
        if not colon:
            return None, f"field line without a colon: {line[:80]!r}"
        if name != name.rstrip(b" \t"):
            return None, "whitespace between field name and colon (RFC 9112 §5.1)"
        if not _TOKEN.match(name):
            return None, f"invalid field name {name[:80]!r}"
        if name.lower() == b"host":
            hosts.append(value.strip(b" \t"))
    if not hosts:
        return None, "no Host header"
    if len(hosts) > 1:
        return None, f"{len(hosts)} Host headers"
    try:
        host = _authority_host(hosts[0])
    except ValueError as exc:
        return None, f"Host: {exc}"
    absolute = _ABSOLUTE_FORM.match(request.group(2))
    if absolute is not None:
        try:
            target_host = _authority_host(absolute.group(1))
        except ValueError as exc:
            return None, f"request-target authority: {exc}"
        if target_host != host:
            return None, "request-target authority and Host name different hosts"
    return host, ""


def _authority_host(value: bytes) -> str:
    """The normalised host of a ``host[:port]`` authority; ValueError with the reason otherwise."""
    if not value:
        raise ValueError("empty")
    if not _FIELD_VALUE.match(value):
        raise ValueError(f"{value[:80]!r} is not printable ASCII")
    text = value.decode("ascii")
    if text.startswith("["):
        raise ValueError(f"{text!r} is an IP literal, not a domain name")
    if "@" in text:
        raise ValueError(f"{text!r} carries userinfo")
    host, colon, port = text.partition(":")
    if colon and not (port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise ValueError(f"{text!r} has an invalid port")
    return routable_name(host)
