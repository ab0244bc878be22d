"""HTTP/1.1 message heads and body framing (RFC 9112), parsed strictly, for the terminating proxy.

Written by hand rather than taken from ``twisted.web``: ``twisted.web.http.HTTPChannel`` collects a request
body whole (in memory or a temporary file) before anything sees the request, has no streaming client side
for the response, and is lenient where a proxy must not be (it accepts bare LF line ends, for one). A proxy
sits in front of another parser: every head or body whose framing two parsers could read differently is a
request-smuggling hole, so everything here refuses ambiguity instead of repairing it.

Nothing here touches a transport. :class:`HeadBuffer` finds the end of a head in bytes as they arrive;
:func:`parse_request_head` / :func:`parse_response_head` turn it into a head; :func:`request_framing` /
:func:`response_framing` say how the body that follows is delimited; the body readers (:class:`LengthBody`,
:class:`ChunkedBody`, :class:`UntilCloseBody`) take bytes as they arrive and give back what to forward and
what is left after the body's end. Every limit is a constant below; every refusal is an :class:`HttpError`
carrying the status to answer with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Bytes a head may take, request line and fields included (larger: 431).
MAX_HEAD_BYTES = 32 * 1024
#: Field lines a head may carry.
MAX_FIELDS = 100
#: Bytes of a chunk-size line (size and extensions) and of a chunked body's trailer section.
MAX_CHUNK_LINE = 4096
MAX_TRAILER_BYTES = 16 * 1024
#: Empty lines ignored before a request line (RFC 9112 §2.2: at least one, after a body, from old clients).
MAX_LEADING_CRLF = 8

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 §5.6.2
# Visible ASCII and obs-text, with single spaces or tabs inside; no control characters (RFC 9110 §5.5).
_FIELD_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\x20-\x7e\x80-\xff\t]*[\x21-\x7e\x80-\xff])?)?\Z")
_REQUEST_TARGET = re.compile(rb"[\x21-\x7e]+\Z")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]\Z")
_STATUS_LINE = re.compile(rb"(HTTP/1\.[01]) ([1-9][0-9][0-9])(?: ([\x20-\x7e\t\x80-\xff]*))?\Z")
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,18}\Z")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}\Z")
_CHUNK_EXT = re.compile(rb"[\x20-\x7e\t\x80-\xff]*\Z")

#: Fields that describe one connection, not the message (RFC 9110 §7.6.1): never passed on as they came.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade", b"proxy-authenticate"}
)


class HttpError(Exception):
    """A message the proxy refuses; ``status`` is what the peer is answered (or 502 for a backend's)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


class Fields:
    """Field lines in the order received: ``(name as sent, value without surrounding whitespace)``.

    Looked up by lower-case name through an index built on the first lookup (a head is asked for several
    fields: Host, Connection, Content-Length, Transfer-Encoding, X-Forwarded-For, ...), not by a scan each."""

    __slots__ = ("_index", "_tokens", "lines")

    def __init__(self, lines: tuple[tuple[bytes, bytes], ...]) -> None:
        self.lines = lines
        self._index: dict[bytes, list[bytes]] | None = None
        self._tokens: dict[bytes, set[bytes]] = {}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fields) and other.lines == self.lines

    def __hash__(self) -> int:
        return hash(self.lines)

    def __repr__(self) -> str:
        return f"Fields({self.lines!r})"

    def _by_name(self) -> dict[bytes, list[bytes]]:
        index = self._index
        if index is None:
            index = self._index = {}
            for key, value in self.lines:
                index.setdefault(key.lower(), []).append(value)
        return index

    def get_all(self, name: bytes) -> list[bytes]:
        """Every value of ``name`` (lower case), in order."""
        return list(self._by_name().get(name, ()))

    def get(self, name: bytes) -> bytes | None:
        """The value of ``name`` when it appears exactly once; None when absent or repeated."""
        values = self._by_name().get(name)
        return values[0] if values is not None and len(values) == 1 else None

    def has(self, name: bytes) -> bool:
        """Whether ``name`` (lower case) appears at all."""
        return name in self._by_name()

    def tokens(self, name: bytes) -> set[bytes]:
        """The comma-separated list elements of every ``name`` field, lower case (``Connection``). The set
        is shared between calls: callers must not change it."""
        items = self._tokens.get(name)
        if items is None:
            values = self._by_name().get(name, ())
            items = {item.strip(b" \t").lower() for value in values for item in value.split(b",")}
            items.discard(b"")
            self._tokens[name] = items
        return items


