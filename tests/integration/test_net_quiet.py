"""Outbound connections made with connect_quietly log nothing about their factory. The "Starting factory"
line comes from a real connector starting its factory, so this runs on the real reactor and 127.0.0.1."""

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

from dcrouter.net.quiet import connect_quietly


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
