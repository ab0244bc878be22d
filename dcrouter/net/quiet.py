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
