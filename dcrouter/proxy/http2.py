"""HTTP/2 on terminated routes (RFC 9113), by ALPN, with the ``h2`` library's connection state machine.

**One stream, one HTTP/1.1 exchange.** Each request stream is translated into an HTTP/1.1 request head (and
body) and given to a fresh *front* — the very protocol a terminated HTTP/1.1 connection gets (forwarder,
answerer of a ``redirect``/``static``/``block`` route, or the dispatcher of a port that routes by path and
headers) — over a :class:`StreamChannel`, a transport that turns the front's HTTP/1.1 response back into
HEADERS and DATA frames. So Host checks (``421``), ``basicAuth``/``jwtAuth``/``rateLimit``, header
changes, X-Forwarded-* and every route action work per stream with the HTTP/1.1 code, and a backend
speaks HTTP/1.1 only. The translation follows RFC 9113 §8: pseudo-header fields become the request line
and ``Host``; ``cookie`` crumbs are joined with ``"; "``; connection-specific fields never cross; a field
name or value that HTTP/1.1 cannot carry (CR, LF, NUL, upper case, no token) makes the request malformed
(``400``), so nothing can be smuggled into the HTTP/1.1 side. ``CONNECT`` is refused (``501``): no tunnels
are offered over HTTP/2, but WebSockets are (RFC 8441, :mod:`dcrouter.proxy.h2websocket`): where the
connection advertises ``SETTINGS_ENABLE_CONNECT_PROTOCOL``, a stream with ``:method CONNECT`` and
``:protocol websocket`` becomes an HTTP/1.1 WebSocket upgrade to the front, the backend's ``101`` the
stream's ``200``, and the stream then carries the upgraded connection's bytes both ways, flow-controlled
like any body; END_STREAM is the client's half-close, RST_STREAM its abort.

**Protections** (:class:`Http2Limits`, each bounded and tested): concurrent streams (SETTINGS, enforced by
``h2``), the receive window (the client's data is acknowledged only as the stream's front takes it, so a
slow backend holds the client back), the header list size (decoded, by ``h2``) and the size of a header
block across HEADERS and CONTINUATION frames (counted here from the frame headers before ``h2`` buffers
anything: the CVE-2024-27316 class), and per time window: streams reset by the client (CVE-2023-44487,
"rapid reset"), SETTINGS and PING frames. Past a bound the connection ends with GOAWAY
``ENHANCE_YOUR_CALM``. A connection without open streams for ``idle_timeout`` seconds ends with GOAWAY.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.log import logger
from dcrouter.proxy.h2websocket import PROTOCOL, WEBSOCKET, handshake_fields, opened_fields
from dcrouter.proxy.httpmessage import (
    HOP_BY_HOP,
    MAX_FIELDS,
    MAX_HEAD_BYTES,
    ChunkedBody,
    Fields,
    HeadBuffer,
    HttpError,
    RequestHead,
    ResponseHead,
    parse_response_head,
    relayed_fields,
    response_framing,
    simple_response,
)

log = logger(__name__)

#: The ALPN protocol names a terminating route offers: with HTTP/2, and without.
ALPN_H2 = (b"h2", b"http/1.1")
ALPN_HTTP1 = (b"http/1.1",)

_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
# What HTTP/1.1 carries (httpmessage's check): visible ASCII and obs-text, spaces and tabs only inside — so
# also no NUL, CR or LF and no whitespace at either end (RFC 9113 §8.2.1).
_FIELD_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\x20-\x7e\x80-\xff\t]*[\x21-\x7e\x80-\xff])?)?\Z")
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
#: The request pseudo-header fields (RFC 9113 §8.3.1), and with extended CONNECT (RFC 8441).
_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
_PSEUDO_EXTENDED = _PSEUDO | {PROTOCOL}
#: Connection-specific fields that make an HTTP/2 request malformed (RFC 9113 §8.2.2).
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")
#: Fields that describe one connection (RFC 9113 §8.2.2) or that the translation sets itself.
_NOT_FORWARDED = HOP_BY_HOP | {b"transfer-encoding", b"host", b"content-length", b"cookie"}
#: Bytes of response data buffered for a stream beyond its flow-control window before its backend is paused.
_BUFFER_HIGH = 64 * 1024
_PREFACE_LENGTH = 24
_HEADERS, _PUSH_PROMISE, _CONTINUATION = 0x1, 0x5, 0x9
_END_HEADERS = 0x4


@dataclass(frozen=True)
class Http2Limits:
    """The bounds of one HTTP/2 connection (``smartProxyConfig.http2``), times in seconds."""

    max_concurrent_streams: int = 100
    initial_window_size: int = 1024 * 1024
    max_header_list_size: int = 64 * 1024
    max_header_block_bytes: int = 64 * 1024
    max_resets: int = 100
    max_control_frames: int = 100
    window: float = 10.0
    idle_timeout: float | None = 300.0


class _Calm(Exception):
    """The client went past a bound: the connection ends with GOAWAY ENHANCE_YOUR_CALM."""


class HeaderBlockMeter:
    """Reads the frame headers of the client's byte stream to bound a header block — a HEADERS or
    PUSH_PROMISE frame and the CONTINUATION frames that follow it — to ``limit`` bytes, before any of it is
    buffered. :meth:`feed` raises ValueError past the bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._skip = _PREFACE_LENGTH
        self._header = bytearray()
        self._block: int | None = None

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
                continue
            need = 9 - len(self._header)
            self._header += data[i : i + need]
            i += need
            if len(self._header) < 9:
                return
            length = int.from_bytes(self._header[0:3], "big")
            kind, flags = self._header[3], self._header[4]
            self._header = bytearray()
            self._skip = length
            if kind in (_HEADERS, _PUSH_PROMISE) or (kind == _CONTINUATION and self._block is not None):
                self._block = (self._block or 0) + length if kind == _CONTINUATION else length
                if self._block > self.limit:
                    raise ValueError(f"header block over {self.limit} bytes")
                if flags & _END_HEADERS:
                    self._block = None


