"""HTTP/1.1 on terminated routes: forwarding after TLS termination, and the plain-HTTP port of a terminated
domain (ACME HTTP-01 challenges, redirects to HTTPS).

:class:`HttpForwarder` is the application protocol inside the terminated TLS connection. What it guarantees:

- Each request head is parsed strictly (:mod:`dcrouter.proxy.httpmessage`, written by hand — see there
  why not ``twisted.web``): malformed heads and ambiguous framing are answered ``400`` (or ``431``, ``501``,
  ``505``) and the connection is closed; a ``Host`` that is not the name the client asked for in TLS is
  answered ``421 Misdirected Request``.
- The request goes to one of the route's targets with ``Host`` unchanged, ``X-Forwarded-For`` (client
  appended; a client's own list kept only from ``trustedProxies``) and ``X-Forwarded-Proto: https``.
- Bodies stream both ways, framed by Content-Length or chunked (re-encoded canonically), so request
  boundaries are exact and several requests share one client connection (keep-alive). Producers are wired
  both ways through :class:`PauseGate`, so a slow side pauses the other; no body is held whole.
- One request at a time: once a request has been sent, nothing more of the client's is handled until its
  response has been relayed; bytes of a next request (pipelined) wait their turn, and reading from the
  client pauses as soon as any arrive (not before: a pause and resume per request would cost two system
  calls each). Responses are relayed as they arrive;
  HEAD, 1xx, 204 and 304 have no body; 1xx interim responses are relayed before the final one.
- ``Upgrade: websocket``: after the backend's ``101`` the connection becomes a raw splice both ways.
- A backend that fails before any response byte gets the client a ``502``; after, the client is dropped.

:class:`HttpRedirect` answers the plain-HTTP side: ``/.well-known/acme-challenge/<token>`` from the ACME
challenge responder (``404`` when unknown), every other request ``301`` to ``https://<host>[:port]<path>``.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.log import logger
from dcrouter.proxy.clienthello import routable_name
from dcrouter.proxy.forward import RouteCounters
from dcrouter.proxy.gate import RequestGate
from dcrouter.proxy.httpmessage import (
    REASONS,
    ChunkedBody,
    HeadBuffer,
    HttpError,
    LengthBody,
    RequestHead,
    ResponseHead,
    UntilCloseBody,
    forwarded_request_head,
    parse_request_head,
    parse_response_head,
    relayed_response_head,
    request_framing,
    response_framing,
    simple_response,
)
from dcrouter.proxy.routes import NO_CHANGES, FieldChanges

log = logger(__name__)

#: Seconds without a byte either way before a terminated connection is closed, when the route sets none.
DEFAULT_IDLE_TIMEOUT = 300.0
ACME_PREFIX = "/.well-known/acme-challenge/"
_ABSOLUTE = re.compile(rb"https?://[^/?#]*(.*)\Z", re.IGNORECASE | re.DOTALL)


class ChallengeSource(TypingProtocol):
    """What the redirect side needs of :class:`dcrouter.acme.challenges.ChallengeResponder`."""

    def response_for(self, path: str) -> bytes | None: ...


def host_name(value: bytes | None) -> str:
    """The normalised host of a ``Host`` field value (``host[:port]``); ValueError with the reason."""
    if not value:
        raise ValueError("no Host field")
    text = value.decode("ascii", "replace")
    if text.startswith("[") or "@" in text:
        raise ValueError(f"Host {text[:60]!r} names no domain")
    host, colon, port = text.partition(":")
    if colon and not (port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise ValueError(f"Host {text[:60]!r} has an invalid port")
    return routable_name(host)


def host_address(value: bytes) -> str | None:
    """The IP address a ``Host`` value (``192.0.2.1:8080``, ``[2001:db8::1]``) names, as written; None when
    it names no address."""
    text = value.decode("ascii", "replace")
    if text.startswith("["):
        literal, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        candidate = literal
        written = f"[{literal}]"
    else:
        candidate = written = text.partition(":")[0]
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return None
    return written


@functools.lru_cache(maxsize=1024)
def _request_host(value: bytes) -> str:
    address = host_address(value)
    return address if address is not None else host_name(value)


def request_host(value: bytes | None) -> str:
    """The name a request's ``Host`` value asks for: its address as written when it is one (what
    ``curl http://127.0.0.1:8080/`` sends: served where no name was asked for, as ``host_allowed``
    decides), else the normalised host name; ValueError with the reason. Remembered for the values seen
    last (every request of every connection carries one, almost always the same few)."""
    if not value:
        raise ValueError("no Host field")
    if len(value) > 270:  # longer than any name with a port: worked out, not kept
        return _request_host.__wrapped__(value)
    return _request_host(value)


@implementer(IPushProducer)
class PauseGate:
    """Pauses ``target`` (a transport) while any reason holds: the other side's buffer is full
    (``pauseProducing`` from the consumer this is registered with), a backend is being connected, a
    response is awaited. Reasons are kept apart so that one being lifted cannot undo another."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.reasons: set[str] = set()
        self.released = False

    def pause(self, reason: str) -> None:
        if self.released:
            return
        if not self.reasons:
            self.target.pauseProducing()
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons:
                self.target.resumeProducing()

    def pauseProducing(self) -> None:
        self.pause("consumer")

    def resumeProducing(self) -> None:
        self.resume("consumer")

    def stopProducing(self) -> None:
        """The consumer went away; the forwarder closes both sides itself when it learns of it."""

    def release(self) -> None:
        """Lift every pause for good (the connection is closing: what the peer sends now must be read, or
        its close_notify and FIN would never be seen); later pauses are ignored."""
        self.released = True
        if self.reasons:
            self.reasons.clear()
            self.target.resumeProducing()


