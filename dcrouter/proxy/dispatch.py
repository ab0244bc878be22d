"""Routes chosen by request: on a terminated connection whose port has routes with ``match.path`` or
``match.headers``, the route is known only once the first request head has been read inside TLS.

:class:`RequestDispatcher` is the application protocol inside such a connection: it reads one request head
(strictly, as the forwarder will), asks ``choose`` for the protocol that serves it (the forwarder or the
answerer of the chosen route, which then carries that one request and closes), and from then on passes
everything on to it. ``choose`` raises :class:`~dcrouter.proxy.httpmessage.HttpError` to have a status
answered instead (no route, refused by the route's rules).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.proxy.answer import reason
from dcrouter.proxy.httpmessage import HeadBuffer, HttpError, RequestHead, parse_request_head, simple_response

#: Given the first request head, the protocol to hand the connection to.
Chooser = Callable[[RequestHead], IProtocol]


@implementer(IHalfCloseableProtocol)
class RequestDispatcher(Protocol):
    """See the module docstring. ``inner`` is the chosen protocol once there is one."""

    transport: Any

    def __init__(self, choose: Chooser) -> None:
        self._choose = choose
        self._head = HeadBuffer()
        self._pending = b""
        self.inner: IProtocol | None = None
        self._done = False

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        if self._done:
            return
        self._pending += data
        try:
            complete = self._head.feed(data)
            if complete is None:
                return
            inner = self._choose(parse_request_head(complete[0]))
        except HttpError as error:
            self._done = True
            text = reason(error.status)
            self.transport.write(simple_response(error.status, text, body=text.encode() + b"\n"))
            self.transport.loseConnection()
            return
        pending, self._pending = self._pending, b""
        self.inner = inner
        inner.makeConnection(self.transport)
        inner.dataReceived(pending)

    def readConnectionLost(self) -> None:
        inner = self.inner
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            inner.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Never sent by the proxy's terminated connections."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.inner is not None:
            self.inner.connectionLost(reason)
