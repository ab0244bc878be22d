"""DnsService: the authoritative server on UDP and TCP, a child service of DcRouter.

The ports are bound in ``privilegedStartService`` (port 53 needs root; twistd drops privileges after it) and
released in ``stopService``. TCP connections are closed after :data:`TCP_IDLE_TIMEOUT` seconds without a
query (RFC 7766 §6.2.3), so idle clients cannot hold sockets open.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.names import dns, server
from twisted.protocols.policies import TimeoutMixin

from dcrouter.dns.answer import respond
from dcrouter.dns.zone import ZoneSet
from dcrouter.log import logger

log = logger(__name__)

#: Seconds a TCP connection may stay idle before the server closes it.
TCP_IDLE_TIMEOUT = 10.0


_RCODES = {
    dns.OK: "NOERROR",
    dns.EFORMAT: "FORMERR",
    dns.ESERVER: "SERVFAIL",
    dns.ENAME: "NXDOMAIN",
    dns.ENOTIMP: "NOTIMP",
    dns.EREFUSED: "REFUSED",
}
_SIZES = {0: "full", 1: "truncated"}


class DnsBindError(Exception):
    """The server cannot listen; the message names the key, the address and the port."""


class _TcpProtocol(dns.DNSProtocol, TimeoutMixin):
    def connectionMade(self) -> None:
        super().connectionMade()
        self.setTimeout(TCP_IDLE_TIMEOUT)

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        super().dataReceived(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.setTimeout(None)
        super().connectionLost(reason)


class AuthoritativeFactory(server.DNSServerFactory):
    """Answers every query from the :class:`ZoneSet` ``zones()`` returns (see :mod:`dcrouter.dns.answer`);
    nothing is ever forwarded or looked up elsewhere."""

    protocol = _TcpProtocol
    noisy = False

    def __init__(self, zones: Callable[[], ZoneSet], clock: Any = None) -> None:
        super().__init__()
        self._zones = zones
        self._clock = clock
        #: Responses sent by (transport ``udp``/``tcp``, rcode name, ``truncated``/``full``), for metrics.
        self.responses: Counter[tuple[str, str, str]] = Counter()

    def buildProtocol(self, addr: Any) -> dns.DNSProtocol:
        protocol = _TcpProtocol(self)
        protocol.factory = self
        if self._clock is not None:
            protocol.callLater = self._clock.callLater  # type: ignore[method-assign]
        return protocol

    def messageReceived(self, message: dns.Message, proto: Any, address: Any = None) -> None:
        response = respond(self._zones(), message, udp=address is not None)
        if response is not None:
            rcode = _RCODES.get(response.rCode, "other")
            self.responses["udp" if address is not None else "tcp", rcode, _SIZES[response.trunc]] += 1
            self.sendReply(proto, response, address)

    def sendReply(self, protocol: Any, message: dns.Message, address: Any) -> None:
        if address is None:
            protocol.writeMessage(message)
        else:
            protocol.writeMessage(message, address)


class DnsService(Service):
    """The server for ``zones`` on ``interface``:``port`` (UDP and TCP; port 0 picks a free one, the same
    for both). ``port`` holds the actual port once bound."""

    name = "dns"  # type: ignore[assignment]

    def __init__(self, zones: ZoneSet, *, interface: str, port: int, reactor: Any) -> None:
        self.zones = zones
        self.interface = interface
        self.configured_port = port
        self.port: int | None = None
        self._reactor = reactor
        self.factory = AuthoritativeFactory(lambda: self.zones, clock=reactor)
        self._listening: list[IListeningPort] = []

    def bind(self) -> None:
        """Listen on UDP and TCP (once). Raises :class:`DnsBindError`."""
        if self._listening:
            return
        reactor = self._reactor
        where = f"dnsServerConfig.udpPort: cannot listen on {self.interface}:{self.configured_port}"
        # Port 0: a port free for UDP may be taken for TCP; try a few.
        for _attempt in range(20 if self.configured_port == 0 else 1):
            datagrams = dns.DNSDatagramProtocol(self.factory)
            datagrams.noisy = False  # our own line below says where it listens
            try:
                udp = reactor.listenUDP(self.configured_port, datagrams, interface=self.interface)
            except CannotListenError as error:
                raise DnsBindError(f"{where} (UDP): {error.socketError}") from error
            port = udp.getHost().port
            try:
                tcp = reactor.listenTCP(port, self.factory, interface=self.interface)
            except CannotListenError as error:
                udp.stopListening()
                if self.configured_port == 0:
                    continue
                raise DnsBindError(f"{where} (TCP): {error.socketError}") from error
            self._listening = [udp, tcp]
            self.port = port
            log.info(
                "DNS server listening on {interface}:{port} (UDP and TCP) for {zones}",
                interface=self.interface,
                port=port,
                zones=", ".join(z.origin for z in self.zones),
            )
            return
        raise DnsBindError(f"{where}: no port free for both UDP and TCP")

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.bind()

    def startService(self) -> None:
        self.bind()
        super().startService()

    def unbind(self) -> Deferred[Any]:
        """Stop listening and close the TCP connections; fires once the ports are released."""
        listening, self._listening = self._listening, []
        for connection in list(self.factory.connections):
            connection.transport.loseConnection()
        stopping = [maybeDeferred(port.stopListening) for port in listening]
        return gatherResults(stopping).addCallback(lambda _: None)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return self.unbind()
