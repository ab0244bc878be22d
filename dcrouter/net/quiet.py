"""Connection hygiene shared by SMTP and the proxy: no per-connection factory log lines, no Nagle delays."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol


class QuietFactory(Factory):
    """A factory for one kind of outbound connection that never logs "Starting factory" / "Stopping
    factory". Twisted logs both for every connection made through an endpoint with a default factory: for a
    proxy or a delivery pool opening thousands of connections a second that is a measurable share of the CPU
    (measured by bench/proxy) and noise in the log."""

    noisy = False

    def __init__(self, build: Callable[[], Protocol]) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = self._build()
        protocol.factory = self
        return protocol


def connect_quietly(endpoint: IStreamClientEndpoint, build: Callable[[], Protocol]) -> Deferred[Any]:
    """``endpoint.connect`` for a protocol made by ``build``, without factory log lines."""
    return endpoint.connect(QuietFactory(build))


def set_no_delay(transport: Any) -> None:
    """Turn off Nagle's algorithm on ``transport`` (TCP, or TLS over TCP; anything else is left alone).

    SMTP writes a few small pieces per round trip (a pipelined command group, then the end of the data):
    with Nagle on, a small write waits for the ACK of the previous one, and the peer delays that ACK
    (40 ms on Linux), so a localhost delivery took ~20 ms instead of well under one (bench/relay)."""
    set_tcp = getattr(transport, "setTcpNoDelay", None)
    if set_tcp is None:
        return
    try:
        set_tcp(True)
    except OSError:
        pass  # the socket is already closed: nothing to tune


def eager_writes(transport: Any) -> None:
    """Make ``transport`` (a Twisted TCP transport; anything else is left alone) send a write at once when
    nothing is waiting in its buffer, instead of through the reactor's next turn.

    Twisted's ``write`` only buffers: it adds the socket to the reactor's writers (an ``epoll_ctl``), the
    next turn sends, and an emptied buffer takes it out again (another ``epoll_ctl``) — for a proxied
    request and its response, four system calls and a reactor dispatch each way that a direct ``send``
    avoids. What the socket does not take now (a full send buffer, an error) goes through Twisted's own
    path as before, after anything still buffered, so order, flow control (producers paused on a full
    buffer) and how errors and closes are reported are Twisted's."""
    sock = getattr(transport, "socket", None)
    if sock is None or not hasattr(transport, "_tempDataBuffer") or not hasattr(transport, "dataBuffer"):
        return
    buffered_write = transport.write
    send = sock.send

    def write(data: bytes) -> None:
        if (
            data
            and not transport._tempDataLen
            and len(transport.dataBuffer) <= transport.offset
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and type(data) is bytes
        ):
            try:
                sent = send(data)
            except OSError:
                sent = 0  # EAGAIN or worse: Twisted's path sends it, or reports the failure
            if sent >= len(data):
                return
            data = data[sent:]
        buffered_write(data)

    transport.write = write
