"""``GET /api/v1/events``: the event bus as a Server-Sent Events stream (``text/event-stream``).

``?types=message.*,security.*`` selects what the client gets (patterns as
:func:`dcrouter.events.parse_patterns` takes them, comma-separated or repeated; default every event); an
unknown type is ``400`` with a JSON error naming it. Each event is sent as::

    id: <n>
    event: <type>
    data: <the event's JSON form>

and a comment line (``: keepalive``) every ``heartbeat`` seconds keeps idle connections (and proxies in
front of them) open. What a caller may rely on:

- **Bounded per client.** The response is a streaming producer of the request: when the client stops
  reading and the transport's buffer fills, events wait in the client's own buffer, up to ``buffer_size``
  events; one more and the client is disconnected (a slow client never holds memory without bound, and never
  slows the router). ``max_clients`` streams at once; more get ``503``.
- **No history.** A client sees events from when it connected; ``Last-Event-ID`` is not replayed.

Events carry ids and counts, never bodies or passwords, but still tell who mails whom when: serve this only
behind authentication (the management API) or on loopback.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from dcrouter.events import Event, EventBus, IEventSink, UnknownEventType, parse_patterns
from dcrouter.log import logger

log = logger(__name__)


def encode(event: Event, event_id: int) -> bytes:
    """One SSE message for ``event`` (JSON never spans lines, so one ``data:`` line)."""
    data = json.dumps(event.to_json(), separators=(",", ":"), ensure_ascii=False)
    return f"id: {event_id}\nevent: {event.type}\ndata: {data}\n\n".encode()


def _error(request: Request, code: int, error: str, message: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps({"error": {"code": error, "message": message}}).encode("utf-8")


@implementer(IEventSink, IPushProducer)
class StreamClient:
    """One connected SSE client: a sink on the bus and the streaming producer of its response."""

    def __init__(
        self, request: Request, resource: EventStreamResource, *, buffer_size: int, heartbeat: float
    ) -> None:
        self.name = "event stream client"
        self._request = request
        self._resource = resource
        self._buffer: deque[bytes] = deque()
        self._buffer_size = buffer_size
        self._heartbeat = heartbeat
        self._paused = False
        self._closed = False
        self._timer: IDelayedCall | None = None
        self._next_id = 1
        self.dropped = False

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self._request.write(b": connected\n\n")
        self._schedule()

    def receive(self, event: Event) -> None:
        if self._closed:
            return
        message = encode(event, self._next_id)
        self._next_id += 1
        if not self._paused:
            self._request.write(message)
            return
        if len(self._buffer) >= self._buffer_size:
            self.drop()
            return
        self._buffer.append(message)

    def drop(self) -> None:
        """The client does not keep up: disconnect it."""
        self.dropped = True
        self._resource.slow_clients_dropped += 1
        log.info(
            "event stream: client too slow, disconnected ({size} events waiting)", size=len(self._buffer)
        )
        self.close()
        request = self._request
        transport = getattr(request, "transport", None) or getattr(
            getattr(request, "channel", None), "transport", None
        )
        if transport is None:
            request.finish()
        elif hasattr(transport, "abortConnection"):
            transport.abortConnection()  # its buffer is full: nothing more would be read anyway
        else:
            transport.loseConnection()

    def close(self) -> None:
        """Unsubscribe and stop the heartbeat (the response ended, or is being dropped)."""
        if self._closed:
            return
        self._closed = True
        self._buffer.clear()
        try:
            self._request.unregisterProducer()
        except Exception:  # noqa: BLE001 (the connection is already gone)
            pass
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._resource.detach(self)

    def _schedule(self) -> None:
        self._timer = self._resource.clock.callLater(self._heartbeat, self._beat)

    def _beat(self) -> None:
        self._timer = None
        if self._closed:
            return
        if not self._paused:
            self._request.write(b": keepalive\n\n")
        self._schedule()

    # IPushProducer: the transport's buffer is full (pause) or drained (resume).
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        while self._buffer and not self._paused and not self._closed:
            self._request.write(self._buffer.popleft())

    def stopProducing(self) -> None:
        self.close()


class EventStreamResource(Resource):
    """``GET /api/v1/events`` as the module docstring says; mount it as a leaf. ``bus`` is the router's
    EventBus, ``clock`` runs the heartbeats."""

    isLeaf = True

    def __init__(
        self,
        bus: EventBus,
        *,
        clock: IReactorTime,
        heartbeat: float = 15.0,
        buffer_size: int = 1000,
        max_clients: int = 32,
    ) -> None:
        super().__init__()
        self.bus = bus
        self.clock = clock
        self.heartbeat = heartbeat
        self.buffer_size = buffer_size
        self.max_clients = max_clients
        self.clients: set[StreamClient] = set()
        self.slow_clients_dropped = 0

    def render_GET(self, request: Request) -> Any:
        args: dict[bytes, list[bytes]] = request.args or {}
        raw = [value.decode("utf-8", "replace") for value in args.get(b"types", [])]
        wanted = [part for value in raw for part in value.split(",") if part.strip()] or ["*"]
        try:
            patterns = parse_patterns(wanted)
        except UnknownEventType as error:
            return _error(request, 400, "bad_event_type", str(error))
        if len(self.clients) >= self.max_clients:
            return _error(
                request, 503, "too_many_streams", f"at most {self.max_clients} event streams at once"
            )
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Accel-Buffering", b"no")
        client = StreamClient(request, self, buffer_size=self.buffer_size, heartbeat=self.heartbeat)
        self.clients.add(client)
        self.bus.subscribe(client, patterns)
        request.notifyFinish().addBoth(lambda _: client.close())
        client.start()
        return NOT_DONE_YET

    def detach(self, client: StreamClient) -> None:
        self.clients.discard(client)
        self.bus.unsubscribe(client)

    def close_all(self) -> None:
        """End every stream (the listener is stopping)."""
        for client in list(self.clients):
            client.close()
            try:
                client._request.finish()
            except Exception:  # noqa: BLE001 (the connection may be gone already)
                pass