@dataclass(frozen=True)
class RequestHead:
    method: bytes
    target: bytes
    version: bytes
    fields: Fields

    @property
    def keep_alive(self) -> bool:
        """Whether the client means to send another request on this connection (RFC 9112 §9.3)."""
        connection = self.fields.tokens(b"connection")
        if self.version == b"HTTP/1.1":
            return b"close" not in connection
        return False  # HTTP/1.0 keep-alive is an old extension; closing after the response is always correct

    @property
    def upgrade_websocket(self) -> bool:
        """A WebSocket opening handshake (RFC 6455 §4.1): Connection lists upgrade, Upgrade is websocket."""
        upgrade = self.fields.tokens(b"upgrade")
        return b"upgrade" in self.fields.tokens(b"connection") and b"websocket" in upgrade


@dataclass(frozen=True)
class ResponseHead:
    version: bytes
    status: int
    reason: bytes
    fields: Fields

    @property
    def keep_alive(self) -> bool:
        connection = self.fields.tokens(b"connection")
        if self.version == b"HTTP/1.1":
            return b"close" not in connection
        return b"keep-alive" in connection


class HeadBuffer:
    """Collects bytes until a head's terminating empty line. ``feed`` returns ``(head, rest)`` once it is
    complete (``head`` ends with CRLF CRLF, leading empty lines dropped), else None. A bare LF or CR, or a
    head over :data:`MAX_HEAD_BYTES`, raises at once rather than waiting for more."""

    def __init__(self, *, leading_crlf: bool = True, max_bytes: int = MAX_HEAD_BYTES) -> None:
        self._buffer = bytearray()
        self._leading_crlf = leading_crlf
        self._max_bytes = max_bytes
        self._scanned = 0
        self._skipped = 0

    @property
    def started(self) -> bool:
        return bool(self._buffer)

    def feed(self, data: bytes) -> tuple[bytes, bytes] | None:
        if not self._buffer and data[:1] not in (b"\r", b"\n"):
            # The common case, a whole head in one read: found in ``data`` itself, without copying it
            # through the buffer (the same checks as below).
            end = data.find(b"\r\n\r\n")
            if end != -1 and end + 4 <= self._max_bytes:
                _refuse_bare_line_ends(data, 0, end + 4)
                self._leading_crlf = False
                return data[: end + 4], data[end + 4 :]
        self._buffer += data
        if self._leading_crlf:
            self._skip_empty_lines()
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n", max(self._scanned - 3, 0))
        limit = len(buffer) if end == -1 else end + 4
        _refuse_bare_line_ends(buffer, max(self._scanned - 1, 0), limit)
        if end == -1:
            if len(buffer) > self._max_bytes:
                raise HttpError(431, f"head longer than {self._max_bytes} bytes")
            self._scanned = len(buffer)
            return None
        if end + 4 > self._max_bytes:
            raise HttpError(431, f"head longer than {self._max_bytes} bytes")
        head, rest = bytes(buffer[: end + 4]), bytes(buffer[end + 4 :])
        self._buffer = bytearray()
        self._scanned = 0
        return head, rest

    def _skip_empty_lines(self) -> None:
        while self._buffer[:2] == b"\r\n":
            del self._buffer[:2]
            self._skipped += 1
            if self._skipped > MAX_LEADING_CRLF:
                raise HttpError(400, "too many empty lines before the request line")
        # Still skipping while nothing, or a lone CR (perhaps the start of another CRLF), is buffered.
        self._leading_crlf = self._buffer in (b"", b"\r")


def _refuse_bare_line_ends(buffer: bytes | bytearray, start: int, end: int) -> None:
    """RFC 9112 §2.2 lets a recipient accept a bare LF; a proxy must not, as the next parser may not."""
    crlf = buffer.count(b"\r\n", start, end)
    if buffer.count(b"\n", start, end) == crlf and buffer.count(b"\r", start, end) == crlf:
        return  # every LF follows a CR and every CR comes before an LF, within the range
    index = buffer.find(b"\n", start, end)
    while index != -1:
        if index == 0 or buffer[index - 1] != 0x0D:
            raise HttpError(400, "bare LF in the head")
        index = buffer.find(b"\n", index + 1, end)
    index = buffer.find(b"\r", start, end)
    while index != -1:
        if index + 1 < len(buffer) and buffer[index + 1] != 0x0A:
            raise HttpError(400, "bare CR in the head")
        index = buffer.find(b"\r", index + 1, end)