class HttpBackend(Protocol):
    """The proxy's connection to a backend, reporting to its :class:`HttpForwarder` (or, while idle, to the
    :class:`BackendPool` keeping it). ``pool_key`` names the route and target it was opened for: a pool
    hands it only to a request balancing sent to that target."""

    transport: Any
    pool_key: Hashable = None
    #: The target it was opened to (set by whoever opened it).
    target: Any = None
    #: When it was last put in a pool (the clock's seconds).
    idle_since = 0.0

    def __init__(self, forwarder: HttpForwarder) -> None:
        self.forwarder = forwarder

    def dataReceived(self, data: bytes) -> None:
        self.forwarder.backend_data(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.forwarder.backend_lost(self, reason)


#: Opens a connection to one of the route's targets with the given protocol factory; fires with the
#: connected protocol, or None when no target could be reached.
Connector = Callable[[Callable[[], Protocol]], "Deferred[Any]"]

#: A forwarder's backend connection for its next request: an idle pooled one of the target balancing chose
#: (at once), or a Deferred firing with a new one (None when no target could be reached).
Acquirer = Callable[["HttpForwarder"], "HttpBackend | Deferred[Any]"]

#: Seconds an idle backend connection is kept for reuse (closed within a second more); below the usual
#: keep-alive timeouts of backends (Apache's and Node's 5 s), so the backend seldom closes one first.
POOL_IDLE_SECONDS = 3.0
#: Idle backend connections kept per process, over all routes and targets; more are closed at once.
POOL_MAX_IDLE = 512


class BackendPool:
    """Idle keep-alive backend connections, shared by every client connection of the process: a forwarder
    done with a backend connection that is still in step (its last response read whole, not marked
    ``Connection: close``, nothing unasked-for sent) :meth:`put`s it here, and the next request balancing
    sends to the same target (and route) :meth:`take`s it rather than opening one. An idle connection the
    backend closes, or that sends anything, is dropped; one idle for ``idle_timeout`` seconds is closed
    (with a ``clock``; checked once a second while any is idle). At most ``size`` are kept.
    :meth:`close` closes them all. Idle connections count against no client limit."""

    def __init__(
        self,
        connect: Connector | None = None,
        size: int = POOL_MAX_IDLE,
        *,
        clock: IReactorTime | None = None,
        idle_timeout: float = POOL_IDLE_SECONDS,
    ) -> None:
        self._connect = connect
        self.size = size
        self._clock = clock
        self.idle_timeout = idle_timeout
        #: pool key -> its idle connections, the most recently used last.
        self.idle: dict[Hashable, list[HttpBackend]] = {}
        self.count = 0
        self._sweep: IDelayedCall | None = None
        self._closing: set[HttpBackend] = set()

    def connector(self, factory: Callable[[], Protocol]) -> Deferred[Any]:
        """A :data:`Connector` taking idle connections of key None first (one target, no balancing)."""
        if self.count:
            taker = factory()
            assert isinstance(taker, HttpBackend)
            backend = self.take(taker.forwarder)
            if backend is not None:
                return succeed(backend)
        assert self._connect is not None
        return self._connect(factory)

    def take(self, forwarder: HttpForwarder, key: Hashable = None) -> HttpBackend | None:
        """An idle connection of ``key``, now ``forwarder``'s; None when none is left."""
        idle = self.idle.get(key) if self.count else None
        while idle:
            backend = idle.pop()
            self.count -= 1
            if backend.transport is not None and backend.transport.connected:
                backend.forwarder = forwarder
                return backend
        return None

    def put(self, backend: HttpBackend) -> None:
        if self.count >= self.size or backend.transport is None:
            if backend.transport is not None:
                backend.transport.loseConnection()
            return
        backend.forwarder = self  # type: ignore[assignment]
        backend.transport.resumeProducing()  # it may have been paused for a slow client
        clock = self._clock
        if clock is not None:
            backend.idle_since = clock.seconds()
            if self._sweep is None:
                self._sweep = clock.callLater(min(1.0, self.idle_timeout), self._expire)
        self.idle.setdefault(backend.pool_key, []).append(backend)
        self.count += 1

    def _expire(self) -> None:
        """Close the connections idle for ``idle_timeout`` or more; look again in a second while any left."""
        self._sweep = None
        assert self._clock is not None
        limit = self._clock.seconds() - self.idle_timeout
        for key, idle in list(self.idle.items()):
            old = 0
            while old < len(idle) and idle[old].idle_since <= limit:
                old += 1
            expired, idle[:old] = idle[:old], []
            self.count -= len(expired)
            if not idle:
                del self.idle[key]
            for backend in expired:
                backend.transport.loseConnection()
        if self.count:
            self._sweep = self._clock.callLater(min(1.0, self.idle_timeout), self._expire)

    def backend_data(self, backend: HttpBackend, data: bytes) -> None:
        """Bytes on an idle connection: it is out of step, and never reused."""
        self._discard(backend)
        backend.transport.loseConnection()

    def backend_lost(self, backend: HttpBackend, reason: Failure = connectionDone) -> None:
        self._closing.discard(backend)
        self._discard(backend)

    def _discard(self, backend: HttpBackend) -> None:
        idle = self.idle.get(backend.pool_key)
        if idle and backend in idle:
            idle.remove(backend)
            self.count -= 1

    def close(self) -> None:
        """Close every idle connection; :attr:`closing` counts those not yet gone."""
        idle, self.idle = self.idle, {}
        self.count = 0
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        for backends in idle.values():
            for backend in backends:
                self._closing.add(backend)
                backend.transport.loseConnection()

    @property
    def closing(self) -> int:
        """Connections :meth:`close` closed whose end has not been reported yet."""
        return len(self._closing)


@dataclass(frozen=True)
class ForwardingPolicy:
    """Per-connection facts the forwarder applies. ``host_allowed``: whether a request's normalised Host
    may be served on this connection (the SNI name, or the same route when there was none)."""

    client_ip: str
    trust_forwarded: bool
    host_allowed: Callable[[str], bool]
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT
    proto: bytes = b"https"
    #: Close after the first response (the route was chosen by that request's path or headers).
    one_request: bool = False
    #: ``security.rateLimit``, ``basicAuth``, ``jwtAuth``: what each request must pass (else 429, 401).
    gate: RequestGate | None = None
    #: ``action.headers``: fields changed on requests and on final responses.
    request_fields: FieldChanges = NO_CHANGES
    response_fields: FieldChanges = NO_CHANGES
    #: ``action.websocket``: once upgraded, the idle limit and the age limit in seconds (None: none), which
    #: replace ``idle_timeout``; ``on_upgrade`` is told, so that the connection's own age cap can be lifted.
    websocket_idle: float | None = None
    websocket_max_age: float | None = None
    on_upgrade: Callable[[], None] | None = None
    #: Where a backend connection still in step goes when the forwarder is done with it (its client
    #: connection or stream closed between requests).
    pool: BackendPool | None = None
    #: Where the forwarder gets its backend connection (balanced, pooled); None: from ``connect``.
    acquire: Acquirer | None = None


@implementer(IHalfCloseableProtocol)
class HttpForwarder(Protocol):
    """HTTP/1.1 from one client connection to the route's backends; see the module docstring."""

    transport: Any

    def __init__(
        self, policy: ForwardingPolicy, *, connect: Connector, counters: RouteCounters, clock: IReactorTime
    ) -> None:
        self.policy = policy
        self._connect = connect
        self.counters = counters
        self._clock = clock
        self.phase = "head"  # head | auth | body | wait | upgraded | closed: the client side
        self.requests = 0
        self._pending = b""
        self._head = HeadBuffer()
        self._request: RequestHead | None = None
        self._request_body: LengthBody | ChunkedBody | UntilCloseBody | None = None
        self._close_after = False
        self._client_gate: PauseGate | None = None
        # The backend side.
        self.backend: HttpBackend | None = None
        self._backend_gate: PauseGate | None = None
        self._connecting = False
        self._backend_reusable = True
        self._queued: list[bytes] = []
        self._response_pending = b""
        self._response_head = HeadBuffer(leading_crlf=False)
        self._response_body: LengthBody | ChunkedBody | UntilCloseBody | None = None
        self._response_started = False
        self._last_activity = clock.seconds()
        self._idle_timeout = policy.idle_timeout
        self._idle_call: IDelayedCall | None = None
        self._age_call: IDelayedCall | None = None
        #: The last Host value that passed the checks: the next request almost always repeats it.
        self._allowed_host: bytes | None = None
        #: Bytes for the client collected while one backend read is handled, written once (one TLS record).
        self._out: list[bytes] | None = None
        #: The transport's own way to take a parsed response head (an HTTP/2 stream's), if it has one.
        self._head_sink: Callable[..., None] | None = None

    # -- the client side ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._client_gate = PauseGate(self.transport)
        self._head_sink = getattr(self.transport, "relay_response_head", None)
        if self.policy.idle_timeout is not None:
            self._idle_call = self._clock.callLater(self.policy.idle_timeout, self._idle_check)

    def dataReceived(self, data: bytes) -> None:
        self._last_activity = self._clock.seconds()
        self.counters.bytes_in += len(data)
        if self.phase == "upgraded":
            self._to_backend(data)
        elif self.phase != "closed":
            self._pending += data
            self._advance()
            if self.phase == "wait" and self._pending:
                self._hold_pipelined()

    def client_eof(self) -> None:
        """The client shut its sending side: finish the request in flight, if complete, then close."""
        if self.phase == "upgraded":
            if self.backend is not None:
                _shut_write(self.backend.transport)
        elif self.phase == "wait":
            self._close_after = True
        else:
            # Between requests nothing is lost; mid-head or mid-body the request can never complete.
            self._close("client EOF", abort=self.phase == "body")

    def readConnectionLost(self) -> None:
        """IHalfCloseableProtocol: the client's EOF (see :meth:`client_eof`)."""
        self.client_eof()

    def writeConnectionLost(self) -> None:
        """IHalfCloseableProtocol: nothing to do; the forwarder never shuts only its side to the client."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.phase = "closed"
        self._cancel_timers()
        self._drop_backend()

    def _advance(self) -> None:
        """Consume buffered client bytes as far as the current phase allows."""
        while self.phase in ("head", "body") and (self._pending or self._body_done()):
            if self.phase == "head":
                try:
                    complete = self._head.feed(self._pending)
                except HttpError as error:
                    self._refuse(error)
                    return
                self._pending = b""
                if complete is None:
                    return
                raw, self._pending = complete
                self._request_head(raw)
            else:
                assert self._request_body is not None
                try:
                    body, self._pending = self._request_body.feed(self._pending)
                except HttpError as error:
                    self._refuse(error)
                    return
                if body:
                    self._to_backend(body)
                if self._request_body.done:
                    self._request_sent()

    def _body_done(self) -> bool:
        return self.phase == "body" and self._request_body is not None and self._request_body.done

    def head_received(self, head: RequestHead) -> None:
        """A request head parsed already, as :func:`parse_request_head` would have parsed it (an HTTP/2
        stream's, translated): handled as if its bytes had come, without writing and parsing them."""
        if self.phase != "head" or self._pending:
            raise RuntimeError("head_received: only as the first thing a fresh forwarder gets")
        self._last_activity = self._clock.seconds()
        self._request_head(None, head)
        self._advance()

    def _request_head(self, raw: bytes | None, parsed: RequestHead | None = None) -> None:
        try:
            head = parsed if parsed is not None else parse_request_head(raw or b"")
            framing = request_framing(head)
            host = head.fields.get(b"host")
            if host is None or host != self._allowed_host:
                name = request_host(host)
                if not self.policy.host_allowed(name):
                    self._refuse(HttpError(421, f"Host {name} is not served on this connection"))
                    return
                self._allowed_host = host
        except HttpError as error:
            self._refuse(error)
            return
        except ValueError as error:
            self._refuse(HttpError(400, str(error)))
            return
        gate = self.policy.gate
        if gate is None:
            self._request_accepted(head, framing)
            return
        # Nothing more is read or forwarded until the credentials are checked (in a thread).
        self.phase = "auth"
        if self._client_gate is not None:
            self._client_gate.pause("auth")
        checking = gate.check(head, self.policy.client_ip)
        checking.addCallbacks(lambda _: self._authorized(head, framing), self._unauthorized)

    def _authorized(self, head: RequestHead, framing: Any) -> None:
        if self.phase != "auth":
            return  # closed meanwhile
        self._request_accepted(head, framing)
        if self._client_gate is not None:
            self._client_gate.resume("auth")
        self._advance()

    def _unauthorized(self, failure: Failure) -> None:
        if self.phase != "auth":
            return
        error = failure.value
        if not isinstance(error, HttpError):
            log.failure("proxy: {client}: checking credentials failed", failure, client=self.policy.client_ip)
            error = HttpError(500, "checking credentials failed")
        self.phase = "head"  # so that _refuse answers
        self._refuse(error)

    def _request_accepted(self, head: RequestHead, framing: Any) -> None:
        self.requests += 1
        self._request = head
        self._close_after = self._close_after or not head.keep_alive or self.policy.one_request
        self._request_body = framing.reader()
        self._response_head = HeadBuffer(leading_crlf=False)
        self._response_body = None
        self._response_started = False
        self.phase = "body"
        self._to_backend(
            forwarded_request_head(
                head,
                client_ip=self.policy.client_ip,
                trust_forwarded=self.policy.trust_forwarded,
                proto=self.policy.proto,
                drop=self.policy.request_fields.dropped,
                add=self.policy.request_fields.set_fields,
            )
        )

    def _request_sent(self) -> None:
        """The whole request went out: nothing more is taken from the client until its response has been
        relayed. Reading pauses only once bytes of a next request are here (pipelined): pausing and
        resuming the socket for every request would cost two system calls each, for nothing."""
        self.phase = "wait"
        if self._pending:
            self._hold_pipelined()

    def _hold_pipelined(self) -> None:
        """Bytes came while a response is awaited: kept, and no more read until it has been relayed."""
        if self._client_gate is not None:
            self._client_gate.pause("response")

    def _refuse(self, error: HttpError) -> None:
        """Answer ``error`` ourselves and close; after response bytes were relayed, only close."""
        log.info(
            "proxy: {client}: HTTP {status} ({reason})",
            client=self.policy.client_ip,
            status=error.status,
            reason=error.reason,
        )
        if not self._response_started:
            reason = REASONS.get(error.status, "Error")
            extra = getattr(error, "extra", ())
            self._write_client(
                simple_response(error.status, reason, body=reason.encode() + b"\n", extra=extra)
            )
        self._close(error.reason)

    # -- the backend side -----------------------------------------------------------------------------

    def _to_backend(self, data: bytes) -> None:
        if self.backend is not None:
            self.backend.transport.write(data)
            return
        self._queued.append(data)
        if not self._connecting:
            acquire = self.policy.acquire
            if acquire is not None:
                got = acquire(self)
                if isinstance(got, HttpBackend):
                    self._connected(got)  # an idle one at hand: no Deferred, no reactor turn
                    return
                connecting = got
            else:
                pool = self.policy.pool
                backend = pool.take(self) if pool is not None else None
                if backend is not None:
                    self._connected(backend)
                    return
                connecting = self._connect(lambda: HttpBackend(self))
            self._connecting = True
            if self._client_gate is not None:
                self._client_gate.pause("connecting")
            connecting.addCallback(self._connected)
            connecting.addErrback(self._connect_crashed)

    def _connected(self, backend: HttpBackend | None) -> None:
        self._connecting = False
        if self.phase == "closed":
            if backend is not None:
                backend.transport.loseConnection()
            return
        if backend is None:
            self._refuse(HttpError(502, "no target reachable"))
            return
        self.backend = backend
        self._backend_reusable = True
        self._backend_gate = PauseGate(backend.transport)
        backend.transport.registerProducer(self._client_gate, True)
        self.transport.registerProducer(self._backend_gate, True)
        queued, self._queued = self._queued, []
        backend.transport.write(b"".join(queued))
        assert self._client_gate is not None
        self._client_gate.resume("connecting")

    def _connect_crashed(self, failure: Failure) -> None:
        log.failure("proxy: connecting a backend for {client} failed", failure, client=self.policy.client_ip)
        self._close("connect crashed", abort=True)

    def backend_data(self, backend: HttpBackend, data: bytes) -> None:
        if backend is not self.backend:
            return
        self._last_activity = self._clock.seconds()
        if self.phase == "upgraded":
            self._write_client(data)
        elif self._request is None:
            # Bytes no request asked for: the backend is out of step; never let them reach a later response.
            self._backend_reusable = False
            self._drop_backend()
        else:
            self._response_pending += data
            # A response head and its body, often in one read, go to the client in one write (one TLS
            # record); a transport taking parsed heads batches by itself.
            if self._head_sink is None:
                self._out = []
            try:
                self._advance_response()
            finally:
                self._flush_client()

    def _advance_response(self) -> None:
        try:
            while self._response_pending and self.backend is not None:
                if self._response_body is None:
                    if not self._response_head_arrived():
                        return
                    continue
                body, self._response_pending = self._response_body.feed(self._response_pending)
                self._write_client(body)
                if self._response_body.done:
                    self._response_done()
                    return
        except HttpError as error:
            self._backend_failed(error.reason)

    def _response_head_arrived(self) -> bool:
        """Read a response head from the pending bytes; False when more are needed or the phase ended."""
        assert self._request is not None
        complete = self._response_head.feed(self._response_pending)
        self._response_pending = b""
        if complete is None:
            return False
        raw, self._response_pending = complete
        head = parse_response_head(raw)
        if head.status == 101:
            if not (self._request.upgrade_websocket and self.phase == "wait"):
                raise HttpError(502, "backend switched protocols unasked")
            self._write_client(relayed_response_head(head, close=False))
            if getattr(self.transport, "disconnecting", False):
                # The client's side would not take the switch (an HTTP/2 stream, on a wrong accept): it
                # answered the client itself; nothing more goes either way.
                self._close("the protocol switch was refused on the client's side")
                return False
            self._upgraded()
            return False
        if head.status < 200:
            self._relay_head(head, close=False)
            self._response_started = True
            self._response_head = HeadBuffer(leading_crlf=False)
            return True
        framing = response_framing(self._request.method, head)
        if not head.keep_alive or framing.kind == "close":
            self._backend_reusable = False
        # A body-delimited-by-close response can only be relayed by closing; an answer that came before the
        # request body ended leaves the rest of that body unread (and the backend connection out of step).
        if framing.kind == "close" or self.phase == "body":
            self._close_after = True
            if self.phase == "body":
                self._backend_reusable = False
        changes = self.policy.response_fields
        self._relay_head(head, close=self._close_after, drop=changes.dropped, add=changes.set_fields)
        self._response_started = True
        self._response_body = framing.reader()
        if self._response_body.done:
            self._response_done()
            return False
        return True

    def _upgraded(self) -> None:
        """After a 101: raw bytes both ways, the client read again, whatever either side sent early first.
        From now on only the route's WebSocket limits apply (none unless configured)."""
        self.phase = "upgraded"
        self._backend_reusable = False
        self._cancel_timers()
        policy = self.policy
        self._idle_timeout = policy.websocket_idle
        if self._idle_timeout is not None:
            self._idle_call = self._clock.callLater(self._idle_timeout, self._idle_check)
        if policy.websocket_max_age is not None:
            self._age_call = self._clock.callLater(policy.websocket_max_age, self._too_old)
        if policy.on_upgrade is not None:
            policy.on_upgrade()
        early_backend, self._response_pending = self._response_pending, b""
        early_client, self._pending = self._pending, b""
        if early_backend:
            self._write_client(early_backend)
        if early_client:
            self._to_backend(early_client)
        assert self._client_gate is not None
        self._client_gate.resume("response")

    def _response_done(self) -> None:
        if self._response_pending:
            self._backend_reusable = False  # more than the response framed: out of step
            self._response_pending = b""
        self._request = None
        self._response_body = None
        self._response_started = False  # a refusal of the next request head is answered again
        if self._close_after:
            self._close("response done, connection not persistent")  # the backend pooled if in step
            return
        if not self._backend_reusable:
            self._drop_backend()
        self.phase = "head"
        self._head = HeadBuffer()
        assert self._client_gate is not None
        self._client_gate.resume("response")
        self._advance()

    def backend_lost(self, backend: HttpBackend, reason: Failure = connectionDone) -> None:
        if backend is not self.backend:
            return
        self._release_backend()
        if self.phase == "upgraded":
            self._close("backend closed the upgraded connection")
        elif self._request is not None:
            if isinstance(self._response_body, UntilCloseBody):
                self._response_body.eof()
                self._response_done()
            else:
                why = reason.getErrorMessage() if reason is not None else "closed"
                self._backend_failed(f"backend connection ended before the response did ({why})")

    def _backend_failed(self, reason: str) -> None:
        log.info("proxy: {client}: backend failed: {reason}", client=self.policy.client_ip, reason=reason)
        self._backend_reusable = False
        self._drop_backend()
        if self._response_started:
            self._close(reason, abort=True)
        else:
            self._refuse(HttpError(502, reason))

    # -- ending ---------------------------------------------------------------------------------------

    def _relay_head(
        self,
        head: ResponseHead,
        *,
        close: bool,
        drop: frozenset[bytes] = frozenset(),
        add: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """A response head (not a 101) to the client: parsed to a transport that takes it so, else bytes."""
        sink = self._head_sink
        if sink is None:
            self._write_client(relayed_response_head(head, close=close, drop=drop, add=add))
        elif self.phase != "closed":
            sink(head, drop, add)

    def _write_client(self, data: bytes) -> None:
        if data and self.phase != "closed":
            self.counters.bytes_out += len(data)
            if self._out is not None:
                self._out.append(data)
            else:
                self.transport.write(data)

    def _flush_client(self) -> None:
        """Write what :meth:`_write_client` collected, and collect no more."""
        out, self._out = self._out, None
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _release_backend(self) -> None:
        """Forget the backend connection: producers unregistered, the client no longer paused for it."""
        backend, self.backend = self.backend, None
        if backend is None:
            return
        self._backend_gate = None
        if self.phase != "closed":
            self.transport.unregisterProducer()
        if self._client_gate is not None:
            self._client_gate.resume("consumer")
        backend.transport.unregisterProducer()

    def _drop_backend(self) -> None:
        """Done with the backend connection: to the pool when it is in step (no request under way, its
        last response read whole, reusable), else closed."""
        backend = self.backend
        self._release_backend()
        if backend is not None:
            pool = self.policy.pool
            if pool is not None and self._backend_reusable and self._request is None and not self._connecting:
                pool.put(backend)
            else:
                backend.transport.loseConnection()

    def _close(self, reason: str, *, abort: bool = False) -> None:
        if self.phase == "closed":
            return
        self._flush_client()
        self._drop_backend()
        self.phase = "closed"
        if self._client_gate is not None:
            self._client_gate.release()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def _cancel_timers(self) -> None:
        for call in (self._idle_call, self._age_call):
            if call is not None and call.active():
                call.cancel()
        self._idle_call = self._age_call = None

    def _too_old(self) -> None:
        self._age_call = None
        self._close(f"WebSocket older than {self.policy.websocket_max_age:g}s")

    def _idle_check(self) -> None:
        timeout = self._idle_timeout
        assert timeout is not None
        idle_for = self._clock.seconds() - self._last_activity
        if idle_for >= timeout:
            self._idle_call = None
            self._close(f"idle for {timeout:g}s", abort=True)
        else:
            self._idle_call = self._clock.callLater(timeout - idle_for, self._idle_check)


def _shut_write(transport: Any) -> None:
    lose_write = getattr(transport, "loseWriteConnection", None)
    if lose_write is not None:
        lose_write()
    else:
        transport.loseConnection()


@implementer(IHalfCloseableProtocol)
class HttpRedirect(Protocol):
    """The plain-HTTP port of a terminated domain: one request answered, then the connection closed.

    ``GET``/``HEAD`` of ``/.well-known/acme-challenge/<token>``: the key authorization from ``challenges``
    (``200``), or ``404`` when it has none (or there is no ACME). Anything else: ``301`` to
    ``https://<host>[:<port>]<path>``, the port from ``https_port(host)`` (the Host's own port is not
    kept: it names the plain-HTTP port), left out when it is 443 or None.

    With a ``clock``, the connection is aborted ``timeout`` seconds after it began, answered or not: a
    request head that never ends, or a client that never takes the answer, holds nothing for longer."""

    transport: Any

    def __init__(
        self,
        challenges: ChallengeSource | None,
        *,
        client_ip: str = "",
        https_port: Callable[[str], int | None] | None = None,
        clock: IReactorTime | None = None,
        timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        self.challenges = challenges
        self.client_ip = client_ip
        self.https_port = https_port
        self._clock = clock
        self._timeout = timeout
        self._deadline: IDelayedCall | None = None
        self._head = HeadBuffer()
        self.answered: int | None = None

    def connectionMade(self) -> None:
        if self._clock is not None:
            self._deadline = self._clock.callLater(self._timeout, self._overdue)

    def _overdue(self) -> None:
        self._deadline = None
        log.info(
            "proxy: {client}: plain HTTP not done within {timeout:g}s; connection aborted",
            client=self.client_ip,
            timeout=self._timeout,
        )
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def dataReceived(self, data: bytes) -> None:
        if self.answered is not None:
            return
        try:
            complete = self._head.feed(data)
            if complete is None:
                return
            head = parse_request_head(complete[0])
            self._answer(head)
        except HttpError as error:
            self._send(error.status, body=REASONS.get(error.status, "Error").encode() + b"\n")
        except ValueError as error:
            self._send(400, body=str(error).encode() + b"\n")

    def client_eof(self) -> None:
        if self.answered is None:
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        """IHalfCloseableProtocol: the client's EOF (see :meth:`client_eof`)."""
        self.client_eof()

    def writeConnectionLost(self) -> None:
        """IHalfCloseableProtocol: never sent; the answer closes the whole connection."""

    def _answer(self, head: RequestHead) -> None:
        host = host_name(head.fields.get(b"host"))
        path = _path(head.target)
        if path.split(b"?", 1)[0].startswith(ACME_PREFIX.encode()):
            if head.method not in (b"GET", b"HEAD"):
                raise HttpError(405, "challenges are fetched with GET")
            text = path.split(b"?", 1)[0].decode("ascii")
            body = self.challenges.response_for(text) if self.challenges is not None else None
            if body is None:
                self._send(404, body=b"Not Found\n", head_only=head.method == b"HEAD")
            else:
                # RFC 8555 §8.3: the key authorization as the body; octet-stream as the responder documents.
                self._send(200, body=body, head_only=head.method == b"HEAD", ok=True)
            return
        port = self.https_port(host) if self.https_port is not None else None
        authority = host if port in (None, 443) else f"{host}:{port}"
        location = b"https://" + authority.encode("ascii") + path
        self._send(301, extra=(b"Location: " + location,), head_only=head.method == b"HEAD")

    def _send(
        self,
        status: int,
        *,
        body: bytes = b"",
        extra: tuple[bytes, ...] = (),
        head_only: bool = False,
        ok: bool = False,
    ) -> None:
        self.answered = status
        reason = "OK" if ok else REASONS.get(status, "Error")
        content_type = b"application/octet-stream" if ok else b"text/plain; charset=utf-8"
        response = simple_response(status, reason, body=body, extra=extra, content_type=content_type)
        if head_only:
            response = response[: len(response) - len(body)]
        self.transport.write(response)
        self.transport.loseConnection()


def _path(target: bytes) -> bytes:
    """The path and query of a request target (origin or absolute form); ``/`` for anything else."""
    if target.startswith(b"/"):
        return target
    absolute = _ABSOLUTE.match(target)
    if absolute is not None and absolute.group(1).startswith(b"/"):
        return bytes(absolute.group(1))
    if absolute is not None:
        return b"/" + absolute.group(1) if absolute.group(1) else b"/"
    raise HttpError(400, f"request target {target[:60]!r} has no path")
