"""The plumbing the daemon scanners share: where the daemon listens, one request/reply exchange over a fresh
connection with the message streamed by a producer, and a deadline over the whole of it.

Each scan opens its own connection (spamd and clamd close after one reply, as their own clients expect).
The message is never read into memory: :class:`~twisted.protocols.basic.FileSender` reads it in 16 KiB chunks
as the daemon takes them. Whatever goes wrong on the way (refused, reset, a deadline, a reply too long or cut
off) comes out as :class:`~dcrouter.processing.message.ScannerUnavailable`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar, cast

from twisted.internet import error as twisted_error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from dcrouter.config.processing import ScannerConfig
from dcrouter.net.reactor import IRouterReactor
from dcrouter.processing.message import ScannerUnavailable

T = TypeVar("T")

#: Longest reply a daemon may send before it counts as nonsense (a SYMBOLS list, a JSON report).
MAX_REPLY = 256 * 1024

_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


def endpoint_for(config: ScannerConfig, reactor: IRouterReactor, default_port: int) -> IStreamClientEndpoint:
    """The daemon's Unix socket when ``config.socket`` is set, else ``config.host`` and ``config.port`` (or
    ``default_port``). The connect attempt itself is bounded by the scan's deadline, not here."""
    seconds = max(config.timeout / 1000.0, 0.001)
    if config.socket is not None:
        return UNIXClientEndpoint(reactor, config.socket, timeout=seconds)
    port = config.port if config.port is not None else default_port
    return TCP4ClientEndpoint(reactor, config.host, port, timeout=seconds)


def where(config: ScannerConfig, default_port: int) -> str:
    """The daemon's address for messages: ``unix:/run/x.sock`` or ``127.0.0.1:783``."""
    if config.socket is not None:
        return f"unix:{config.socket}"
    return f"{config.host}:{config.port if config.port is not None else default_port}"


def printable(text: str, limit: int) -> str:
    """``text`` with runs of anything but printable ASCII made one ``?``, cut to ``limit`` characters: safe
    in a header field, a log line and an SMTP reply."""
    return _UNPRINTABLE.sub("?", text).strip()[:limit]


@dataclass(frozen=True)
class Request:
    """What one exchange sends: ``head``, then ``body`` (closed afterwards) chunk by chunk through
    ``frame`` (None: as is), then ``tail``. ``complete(reply)`` says whether the bytes so far are the whole
    reply (None: the daemon closing the connection ends it)."""

    head: bytes
    body: BinaryIO | None = None
    frame: Callable[[bytes], bytes] | None = None
    tail: bytes = b""
    complete: Callable[[bytes], bool] | None = None