def _field_lines(lines: list[bytes], status: int) -> Fields:
    if len(lines) > MAX_FIELDS:
        raise HttpError(431 if status == 400 else status, f"more than {MAX_FIELDS} fields")
    parsed = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise HttpError(status, "obs-fold (a field line continued on the next line)")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            # Also whitespace between the name and the colon (RFC 9112 §5.1): a name is a token.
            raise HttpError(status, f"malformed field line {line[:60]!r}")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.match(value):
            raise HttpError(status, f"control character in the value of {name[:60]!r}")
        parsed.append((name, value))
    return Fields(tuple(parsed))


def _split(head: bytes) -> list[bytes]:
    if not head.endswith(b"\r\n\r\n"):
        raise HttpError(400, "head does not end with an empty line")
    body = head[:-4]
    stripped = body.replace(b"\r\n", b"")
    if b"\r" in stripped or b"\n" in stripped:
        raise HttpError(400, "bare CR or LF in the head")
    return body.split(b"\r\n")


def parse_request_head(head: bytes) -> RequestHead:
    """A request head as :class:`HeadBuffer` returns it; :class:`HttpError` (400, 431, 505) otherwise.

    Refused: a request line that is not ``method SP target SP HTTP/x.y``, versions other than 1.0 and 1.1,
    obs-fold, field names that are not tokens (whitespace before the colon), control characters in
    values, no or several ``Host`` fields in HTTP/1.1, ``CONNECT`` (not a proxy for tunnels)."""
    request_line, *lines = _split(head)
    parts = request_line.split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not _REQUEST_TARGET.match(parts[1]):
        raise HttpError(400, f"malformed request line {request_line[:80]!r}")
    method, target, version = parts
    if not _VERSION.match(version):
        raise HttpError(400, f"malformed HTTP version {version[:20]!r}")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError(505, f"{version.decode()} is not supported")
    if method == b"CONNECT":
        raise HttpError(405, "CONNECT is not proxied")
    fields = _field_lines(lines, 400)
    hosts = fields.get_all(b"host")
    if len(hosts) > 1 or (version == b"HTTP/1.1" and not hosts):
        raise HttpError(400, f"{len(hosts)} Host fields (RFC 9112 §3.2: exactly one)")
    return RequestHead(method, target, version, fields)


def parse_response_head(head: bytes) -> ResponseHead:
    """A backend's response head; :class:`HttpError` with status 502 when it is malformed."""
    try:
        status_line, *lines = _split(head)
    except HttpError as error:
        raise HttpError(502, f"backend: {error.reason}") from None
    match = _STATUS_LINE.match(status_line)
    if match is None:
        raise HttpError(502, f"backend: malformed status line {status_line[:80]!r}")
    fields = _field_lines(lines, 502)
    return ResponseHead(match.group(1), int(match.group(2)), match.group(3) or b"", fields)


# --- framing -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Framing:
    """How a body is delimited: ``kind`` is "none", "length" (``length`` bytes), "chunked" or "close"
    (until the connection ends: responses only)."""

    kind: str
    length: int = 0

    def reader(self) -> LengthBody | ChunkedBody | UntilCloseBody:
        if self.kind == "chunked":
            return ChunkedBody()
        if self.kind == "close":
            return UntilCloseBody()
        return LengthBody(self.length if self.kind == "length" else 0)


NO_BODY = Framing("none")


def _transfer_codings(fields: Fields) -> list[bytes]:
    return [c.strip(b" \t").lower() for v in fields.get_all(b"transfer-encoding") for c in v.split(b",")]


def _content_length(values: list[bytes], status: int) -> int:
    if len(values) > 1:
        # RFC 9112 §6.3 allows folding identical values; parsers that disagree on that are a smuggling hole.
        raise HttpError(status, "more than one Content-Length")
    if not _CONTENT_LENGTH.match(values[0]):
        raise HttpError(status, f"invalid Content-Length {values[0][:30]!r}")
    return int(values[0])


