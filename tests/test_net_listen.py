"""Tests for dcrouter.net.listen: ports bound through tcp endpoint strings, paused until resumed, and a port
that cannot be bound named in the error with nothing left bound. On in-memory reactors; tests/test_router.py
shows the same on the real reactor (not accepting before the queue has loaded, a port in use)."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReadDescriptor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from dcrouter.net import listen
from dcrouter.net.listen import (
    LISTEN_BACKLOG,
    ListenError,
    format_address,
    listen_paused,
    resume,
    tcp_endpoint,
)


@implementer(IListeningPort, IReadDescriptor)
class RecordingPort:
    """A listening port that is a read descriptor, as a real reactor's is: it records reading and stopping."""

    def __init__(self, port: int, log: list[str]) -> None:
        self.port = port
        self.log = log
        self.reading = True  # a real port reads (accepts) as soon as it listens

    def startReading(self) -> None:
        self.reading = True
        self.log.append(f"{self.port} reading")

    def stopReading(self) -> None:
        self.reading = False
        self.log.append(f"{self.port} paused")

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        self.log.append(f"{self.port} closed")

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", self.port)

    def doRead(self) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass

    def fileno(self) -> int:
        return -1

    def logPrefix(self) -> str:
        return "RecordingPort"


class PortsReactor(MemoryReactorClock):
    """A MemoryReactorClock whose ports are RecordingPorts, and on which the ports in ``taken`` are in use."""

    def __init__(self, taken: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.taken = taken
        self.log: list[str] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port in self.taken:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        super().listenTCP(port, factory, backlog, interface)
        self.log.append(f"{port} bound")
        return RecordingPort(port, self.log)


def factory() -> Factory:
    return Factory.forProtocol(Protocol)


class EndpointStringTests(SynchronousTestCase):
    def test_tcp_endpoint_names_port_interface_and_backlog(self) -> None:
        self.assertEqual(tcp_endpoint(25, "127.0.0.1"), "tcp:port=25:interface=127.0.0.1:backlog=1024")
        self.assertEqual(tcp_endpoint(0, "::1", backlog=7), "tcp:port=0:interface=\\:\\:1:backlog=7")

    def test_format_address(self) -> None:
        self.assertEqual(format_address("127.0.0.1", 25), "127.0.0.1:25")
        self.assertEqual(format_address("::1", 25), "[::1]:25")


class ListenPausedTests(SynchronousTestCase):
    def test_binds_each_port_in_order_with_the_backlog(self) -> None:
        reactor = MemoryReactorClock()
        smtp, submission = factory(), factory()
        ports = listen_paused(reactor, [(2525, smtp), (2587, submission)], interface="::1", what="SMTP")
        self.assertEqual(
            reactor.tcpServers,
            [(2525, smtp, LISTEN_BACKLOG, "::1"), (2587, submission, LISTEN_BACKLOG, "::1")],
        )
        self.assertEqual(len(ports), 2)

    def test_bound_ports_accept_only_once_resumed(self) -> None:
        reactor = PortsReactor()
        ports = listen_paused(
            reactor, [(25, factory()), (587, factory())], interface="127.0.0.1", what="SMTP"
        )
        self.assertEqual(reactor.log, ["25 bound", "25 paused", "587 bound", "587 paused"])
        self.assertEqual([port.reading for port in ports], [False, False])  # type: ignore[attr-defined]
        resume(ports[1])
        self.assertEqual([port.reading for port in ports], [False, True])  # type: ignore[attr-defined]

    def test_a_port_in_use_is_named_and_nothing_stays_bound(self) -> None:
        reactor = PortsReactor(taken=(587,))
        error = self.assertRaises(
            ListenError,
            listen_paused,
            reactor,
            [(25, factory()), (587, factory()), (465, factory())],
            interface="127.0.0.1",
            what="SMTP",
        )
        self.assertEqual(
            str(error), "cannot listen for SMTP on 127.0.0.1:587: [Errno 98] Address already in use"
        )
        self.assertEqual((error.interface, error.port), ("127.0.0.1", 587))
        self.assertEqual(reactor.log, ["25 bound", "25 paused", "25 closed"])

    def test_an_endpoint_that_binds_later_is_refused(self) -> None:
        """Binding after privilegedStartService would bind without privileges: not allowed to happen."""
        cancelled: list[object] = []
        later: Deferred[IListeningPort] = Deferred(cancelled.append)

        class LaterEndpoint:
            def listen(self, protocol_factory: Any) -> Deferred[IListeningPort]:
                return later

        reactor = PortsReactor()
        bound = listen_paused(reactor, [(25, factory())], interface="127.0.0.1", what="SMTP")
        self.patch(listen, "serverFromString", lambda reactor, description: LaterEndpoint())
        error = self.assertRaises(
            ListenError, listen_paused, reactor, [(587, factory())], interface="127.0.0.1", what="the proxy"
        )
        self.assertEqual(
            str(error), "cannot listen for the proxy on 127.0.0.1:587: the endpoint did not bind at once"
        )
        self.assertEqual(cancelled, [later])
        self.assertEqual(len(bound), 1)


class SharedPortTests(TestCase):
    """With ``spread`` (SMTP), a port adopted from the supervisor (workers) accepts one connection per
    wake-up, so that the workers sharing it each take their part of a burst; without, Twisted's burst."""

    def test_an_adopted_port_accepts_one_connection_per_wakeup(self) -> Deferred[None]:
        return self.accepts(spread=True)

    def test_without_spread_it_accepts_what_is_waiting(self) -> Deferred[None]:
        return self.accepts(spread=False)

    def accepts(self, *, spread: bool) -> Deferred[None]:
        import socket

        from twisted.internet import reactor
        from twisted.internet.protocol import Factory, Protocol

        from dcrouter.net import listen

        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        server.setblocking(False)  # as the supervisor opens them (adoptStreamPort requires it)
        port = server.getsockname()[1]
        listen.inherit({("127.0.0.1", port): server.fileno()})
        self.addCleanup(listen.inherit, {})
        built: list[Protocol] = []

        class Recorder(Factory):
            def buildProtocol(self, addr: object) -> Protocol:
                protocol = Protocol()
                built.append(protocol)
                return protocol

        (listening,) = listen.listen_paused(
            reactor, [(port, Recorder())], interface="127.0.0.1", what="SMTP", spread=spread
        )
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]  # all three queued
        try:
            counts = []
            for _ in range(3):
                listening.doRead()  # type: ignore[attr-defined]  # what the reactor calls when readable
                counts.append(len(built))
            self.assertEqual(counts, [1, 2, 3] if spread else [3, 3, 3])
        finally:
            for protocol in built:
                protocol.transport.abortConnection()  # type: ignore[union-attr]
            for client in clients:
                client.close()
        return listening.stopListening()  # type: ignore[return-value]