class _WindowCounter:
    """Events in the last ``window`` seconds, by ``clock``."""

    def __init__(self, clock: IReactorTime, window: float, limit: int) -> None:
        self._clock = clock
        self._window = window
        self._limit = limit
        self._start = clock.seconds()
        self.count = 0

    def add(self) -> bool:
        """Count one; True when the limit is passed."""
        now = self._clock.seconds()
        if now - self._start >= self._window:
            self._start, self.count = now, 0
        self.count += 1
        return self.count > self._limit


class Translation(NamedTuple):
    """An HTTP/2 request's header list as the parts of an HTTP/1.1 request head (see
    :func:`request_fields`)."""

    method: bytes
    path: bytes
    lines: list[tuple[bytes, bytes]]
    #: The request body is passed on chunked (no ``content-length`` came, and the stream goes on).
    chunked: bool
    #: An extended CONNECT for a WebSocket: the ``Sec-WebSocket-Key`` of the handshake sent for it.
    websocket_key: bytes | None = None


def request_head(
    headers: list[tuple[bytes, bytes]], *, ended: bool, extended_connect: bool = False
) -> tuple[bytes, bytes, bool]:
    """An HTTP/2 request's header list as an HTTP/1.1 request head: (head, method, chunked body).
    HttpError when it is malformed or cannot be carried (RFC 9113 §8.2, §8.3); see :func:`request_fields`."""
    method, path, lines, chunked, _ = request_fields(headers, ended=ended, extended_connect=extended_connect)
    out = [b"%s %s HTTP/1.1" % (method, path)]
    out += [b"%s: %s" % field for field in lines]
    return b"\r\n".join(out) + b"\r\n\r\n", method, chunked


def parsed_request_head(method: bytes, path: bytes, lines: list[tuple[bytes, bytes]]) -> RequestHead:
    """What :func:`~dcrouter.proxy.httpmessage.parse_request_head` would make of the head
    :func:`request_head` writes for these: the same limits (fields, head size: ``431``) apply. The other
    checks of that parse hold already (:func:`request_fields`)."""
    if len(lines) > MAX_FIELDS:
        raise HttpError(431, f"more than {MAX_FIELDS} fields")
    size = len(method) + len(path) + 15 + sum(len(name) + len(value) + 4 for name, value in lines)
    if size > MAX_HEAD_BYTES:
        raise HttpError(431, f"head longer than {MAX_HEAD_BYTES} bytes")
    return RequestHead(method, path, b"HTTP/1.1", Fields(tuple(lines)))