class Exchange(Protocol):
    """Sends one :class:`Request` and collects the reply. ``reply`` fires with the bytes received once the
    reply is complete or the daemon closed the connection after sending something; it fails with
    ScannerUnavailable when the connection ends with nothing, or the reply outgrows :data:`MAX_REPLY`.
    Cancelling ``reply`` aborts the connection."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.reply: Deferred[bytes] = Deferred(self._cancel)
        self._received: list[bytes] = []
        self._size = 0
        self._sender: FileSender | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request.head)
        body = self.request.body
        if body is None:
            self._sent(None)
            return
        self._sender = FileSender()
        sent = self._sender.beginFileTransfer(body, self.transport, self.request.frame)
        sent.addCallbacks(self._sent, self._not_sent)

    def _sent(self, _: object) -> None:
        self._close_body()
        if self.request.tail and self.transport is not None and not self.reply.called:
            self.transport.write(self.request.tail)

    def _not_sent(self, failure: Failure) -> None:
        # The daemon went away (or answered early and closed) mid-message: the reply, or its absence, is
        # what connectionLost reports, so this failure says nothing new.
        self._close_body()

    def _close_body(self) -> None:
        self._sender = None
        if self.request.body is not None:
            self.request.body.close()

    def dataReceived(self, data: bytes) -> None:
        if self.reply.called:
            return
        self._received.append(data)
        self._size += len(data)
        if self._size > MAX_REPLY:
            self._finish(Failure(ScannerUnavailable(f"reply longer than {MAX_REPLY} bytes")))
            return
        complete = self.request.complete
        if complete is not None and complete(b"".join(self._received)):
            self._finish(b"".join(self._received))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._sender is not None:
            self._close_body()
        if self.reply.called:
            return
        if self._received:
            self.reply.callback(b"".join(self._received))
        else:
            detail = reason.getErrorMessage() if reason is not None else "closed"
            self.reply.errback(ScannerUnavailable(f"connection closed without a reply ({detail})"))

    def _finish(self, result: bytes | Failure) -> None:
        if isinstance(result, Failure):
            self.reply.errback(result)
        else:
            self.reply.callback(result)
        self._abort()

    def _cancel(self, _: Deferred[bytes]) -> None:
        self._abort()

    def _abort(self) -> None:
        # TCP and Unix transports both abort; the ITCPTransport cast only tells mypy so.
        if self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()


async def exchange(endpoint: IStreamClientEndpoint, request: Request) -> bytes:
    """Connect, send ``request``, return the reply (see :class:`Exchange`). The body is closed whatever
    happens. Connection failures are ScannerUnavailable; cancelling the coroutine's Deferred aborts."""
    try:
        protocol = cast(Exchange, await endpoint.connect(Factory.forProtocol(lambda: Exchange(request))))
    except BaseException:
        if request.body is not None:
            request.body.close()
        raise
    return await protocol.reply


#: Failures that mean "the daemon cannot answer now", turned into ScannerUnavailable by :func:`within`.
UNAVAILABLE = (
    twisted_error.ConnectError,
    twisted_error.ConnectingCancelledError,
    twisted_error.ConnectionClosed,
    twisted_error.TimeoutError,
    OSError,
)


def within(work: Coroutine[Any, Any, T], timeout_ms: int, clock: IReactorTime, what: str) -> Deferred[T]:
    """Run ``work`` with a deadline of ``timeout_ms`` milliseconds on ``clock``; past it the work is
    cancelled (its connection aborted). Fails with ScannerUnavailable, naming ``what``, on the deadline or
    on any of :data:`UNAVAILABLE`; other failures (bugs) pass through as they are."""
    d: Deferred[T] = Deferred.fromCoroutine(work)
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        d.cancel()

    deadline = clock.callLater(timeout_ms / 1000.0, expire)

    def settled(result: T | Failure) -> T | Failure:
        if deadline.active():
            deadline.cancel()
        if not isinstance(result, Failure):
            return result
        if expired:  # whatever the cancelled work made of its cancellation
            return Failure(ScannerUnavailable(f"{what}: no answer within {timeout_ms} ms"))
        if result.check(CancelledError):
            # Cancelled from outside (processingTimeout ended the whole chain): not the daemon's fault, and
            # turning it into "unavailable" would let onError = accept carry on with a cancelled message.
            return result
        if result.check(ScannerUnavailable):
            return result
        if result.check(*UNAVAILABLE):
            return Failure(ScannerUnavailable(f"{what}: {result.getErrorMessage()}"))
        return result

    return d.addBoth(settled)


class DaemonScanner:
    """What the daemon clients share: their name, configuration, reactor, size limit and where the daemon is
    (``host:port`` or the socket, for messages). Subclasses set :attr:`daemon`, :attr:`default_port` and
    :attr:`default_max_size`."""

    daemon = ""
    default_port = 0
    default_max_size = 0

    def __init__(self, config: ScannerConfig, reactor: IRouterReactor) -> None:
        self.name = config.label
        self._config = config
        self._reactor = reactor
        self._max_size = config.max_size if config.max_size is not None else self.default_max_size
        self._where = f"{self.daemon} at {where(config, self.default_port)}"


class StreamDaemonScanner(DaemonScanner):
    """A daemon spoken to over a stream connection of its own per scan (spamd, clamd)."""

    def __init__(self, config: ScannerConfig, reactor: IRouterReactor) -> None:
        super().__init__(config, reactor)
        self._endpoint = endpoint_for(config, reactor, self.default_port)
