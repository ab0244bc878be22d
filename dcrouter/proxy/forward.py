"""The byte splice between a client connection and its backend connection.

What :class:`Splice` guarantees, once started:

- Bytes go both ways unchanged and in order; the bytes read from the client before the backend was chosen
  (the peeked ClientHello or request head) and any PROXY header reach the backend first.
- Flow control: each transport is registered as the streaming producer of the other (as
  ``twisted.protocols.portforward`` does), so when one side's write buffer fills, reading from the other side
  pauses; nothing is buffered without bound.
- Half-close: end-of-file from one side shuts the write side of the other (``loseWriteConnection``);
  when both sides have sent EOF, both connections are closed (the second EOF closes at once: the close
  sends the FIN that a separate shutdown would have).
- A TCP transport with nothing left to write is shut or closed at once (``shutdown`` now, rather than on
  the reactor's next write turn after an empty ``send``): the same FIN, three system calls fewer.
- A connection lost on one side closes the other after its pending bytes are written.
- Idle timeout: no byte in either direction for ``idle_timeout`` seconds aborts both connections.
- Counters: bytes from the client (``bytes_in``) and to it (``bytes_out``) are added to the route's
  :class:`RouteCounters` as they pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import main, tcp
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.net.quiet import set_no_delay


@dataclass
class RouteCounters:
    """What one route has done since start-up. ``active`` is the number of connections open on the route
    now (the figure ``max_connections`` caps); ``refused`` counts connections the route turned away (IP
    rules, connection caps, no backend reachable)."""

    connections: int = 0
    active: int = 0
    refused: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


def _shut_write(transport: Any) -> None:
    """Send EOF on ``transport``: the write half only when it can half-close (TCP), else all of it."""
    # Whether it is a connected TCP transport of the reactor with nothing buffered to write, no producer and
    # no close under way: what FileDescriptor.doWrite would find on its next turn before shutting it, so
    # that can be done now. These are FileDescriptor's private attributes: a Twisted without them gets the
    # public path.
    try:
        drained = (
            isinstance(transport, tcp.Connection)
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnecting
            and transport.producer is None
            and not transport._tempDataLen
            and transport.offset == len(transport.dataBuffer)
        )
    except AttributeError:
        drained = False
    if drained:
        # As doWrite half-closes once the buffer is empty, without the round through it (an epoll_ctl
        # each way and an empty send).
        transport._writeDisconnecting = True
        transport._writeDisconnected = True
        transport._closeWriteConnection()
        return
    lose_write = getattr(transport, "loseWriteConnection", None)
    if lose_write is not None:
        lose_write()
    else:
        transport.loseConnection()


#: The reason of a clean close, shared as Twisted shares ``connectionDone``: ``loseConnection``'s immediate
#: path would build a Failure (and its class names) for every close.
_DONE = Failure(main.CONNECTION_DONE)


def _lose(transport: Any, *, ended: bool = False) -> None:
    """``transport.loseConnection()``; a drained TCP transport is closed at once (``loseConnection`` takes
    its own immediate path, the one it takes after a half-close: shutdown, close, connectionLost).
    ``ended``: both directions have seen EOF, so the ``shutdown(SHUT_RDWR)`` before ``close`` can add
    nothing (``close`` sends the FIN still owed; after our own half-close it would fail ENOTCONN)."""
    if isinstance(transport, tcp.Connection):
        # What _shut_write and FileDescriptor.loseConnection look at, read once (private attributes: a Twisted
        # without them gets the public path).
        try:
            if not transport.connected or transport.disconnecting or transport.TLS:
                immediate = False
            elif transport._writeDisconnected:
                immediate = True
            else:
                immediate = (
                    not transport._writeDisconnecting
                    and transport.producer is None
                    and not transport._tempDataLen
                    and transport.offset == len(transport.dataBuffer)
                )
                if immediate:
                    transport._writeDisconnected = True
        except AttributeError:
            immediate = False
        if ended:
            transport._shouldShutdown = False
        if immediate:
            # FileDescriptor.loseConnection's own path for a write side already shut, with the shared reason.
            transport.stopReading()
            transport.stopWriting()
            transport.connectionLost(_DONE)
            return
    transport.loseConnection()


@implementer(IHalfCloseableProtocol)
class BackendProtocol(Protocol):
    """The proxy's connection to a backend. Until a :class:`Splice` is attached it keeps what arrives (a
    server that speaks first may send its greeting at once) and notes EOF or loss; the splice replays it."""

    transport: Any  # a TCP transport: also a producer, a consumer, and half-closeable

    def __init__(self) -> None:
        self.splice: Splice | None = None
        self.early: list[bytes] = []
        self.eof = False
        self.lost = False

    def connectionMade(self) -> None:
        # A proxy must not add Nagle delays to what it relays (HAProxy disables Nagle too).
        set_no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.splice is None:
            self.early.append(data)
        else:
            self.splice.backend_data(data)

    def readConnectionLost(self) -> None:
        if self.splice is None:
            self.eof = True
        else:
            self.splice.backend_eof()

    def writeConnectionLost(self) -> None:
        """Our EOF towards the backend was sent; nothing to do until its side ends too."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.splice is None:
            self.lost = True
        else:
            self.splice.backend_lost()