def request_fields(
    headers: list[tuple[bytes, bytes]], *, ended: bool, extended_connect: bool = False
) -> Translation:
    """An HTTP/2 request's header list as the parts of an HTTP/1.1 request head. HttpError when it is
    malformed or cannot be carried (RFC 9113 §8.2, §8.3).

    This is the whole check of a request's header list: ``h2``'s own validation is off (it cost more than
    the rest of a request's handling in ``h2``), so everything it refused is refused here, as ``400`` on
    the stream — field names that are not lower-case tokens, values with NUL, CR, LF or surrounding
    whitespace, connection-specific fields, ``TE`` other than ``trailers``, pseudo-header fields unknown,
    repeated or after a regular field, no ``:method``, ``:scheme`` or ``:path``, several ``Host`` fields
    or one that differs from ``:authority``.

    ``CONNECT`` is answered ``501``, unless ``extended_connect`` (the connection advertises
    SETTINGS_ENABLE_CONNECT_PROTOCOL) and it comes with ``:protocol websocket`` (RFC 8441): that becomes
    a WebSocket opening handshake (:func:`~dcrouter.proxy.h2websocket.handshake_fields`). ``:protocol``
    is an unknown pseudo-header field (``400``) without ``extended_connect``, and ``400`` with any method
    but ``CONNECT``; another protocol than ``websocket`` is ``501``."""
    allowed = _PSEUDO_EXTENDED if extended_connect else _PSEUDO
    pseudo: dict[bytes, bytes] = {}
    fields: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    host: bytes | None = None
    length: bytes | None = None
    regular = False
    for name, value in headers:
        if name[:1] == b":":
            if regular or name in pseudo or name not in allowed:
                raise HttpError(400, "a pseudo-header field unknown, repeated or after a regular field")
            pseudo[name] = value
            continue
        regular = True
        if not _FIELD_NAME.match(name) or not _FIELD_VALUE.match(value):
            raise HttpError(400, "a field HTTP/1.1 cannot carry")
        if name == b"cookie":
            cookies.append(value)
        elif name == b"host":
            if host is not None:
                raise HttpError(400, "several Host fields")
            host = value
        elif name == b"content-length":
            length = value
        elif name in _CONNECTION_SPECIFIC or (name == b"te" and value.lower() != b"trailers"):
            raise HttpError(400, f"connection-specific field {name.decode()!r}")
        elif name not in _NOT_FORWARDED:
            fields.append((name, value))
    method = pseudo.get(b":method", b"")
    protocol = pseudo.get(PROTOCOL)
    key: bytes | None = None
    if protocol is not None:
        if method != b"CONNECT":
            raise HttpError(400, ":protocol in a request other than CONNECT")
        if protocol != WEBSOCKET:
            raise HttpError(501, "extended CONNECT is offered for websocket only")
        method = b"GET"
        fields, key = handshake_fields(fields)
    elif method == b"CONNECT":
        raise HttpError(501, "CONNECT is not served over HTTP/2")
    authority = pseudo.get(b":authority", host)
    if host is not None and authority != host:
        raise HttpError(400, ":authority and Host differ")
    path = pseudo.get(b":path", b"")
    if b":scheme" not in pseudo:
        raise HttpError(400, "no :scheme")
    if not authority or not _TARGET.match(authority) or not _TARGET.match(path) or not _METHOD.match(method):
        raise HttpError(400, "no usable :authority, :path or :method")
    lines = [(b"Host", authority), *fields]
    if cookies:
        lines.append((b"Cookie", b"; ".join(cookies)))
    if key is not None:
        # No body: what the stream carries after the handshake is the WebSocket's.
        return Translation(method, path, lines, False, key)
    chunked = False
    if length is not None:
        lines.append((b"Content-Length", length))
    elif not ended:
        lines.append((b"Transfer-Encoding", b"chunked"))
        chunked = True
    # One exchange per front: it closes after the response, which ends the stream.
    lines.append((b"Connection", b"close"))
    return Translation(method, path, lines, chunked)


