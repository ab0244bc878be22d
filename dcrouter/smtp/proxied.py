"""The PROXY protocol on SMTP listeners (``smtpConfig.proxyProtocol``): a load balancer in front of the SMTP
ports (HAProxy with ``send-proxy``/``send-proxy-v2``) opens each connection with a header naming the client,
and the session sees that client as its peer.

What a caller may rely on:

- :class:`ProxyHeaderFactory` wraps an SMTP listener's factory (below TLS on an implicit-TLS port: the header
  comes before the ClientHello). Each connection gets a :class:`ProxyHeaderReader`.
- A connection from ``trustedProxies`` must open with one whole PROXY header of the allowed version within
  ``proxyHeaderTimeout``; only then does the SMTP session start (its ``connectionMade``: connection limits,
  the greeting), and its transport's ``getPeer()``/``getHost()`` give the addresses the header carries, so
  relayNetworks, limits, the Received field and the logs use the real client. A ``LOCAL`` or ``UNKNOWN``
  header (a health check) keeps the proxy's own address. A trusted peer that sends anything else, a
  malformed or oversized header, a header of the other version, or nothing in time, is disconnected without
  a greeting (as Postfix's ``smtpd_upstream_proxy_protocol`` does): a proxy that stopped sending headers
  would otherwise make every client look like the proxy, and the proxy is usually in relayNetworks' reach.
- Any other peer is an ordinary SMTP client, greeted at once; if its first bytes are a PROXY header (v1
  ``PROXY `` or the v2 signature) it is disconnected before the session sees them: a client must not be able
  to claim an address. Until its first bytes tell (at most 11 bytes) they are held back.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IProtocol,
    IReactorTime,
    ITransport,
)
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from dcrouter.log import logger
from dcrouter.net import proxyprotocol
from dcrouter.net.cidr import CidrSet

log = logger(__name__)


def _host(address: IAddress) -> str:
    if isinstance(address, (IPv4Address, IPv6Address)):
        return str(address.host)
    return ""


@implementer(IHandshakeListener)
class ProxyHeaderReader(ProtocolWrapper):
    """One connection on a PROXY-protocol SMTP port; see the module docstring."""

    factory: ProxyHeaderFactory

    def __init__(self, factory: ProxyHeaderFactory, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self._header: proxyprotocol.IncomingHeader | None = None
        self._opening: bytes | None = None  # an untrusted peer's first bytes, held until they tell
        self._deadline: IDelayedCall | None = None
        self._info: ProxyInfo | None = None
        self._started = False
        self._closed = False
        self.proxy_host = ""

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper.makeConnection would start the SMTP session at once; here it waits for the header.
        directlyProvides(self, providedBy(transport))
        self.connected = 1
        self.transport = transport
        self.factory.registerProtocol(self)
        self.proxy_host = _host(transport.getPeer())
        if self.proxy_host in self.factory.trusted:
            self._header = proxyprotocol.IncomingHeader()
            self._deadline = self.factory.clock.callLater(self.factory.timeout, self._header_timed_out)
            return
        self._opening = b""
        self._start()

    def _start(self) -> None:
        self._started = True
        self.wrappedProtocol.makeConnection(cast(ITransport, self))

    def _refuse(self, why: str) -> None:
        log.warn("PROXY protocol: disconnecting {peer}: {why}", peer=self.proxy_host, why=why)
        self._cancel_deadline()
        self._closed = True
        assert self.transport is not None
        self.transport.loseConnection()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _header_timed_out(self) -> None:
        self._deadline = None
        self._refuse(f"no PROXY header within {self.factory.timeout:g} s")

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        if self._header is not None:
            self._header_data(data)
        elif self._opening is not None:
            self._opening_data(data)
        else:
            self.wrappedProtocol.dataReceived(data)

    def _header_data(self, data: bytes) -> None:
        assert self._header is not None
        try:
            parsed = self._header.feed(data)
        except proxyprotocol.ProxyHeaderError as exc:
            self._refuse(f"trusted proxy sent no valid PROXY header: {exc}")
            return
        if parsed is None:
            return
        info, rest = parsed
        self._header = None
        version = proxyprotocol.header_version(info)
        if self.factory.version not in ("any", version):
            self._refuse(f"PROXY header {version}, but proxyProtocol is {self.factory.version}")
            return
        self._cancel_deadline()
        self._info = info
        self._start()
        if rest and not self._closed:
            self.wrappedProtocol.dataReceived(rest)

    def _opening_data(self, data: bytes) -> None:
        assert self._opening is not None
        opening = self._opening + data
        verdict = proxyprotocol.opens_with_header(opening)
        if verdict is None:
            self._opening = opening
            return
        self._opening = None
        if verdict:
            self._refuse("PROXY header from a peer not in trustedProxies")
            return
        self.wrappedProtocol.dataReceived(opening)

    def getPeer(self) -> IAddress:
        if self._info is not None:
            source = proxyprotocol.client_address(self._info)
            if source is not None:
                return source
        assert self.transport is not None
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        if self._info is not None and proxyprotocol.client_address(self._info) is not None:
            destination = self._info.destination
            if destination is not None:
                return destination
        assert self.transport is not None
        return self.transport.getHost()

    def handshakeCompleted(self) -> None:
        """TLS after STARTTLS runs below this wrapper; the session wants to hear that it is up."""
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_deadline()
        self._closed = True
        self.factory.unregisterProtocol(self)
        if self._started:
            self.wrappedProtocol.connectionLost(reason)
        # Break the cycle the wrapper and its protocol form (ProtocolWrapper does the same).
        del self.wrappedProtocol


class ProxyHeaderFactory(WrappingFactory[ProxyHeaderReader]):
    """Wraps an SMTP listener's factory so that connections from ``trusted`` open with a PROXY header of
    ``version`` (``"v1"``, ``"v2"`` or ``"any"``) within ``timeout`` seconds on ``clock``."""

    protocol = ProxyHeaderReader
    noisy = False

    def __init__(
        self, wrapped: Any, *, trusted: CidrSet, version: str, timeout: float, clock: IReactorTime
    ) -> None:
        super().__init__(wrapped)
        self.trusted = trusted
        self.version = version
        self.timeout = timeout
        self.clock = clock

    def logPrefix(self) -> str:
        return "SMTP (PROXY)"