def _nothing() -> None:
    pass


class Splice:
    """Joins a client transport and a connected :class:`BackendProtocol` (see the module docstring).

    The session protocol on the client side forwards its events here: :meth:`client_data`,
    :meth:`client_eof`, :meth:`client_lost`. ``on_done`` is called once, when both connections are gone.
    """

    # One per proxied connection: no instance dictionary to allocate and fill.
    __slots__ = (
        "_backend_eof",
        "_backend_gone",
        "_backend_has_producer",
        "_client_eof",
        "_client_gone",
        "_client_has_producer",
        "_clock",
        "_idle_call",
        "_idle_timeout",
        "_last_activity",
        "_on_done",
        "backend",
        "backend_transport",
        "client",
        "close_reason",
        "counters",
    )

    def __init__(
        self,
        client: Any,
        backend: BackendProtocol,
        *,
        counters: RouteCounters,
        clock: IReactorTime,
        idle_timeout: float | None,
        on_done: Callable[[], None] = lambda: None,
    ) -> None:
        self.client = client
        self.backend = backend
        self.counters = counters
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._on_done = on_done
        self._client_eof = False
        self._backend_eof = False
        self._client_gone = False
        self._backend_gone = False
        # Kept only where an idle timeout reads it: no clock read per chunk otherwise.
        self._last_activity = clock.seconds() if idle_timeout is not None else 0.0
        self._idle_call: IDelayedCall | None = None
        self.close_reason: str | None = None
        #: The backend protocol's transport (connected before the splice is made).
        self.backend_transport: Any = backend.transport
        # Whether each transport still has the other registered as its producer (unregistered at most once).
        self._client_has_producer = False
        self._backend_has_producer = False

    def start(self, first: bytes) -> None:
        """Wire the two transports together, write ``first`` (PROXY header and replayed bytes) to the
        backend, and let the client be read again. The client transport must be paused by the caller
        until now, so no byte overtakes ``first``."""
        backend = self.backend_transport
        client = self.client
        client.registerProducer(backend, True)
        backend.registerProducer(client, True)
        self._client_has_producer = self._backend_has_producer = True
        self.backend.splice = self
        if self._idle_timeout is not None:
            self._idle_call = self._clock.callLater(self._idle_timeout, self._idle_check)
        # Resume before writing: a write that fills the backend's buffer pauses the client again, and that
        # pause must not be undone.
        client.resumeProducing()
        if first:
            self.counters.bytes_in += len(first)
            backend.write(first)
        early = self.backend.early
        if early:
            self.backend.early = []
        for data in early:
            self.backend_data(data)
        if self.backend.eof:
            self.backend_eof()
        if self.backend.lost:
            self.backend_lost()

    # -- events from the client side ------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        if self._idle_timeout is not None:
            self._last_activity = self._clock.seconds()
        self.counters.bytes_in += len(data)
        self.backend_transport.write(data)

    def client_eof(self) -> None:
        if self._client_eof or self._backend_gone:
            return
        self._client_eof = True
        # The client will produce nothing more: it must not stay the backend's producer, or a paused
        # producer would keep the backend transport from ever sending its EOF.
        if self._backend_eof:
            self.close("both sides ended", ended=True)
            return
        if self._backend_has_producer:
            self._backend_has_producer = False
            self.backend_transport.unregisterProducer()
        _shut_write(self.backend_transport)

    def client_lost(self) -> None:
        if self._client_gone:
            return
        self._client_gone = True
        if not self._backend_gone:
            self._unregister(self.backend_transport)
            _lose(self.backend_transport, ended=self._client_eof and self._backend_eof)
        self._maybe_done()

    # -- events from the backend side -----------------------------------------------------------------

    def backend_data(self, data: bytes) -> None:
        if self._idle_timeout is not None:
            self._last_activity = self._clock.seconds()
        self.counters.bytes_out += len(data)
        self.client.write(data)

    def backend_eof(self) -> None:
        if self._backend_eof or self._client_gone:
            return
        self._backend_eof = True
        if self._client_eof:
            self.close("both sides ended", ended=True)
            return
        self._unregister(self.client)
        _shut_write(self.client)

    def backend_lost(self) -> None:
        if self._backend_gone:
            return
        self._backend_gone = True
        if not self._client_gone:
            self._unregister(self.client)
            _lose(self.client, ended=self._client_eof and self._backend_eof)
        self._maybe_done()

    # -- ending ---------------------------------------------------------------------------------------

    def close(self, reason: str, *, ended: bool = False) -> None:
        """Close both connections after their pending bytes are written (``ended``: both sides sent EOF)."""
        self.close_reason = self.close_reason or reason
        # Each side is looked at when its turn comes: closing the client may close the backend too
        # (client_lost), and that must not be done twice.
        if not self._client_gone:
            self._unregister(self.client)
            _lose(self.client, ended=ended)
        if not self._backend_gone:
            self._unregister(self.backend_transport)
            _lose(self.backend_transport, ended=ended)

    def abort(self, reason: str) -> None:
        """Drop both connections now, pending bytes and all (timeouts, shutdown)."""
        self.close_reason = self.close_reason or reason
        for transport, gone in (
            (self.client, self._client_gone),
            (self.backend_transport, self._backend_gone),
        ):
            if not gone:
                transport.abortConnection()

    def _unregister(self, transport: Any) -> None:
        if transport is self.client:
            if self._client_has_producer:
                self._client_has_producer = False
                transport.unregisterProducer()
        elif self._backend_has_producer:
            self._backend_has_producer = False
            transport.unregisterProducer()

    def _idle_check(self) -> None:
        assert self._idle_timeout is not None
        idle_for = self._clock.seconds() - self._last_activity
        if idle_for >= self._idle_timeout:
            self._idle_call = None
            self.abort(f"idle for {self._idle_timeout:g}s")
        else:
            # Re-armed for the remainder rather than on every chunk: one timer operation per timeout period.
            self._idle_call = self._clock.callLater(self._idle_timeout - idle_for, self._idle_check)

    def _maybe_done(self) -> None:
        if self._client_gone and self._backend_gone:
            if self._idle_call is not None and self._idle_call.active():
                self._idle_call.cancel()
            self._idle_call = None
            on_done, self._on_done = self._on_done, _nothing
            # No reference cycles left behind (splice <-> backend, splice -> session -> splice): the pair
            # is freed as soon as its last reference goes, not by the cyclic garbage collector.
            self.backend.splice = None
            on_done()
