"""bench/proxy_forwarder: a minimal Twisted TCP forwarder, the peer that shows what Twisted itself costs.

    python -m bench.proxy_forwarder --host 127.0.0.1 --forward LISTEN_PORT:BACKEND_PORT [--forward ...]

Accept, pause the client, ``reactor.connectTCP`` to the backend, then pass bytes both ways with each
transport the streaming producer of the other (flow control as ``twisted.protocols.portforward``), Nagle off
on both sides as a proxy needs; when either side closes, the other is closed after its pending bytes. No
routing, limits, half-close or counters: the floor a Twisted proxy on this reactor cannot go below. (On
bench/proxy's TLS port it forwards to the backend's TLS port without reading the ClientHello. Without
half-close it cannot carry bench/proxy's throughput test, whose trailer comes after the client's EOF.)
"""

from __future__ import annotations

import argparse
import sys

from twisted.internet import reactor
from twisted.internet.protocol import ClientFactory, Factory, Protocol


class Side(Protocol):
    peer: Side | None = None

    def dataReceived(self, data: bytes) -> None:
        self.peer.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: object = None) -> None:
        if self.peer is not None:
            self.peer.transport.unregisterProducer()
            self.peer.transport.loseConnection()
            self.peer.peer = None


class Backend(Side):
    def connectionMade(self) -> None:
        if self.factory.client.transport.disconnected:  # type: ignore[attr-defined]
            self.transport.loseConnection()  # the client left while we connected
            return
        client, self.peer = self.factory.client, self.factory.client  # type: ignore[attr-defined]
        client.peer = self
        self.transport.setTcpNoDelay(True)
        self.transport.registerProducer(client.transport, True)
        client.transport.registerProducer(self.transport, True)
        client.transport.resumeProducing()


class BackendFactory(ClientFactory):
    noisy = False
    protocol = Backend

    def __init__(self, client: Side) -> None:
        self.client = client

    def clientConnectionFailed(self, connector: object, reason: object) -> None:
        self.client.transport.loseConnection()


class Client(Side):
    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.pauseProducing()
        host, port = self.factory.backend  # type: ignore[attr-defined]
        reactor.connectTCP(host, port, BackendFactory(self), timeout=10)  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.proxy_forwarder", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--forward", action="append", required=True, help="LISTEN_PORT:BACKEND_PORT")
    args = parser.parse_args(argv)
    for pair in args.forward:
        listen, backend = (int(p) for p in pair.split(":"))
        factory = Factory.forProtocol(Client)
        factory.noisy = False
        factory.backend = (args.host, backend)  # type: ignore[attr-defined]
        reactor.listenTCP(listen, factory, interface=args.host)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