def request_framing(head: RequestHead) -> Framing:
    """RFC 9112 §6.3 for a request, refusing what is ambiguous: Content-Length with Transfer-Encoding,
    several or malformed Content-Length values, Transfer-Encoding in HTTP/1.0, any coding but ``chunked``."""
    fields = head.fields
    lengths = fields.get_all(b"content-length")
    if fields.get_all(b"transfer-encoding"):
        if lengths:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        if head.version != b"HTTP/1.1":
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = _transfer_codings(fields)
        if codings != [b"chunked"]:
            # chunked must come last and only once (RFC 9112 §6.1); other codings are valid but not ours.
            valid = codings[-1:] == [b"chunked"] and codings.count(b"chunked") == 1
            raise HttpError(501 if valid else 400, f"Transfer-Encoding {codings!r}")
        return Framing("chunked")
    if lengths:
        return Framing("length", _content_length(lengths, 400))
    return NO_BODY


def response_framing(method: bytes, head: ResponseHead) -> Framing:
    """RFC 9112 §6.3 for a response to ``method``; :class:`HttpError` 502 for an ambiguous one."""
    if method == b"HEAD" or head.status < 200 or head.status in (204, 304):
        return NO_BODY
    fields = head.fields
    lengths = fields.get_all(b"content-length")
    if fields.get_all(b"transfer-encoding"):
        if lengths:
            raise HttpError(502, "backend sent both Content-Length and Transfer-Encoding")
        return Framing("chunked" if _transfer_codings(fields)[-1:] == [b"chunked"] else "close")
    if lengths:
        return Framing("length", _content_length(lengths, 502))
    return Framing("close")


class LengthBody:
    """A body of a known length. ``feed`` returns ``(bytes of the body, bytes after it)``."""

    def __init__(self, length: int) -> None:
        self.remaining = length

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        take = min(self.remaining, len(data))
        self.remaining -= take
        return data[:take], data[take:]

    def eof(self) -> bool:
        """Whether the connection ending now ends the body properly."""
        return self.done


class UntilCloseBody:
    """A response body that ends with the connection."""

    def __init__(self) -> None:
        self.done = False

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        return data, b""

    def eof(self) -> bool:
        self.done = True
        return True


class ChunkedBody:
    """A chunked body (RFC 9112 §7.1), checked strictly and re-encoded as it passes: what ``feed`` returns
    is a canonical chunked encoding of the same data (chunk extensions and trailer fields are dropped), so
    the next parser never sees anything this one did not understand."""

    def __init__(self) -> None:
        self.done = False
        self._state = "size"
        self._line = bytearray()
        self._remaining = 0
        self._trailer_bytes = 0

    def eof(self) -> bool:
        return self.done

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        out: list[bytes] = []
        i, n = 0, len(data)
        while i < n and not self.done:
            if self._state == "data":
                take = min(self._remaining, n - i)
                out.append(b"%x\r\n%s\r\n" % (take, data[i : i + take]))
                self._remaining -= take
                i += take
                if self._remaining == 0:
                    self._state = "data-end"
                continue
            # Line-oriented states: the chunk-size line, the CRLF after the data, the trailer lines.
            newline = data.find(b"\n", i)
            end = n if newline == -1 else newline + 1
            self._line += data[i:end]
            i = end
            limit = 2 if self._state == "data-end" else MAX_CHUNK_LINE
            if len(self._line) > limit:
                raise HttpError(400, f"chunked body: {self._state} line too long")
            if newline != -1:
                line, self._line = bytes(self._line), bytearray()
                if self._line_done(line):
                    out.append(b"0\r\n\r\n")
        return b"".join(out), data[i:]

    def _line_done(self, line: bytes) -> bool:
        """Handle one complete line; True when the body ended with it."""
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            raise HttpError(400, f"chunked body: bare LF or CR in the {self._state} line")
        content = line[:-2]
        if self._state == "data-end":
            if content:
                raise HttpError(400, "chunked body: chunk data longer than its size")
            self._state = "size"
            return False
        if self._state == "trailer":
            self._trailer_bytes += len(line)
            if self._trailer_bytes > MAX_TRAILER_BYTES:
                raise HttpError(400, "chunked body: trailer section too long")
            if not content:
                self.done = True
                return True
            _field_lines([content], 400)
            return False
        size, semicolon, extensions = content.partition(b";")
        if not _CHUNK_SIZE.match(size):
            raise HttpError(400, f"chunked body: invalid chunk size {size[:20]!r}")
        if semicolon and not _CHUNK_EXT.match(extensions):
            raise HttpError(400, "chunked body: control character in a chunk extension")
        self._remaining = int(size, 16)
        self._state = "data" if self._remaining else "trailer"
        return False


