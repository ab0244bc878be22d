"""bench/proxy_forwarder: a minimal Twisted TCP forwarder, the peer that shows what Twisted itself costs.

    python -m bench.proxy_forwarder --host 127.0.0.1 --forward LISTEN_PORT:BACKEND_PORT [--forward ...] \
        [--processes N]

Accept, pause the client, ``reactor.connectTCP`` to the backend, then pass bytes both ways with each
transport the streaming producer of the other (flow control as ``twisted.protocols.portforward``), Nagle off
on both sides as a proxy needs; when either side closes, the other is closed after its pending bytes. No
routing, limits, half-close or counters: the floor a Twisted proxy on this reactor cannot go below. (On
bench/proxy's TLS port it forwards to the backend's TLS port without reading the ClientHello. Without
half-close it cannot carry bench/proxy's throughput test, whose trailer comes after the client's EOF.)

``--processes N``: N processes serve the same listening sockets, opened once and adopted by each
(``adoptStreamPort``), as dcrouter's workers do: the floor for dcrouter with ``workers = N``. The first
process is the parent; it stops the others when it stops.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from twisted.internet.protocol import ClientFactory, Factory, Protocol

# The reactor is imported in main(), after any fork: processes must not share one epoll instance.


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
        self.factory.reactor.connectTCP(host, port, BackendFactory(self), timeout=10)  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.proxy_forwarder", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--forward", action="append", required=True, help="LISTEN_PORT:BACKEND_PORT")
    parser.add_argument("--processes", type=int, default=1, help="Processes sharing the ports (default 1).")
    args = parser.parse_args(argv)
    listeners = []
    for pair in args.forward:
        listen, backend = (int(p) for p in pair.split(":"))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, listen))
        sock.listen(1024)
        sock.setblocking(False)
        listeners.append((sock, backend))
    children: list[int] = []
    for _ in range(args.processes - 1):
        pid = os.fork()
        if pid == 0:
            children = []
            break
        children.append(pid)
    from twisted.internet import reactor

    for sock, backend in listeners:
        factory = Factory.forProtocol(Client)
        factory.noisy = False
        factory.backend = (args.host, backend)  # type: ignore[attr-defined]
        factory.reactor = reactor  # type: ignore[attr-defined]
        reactor.adoptStreamPort(sock.fileno(), socket.AF_INET, factory)  # type: ignore[attr-defined]
        sock.close()  # the reactor's port holds its own copy of the descriptor

    def stop_children() -> None:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)

    reactor.addSystemEventTrigger("after", "shutdown", stop_children)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
