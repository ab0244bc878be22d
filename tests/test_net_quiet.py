"""Outbound connections made with connect_quietly log nothing about their factory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from dcrouter.net.quiet import connect_quietly, set_no_delay


class QuietServerFactory(Factory):
    noisy = False
    protocol = Protocol


class Client(Protocol):
    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost.callback(None)


class QuietConnectionTests(TestCase):
    def setUp(self) -> None:
        port = reactor.listenTCP(0, QuietServerFactory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    async def factory_lines(self, connect: Callable[[], Deferred[Any]]) -> list[str]:
        client = await connect()
        client.transport.loseConnection()
        await client.lost
        return [formatEvent(e) for e in self.events if "factory" in formatEvent(e)]

    async def test_no_factory_lines(self) -> None:
        self.assertEqual(await self.factory_lines(lambda: connect_quietly(self.endpoint, Client)), [])

    async def test_twisted_default_logs_them(self) -> None:
        """The baseline the helper exists for: a default endpoint connection logs its factory."""
        logged = await self.factory_lines(lambda: connectProtocol(self.endpoint, Client()))
        self.assertTrue(logged and logged[0].startswith("Starting factory"), logged)


class NoDelayTests(TestCase):
    def test_tcp_transport_gets_nodelay(self) -> None:
        transport = StringTransportWithNoDelay()
        set_no_delay(transport)
        self.assertTrue(transport.no_delay)

    def test_transport_without_tcp_options_is_left_alone(self) -> None:
        """No setTcpNoDelay (a UNIX socket, an in-memory transport): it is asked for that and nothing else."""
        transport = TransportWithoutTcpOptions()
        self.assertIsNone(set_no_delay(transport))
        self.assertEqual(transport.asked, ["setTcpNoDelay"])

    def test_closed_socket_is_ignored(self) -> None:
        """The socket closed under us: the attempt was made, and its OSError goes no further."""
        calls: list[bool] = []

        class Closed:
            def setTcpNoDelay(self, enabled: bool) -> None:
                calls.append(enabled)
                raise OSError(9, "Bad file descriptor")

        self.assertIsNone(set_no_delay(Closed()))
        self.assertEqual(calls, [True])


class StringTransportWithNoDelay:
    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


class TransportWithoutTcpOptions:
    """Records every attribute it is asked for; it has none."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.asked.append(name)
        raise AttributeError(name)