def response_fields(head: Any) -> list[tuple[bytes, bytes]]:
    """An HTTP/1.1 response head's fields as HTTP/2 fields: names in lower case, connection-specific ones
    (and those the Connection field names) left out."""
    named = {token.lower() for token in head.fields.tokens(b"connection")}
    out = [(b":status", b"%d" % head.status)]
    for name, value in head.fields.lines:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower == b"transfer-encoding" or lower in named:
            continue
        out.append((lower, value))
    return out


@implementer(IPushProducer)
class StreamChannel:
    """The transport a stream's front writes its HTTP/1.1 response to; see the module docstring."""

    disconnecting = False

    def __init__(self, connection: Http2Connection, stream_id: int, method: bytes) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.method = method
        self.front: IProtocol | None = None
        self.producer: IPushProducer | None = None
        self.paused = False
        self.unacknowledged = 0
        self.outbound = bytearray()
        self.end_pending = False
        self.finished = False  # END_STREAM sent or the stream reset: nothing more goes out
        self.chunked = False  # the request body is passed on chunked (no Content-Length came)
        self.lost = False  # the front was told the connection is gone
        #: An extended CONNECT's stream (RFC 8441): the key of the WebSocket handshake sent for it, until
        #: the answer to that handshake came (then None again, if it was no switch to the WebSocket).
        self.websocket_key: bytes | None = None
        self.tunnel = False  # the WebSocket is open: the stream carries its bytes both ways
        self.eof_pending = False  # the client ended the stream before the WebSocket was open
        self._head: HeadBuffer | None = HeadBuffer(leading_crlf=False)
        self._body: Any = None
        self._remaining: int | None = None
        self._producer_paused = False
        self.streaming = True
        self._pulling = False
        self._written = 0

    # -- the transport the front sees -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.finished or not data:
            return
        self._written += len(data)
        try:
            self._response(data)
        except HttpError as error:
            log.info("proxy: h2 stream {id}: bad response ({reason})", id=self.stream_id, reason=error.reason)
            self.abortConnection()

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        if not self.finished:
            if self._body is not None and self._remaining is None and not isinstance(self._body, ChunkedBody):
                self.end_pending = True  # a body delimited by the close ends here
                self.connection.flush(self)
            elif not self.end_pending:
                self.connection.reset(self, ErrorCodes.INTERNAL_ERROR)
        self.connection.front_closed(self)

    def abortConnection(self) -> None:
        self.disconnecting = True
        if not self.finished:
            self.connection.reset(self, ErrorCodes.INTERNAL_ERROR)
        self.connection.front_closed(self)

    def getPeer(self) -> Any:
        return self.connection.transport.getPeer()

    def getHost(self) -> Any:
        return self.connection.transport.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        self.streaming = streaming
        if not streaming:
            self._pull()
        elif self._producer_paused:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    # -- the client side, paused by the front ---------------------------------------------------------

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.unacknowledged:
            count, self.unacknowledged = self.unacknowledged, 0
            self.connection.acknowledge(self, count)

    def stopProducing(self) -> None:
        self.abortConnection()

    # -- the response, HTTP/1.1 to HTTP/2 -------------------------------------------------------------

    def _response(self, data: bytes) -> None:
        while data and not self.finished:
            if self._head is not None:
                complete = self._head.feed(data)
                if complete is None:
                    return
                raw, data = complete
                self._response_head(raw)
                continue
            if self._body is None or self.end_pending:
                return  # bytes past the response: nothing can carry them
            if isinstance(self._body, ChunkedBody):
                body, data = self._body.feed(data)
                self._send(_unchunk(body), end=self._body.done)
                continue
            if self._remaining is None:
                self._send(data, end=False)
                return
            take = data[: self._remaining]
            data = data[self._remaining :]
            self._remaining -= len(take)
            self._send(take, end=self._remaining == 0)

    def relay_response_head(
        self, head: ResponseHead, drop: frozenset[bytes], add: tuple[tuple[bytes, bytes], ...]
    ) -> None:
        """The front's response head, parsed already (an :class:`~dcrouter.proxy.http.HttpForwarder`
        has it so): as if written as HTTP/1.1 bytes, without writing and parsing them again."""
        if self.finished or self._head is None:
            return
        lines = relayed_fields(head, drop=drop, add=add)
        try:
            self._response_head(None, ResponseHead(head.version, head.status, head.reason, Fields(lines)))
        except HttpError as error:
            log.info("proxy: h2 stream {id}: bad response ({reason})", id=self.stream_id, reason=error.reason)
            self.abortConnection()

    def _response_head(self, raw: bytes | None, parsed: ResponseHead | None = None) -> None:
        head = parsed if parsed is not None else parse_response_head(raw or b"")
        if self.websocket_key is not None and self._websocket_head(head):
            return
        if head.status == 101:
            raise HttpError(502, "no protocol switch over HTTP/2")
        if head.status < 200:
            self.connection.send_headers(self, response_fields(head), end=False)
            self._head = HeadBuffer(leading_crlf=False)
            return
        self._head = None
        framing = response_framing(self.method, head)
        self.connection.send_headers(self, response_fields(head), end=framing.kind == "none")
        if framing.kind == "none":
            self.finished = True
        elif framing.kind == "chunked":
            self._body = ChunkedBody()
        elif framing.kind == "length":
            self._body, self._remaining = True, framing.length
            if framing.length == 0:
                self._send(b"", end=True)
        else:
            self._body = True

    def _websocket_head(self, head: ResponseHead) -> bool:
        """The answer to an extended CONNECT's handshake: True when taken here. A ``101`` with the right
        accept opens the stream (``200``); a ``101`` without it, or a ``2xx`` (which would read as the
        WebSocket opened), is answered ``502``; interim responses are not relayed. Any other answer (the
        route's ``401``, ``429``, ``421``, a backend's refusal) is relayed as it is: False."""
        assert self.websocket_key is not None
        status = head.status
        if status < 200 and status != 101:
            self._head = HeadBuffer(leading_crlf=False)
            return True
        if status >= 300:
            self.websocket_key = None
            return False
        self._head = None
        self._body = True  # from now on the stream's data is the WebSocket's, until the front closes
        try:
            fields = opened_fields(head, self.websocket_key)
        except HttpError as error:
            log.info("proxy: h2 stream {id}: no WebSocket ({reason})", id=self.stream_id, reason=error.reason)
            body = error.reason.encode() + b"\n"
            self._remaining = len(body)
            fields = [
                (b":status", b"502"),
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", b"%d" % len(body)),
            ]
            self.connection.send_headers(self, fields, end=False)
            self._send(body, end=True)
            # The front thinks itself upgraded: it is told the stream is gone, and drops its backend.
            self.disconnecting = True
            self.connection.front_closed(self)
            return True
        self.websocket_key = None
        self.tunnel = True
        self.connection.send_headers(self, fields, end=False)
        if self.eof_pending:
            self.connection.tunnel_eof(self)
        return True

    def _send(self, data: bytes, *, end: bool) -> None:
        self.outbound += data
        self.end_pending = self.end_pending or end
        self.connection.flush(self)

    def flushed(self) -> None:
        """Called after a flush: pause or resume the backend by what is still buffered, or ask a pull
        producer (a static file) for more."""
        if self.producer is not None and not self.streaming:
            self._pull()
            return
        high = len(self.outbound) > _BUFFER_HIGH
        if high != self._producer_paused:
            self._producer_paused = high
            if self.producer is not None:
                (self.producer.pauseProducing if high else self.producer.resumeProducing)()

    def _pull(self) -> None:
        if self._pulling:
            return
        self._pulling = True
        try:
            while self.producer is not None and not self.streaming:
                if len(self.outbound) > _BUFFER_HIGH:
                    return
                written = self._written
                self.producer.resumeProducing()
                if self._written == written:
                    return  # nothing came: the producer writes later, or is done
        finally:
            self._pulling = False