_DROPPED_TRUSTED = HOP_BY_HOP | {b"x-forwarded-proto"}
_DROPPED_UNTRUSTED = _DROPPED_TRUSTED | {b"x-forwarded-for", b"forwarded"}


def forwarded_request_head(
    head: RequestHead,
    *,
    client_ip: str,
    trust_forwarded: bool,
    proto: bytes = b"https",
    drop: frozenset[bytes] = frozenset(),
    add: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """The head to send to the backend: the request line and fields as received, less the hop-by-hop fields
    (and those ``Connection`` names), with ``X-Forwarded-For`` (the client appended; a client's own list
    kept only when ``trust_forwarded``) and ``X-Forwarded-Proto`` set. A WebSocket handshake keeps its
    ``Connection: Upgrade`` / ``Upgrade`` pair. Fields named in ``drop`` (lower case) are left out and
    ``add`` appended (a route's ``action.headers.request``)."""
    fields = head.fields
    dropped = _DROPPED_TRUSTED if trust_forwarded else _DROPPED_UNTRUSTED
    connection = fields.tokens(b"connection")
    if connection or drop:
        dropped = dropped | connection | drop
    prior = fields.get_all(b"x-forwarded-for") if trust_forwarded else []
    lines = [b"%s %s %s" % (head.method, head.target, head.version)]
    lines += [b"%s: %s" % (name, value) for name, value in fields.lines if name.lower() not in dropped]
    lines += [b"%s: %s" % field for field in add]
    lines.append(b"X-Forwarded-For: " + b", ".join([*prior, client_ip.encode("ascii")]))
    lines.append(b"X-Forwarded-Proto: " + proto)
    if head.upgrade_websocket:
        lines += [b"Connection: Upgrade", b"Upgrade: " + (fields.get(b"upgrade") or b"websocket")]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def relayed_response_head(
    head: ResponseHead,
    *,
    close: bool,
    drop: frozenset[bytes] = frozenset(),
    add: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """The head to send to the client: as received less the hop-by-hop fields, plus ``Connection: close``
    when the proxy closes the client connection after this response. A 101 is relayed unchanged. Fields
    named in ``drop`` (lower case) are left out and ``add`` appended (``action.headers.response``)."""
    lines = [b"%s %d %s" % (head.version, head.status, head.reason)]
    if head.status == 101:
        lines += [b"%s: %s" % line for line in head.fields.lines]
    else:
        lines += [b"%s: %s" % field for field in relayed_fields(head, drop=drop, add=add)]
        if close:
            lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def relayed_fields(
    head: ResponseHead, *, drop: frozenset[bytes] = frozenset(), add: tuple[tuple[bytes, bytes], ...] = ()
) -> tuple[tuple[bytes, bytes], ...]:
    """The field lines :func:`relayed_response_head` relays of a response other than a 101 (without the
    ``Connection: close`` it may add)."""
    connection = head.fields.tokens(b"connection")
    dropped = (HOP_BY_HOP | connection | drop) if connection or drop else HOP_BY_HOP
    kept = tuple((n, v) for n, v in head.fields.lines if n.lower() not in dropped)
    return kept + add if add else kept


def simple_response(
    status: int,
    reason: str,
    *,
    body: bytes = b"",
    extra: tuple[bytes, ...] = (),
    content_type: bytes = b"text/plain; charset=utf-8",
) -> bytes:
    """A complete response the proxy answers itself, closing the connection after it."""
    head = [b"HTTP/1.1 %d %s" % (status, reason.encode("ascii")), *extra]
    head += [b"Content-Type: " + content_type, b"Content-Length: %d" % len(body)]
    head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


REASONS = {
    101: "Switching Protocols",
    301: "Moved Permanently",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    421: "Misdirected Request",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
