"""HTTP/2 over cleartext TCP to backends, with prior knowledge (RFC 9113 §3.3): ``action.target.protocol =
"h2c"`` (a dcrouter addition; SmartProxy has no such field).

**Where it fits.** The forwarder (:class:`~dcrouter.proxy.http.HttpForwarder`) speaks HTTP/1.1 to a backend
connection's transport. For an h2c route, that transport is an :class:`H2cStream`: one stream of a shared
:class:`H2cConnection`. The stream parses the HTTP/1.1 request the forwarder writes (head, then the body
framed by Content-Length or canonical chunks), sends it as HEADERS and DATA, and hands the backend's response
back as HTTP/1.1 bytes (``Content-Length`` kept, else chunked; always ``Connection: close``, so the forwarder
never pools the stream). So every request a forwarder carries — an HTTP/1.1 client's, an HTTP/2 client
stream's — maps onto a backend stream, and the forwarder's checks, header changes, timeouts and errors apply
unchanged: a backend that resets a stream (or whose connection ends) before the response head gets the
client a ``502``; after, the client's connection (or stream) is aborted, as for a truncated HTTP/1.1 response.

**Sharing.** :class:`H2cPool` keeps the connections per target (address and port), shared by every client
connection of the process. A request takes a stream on a connection that has room under the backend's
``SETTINGS_MAX_CONCURRENT_STREAMS`` (and :data:`MAX_STREAMS`); when none has, a further connection is
opened. A connection is used once the backend's first SETTINGS arrived. After a GOAWAY a connection gets no
new stream; its streams at or below the last stream id finish, later ones fail (``502``); new requests go to
another connection. A connection without streams for :data:`IDLE_SECONDS` is closed.

**Flow control** both ways: request DATA goes out as the backend's windows allow; beyond
:data:`BUFFER_HIGH` bytes waiting the client is paused. Response data is acknowledged as the client side takes
it (the forwarder pauses the stream for a slow client: nothing is acknowledged until it resumes).

WebSocket upgrades are not carried over h2c: the session keeps them on an HTTP/1.1 backend connection.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable
from http import HTTPStatus
from typing import Any

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from dcrouter.log import logger
from dcrouter.proxy.httpmessage import (
    HOP_BY_HOP,
    REASONS,
    HeadBuffer,
    HttpError,
    RequestHead,
    parse_request_head,
    request_framing,
)

log = logger(__name__)

#: Streams opened on one backend connection at most, whatever the backend allows.
MAX_STREAMS = 100
#: Seconds a backend connection without streams is kept.
IDLE_SECONDS = 30.0
#: Seconds a new connection may take to send its first SETTINGS frame (a backend that does not speak h2c
#: may wait for more of a request forever); the requests waiting for it then get a ``502``.
SETTINGS_SECONDS = 10.0
#: The receive window per stream the proxy advertises to backends (the connection's grows by as much).
WINDOW = 1024 * 1024
#: Request bytes held for a stream beyond the backend's window before the client is paused.
BUFFER_HIGH = 64 * 1024

_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
_FIELD_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\x20-\x7e\x80-\xff\t]*[\x21-\x7e\x80-\xff])?)?\Z")
_ABSOLUTE = re.compile(rb"https?://([^/?#]*)(.*)\Z", re.IGNORECASE | re.DOTALL)
#: Request fields that never go to an h2 backend (RFC 9113 §8.2.2), or that become pseudo-header fields.
_DROPPED = HOP_BY_HOP | {b"host", b"transfer-encoding", b"connection", b"keep-alive", b"proxy-connection"}


def request_headers(head: RequestHead) -> list[tuple[bytes, bytes]]:
    """An HTTP/1.1 request head as an HTTP/2 header list: pseudo-header fields first (``:authority`` from
    ``Host``, ``:scheme`` ``http``: the backend is reached in cleartext), names in lower case,
    connection-specific fields and those ``Connection`` names dropped, ``TE`` only as ``trailers``."""
    target = head.target
    authority = head.fields.get(b"host") or b""
    absolute = _ABSOLUTE.match(target)
    if absolute is not None:
        authority = absolute.group(1) or authority
        target = absolute.group(2) or b"/"
    if not target.startswith(b"/") and not (target == b"*" and head.method == b"OPTIONS"):
        raise HttpError(400, "request target not in origin form")
    named = {token.lower() for token in head.fields.tokens(b"connection")}
    out = [(b":method", head.method), (b":scheme", b"http"), (b":authority", authority), (b":path", target)]
    for name, value in head.fields.lines:
        lower = name.lower()
        if lower == b"te":
            if b"trailers" in value.lower():
                out.append((b"te", b"trailers"))
            continue
        if lower in _DROPPED or lower in named:
            continue
        out.append((lower, value))
    return out


def response_head(status: int, headers: list[tuple[bytes, bytes]], *, no_body: bool) -> tuple[bytes, bool]:
    """An HTTP/2 response header list as an HTTP/1.1 response head: (head, body chunked). HttpError 502 for
    a field HTTP/1.1 cannot carry. The head always says ``Connection: close`` (a stream is never reused)."""
    lines = [b"HTTP/1.1 %d %s" % (status, _reason(status))]
    length = False
    for name, value in headers:
        if name[:1] == b":":
            continue
        if not _FIELD_NAME.match(name) or not _FIELD_VALUE.match(value):
            raise HttpError(502, "backend sent a field HTTP/1.1 cannot carry")
        if name in HOP_BY_HOP or name == b"transfer-encoding":
            continue
        if name == b"content-length":
            length = True
        lines.append(b"%s: %s" % (name, value))
    chunked = not no_body and not length and status >= 200
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
    if status >= 200:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n", chunked


class ChunkDecoder:
    """The canonical chunked encoding :class:`~dcrouter.proxy.httpmessage.ChunkedBody` writes (``size CRLF
    data CRLF``, ``0 CRLF CRLF``, no extensions, no trailers) back to the data."""

    def __init__(self) -> None:
        self.done = False
        self._buffer = b""
        self._remaining = 0  # data bytes left of the current chunk; then its CRLF
        self._in_data = False

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out: list[bytes] = []
        while self._buffer and not self.done:
            if self._in_data:
                take = min(self._remaining, len(self._buffer))
                out.append(self._buffer[:take])
                self._buffer = self._buffer[take:]
                self._remaining -= take
                if self._remaining:
                    break
                if len(self._buffer) < 2:
                    break
                self._buffer = self._buffer[2:]
                self._in_data = False
                continue
            line, crlf, rest = self._buffer.partition(b"\r\n")
            if not crlf:
                break
            size = int(line, 16)
            if size == 0:
                if not rest.startswith(b"\r\n"):
                    break
                self.done = True
                self._buffer = b""
                break
            self._buffer = rest
            self._remaining = size
            self._in_data = True
        return b"".join(out)


class H2cStream:
    """One request's stream: the transport of its :class:`~dcrouter.proxy.http.HttpBackend` (see the module
    docstring)."""

    connected = True
    disconnecting = False

    def __init__(self, connection: H2cConnection, backend: Any) -> None:
        self.connection = connection
        self.backend = backend
        self.stream_id: int | None = None
        self._head = HeadBuffer()
        self._method = b"GET"
        self._length: int | None = None  # request body bytes still to come (Content-Length)
        self._chunks: ChunkDecoder | None = None
        self.outbound = bytearray()
        self.end_pending = False
        self.sent_end = False
        self.chunked_response = False
        self.response_started = False
        self.finished = False  # END_STREAM received or the stream reset/lost
        self.closed = False  # the forwarder let go of it
        self.producer: IPushProducer | None = None
        self.producer_paused = False
        self.paused = False
        self.unacknowledged = 0
        #: Counted in the connection's streams before its HEADERS are sent.
        self.reserved = False

    # -- the transport the forwarder writes to --------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.closed or self.finished:
            return
        try:
            if self.stream_id is None:
                complete = self._head.feed(data)
                if complete is None:
                    return
                raw, data = complete
                self._start(parse_request_head(raw))
            if self._chunks is not None:
                data = self._chunks.feed(data)
                if self._chunks.done:
                    self.end_pending = True
            elif self._length is not None:
                data = data[: self._length]
                self._length -= len(data)
                if self._length == 0:
                    self.end_pending = True
        except (HttpError, ValueError) as error:
            self.connection.fail_stream(self, f"request not translatable: {error}")
            return
        if data:
            self.outbound += data
        self.connection.flush(self)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def _start(self, head: RequestHead) -> None:
        framing = request_framing(head)
        headers = request_headers(head)
        self._method = head.method
        end = framing.kind == "none" or (framing.kind == "length" and framing.length == 0)
        if framing.kind == "chunked":
            self._chunks = ChunkDecoder()
        elif framing.kind == "length":
            self._length = framing.length
        self.connection.open_stream(self, headers, end=end)

    def loseConnection(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.producer = None
        if self.reserved:
            self.connection.unreserve(self)
            self.connection.pool.room(self.connection)
        if not self.finished:
            self.connection.cancel(self)

    abortConnection = loseConnection

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.unacknowledged:
            count, self.unacknowledged = self.unacknowledged, 0
            self.connection.acknowledge(self, count)

    def stopProducing(self) -> None:
        self.loseConnection()

    def getPeer(self) -> Any:
        return self.connection.transport.getPeer()

    def getHost(self) -> Any:
        return self.connection.transport.getHost()

    # -- from the connection --------------------------------------------------------------------------

    def deliver(self, data: bytes) -> None:
        if not self.closed:
            self.backend.dataReceived(data)

    def lost(self, why: str) -> None:
        """The stream failed (reset, connection gone): the forwarder learns it as a lost connection."""
        self.finished = True
        self.connected = False
        if not self.closed:
            self.closed = True
            self.backend.connectionLost(Failure(ConnectionLost(why)))

    def drained(self) -> None:
        """Buffered request bytes went out: the client may send more."""
        if self.producer is not None and self.producer_paused and len(self.outbound) < BUFFER_HIGH:
            self.producer_paused = False
            self.producer.resumeProducing()

    def filling(self) -> None:
        if self.producer is not None and not self.producer_paused and len(self.outbound) >= BUFFER_HIGH:
            self.producer_paused = True
            self.producer.pauseProducing()


class _ClientConnection(H2Connection):
    """``h2``'s connection, but one that still takes the frames of streams a GOAWAY lets finish (RFC 9113
    §6.8: those up to its last stream id); ``h2`` itself treats every frame after a GOAWAY as an error."""

    def _receive_goaway_frame(self, frame: Any) -> Any:
        state = self.state_machine.state
        result = super()._receive_goaway_frame(frame)
        if state != ConnectionState.CLOSED:
            self.state_machine.state = state
        return result


class H2cConnection(Protocol):
    """One HTTP/2 connection to a backend, its streams those of many forwarders."""

    transport: Any
    target: Any = None

    def __init__(self, pool: H2cPool, key: Hashable, clock: IReactorTime) -> None:
        self.pool = pool
        self.key = key
        self._clock = clock
        self.h2 = _ClientConnection(
            config=H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=True)
        )
        self.streams: dict[int, H2cStream] = {}
        self.ready = False  # the backend's first SETTINGS came
        self.goaway = False
        self.closed = False
        self._idle: IDelayedCall | None = None
        self._settings_call: IDelayedCall | None = None
        #: Streams handed to forwarders whose request head has not been sent yet.
        self.reserved = 0
        self._settled = False

    @property
    def capacity(self) -> int:
        """Streams that can still be opened on it now."""
        if not self.ready or self.goaway or self.closed:
            return 0
        allowed = min(self.h2.remote_settings.max_concurrent_streams, MAX_STREAMS)
        return allowed - self.h2.open_outbound_streams - self.reserved

    def connectionMade(self) -> None:
        self.h2.initiate_connection()
        self.h2.update_settings({SettingCodes.ENABLE_PUSH: 0, SettingCodes.INITIAL_WINDOW_SIZE: WINDOW})
        self.h2.increment_flow_control_window(WINDOW)
        self._send()
        self._settings_call = self._clock.callLater(SETTINGS_SECONDS, self._no_settings)

    def _no_settings(self) -> None:
        self._settings_call = None
        if not self.ready and not self.closed:
            self._fail(
                f"no HTTP/2 SETTINGS from the backend within {SETTINGS_SECONDS:g}s (does it speak h2c?)"
            )

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as error:
            self._fail(f"HTTP/2 protocol error from the backend: {error}")
            return
        self._settled = False
        for event in events:
            self._event(event)
        if self._settled:
            # Streams are handed out once every event of this read is handled (``h2`` has applied all
            # SETTINGS frames of the read already: a server's limits in its second frame hold too).
            self.pool.room(self)
        self._send()

    def _event(self, event: Any) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, RemoteSettingsChanged):
            first = not self.ready
            self.ready = True
            if first or SettingCodes.MAX_CONCURRENT_STREAMS in event.changed_settings:
                self._settled = True
            if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                for each in list(self.streams.values()):
                    self.flush(each)
        elif isinstance(event, ResponseReceived | InformationalResponseReceived) and stream is not None:
            self._response(stream, event)
        elif isinstance(event, DataReceived) and stream is not None:
            length = event.flow_controlled_length or 0
            data = event.data or b""
            if stream.closed:
                self._ack(event.stream_id, length)
                return
            if data:
                stream.deliver(b"%x\r\n%s\r\n" % (len(data), data) if stream.chunked_response else data)
            if stream.paused:
                stream.unacknowledged += length
            else:
                self._ack(event.stream_id, length)
        elif isinstance(event, StreamEnded) and stream is not None:
            if not stream.sent_end:
                # The response ended before the request body did: the rest of it is not wanted (RFC 9113
                # §8.1); the stream is closed our side too, so that it stops counting against the limit.
                stream.sent_end = True
                stream.outbound.clear()
                try:
                    self.h2.reset_stream(event.stream_id, ErrorCodes.NO_ERROR)
                except (StreamClosedError, ProtocolError):
                    pass
            self._stream_over(stream)
            if stream.chunked_response:
                stream.deliver(b"0\r\n\r\n")
            stream.finished = True
        elif isinstance(event, StreamReset) and stream is not None:
            self._stream_over(stream)
            stream.lost(f"backend reset the stream ({_code(event.error_code)})")
        elif isinstance(event, TrailersReceived) and stream is not None:
            pass  # trailer fields are not passed on (the HTTP/1.1 side drops them too)
        elif isinstance(event, WindowUpdated):
            targets = [stream] if event.stream_id else list(self.streams.values())
            for target in targets:
                if target is not None:
                    self.flush(target)
        elif isinstance(event, ConnectionTerminated):
            self._goaway(event)

    def _response(self, stream: H2cStream, event: Any) -> None:
        headers = list(event.headers or ())
        status_text = dict(headers).get(b":status", b"")
        try:
            status = int(status_text)
            no_body = stream._method == b"HEAD" or status in (204, 304)
            head, chunked = response_head(status, headers, no_body=no_body)
        except (ValueError, HttpError) as error:
            self.fail_stream(stream, f"backend response not translatable: {error}")
            return
        if status >= 200:
            stream.chunked_response = chunked
            stream.response_started = True
        stream.deliver(head)

    def _goaway(self, event: ConnectionTerminated) -> None:
        """No new streams here; those the backend will not process fail; the rest finish."""
        self.goaway = True
        self.pool.forget(self)
        last = event.last_stream_id if event.last_stream_id is not None else 0
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last or event.error_code not in (ErrorCodes.NO_ERROR, 0):
                self.streams.pop(stream_id, None)
                stream.lost(f"backend sent GOAWAY ({_code(event.error_code)})")
        self._maybe_done()

    # -- what streams ask -----------------------------------------------------------------------------

    def open_stream(self, stream: H2cStream, headers: list[tuple[bytes, bytes]], *, end: bool) -> None:
        self.unreserve(stream)
        if self.closed or self.goaway:
            stream.lost("backend connection gone before the request")
            return
        stream_id = self.h2.get_next_available_stream_id()
        stream.stream_id = stream_id
        self.streams[stream_id] = stream
        self._cancel_idle()
        try:
            self.h2.send_headers(stream_id, headers, end_stream=end)
        except ProtocolError as error:
            self.streams.pop(stream_id, None)
            stream.lost(f"stream not opened: {error}")
            return
        stream.sent_end = end
        self._send()

    def flush(self, stream: H2cStream) -> None:
        """Send what the stream's and the connection's windows allow of its request body."""
        sid = stream.stream_id
        if sid is None or self.closed or stream.sent_end or sid not in self.streams:
            return
        try:
            while stream.outbound:
                size = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
                if size <= 0:
                    break
                chunk = bytes(stream.outbound[:size])
                del stream.outbound[:size]
                last = stream.end_pending and not stream.outbound
                self.h2.send_data(sid, chunk, end_stream=last)
                stream.sent_end = last
            if stream.end_pending and not stream.outbound and not stream.sent_end:
                self.h2.end_stream(sid)
                stream.sent_end = True
        except (StreamClosedError, ProtocolError):
            stream.outbound.clear()
            stream.sent_end = True
        self._send()
        stream.filling()
        stream.drained()

    def unreserve(self, stream: H2cStream) -> None:
        if stream.reserved:
            stream.reserved = False
            self.reserved -= 1

    def acknowledge(self, stream: H2cStream, count: int) -> None:
        if stream.stream_id is not None:
            self._ack(stream.stream_id, count)
            self._send()

    def _ack(self, stream_id: int, count: int) -> None:
        if count and not self.closed:
            try:
                self.h2.acknowledge_received_data(count, stream_id)
            except (StreamClosedError, ProtocolError):
                pass

    def cancel(self, stream: H2cStream) -> None:
        """The forwarder let go of a stream still open: RST_STREAM CANCEL."""
        sid = stream.stream_id
        if sid is None or sid not in self.streams:
            return
        self._stream_over(stream)
        stream.finished = True
        try:
            self.h2.reset_stream(sid, ErrorCodes.CANCEL)
        except (StreamClosedError, ProtocolError):
            pass
        self._send()

    def fail_stream(self, stream: H2cStream, why: str) -> None:
        log.info("proxy: h2c backend {key}: {why}", key=self.key, why=why)
        if stream.stream_id is not None and stream.stream_id in self.streams:
            self.cancel(stream)
        stream.lost(why)

    def _stream_over(self, stream: H2cStream) -> None:
        if stream.stream_id is not None:
            self.streams.pop(stream.stream_id, None)
        self.pool.room(self)
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.streams or self.closed:
            return
        if self.goaway:
            self.closed = True
            self._send()
            self.transport.loseConnection()
        elif self._idle is None:
            self._idle = self._clock.callLater(self.pool.idle_timeout, self._idle_over)

    def _idle_over(self) -> None:
        self._idle = None
        if not self.streams and not self.closed:
            self.close()

    def _cancel_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def close(self) -> None:
        """GOAWAY and close (idle, or the pool is closing); streams still open fail."""
        if self.closed:
            return
        self.pool.forget(self)
        try:
            self.h2.close_connection(ErrorCodes.NO_ERROR)
        except ProtocolError:
            pass
        self._send()
        self.closed = True
        self.transport.loseConnection()

    def _fail(self, why: str) -> None:
        log.info("proxy: h2c backend {key}: {why}", key=self.key, why=why)
        self.closed = True
        self.pool.forget(self)
        self.transport.loseConnection()
        self._lose_streams(why)

    def _lose_streams(self, why: str) -> None:
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.lost(why)

    def _send(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not getattr(self.transport, "disconnected", False):
            self.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self._cancel_idle()
        if self._settings_call is not None and self._settings_call.active():
            self._settings_call.cancel()
        self._settings_call = None
        self.pool.forget(self)
        self.pool.lost(self)
        why = reason.getErrorMessage() if reason is not None else "closed"
        self._lose_streams(f"backend connection ended ({why})")


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return REASONS.get(status, "Status").encode()


def _code(code: Any) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


#: Opens a connection to a target with the given protocol factory; fires with it, or None.
Opener = Callable[[Callable[[], Protocol]], "Deferred[Any]"]


class H2cPool:
    """The h2c connections of the process, by target key; see the module docstring."""

    def __init__(self, clock: IReactorTime, *, idle_timeout: float = IDLE_SECONDS) -> None:
        self._clock = clock
        self.idle_timeout = idle_timeout
        self.connections: dict[Hashable, list[H2cConnection]] = {}
        #: key -> the connection being opened for it, and the requests waiting for a stream.
        self._opening: dict[Hashable, bool] = {}
        self._waiting: dict[Hashable, list[tuple[Any, Opener, Deferred[Any]]]] = {}
        self._all: set[H2cConnection] = set()
        self.generation = 0

    def stream(self, key: Hashable, backend: Any, opener: Opener) -> Deferred[Any]:
        """Fires with ``backend`` connected over a new stream to the target ``key`` names — ``(target,
        port)``, the target as the opener sets it on the connection — or None when no connection could be
        opened."""
        result: Deferred[Any] = Deferred()
        self._waiting.setdefault(key, []).append((backend, opener, result))
        self._serve(key)
        return result

    def _serve(self, key: Hashable) -> None:
        waiting = self._waiting.get(key)
        while waiting:
            connection = next((c for c in self.connections.get(key, ()) if c.capacity > 0), None)
            if connection is None:
                break
            backend, _, result = waiting.pop(0)
            self._attach(connection, backend, result)
        settling = any(not c.ready and not c.closed for c in self.connections.get(key, ()))
        if waiting and not self._opening.get(key) and not settling:
            # Room for the first waiting request: a further connection, by its opener.
            self._open(key, waiting[0])
        if not waiting:
            self._waiting.pop(key, None)

    def _attach(self, connection: H2cConnection, backend: Any, result: Deferred[Any]) -> None:
        stream = backend.transport = H2cStream(connection, backend)
        stream.reserved = True
        connection.reserved += 1
        backend.target = connection.target
        result.callback(backend)

    def _open(self, key: Hashable, entry: tuple[Any, Opener, Deferred[Any]]) -> None:
        """Open a further connection with the opener of ``entry`` (a waiting request's)."""
        self._opening[key] = True
        generation = self.generation
        opener = entry[1]

        def opened(connection: H2cConnection | None) -> None:
            self._opening.pop(key, None)
            if connection is None:
                # That opener's own request fails (its target did not answer, or its client left), if it is
                # still waiting; the others try again with theirs.
                waiting = self._waiting.get(key) or []
                for index, waiter in enumerate(waiting):
                    if waiter is entry:
                        del waiting[index]
                        entry[2].callback(None)
                        break
                self._serve(key)
                return
            self._all.add(connection)
            target = getattr(connection, "target", None)
            if isinstance(key, tuple) and target is not None and key[0] != target:
                # Balancing's first choice did not answer; the next did: the connection and the requests
                # waiting are that target's now.
                moved = (target, *key[1:])
                connection.key = moved
                self._waiting.setdefault(moved, []).extend(self._waiting.pop(key, []))
            if generation != self.generation:
                connection.close()
            else:
                self.connections.setdefault(connection.key, []).append(connection)
                # Streams are taken once its SETTINGS came: now if they did already, else by room().
                self._serve(connection.key)

        def crashed(failure: Failure) -> None:
            log.failure("proxy: opening an h2c backend connection failed", failure)
            opened(None)

        opener(lambda: H2cConnection(self, key, self._clock)).addCallbacks(opened, crashed)

    def room(self, connection: H2cConnection) -> None:
        """A connection may take more streams (its SETTINGS, a stream over)."""
        if self._waiting.get(connection.key):
            self._serve(connection.key)

    def forget(self, connection: H2cConnection) -> None:
        """No new streams go to it (GOAWAY, closing, gone)."""
        connections = self.connections.get(connection.key)
        if connections and connection in connections:
            connections.remove(connection)
            if not connections:
                del self.connections[connection.key]
        if self._waiting.get(connection.key):
            self._serve(connection.key)

    def lost(self, connection: H2cConnection) -> None:
        self._all.discard(connection)
        if not connection.ready and self._waiting.get(connection.key):
            # It ended before its SETTINGS: the requests waiting for it fail (no target answered h2c).
            waiting = self._waiting.pop(connection.key)
            for _, _, result in waiting:
                result.callback(None)

    def close(self) -> None:
        """Close every connection (routes reloaded, shutting down); :attr:`closing` counts those not gone."""
        self.generation += 1
        self.connections = {}
        for connection in list(self._all):
            if not connection.streams:
                connection.close()
            else:
                connection.goaway = True  # no new streams; closed when its streams are done

    @property
    def closing(self) -> int:
        return len(self._all)