def _unchunk(encoded: bytes) -> bytes:
    """The data of a canonical chunked encoding as :class:`ChunkedBody` writes it (``%x CRLF data CRLF``)."""
    out: list[bytes] = []
    i = 0
    while i < len(encoded):
        end = encoded.index(b"\r\n", i)
        size = int(encoded[i:end], 16)
        if size == 0:
            break
        out.append(encoded[end + 2 : end + 2 + size])
        i = end + 2 + size + 2
    return b"".join(out)


class Http2Connection(Protocol):
    """HTTP/2 inside a terminated TLS connection; see the module docstring. ``make_front`` gives the
    protocol that serves one request (a fresh one per stream). ``websockets``: extended CONNECT (RFC 8441)
    is advertised and served (for routes whose fronts may forward an upgrade)."""

    transport: Any

    def __init__(
        self,
        make_front: Callable[[], IProtocol],
        *,
        clock: IReactorTime,
        limits: Http2Limits | None = None,
        client_ip: str = "",
        websockets: bool = True,
    ) -> None:
        self.limits = limits or Http2Limits()
        self.websockets = websockets
        self._make_front = make_front
        self._clock = clock
        self.client_ip = client_ip
        # Headers are checked by request_head (inbound) and come from a parsed HTTP/1.1 head (outbound):
        # h2's validation and normalisation of both would only repeat that, at a high cost per request.
        config = H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = H2Connection(config=config)
        self.streams: dict[int, StreamChannel] = {}
        self.closed = False
        self.goaway: str | None = None  # why we sent GOAWAY, when we did
        self._meter = HeaderBlockMeter(self.limits.max_header_block_bytes)
        self._resets = _WindowCounter(clock, self.limits.window, self.limits.max_resets)
        self._control = _WindowCounter(clock, self.limits.window, self.limits.max_control_frames)
        self._idle: IDelayedCall | None = None
        self._write_call: IDelayedCall | None = None
        self._closed_fronts: list[StreamChannel] = []
        self._closed_call: IDelayedCall | None = None
        self._last_activity = clock.seconds()

    def connectionMade(self) -> None:
        limits = self.limits
        self.h2.initiate_connection()
        self.h2.update_settings(
            {
                SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
                SettingCodes.INITIAL_WINDOW_SIZE: limits.initial_window_size,
                SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.ENABLE_CONNECT_PROTOCOL: int(self.websockets),
            }
        )
        # h2 applies our settings once the client acknowledges them; until then (one round trip) the
        # protocol's defaults hold, except for the header list size, bounded from the start.
        self.h2.decoder.max_header_list_size = limits.max_header_list_size
        # The connection's own receive window (65535 by the protocol) grows by as much again as one stream's:
        # a stream paused by a slow backend must not hold up the others' uploads, and what the client may
        # send before the proxy passes it on stays bounded by this one window.
        self.h2.increment_flow_control_window(limits.initial_window_size)
        self._write()
        if limits.idle_timeout is not None:
            self._idle = self._clock.callLater(limits.idle_timeout, self._idle_check)

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self._last_activity = self._clock.seconds()
        try:
            self._meter.feed(data)
            events = self.h2.receive_data(data)
            for event in events:
                self._event(event)
        except ValueError as error:  # the header block meter
            self._calm(str(error))
            return
        except _Calm as error:
            self._calm(str(error))
            return
        except ProtocolError as error:
            log.info("proxy: {client}: HTTP/2 protocol error: {error}", client=self.client_ip, error=error)
            self.goaway = f"protocol error: {error}"
            self._end()
            return
        self._write()

    def _event(self, event: Any) -> None:
        if isinstance(event, RequestReceived):
            self._request(event)
        elif isinstance(event, DataReceived):
            self._data(event)
        elif isinstance(event, StreamEnded):
            channel = self.streams.get(event.stream_id)
            if channel is not None and channel.front is not None:
                if channel.chunked:
                    channel.front.dataReceived(b"0\r\n\r\n")
                elif channel.tunnel:
                    self.tunnel_eof(channel)
                elif channel.websocket_key is not None:
                    channel.eof_pending = True  # passed on once the WebSocket is open
        elif isinstance(event, StreamReset):
            if event.remote_reset and self._resets.add():
                raise _Calm(
                    f"more than {self.limits.max_resets} streams reset within {self.limits.window:g}s"
                )
            channel = self.streams.get(event.stream_id)
            if channel is not None:
                channel.finished = True
                self._lose_front(channel, ConnectionLost("stream reset by the client"))
        elif isinstance(event, PingReceived | RemoteSettingsChanged):
            if self._control.add():
                raise _Calm(
                    f"more than {self.limits.max_control_frames} SETTINGS and PING frames within "
                    f"{self.limits.window:g}s"
                )
        elif isinstance(event, WindowUpdated):
            targets = (
                list(self.streams.values()) if event.stream_id == 0 else [self.streams.get(event.stream_id)]
            )
            for channel in targets:
                if channel is not None:
                    self.flush(channel)
        elif isinstance(event, ConnectionTerminated):
            self._end()

    def _request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        raw: bytes | None = None
        front: Any = None
        try:
            method, path, lines, chunked, websocket_key = request_fields(
                list(event.headers or ()),
                ended=event.stream_ended is not None,
                extended_connect=self.websockets,
            )
            front = self._make_front()
            if getattr(front, "head_received", None) is not None:
                # A forwarder takes the head parsed: no HTTP/1.1 bytes written here to be parsed there.
                head = parsed_request_head(method, path, lines)
            else:
                out = [b"%s %s HTTP/1.1" % (method, path)]
                out += [b"%s: %s" % field for field in lines]
                raw = b"\r\n".join(out) + b"\r\n\r\n"
        except HttpError as error:
            channel = StreamChannel(self, stream_id, b"GET")
            self.streams[stream_id] = channel
            reason = error.reason
            channel.write(simple_response(error.status, reason, body=reason.encode() + b"\n"))
            channel.loseConnection()
            return
        channel = StreamChannel(self, stream_id, method)
        channel.chunked = chunked
        channel.websocket_key = websocket_key
        self.streams[stream_id] = channel
        channel.front = front
        front.makeConnection(channel)
        if not channel.lost:
            if raw is None:
                front.head_received(head)
            else:
                front.dataReceived(raw)

    def _data(self, event: DataReceived) -> None:
        channel = self.streams.get(event.stream_id)
        length = event.flow_controlled_length or 0
        if channel is None or channel.front is None or channel.lost:
            self.h2.acknowledge_received_data(length, event.stream_id)
            return
        data = event.data or b""
        if data:
            channel.front.dataReceived(b"%x\r\n%s\r\n" % (len(data), data) if channel.chunked else data)
        if channel.paused:
            channel.unacknowledged += length
        else:
            self.acknowledge(channel, length)

    # -- what channels ask ----------------------------------------------------------------------------

    def acknowledge(self, channel: StreamChannel, count: int) -> None:
        if count and not self.closed:
            try:
                self.h2.acknowledge_received_data(count, channel.stream_id)
            except (StreamClosedError, ProtocolError):
                return
            self._write()

    def send_headers(self, channel: StreamChannel, headers: list[tuple[bytes, bytes]], *, end: bool) -> None:
        if self.closed:
            return
        try:
            self.h2.send_headers(channel.stream_id, headers, end_stream=end)
        except (StreamClosedError, ProtocolError):
            channel.finished = True
            return
        if end:
            self._stream_done(channel)
        self._write()

    def flush(self, channel: StreamChannel) -> None:
        """Send what the stream's flow-control window allows of its buffered response."""
        if self.closed or channel.finished:
            return
        sid = channel.stream_id
        try:
            while channel.outbound:
                size = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
                if size <= 0:
                    break
                chunk = bytes(channel.outbound[:size])
                del channel.outbound[:size]
                last = channel.end_pending and not channel.outbound
                self.h2.send_data(sid, chunk, end_stream=last)
                if last:
                    self._stream_done(channel)
            if channel.end_pending and not channel.outbound and not channel.finished:
                self.h2.end_stream(sid)
                self._stream_done(channel)
        except (StreamClosedError, ProtocolError):
            self._stream_done(channel)
            return
        self._write()
        channel.flushed()

    def reset(self, channel: StreamChannel, code: ErrorCodes) -> None:
        if channel.finished or self.closed:
            return
        channel.finished = True
        try:
            self.h2.reset_stream(channel.stream_id, code)
        except (StreamClosedError, ProtocolError):
            pass
        self.streams.pop(channel.stream_id, None)
        self._write()

    def tunnel_eof(self, channel: StreamChannel) -> None:
        """The client ended a WebSocket's stream (END_STREAM): its half-close, to the front (which shuts
        its backend connection's sending side). Not at once: the front is told of the open WebSocket by
        the write that opened it, and takes the half-close only once it has finished handling it."""

        def half_close() -> None:
            front = channel.front
            if channel.lost or front is None:
                return
            if IHalfCloseableProtocol.providedBy(front):
                front.readConnectionLost()
            else:
                channel.loseConnection()

        self._clock.callLater(0, half_close)

    def front_closed(self, channel: StreamChannel) -> None:
        """The front closed its side: it is told the connection is gone (as a transport would, later)."""
        # One timer for the fronts closed in this reactor turn (often a stream each), not one per front.
        self._closed_fronts.append(channel)
        if self._closed_call is None:
            self._closed_call = self._clock.callLater(0, self._lose_closed_fronts)

    def _lose_closed_fronts(self) -> None:
        self._closed_call = None
        closed, self._closed_fronts = self._closed_fronts, []
        for channel in closed:
            self._lose_front(channel, ConnectionDone("stream done"))

    def _stream_done(self, channel: StreamChannel) -> None:
        """Nothing more goes out on the stream; the front closes when it sees its response end."""
        channel.finished = True
        self.streams.pop(channel.stream_id, None)

    def _lose_front(self, channel: StreamChannel, reason: Exception) -> None:
        if channel.lost:
            return
        channel.lost = True
        if not channel.finished and not channel.end_pending:
            self.reset(channel, ErrorCodes.CANCEL)
        if channel.finished:
            self.streams.pop(channel.stream_id, None)
        if channel.front is not None:
            channel.front.connectionLost(Failure(reason))

    # -- the connection -------------------------------------------------------------------------------

    def _write(self) -> None:
        """Send what ``h2`` has queued, once per reactor turn: the frames of every stream that advanced in
        this turn (a response's HEADERS and DATA, other streams' frames) go out in one TLS write."""
        if self._write_call is None and not self.closed:
            self._write_call = self._clock.callLater(0, self._write_now)

    def _write_now(self) -> None:
        if self._write_call is not None and self._write_call.active():
            self._write_call.cancel()
        self._write_call = None
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def _calm(self, why: str) -> None:
        log.info("proxy: {client}: HTTP/2 connection ended: {why}", client=self.client_ip, why=why)
        self.goaway = why
        try:
            self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        except ProtocolError:
            pass
        self._end()

    def _end(self) -> None:
        if not self.closed:
            self._write_now()
            self.closed = True
            self.transport.loseConnection()

    def _idle_check(self) -> None:
        timeout = self.limits.idle_timeout
        assert timeout is not None
        self._idle = None
        if self.closed:
            return
        idle_for = self._clock.seconds() - self._last_activity
        if not self.streams and idle_for >= timeout:
            self.goaway = f"idle for {timeout:g}s"
            self.h2.close_connection(ErrorCodes.NO_ERROR)
            self._end()
            return
        self._idle = self._clock.callLater(max(timeout - idle_for, 1.0), self._idle_check)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        for call in (self._idle, self._write_call):
            if call is not None and call.active():
                call.cancel()
        self._idle = self._write_call = None
        for channel in list(self.streams.values()):
            channel.finished = True
            self._lose_front(channel, ConnectionLost("HTTP/2 connection lost"))
        self.streams.clear()


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class AlpnFront(Protocol):
    """The application protocol of a terminated TLS connection that offered ``h2``: HTTP/1.1 (``http1``,
    connected at once, as without HTTP/2) unless the handshake chose ``h2``, then ``http2()``."""

    transport: Any

    def __init__(self, http1: IProtocol, http2: Callable[[], IProtocol]) -> None:
        self.http1 = http1
        self._http2 = http2
        self.inner: IProtocol = http1

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.http1.makeConnection(transport)

    def handshakeCompleted(self) -> None:
        if getattr(self.transport, "negotiatedProtocol", None) != b"h2":
            return
        self.http1.connectionLost(Failure(ConnectionDone("HTTP/2 chosen")))
        self.inner = self._http2()
        self.inner.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def readConnectionLost(self) -> None:
        if IHalfCloseableProtocol.providedBy(self.inner):
            self.inner.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Never sent by the proxy's terminated connections."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.inner.connectionLost(reason)
