"""One proxied connection, from accept to close: PROXY header (trusted peers only) → client IP rules →
peek (SNI or Host, within a deadline) → route → connect to a target (round robin, failover) → splice; or,
on a terminating route, TLS ended here (:mod:`~dcrouter.proxy.terminate`) and HTTP forwarded per request
(:mod:`~dcrouter.proxy.http`), plain HTTP answered with a redirect or an ACME challenge.

:class:`ProxySession` is the protocol on the client's connection; :class:`ProxyContext` is what every session
of one proxy shares (route table, settings, connection counts, target health). A refused connection is
closed without a byte written to it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, ConnectingCancelledError, NotConnectingError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.events import NO_EVENTS, EventBus
from dcrouter.limits.counters import LocalCounters
from dcrouter.limits.gcra import Rate
from dcrouter.limits.limiter import ALLOWED, Charge, Limit, Limiter
from dcrouter.log import logger
from dcrouter.net import proxyprotocol
from dcrouter.net.balance import Balancer
from dcrouter.net.cidr import CidrSet
from dcrouter.net.quiet import connect_quietly, eager_writes, set_no_delay
from dcrouter.net.reactor import IRouterReactor
from dcrouter.net.targets import Target, TargetHealth
from dcrouter.net.tls import TlsPolicy
from dcrouter.proxy.answer import HttpAnswerer
from dcrouter.proxy.basicauth import BasicAuth, BlockingRunner
from dcrouter.proxy.dispatch import RequestDispatcher
from dcrouter.proxy.forward import BackendProtocol, RouteCounters, Splice
from dcrouter.proxy.gate import RequestGate, RequestRate
from dcrouter.proxy.h2c import H2cPool
from dcrouter.proxy.handlers import RouteContext, SocketHandlerError, SocketHandlers
from dcrouter.proxy.health import HealthMonitor
from dcrouter.proxy.http import (
    DEFAULT_IDLE_TIMEOUT,
    BackendPool,
    ChallengeSource,
    ForwardingPolicy,
    HttpBackend,
    HttpForwarder,
    HttpRedirect,
)
from dcrouter.proxy.http2 import ALPN_H2, AlpnFront, Http2Connection, Http2Limits
from dcrouter.proxy.httpmessage import HeadBuffer, HttpError, RequestHead, parse_request_head
from dcrouter.proxy.jwtauth import Fetcher, JwtAuth
from dcrouter.proxy.lifetime import Deadlines
from dcrouter.proxy.routes import (
    ACME_PORT_ROUTE,
    DEFERRED,
    ProxyRoute,
    Request,
    RouteTable,
    offered_versions,
    rate,
    request_of,
)
from dcrouter.proxy.sniff import Kind, Sniffed, Sniffer
from dcrouter.proxy.terminate import ALPN, BackendTls, ServerCreatorSource, terminate_tls

log = logger(__name__)

_NO_PEEK = Sniffed(Kind.OTHER, None, None, "not peeked: no route on this port selects by name")
#: The first byte of a PROXY v1 (``P``) and of a v2 (``\r``) header.
_HEADER_STARTS = frozenset((proxyprotocol.V1_PREFIX[0], proxyprotocol.V2_SIGNATURE[0]))
_CLIENT_HEADER = "PROXY header from the client"
#: Seconds a refused client may go on sending before its connection is closed anyway (see _close_refused).
REFUSAL_LINGER = 2.0


@dataclass(frozen=True)
class ProxySettings:
    """The proxy-wide limits and behaviours, in seconds. ``no_sni_ports``: ports forwarded without reading
    anything first (``fromPort`` with ``sniEnabled = false``)."""

    sni_timeout: float = 10.0
    max_connection_lifetime: float | None = 86_400.0
    max_connections_per_ip: int | None = 100
    proxy_protocol: str = "none"
    trusted_proxies: CidrSet | None = None
    keep_alive: bool = True
    connect_timeout: float = 10.0
    target_down_time: float = 30.0
    no_sni_ports: frozenset[int] = frozenset()
    #: New connections per client IP (``connectionRatePerIP``); None: no limit.
    connection_rate_per_ip: Rate | None = None
    #: HTTP/2 on terminating routes (``http2``).
    http2: Http2Limits = Http2Limits()

    @classmethod
    def from_config(cls, config: Any) -> ProxySettings:
        """Settings from a loaded ``smartProxyConfig`` (a SmartProxyConfig), or the defaults for None
        (only ``httpDomainRoutes`` configured)."""
        if config is None:
            return cls()
        no_sni: frozenset[int] = frozenset()
        if config.from_port is not None and not config.sni_enabled:
            no_sni = frozenset({config.from_port})
        return cls(
            sni_timeout=config.sni_timeout / 1000,
            max_connection_lifetime=config.max_connection_lifetime / 1000,
            max_connections_per_ip=config.max_connections_per_ip,
            proxy_protocol=config.proxy_protocol,
            trusted_proxies=CidrSet(config.trusted_proxies) if config.trusted_proxies else None,
            keep_alive=config.keep_alive,
            no_sni_ports=no_sni,
            connection_rate_per_ip=rate(config.connection_rate_per_ip),
            http2=http2_limits(config.http2),
        )


def http2_limits(config: Any) -> Http2Limits:
    """``smartProxyConfig.http2`` (an Http2Config, or None for the defaults) as limits in seconds."""
    if config is None:
        return Http2Limits()
    return Http2Limits(
        max_concurrent_streams=config.max_concurrent_streams,
        initial_window_size=config.initial_window_size,
        max_header_list_size=config.max_header_list_size,
        max_header_block_bytes=config.max_header_block_bytes,
        max_resets=config.max_resets,
        max_control_frames=config.max_control_frames,
        window=config.flood_window / 1000,
        idle_timeout=config.idle_timeout / 1000,
    )


def canonical_ip(host: str) -> str:
    """``host`` as one spelling per address (an IPv4-mapped IPv6 address as IPv4), so a per-IP count does
    not depend on how the listener reported the peer. Anything that is not an address is returned as is."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _host(address: IAddress | None) -> str:
    if isinstance(address, IPv4Address):
        return address.host  # the kernel's dotted quad: already the one spelling (no parse per connection)
    return canonical_ip(address.host) if isinstance(address, IPv6Address) else ""


def client_endpoint(reactor: IRouterReactor, host: str, port: int) -> IStreamClientEndpoint:
    """An endpoint for a target: TCP4/TCP6 for IP literals, HostnameEndpoint (resolving) for names."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port)
    if ip.version == 4:
        return TCP4ClientEndpoint(reactor, host, port)
    return TCP6ClientEndpoint(reactor, host, port)


@dataclass
class ProxyContext:
    """State shared by the sessions of one proxy. ``reactor`` provides IReactorTCP and IReactorTime.

    ``counters`` holds a :class:`RouteCounters` for every route, by route name; ``per_ip`` the open
    connections per client address; ``sessions`` the sessions whose client connection is open.
    ``certificates`` (the router's CertificateStore) is what terminating routes present, by SNI;
    ``challenges`` (the ACME ChallengeResponder) answers HTTP-01 on their plain-HTTP ports; ``handlers``
    the socket handlers ``socket-handler`` routes name; ``run_blocking`` runs password checks off the
    reactor (default: the reactor's thread pool); ``fetch`` gets JWKS documents (default: treq)."""

    table: RouteTable
    settings: ProxySettings
    reactor: IRouterReactor
    health: TargetHealth = field(init=False)
    counters: dict[str, RouteCounters] = field(init=False)
    per_ip: dict[str, int] = field(default_factory=dict)
    sessions: set[ProxySession] = field(default_factory=set)
    certificates: ServerCreatorSource | None = None
    challenges: ChallengeSource | None = None
    handlers: SocketHandlers = field(default_factory=SocketHandlers)
    run_blocking: BlockingRunner | None = None
    fetch: Fetcher | None = None
    #: Where sessions report connections (dcrouter.events); bytes per route are in ``counters``.
    events: EventBus = NO_EVENTS
    #: The listening sockets carry TCP_NODELAY and, as ``keepAlive`` asks, SO_KEEPALIVE (set by
    #: ProxyService), which accepted sockets inherit: nothing to set per connection on the client side.
    listeners_tuned: bool = False
    #: Worker processes serving the same ports: each counts 1/workers of every connection rate.
    workers: int = 1

    def __post_init__(self) -> None:
        self.health = TargetHealth(self.reactor, self.settings.target_down_time)
        self.counters = {route.name: RouteCounters() for route in self.table.routes}
        # Connection rates, counted in this process (dcrouter.limits); alerts as for SMTP's limits.
        self.limiter = Limiter(LocalCounters(self.reactor, share=self.workers), self.reactor)
        #: Open backend connections per target (what ``leastConnections`` compares), across reloads.
        self.connections: dict[Target, int] = {}
        #: Idle keep-alive HTTP backend connections of terminating routes, shared by every client
        #: connection; keyed by (reload generation, route, target, backend SNI).
        self.backend_pool = BackendPool(clock=self.reactor)
        #: HTTP/2 connections to the targets of ``action.target.protocol = "h2c"`` routes, shared likewise.
        self.h2c_pool = H2cPool(self.reactor)
        self.generation = 0
        #: Whether connection.connect / connection.disconnect events of the proxy reach some sink, as of the
        #: bus's ``generation`` noted in ``events_generation`` (looked at per connection without a call).
        self.wants_connect = self.wants_disconnect = False
        self.events_generation = -1
        self._set_limits()
        #: The routes' active health checks (``action.healthCheck``), started with the proxy service.
        self.monitor = HealthMonitor(self)

    def _set_limits(self) -> None:
        rate_per_ip = self.settings.connection_rate_per_ip
        #: The ``connectionRatePerIP`` limit, or None.
        self.ip_rate = (
            None
            if rate_per_ip is None
            else Limit(
                "proxy.ip",
                "connections per client IP",
                rate_per_ip,
                metric=("proxy", "connectionRatePerIP", "connect"),
            )
        )
        self._route_rates = {
            route.name: Limit(
                f"proxy.route.{route.name}",
                f"connections to {route.name}",
                route.connection_rate,
                metric=("proxy", "routeConnectionRate", "connect"),
            )
            for route in self.table.routes
            if route.connection_rate is not None
        }
        self._port_routes: dict[int, tuple[ProxyRoute, ...]] = {}
        self._server_creators: dict[tuple[str, tuple[bytes, ...]], IOpenSSLServerConnectionCreator] = {}
        self._backend_tls: BackendTls | None = None
        self._auth: dict[str, BasicAuth | JwtAuth] = {}
        self._gates: dict[str, RequestGate] = {}
        self._balancers = {route.name: Balancer(route.target.balancing) for route in self.table.routes}
        #: (route name, backend port) -> (route, its targets, their weights, whether all are IP literals):
        #: built on a route's first connection, kept until the next reload.
        self._target_lists: dict[tuple[str, int], tuple[ProxyRoute, list[Target], list[int], bool]] = {}
        #: port -> (whether it peeks, whether some route there has client IP rules); None: no route there.
        self.port_plans: dict[int, tuple[bool, bool] | None] = {}
        #: port -> its route for connections not read before routing, where that cannot depend on the client.
        self._unpeeked: dict[int, ProxyRoute | None] = {}
        #: Whether some route balances by ``leastConnections``: only then are spliced backend connections
        #: counted per target (``connections``).
        self.counts_connections = any(r.target.balancing == "leastConnections" for r in self.table.routes)
        #: maxConnectionLifetime in seconds -> the connections that end then (one timer for all of them).
        self._lifetimes: dict[float, Deadlines[ProxySession]] = getattr(self, "_lifetimes", {})
        #: sniTimeout in seconds -> the connections waiting that long (see sni_deadline).
        self._sni_deadlines: dict[float, Deadlines[ProxySession]] = getattr(self, "_sni_deadlines", {})
        seconds = self.settings.max_connection_lifetime
        if seconds is not None and seconds not in self._lifetimes:
            self._lifetimes[seconds] = Deadlines(self.reactor, seconds, _lifetime_over)
        #: Where connections accepted from now on count against maxConnectionLifetime (None: no limit):
        #: each is aborted when it is over (one timer for all of them).
        self.lifetime: Deadlines[ProxySession] | None = None if seconds is None else self._lifetimes[seconds]

    def see_events(self) -> None:
        """Whether connection events are wanted, asked again (the bus's subscriptions changed)."""
        self.wants_connect = self.events.wants("connection.connect", "proxy")
        self.wants_disconnect = self.events.wants("connection.disconnect", "proxy")
        self.events_generation = self.events.generation

    def gate_for(self, route: ProxyRoute) -> RequestGate | None:
        """What the route's requests must pass (rate, credentials), or None when nothing."""
        gate = self._gates.get(route.name)
        if gate is None:
            auth = self.auth_for(route)
            rule = route.request_rate
            rate = RequestRate(route.name, rule, self.limiter) if rule is not None else None
            if auth is None and rate is None:
                return None
            gate = self._gates[route.name] = RequestGate(rate, auth)
        return gate

    def auth_for(self, route: ProxyRoute) -> BasicAuth | JwtAuth | None:
        """The route's ``security.basicAuth`` or ``security.jwtAuth`` checker (made once: it remembers good
        credentials, or holds the fetched keys)."""
        checker = self._auth.get(route.name)
        if checker is None:
            if route.basic_auth is not None:
                checker = BasicAuth(route.basic_auth, self._blocking)
            elif route.jwt_auth is not None:
                checker = JwtAuth(route.jwt_auth, clock=self.reactor, fetch=self.fetch or self._fetch)
            else:
                return None
            self._auth[route.name] = checker
        return checker

    def _fetch(self, url: str) -> Deferred[bytes]:
        """The body of a ``200`` answer to ``GET url`` (a JWKS), within 10 seconds."""
        from treq.client import HTTPClient
        from twisted.web.client import Agent

        async def get() -> bytes:
            response = await HTTPClient(Agent(self.reactor)).get(url, timeout=10)
            if response.code != 200:
                raise ValueError(f"HTTP {response.code}")
            body: bytes = await response.content()
            return body

        return Deferred.fromCoroutine(get())

    def _blocking(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self.run_blocking is not None:
            return self.run_blocking(function, *args)
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), function, *args)

    def replace(self, table: RouteTable, settings: ProxySettings) -> None:
        """The routes and settings of a configuration reload, for connections accepted from now on (one in
        flight has its route already). Counters of routes that stay are kept; new routes get theirs."""
        self.table = table
        self.settings = settings
        for route in table.routes:
            self.counters.setdefault(route.name, RouteCounters())
        previous = list(self._auth.values())
        # Idle backend connections were opened under the old routes (targets, TLS): none is taken again.
        self.generation += 1
        self.backend_pool.close()
        self.h2c_pool.close()
        self._set_limits()  # new, empty tables of checkers and gates: made again per route on first use
        for checker in previous:
            if isinstance(checker, JwtAuth):
                checker.stop()  # its jwksUrl refresh timer would otherwise go on for good
        # The new routes' checks replace the old ones; every target starts up again (a down target of the
        # new checks goes down after ``fall`` of them), none stays held down by a check that is gone.
        running = self.monitor.running
        self.monitor.release()
        self.monitor = HealthMonitor(self)
        if running:
            self.monitor.start()
            for route in table.routes:
                made = self.auth_for(route)
                if isinstance(made, JwtAuth):
                    made.start()  # the new route's jwksUrl fetched now and kept fresh

    def server_creator(
        self, profile: str = "intermediate", *, http2: bool = False
    ) -> IOpenSSLServerConnectionCreator | None:
        """The TLS server side of terminating routes with ``tlsProfile`` ``profile`` (certificate by SNI from
        the store; by ALPN HTTP/1.1, and ``h2`` first with ``http2``), made once per profile and ALPN list:
        the store consults its current certificates at each handshake. None without a store."""
        if self.certificates is None:
            return None
        alpn = ALPN_H2 if http2 else ALPN
        creator = self._server_creators.get((profile, alpn))
        if creator is None:
            creator = self.certificates.server_options(policy=TlsPolicy(profile), alpn=alpn)
            self._server_creators[(profile, alpn)] = creator
        return creator

    def backend_tls(
        self, route: ProxyRoute, target: Target, server_name: str | None
    ) -> IOpenSSLClientConnectionCreator:
        """TLS towards ``target`` of a ``terminate-and-reencrypt`` route: its certificate verified for the
        route's ``serverName`` or the target host (against ``backendCaFile`` or the system's CAs); with
        ``verifyBackend = false`` not verified, sending the client's SNI ``server_name``."""
        verification = route.target.verification
        if not verification.verify:
            return self.unverified_tls(server_name)
        if self._backend_tls is None:
            self._backend_tls = BackendTls()
        return self._backend_tls.verified(verification.server_name or target.host, verification.ca_file)

    def unverified_tls(self, server_name: str | None) -> IOpenSSLClientConnectionCreator:
        """TLS that takes any certificate, sending SNI ``server_name`` (``verifyBackend = false``)."""
        if self._backend_tls is None:
            self._backend_tls = BackendTls()
        return self._backend_tls.creator(server_name)

    def routes_on(self, port: int) -> tuple[ProxyRoute, ...]:
        routes = self._port_routes.get(port)
        if routes is None:
            routes = self._port_routes[port] = tuple(r for r in self.table.routes if r.listens_on(port))
        return routes

    def peeks(self, port: int) -> bool:
        """Whether connections on ``port`` are read before routing: only when some route there selects by
        name or terminates TLS (which must tell TLS from plain HTTP). Elsewhere nothing is awaited, so
        protocols where the server speaks first (SMTP) work."""
        if port in self.settings.no_sni_ports:
            return False
        return any(
            route.domains or route.terminates or route.conditions or route.tls_versions or route.reads_http
            for route in self.routes_on(port)
        )

    def port_plan(self, port: int) -> tuple[bool, bool] | None:
        """``(peeks(port), whether some route on port has client IP rules)``, worked out once per port
        until the next reload; None when no route listens on ``port``."""
        try:
            return self.port_plans[port]
        except KeyError:
            routes = self.routes_on(port)
            rules = any(r.client_ips or r.allow is not None or r.block is not None for r in routes)
            plan = (self.peeks(port), rules) if routes else None
            self.port_plans[port] = plan
            return plan

    def unpeeked_route(self, port: int, client_ip: str) -> ProxyRoute | None:
        """``table.match(port, None, client_ip)``: the route of a connection routed without reading from it.
        Where no route on ``port`` has client IP rules the answer cannot depend on the client, so it is
        worked out once per port until the next reload."""
        known = self._unpeeked
        if port in known:
            return known[port]  # None too: no route there
        route = self.table.match(port, None, client_ip)
        plan = self.port_plan(port)
        if plan is not None and not plan[1]:
            self._unpeeked[port] = route
        return route

    def sni_deadline(self, session: ProxySession) -> Deadlines[ProxySession]:
        """Wait ``sniTimeout`` from now for ``session`` (one timer for all connections waiting as long);
        returns what to :meth:`~Deadlines.discard` it from once what it waited for came."""
        seconds = self.settings.sni_timeout
        deadlines = self._sni_deadlines.get(seconds)
        if deadlines is None:
            deadlines = self._sni_deadlines[seconds] = Deadlines(self.reactor, seconds, _sni_deadline_over)
        deadlines.add(session)
        return deadlines

    def any_permits(self, port: int, client_ip: str) -> bool:
        """Whether some route on ``port`` could serve ``client_ip``: if none could, the client is refused
        before anything is read from it."""
        return any(
            (r.client_ips is None or client_ip in r.client_ips) and r.permits(client_ip)
            for r in self.routes_on(port)
        )

    def within_ip_rate(self, client_ip: str) -> bool:
        """Count a new connection from ``client_ip`` against ``connectionRatePerIP``; False when over it."""
        if self.ip_rate is None:
            return True
        return self.limiter.check([Charge(self.ip_rate, client_ip)]) is ALLOWED

    def within_route_rate(self, route: ProxyRoute) -> bool:
        """Count a new connection to ``route`` against its ``connectionRate``; False when over it."""
        limit = self._route_rates.get(route.name)
        if limit is None:
            return True
        return self.limiter.check([Charge(limit, "")]) is ALLOWED

    def release_ip(self, client_ip: str) -> None:
        count = self.per_ip.get(client_ip, 0) - 1
        if count > 0:
            self.per_ip[client_ip] = count
        else:
            self.per_ip.pop(client_ip, None)

    def targets(self, route: ProxyRoute, port: int, client_ip: str = "") -> list[Target]:
        """The route's hosts in the order to try them: as its ``loadBalancing`` prefers (``client_ip`` for
        ``sourceHash``), without those an active health check holds down, passively marked ones last."""
        _, candidates, weights, _ = self.target_list(route, port)
        balancer = self._balancers.get(route.name)
        if balancer is None:
            balancer = self._balancers[route.name] = Balancer(route.target.balancing)
        preferred = balancer.order(candidates, weights, client_ip=client_ip, connections=self.connections)
        return self.health.arrange(preferred)

    def target_list(self, route: ProxyRoute, port: int) -> tuple[ProxyRoute, list[Target], list[int], bool]:
        """``(route, its targets on port, their weights, whether every target is an IP address)``, made on
        the route's first connection and reused (not to be changed by the caller)."""
        entry = self._target_lists.get((route.name, port))
        if entry is None or entry[0] is not route:
            hosts = route.target.hosts
            entry = (
                route,
                [Target(h, h, port) for h in hosts],
                route.target.weight_list(),
                all(isIPAddress(h) or isIPv6Address(h) for h in hosts),
            )
            self._target_lists[(route.name, port)] = entry
        return entry

    def counted(self, target: Target, protocol: Callable[[], Protocol]) -> Callable[[], Protocol]:
        """``protocol``'s factory, counting the connection to ``target`` open from when the protocol is
        built (the connection is made) until it is lost."""

        def build() -> Protocol:
            built = protocol()
            lost = built.connectionLost
            self.connections[target] = self.connections.get(target, 0) + 1

            def connection_lost(reason: Failure = connectionDone) -> None:
                left = self.connections.get(target, 1) - 1
                if left > 0:
                    self.connections[target] = left
                else:
                    self.connections.pop(target, None)
                lost(reason)

            built.connectionLost = connection_lost  # type: ignore[method-assign]
            return built

        return build

    def connect(
        self,
        host: str,
        port: int,
        *,
        protocol: Callable[[], Protocol] = BackendProtocol,
        tls: IOpenSSLClientConnectionCreator | None = None,
    ) -> Deferred[Any]:
        """A connection to ``host:port`` speaking ``protocol`` (over TLS with ``tls``), failing with
        TimeoutError after ``connect_timeout`` seconds."""
        endpoint = client_endpoint(self.reactor, host, port)
        if tls is not None:
            endpoint = wrapClientTLS(tls, endpoint)
        connecting: Deferred[Any] = connect_quietly(endpoint, protocol)
        timeout = self.settings.connect_timeout
        timer = self.reactor.callLater(timeout, connecting.cancel)

        def settled(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            elif isinstance(result, Failure) and result.check(CancelledError, ConnectingCancelledError):
                # Cancelled by the timer, not by the caller (whose cancel leaves the timer active).
                return Failure(ConnectTimeoutError(f"no connection to {host}:{port} within {timeout:g}s"))
            return result

        connecting.addBoth(settled)
        return connecting


def _keyed(backend: HttpBackend | None, base: tuple[Any, ...]) -> HttpBackend | None:
    """A new backend connection, keyed for the pool by ``base`` and the target it reached."""
    if backend is not None:
        backend.pool_key = (*base, backend.target)
        eager_writes(backend.transport)
    return backend


def _idle_timeout(route: ProxyRoute) -> float:
    """A terminating route's idle limit in seconds: its ``connectionTimeout``, else the default."""
    if route.connection_timeout_ms is not None:
        return route.connection_timeout_ms / 1000
    return DEFAULT_IDLE_TIMEOUT


class _State:
    HEADER = "header"  # reading an incoming PROXY header from a trusted peer
    PEEK = "peek"
    CONNECTING = "connecting"
    SPLICED = "spliced"
    TERMINATED = "terminated"  # TLS ended here (or plain HTTP answered): bytes go to _receiver
    CLOSED = "closed"


@implementer(IHalfCloseableProtocol)
class ProxySession(Protocol):
    """The client side of one proxied connection, accepted on ``port`` (the configured listening port,
    which routes match on). Attributes tests may rely on: ``client_ip``, ``route`` (once chosen),
    ``sniffed``, ``splice`` (once connected), ``refused`` (why it was refused, or None)."""

    transport: Any  # a TCP transport: also a producer and consumer

    # The starting values of what most connections never change, as class attributes: fewer stores per
    # accepted connection (an assignment on the instance shadows them).
    client_ip = ""
    _client_address: IAddress | None = None
    route: ProxyRoute | None = None
    sniffed: Sniffed | None = None
    splice: Splice | None = None
    refused: str | None = None
    front: HttpForwarder | HttpRedirect | HttpAnswerer | RequestDispatcher | None = None
    _local_address: IAddress | None = None
    _sniffer: Sniffer | None = None
    _header: proxyprotocol.IncomingHeader | None = None
    _holds_ip = False
    _holds_route = False
    _client_eof = False
    #: Where this connection waits for ``sniTimeout`` (a PROXY header, a peek, a client's first bytes).
    _deadline: Deadlines[ProxySession] | None = None
    #: Where this connection counts against maxConnectionLifetime (see ProxyContext.lifetime).
    _lifetime: Deadlines[ProxySession] | None = None
    _linger: IDelayedCall | None = None
    _connecting: Deferred[Any] | _BackendAttempt | None = None
    _receiver: IProtocol | None = None  # on a terminating route: the TLS layer or the redirect
    # The client's first bytes, held back while they may still become a PROXY header; None once they
    # were looked at (or, before routing, while the peek looks at them).
    _opening: bytes | None = None
    _opened_at = 0.0

    def __init__(self, context: ProxyContext, port: int) -> None:
        self.context = context
        self.port = port
        self._state = _State.HEADER
        self._buffer: list[bytes] = []

    @property
    def client_address(self) -> IAddress | None:
        """The client's address (from a trusted PROXY header, else the socket's peer, looked up when first
        needed: a spliced connection without PROXY headers never needs it)."""
        if self._client_address is None and self.transport is not None:
            self._client_address = self.transport.getPeer()
        return self._client_address

    @client_address.setter
    def client_address(self, address: IAddress | None) -> None:
        self._client_address = address

    @property
    def local_address(self) -> IAddress | None:
        """The address the client connected to (from a trusted PROXY header, else the socket's, looked up
        when first needed: most connections never need it)."""
        if self._local_address is None and self.transport is not None:
            self._local_address = self.transport.getHost()
        return self._local_address

    @local_address.setter
    def local_address(self, address: IAddress | None) -> None:
        self._local_address = address

    # -- accept ----------------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        context = self.context
        settings = context.settings
        transport = self.transport
        if not context.listeners_tuned:
            set_no_delay(transport)
            if settings.keep_alive and hasattr(transport, "setTcpKeepAlive"):
                transport.setTcpKeepAlive(True)
        # A TCP server transport's ``client`` is what accept() returned: (host, port) for IPv4, the host
        # already the one spelling. Anything else goes by getPeer().
        client: Any = getattr(transport, "client", None)
        ipv4 = type(client) is tuple and len(client) == 2
        self.client_ip = client_ip = client[0] if ipv4 else _host(self.client_address)
        context.sessions.add(self)  # also what the metrics' open-connections gauge counts
        self._opened_at = context.reactor.seconds()
        if context.events_generation != context.events.generation:
            context.see_events()
        if context.wants_connect:  # no event built when nothing listens for it
            context.events.emit("connection.connect", protocol="proxy", port=self.port, peer=client_ip)
        lifetime = context.lifetime
        if lifetime is not None:
            lifetime.add(self)
            self._lifetime = lifetime
        trusted = settings.trusted_proxies
        if trusted is not None and client_ip in trusted:
            self._header = proxyprotocol.IncomingHeader()
            self._deadline = context.sni_deadline(self)
            return
        self._admit()

    def _admit(self) -> None:
        """Client IP rules, before anything is read: the per-IP cap, then whether any route on the port
        serves this client at all."""
        context = self.context
        client_ip = self.client_ip
        per_ip = context.per_ip
        count = per_ip.get(client_ip, 0)
        cap = context.settings.max_connections_per_ip
        if cap is not None and count >= cap:
            self._refuse(None, "maxConnectionsPerIP reached")
            return
        per_ip[client_ip] = count + 1  # given back by release_ip when the connection is lost
        self._holds_ip = True
        if context.ip_rate is not None and not context.within_ip_rate(client_ip):
            self._refuse(None, "connectionRatePerIP reached")
            return
        plans = context.port_plans
        plan = plans[self.port] if self.port in plans else context.port_plan(self.port)
        # Without IP rules on the port, every client is served by some route there: nothing to look at.
        if plan is None or (plan[1] and not context.any_permits(self.port, self.client_ip)):
            self._refuse(None, "no route on this port serves this client (IP rules)")
            return
        if plan[0]:
            self._state = _State.PEEK
            self._sniffer = Sniffer()
            self._deadline = self.context.sni_deadline(self)
        else:
            self._decided(_NO_PEEK)

    # -- bytes from the client -------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _State.SPLICED:
            assert self.splice is not None
            opening = self._opening
            if opening is None:
                self.splice.client_data(data)
            elif not opening and data and data[0] not in _HEADER_STARTS:
                # The first bytes, and neither PROXY header can start so: forwarded (_opening_data's
                # first test, without the call).
                self._opening = None
                self.splice.client_data(data)
            else:
                self._opening_data(data)
        elif state == _State.TERMINATED:
            assert self._receiver is not None
            self._receiver.dataReceived(data)
        elif state == _State.PEEK:
            self._buffer.append(data)
            assert self._sniffer is not None
            verdict = self._sniffer.feed(data)
            if verdict is not None:
                self._decided(verdict)
        elif state == _State.CONNECTING:
            self._buffer.append(data)  # in flight when the client was paused; replayed after the peeked bytes
        elif state == _State.HEADER:
            self._header_data(data)

    def _header_data(self, data: bytes) -> None:
        assert self._header is not None
        try:
            parsed = self._header.feed(data)
        except proxyprotocol.ProxyHeaderError as exc:
            self._refuse(None, f"from trusted proxy {self.client_ip}: {exc}")
            return
        if parsed is None:
            return
        info, rest = parsed
        self._cancel_deadline()
        source = proxyprotocol.client_address(info)
        if source is not None:
            self.client_address = source
            self.client_ip = canonical_ip(source.host)
            if info.destination is not None:
                self.local_address = info.destination
        self._admit()
        if rest and self._state != _State.CLOSED:
            self.dataReceived(rest)

    def readConnectionLost(self) -> None:
        """The client sent EOF: passed on once spliced; before that, peeking stops with what arrived."""
        self._client_eof = True
        if self._state == _State.SPLICED:
            assert self.splice is not None
            if self._opening:  # the start of a PROXY header, and no more: refused as the peek would
                self._refuse_spliced(_CLIENT_HEADER)
            else:
                self.splice.client_eof()
        elif self._state == _State.TERMINATED:
            assert self._receiver is not None
            self._receiver_eof()
        elif self._state == _State.PEEK:
            assert self._sniffer is not None
            self._decided(self._sniffer.give_up())
        elif self._state == _State.HEADER:
            self._refuse(None, "EOF before the PROXY header ended")
        elif self._linger is not None:
            self.transport.loseConnection()  # a refused client has stopped sending: the close is clean now

    def writeConnectionLost(self) -> None:
        """Our EOF to the client was sent (the backend ended first)."""

    # -- routing ---------------------------------------------------------------------------------------

    def _peek_deadline(self) -> None:
        self._deadline = None
        if self._state == _State.PEEK:
            assert self._sniffer is not None
            self._decided(self._sniffer.give_up())

    def _header_deadline(self) -> None:
        self._deadline = None
        if self._state == _State.HEADER:
            self._refuse(None, "no PROXY header before the deadline")

    def _decided(self, sniffed: Sniffed) -> None:
        if self._deadline is not None:
            self._cancel_deadline()
        self.sniffed = sniffed
        # A client's own PROXY header never reaches a backend (one that trusts dcrouter's headers would take
        # it for dcrouter's): refused here if the peek read the first bytes, else looked at once spliced.
        if not self._buffer:
            self._opening = b""
        elif sniffed.kind is Kind.OTHER:
            first = b"".join(self._buffer)
            if proxyprotocol.may_start_header(first[:12]):
                self._refuse(None, _CLIENT_HEADER)
                return
        # Nothing more is read until the backend is connected: the buffer stays bounded by what the sniffer
        # looks at.
        self.transport.pauseProducing()
        self._state = _State.CONNECTING
        if sniffed is _NO_PEEK:
            route = self.context.unpeeked_route(self.port, self.client_ip)
        else:
            route = self.context.table.match(
                self.port,
                sniffed.server_name,
                self.client_ip,
                # TLS: a terminating route's request conditions are looked at once the request is read
                # inside.
                request=DEFERRED
                if sniffed.kind is Kind.TLS
                else self._peeked_request(sniffed)
                if sniffed.kind is Kind.HTTP
                else None,
                tls_versions=offered_versions(sniffed.hello.supported_versions, sniffed.hello.legacy_version)
                if sniffed.hello is not None
                else None,
            )
        if route is None:
            self._refuse(None, f"no route for {sniffed.server_name or 'a connection without a name'}")
            return
        self.route = route
        counters = self.context.counters[route.name]
        if not route.permits(self.client_ip):
            self._refuse(counters, f"refused by the IP rules of {route.name}")
            return
        if route.max_connections is not None and counters.active >= route.max_connections:
            self._refuse(counters, f"{route.name}: maxConnections ({route.max_connections}) reached")
            return
        if not self.context.within_route_rate(route):
            self._refuse(counters, f"{route.name}: connectionRate reached")
            return
        action = route.action
        if action.type == "block" and not action.answers_http:
            self._refuse(counters, f"blocked by {route.name}")
            return
        counters.active += 1
        counters.connections += 1
        self._holds_route = True
        if route.splices and sniffed.kind is not Kind.HTTP:
            self._connect_splice(route)  # what the checks below come to for it
            return
        if route.terminates:
            self._terminate(route, sniffed)
            return
        if route.action.answers_http:
            self._answer_plain(route, sniffed)
            return
        if route.action.type == "socket-handler":
            self._hand_over(route, sniffed)
            return
        if route.reads_http and sniffed.kind is not Kind.HTTP:
            self._refuse(counters, f"{route.name} reads HTTP requests; this is not an HTTP request")
            return
        if (
            sniffed.kind is Kind.HTTP
            and route.reads_http
            and not self.context.table.has_conditions(self.port)
        ):
            # Credentials checked or fields changed per request: forwarded as HTTP, not spliced.
            forwarder = self._forwarder(route, sniffed.server_name, counters, proto=b"http")
            self.front = forwarder
            self._attach(forwarder)
            return
        if sniffed.kind is Kind.HTTP and self.context.table.has_conditions(self.port):
            # Routes here differ by request: this connection carries the one request its route was chosen
            # by, forwarded as HTTP (the next request comes on a new connection and is routed afresh).
            forwarder = self._forwarder(route, sniffed.server_name, counters, one_request=True, proto=b"http")
            self.front = forwarder
            self._attach(forwarder)
            return
        self._connect_splice(route)

    def _peeked_request(self, sniffed: Sniffed) -> Request | None:
        """The request whose head the peek read (plain HTTP), for routes with request conditions."""
        if sniffed.kind is not Kind.HTTP or not self._buffer:
            return None
        try:
            complete = HeadBuffer().feed(b"".join(self._buffer))
            if complete is None:
                return None
            head = parse_request_head(complete[0])
        except HttpError:
            return None  # answered by the route's own parser
        return request_of(head.target, head.fields.lines)

    def _connect_splice(self, route: ProxyRoute) -> None:
        """Connect to the route's targets in order (the first that accepts is spliced to the client),
        straight from ``reactor.connectTCP`` with the connector's own timeout: no endpoint, Deferred or
        coroutine per connection. Targets given by host name go the resolving way (:meth:`_connect`)."""
        port = route.target.port_for(self.port)
        context = self.context
        entry = context.target_list(route, port) if 1 <= port <= 65535 else None
        if entry is None or not entry[3]:
            connecting = Deferred.fromCoroutine(self._connect(route))
            connecting.addErrback(self._connect_crashed)
            return
        candidates = entry[1]
        # One target: no balancing (every method's order, no state to move); still none held down.
        targets = (
            context.health.arrange(candidates)
            if len(candidates) == 1
            else context.targets(route, port, self.client_ip)
        )
        self._try_target(route, targets, 0)

    def _try_target(self, route: ProxyRoute, targets: list[Target], index: int) -> None:
        """Connect to ``targets[index]``, or refuse the client when no target is left."""
        if index >= len(targets):
            self._connecting = None
            if self._state != _State.CLOSED:
                self._refuse(self.context.counters[route.name], f"{route.name}: no target reachable")
            return
        attempt = _BackendAttempt(self, route, targets, index)
        self._connecting = attempt
        target = targets[index]
        context = self.context
        attempt.connector = context.reactor.connectTCP(
            target.address, target.port, attempt, timeout=context.settings.connect_timeout
        )

    def _backend_failed(self, route: ProxyRoute, target: Target, error: BaseException) -> None:
        """A target did not accept: marked down (passively, for ``targetDownTime``) and logged."""
        self.context.health.mark_down(target)
        log.info(
            "proxy: {route}: target {target} failed ({error}); marked down",
            route=route.name,
            target=str(target),
            error=error.__class__.__name__ + (f": {error}" if str(error) else ""),
        )

    async def _connect(self, route: ProxyRoute) -> None:
        """Try the route's targets in order; the first that accepts is spliced to the client."""
        backend = await self._open_backend(route, BackendProtocol)
        if backend is not None:
            self._spliced(route, backend)
        elif self._state != _State.CLOSED:
            self._refuse(self.context.counters[route.name], f"{route.name}: no target reachable")

    async def _open_backend(
        self,
        route: ProxyRoute,
        protocol: Callable[[], Protocol],
        tls: Callable[[Target], IOpenSSLClientConnectionCreator] | None = None,
        order: list[Target] | None = None,
    ) -> Any:
        """A connection to the first of the route's targets (in the balancer's order, or ``order`` when the
        caller asked the balancer already) that accepts, marking those that fail down; None when none does
        or the client went away meanwhile. ``tls`` gives the TLS creator for a target (re-encrypting
        routes). The target connected to is the protocol's ``target``."""
        port = route.target.port_for(self.port)
        if not 1 <= port <= 65535:
            log.info("proxy: {route}: target port {port} is out of range", route=route.name, port=port)
            return None
        if order is None:
            order = self.context.targets(route, port, self.client_ip)
        for target in order:
            self._connecting = self.context.connect(
                target.address,
                port,
                protocol=self.context.counted(target, protocol),
                tls=tls(target) if tls is not None else None,
            )
            try:
                backend = await self._connecting
            except (CancelledError, ConnectingCancelledError):
                return None  # the client went away while connecting (timeouts arrive as ConnectTimeoutError)
            except (ConnectError, OSError) as exc:  # refused, unreachable, timed out, no such host
                if self._state == _State.CLOSED:
                    return None
                self._backend_failed(route, target, exc)
                continue
            finally:
                self._connecting = None
            self.context.health.mark_up(target)
            if self._state == _State.CLOSED:
                backend.transport.loseConnection()
                return None
            backend.target = target
            return backend
        return None

    def _connect_crashed(self, failure: Failure) -> None:
        log.failure("proxy: connecting {client} failed unexpectedly", failure, client=self.client_ip)
        self.transport.abortConnection()

    def _answerer(self, route: ProxyRoute, server_name: str | None) -> HttpAnswerer:
        return HttpAnswerer(
            route.action,
            counters=self.context.counters[route.name],
            clock=self.context.reactor,
            client_ip=self.client_ip,
            port=int(getattr(self.transport.getHost(), "port", self.port)),
            server_name=server_name,
            host_allowed=self._host_check(route, server_name),
            timeout=_idle_timeout(route),
            gate=self.context.gate_for(route),
            extra=tuple(b"%s: %s" % field for field in route.response_fields.set_fields),
        )

    def _attach(self, receiver: IProtocol) -> None:
        """Give the client's connection to ``receiver`` (an answerer or a socket handler's protocol): the
        bytes already read first, every later one as it comes."""
        replay = b"".join(self._buffer)
        self._buffer = []
        self._opening = None
        self._state = _State.TERMINATED
        self._receiver = receiver
        self.transport.resumeProducing()
        receiver.makeConnection(self.transport)
        if replay and self._state == _State.TERMINATED:
            receiver.dataReceived(replay)
        if self._client_eof and self._state == _State.TERMINATED:
            self._receiver_eof()

    def _answer_plain(self, route: ProxyRoute, sniffed: Sniffed) -> None:
        """Plain HTTP answered by the route's action (redirect, static, block with a status)."""
        if sniffed.kind is Kind.TLS:
            self._refuse(self.context.counters[route.name], f"{route.name} answers plain HTTP; this is TLS")
            return
        answerer = self._answerer(route, sniffed.server_name)
        self.front = answerer
        self._attach(answerer)

    def _hand_over(self, route: ProxyRoute, sniffed: Sniffed) -> None:
        """The ``socket-handler`` action: the connection goes to the handler's protocol."""
        assert route.action.handler is not None
        context = RouteContext(
            route_name=route.name,
            port=self.port,
            client_ip=self.client_ip,
            client_address=self.client_address,
            local_address=self.local_address,
            server_name=sniffed.server_name,
        )
        try:
            protocol = self.context.handlers.get(route.action.handler)(context)
        except SocketHandlerError as error:
            self._refuse(self.context.counters[route.name], str(error))
            return
        except Exception:  # noqa: BLE001 -- a plugin's bug must cost one connection, not the proxy
            log.failure("proxy: socket handler {handler} failed", handler=route.action.handler)
            self._refuse(self.context.counters[route.name], f"socket handler {route.action.handler} failed")
            return
        self._attach(protocol)

    def _terminate(self, route: ProxyRoute, sniffed: Sniffed) -> None:
        """End TLS here and forward HTTP or answer it by the route's action (a ClientHello), or answer plain
        HTTP with a redirect or an ACME challenge (a request head); anything else cannot be served by a
        terminating route."""
        counters = self.context.counters[route.name]
        front: HttpForwarder | HttpRedirect | HttpAnswerer | RequestDispatcher
        if sniffed.kind is Kind.TLS and self.context.server_creator(route.tls_profile) is None:
            self._refuse(counters, f"{route.name}: no certificate store to terminate TLS with")
            return
        if sniffed.kind is Kind.TLS and self.context.table.has_conditions(self.port):
            front = RequestDispatcher(lambda head: self._dispatch(head, sniffed))
        elif sniffed.kind is Kind.TLS and route.action.answers_http:
            front = self._answerer(route, sniffed.server_name)
        elif sniffed.kind is Kind.HTTP:
            front = HttpRedirect(
                self.context.challenges,
                client_ip=self.client_ip,
                https_port=self._https_port,
                clock=self.context.reactor,
                timeout=_idle_timeout(route),
            )
        elif sniffed.kind is Kind.TLS and self.context.server_creator(route.tls_profile) is not None:
            front = self._forwarder(route, sniffed.server_name, counters)
        else:
            self._refuse(counters, f"{route.name} terminates TLS; this connection is not TLS or HTTP/1.x")
            return
        replay = b"".join(self._buffer)
        self._buffer = []
        self._state = _State.TERMINATED
        self.front = front
        # Read again before the replay, not after: what the replay leads to (a pause, a close) must stand.
        self.transport.resumeProducing()
        if isinstance(front, HttpRedirect):
            front.makeConnection(self.transport)
            self._receiver = front
            if replay:
                front.dataReceived(replay)
        else:
            creator = self.context.server_creator(route.tls_profile, http2=route.http2)
            assert creator is not None
            eager_writes(self.transport)  # each TLS write to the client sent at once (see eager_writes)
            application: IProtocol = front
            if route.http2:
                application = AlpnFront(front, lambda: self._http2(route, sniffed, counters))
            self._receiver = terminate_tls(
                self.transport, creator, application, replay, clock=self.context.reactor
            )
        if self._client_eof and self._state == _State.TERMINATED:
            self._receiver_eof()

    def _http2(self, route: ProxyRoute, sniffed: Sniffed, counters: RouteCounters) -> Http2Connection:
        """HTTP/2 on a terminated connection: each stream served by the front an HTTP/1.1 connection of the
        route would get (the dispatcher, the route's answerer, or its forwarder)."""
        make_front: Callable[[], IProtocol]
        # WebSockets over HTTP/2 (RFC 8441) are offered where a stream may reach a forwarder.
        websockets = True
        if self.context.table.has_conditions(self.port):
            make_front = lambda: RequestDispatcher(lambda head: self._dispatch(head, sniffed))  # noqa: E731
        elif route.action.answers_http:
            websockets = False
            make_front = lambda: self._answerer(route, sniffed.server_name)  # noqa: E731
        else:
            # The policy and the connector are the same for every stream: made once, not per request.
            make_front = self._forwarders(route, sniffed.server_name, counters, pooled=True)
        return Http2Connection(
            make_front,
            clock=self.context.reactor,
            limits=self.context.settings.http2,
            client_ip=self.client_ip,
            websockets=websockets,
        )

    def _dispatch(self, head: RequestHead, sniffed: Sniffed) -> IProtocol:
        """The route for the first request on a terminated connection whose port routes by request, and the
        protocol that serves it (that one request, then the connection closes). HttpError: answered."""
        current = self.route
        assert current is not None
        chosen = self.context.table.match(
            self.port,
            sniffed.server_name,
            self.client_ip,
            request=request_of(head.target, head.fields.lines),
            tls_versions=offered_versions(sniffed.hello.supported_versions, sniffed.hello.legacy_version)
            if sniffed.hello is not None
            else None,
        )
        if chosen is None or not chosen.terminates:
            self._note_refusal(self.context.counters[current.name], "no route for this request")
            raise HttpError(404, "no route for this request")
        if chosen is not current:
            counters = self.context.counters[chosen.name]
            if not chosen.permits(self.client_ip):
                self._note_refusal(counters, f"refused by the IP rules of {chosen.name}")
                raise HttpError(403, "refused by the route's IP rules")
            if chosen.max_connections is not None and counters.active >= chosen.max_connections:
                self._note_refusal(
                    counters, f"{chosen.name}: maxConnections ({chosen.max_connections}) reached"
                )
                raise HttpError(503, "the route's maxConnections is reached")
            self._release_route()
            # The route taken at the handshake was provisional: the connection counts for the chosen one.
            self.context.counters[current.name].connections -= 1
            counters.active += 1
            counters.connections += 1
            self._holds_route = True
            self.route = chosen
        if chosen.action.answers_http:
            return self._answerer(chosen, sniffed.server_name)
        return self._forwarder(
            chosen, sniffed.server_name, self.context.counters[chosen.name], one_request=True
        )

    def _receiver_eof(self) -> None:
        """The client's EOF, to the TLS layer (which ends or passes it on), the plain-HTTP answerer or a
        socket handler's protocol (closed, if it cannot take a half-close)."""
        receiver = self._receiver
        assert receiver is not None
        if IHalfCloseableProtocol.providedBy(receiver):
            receiver.readConnectionLost()
        else:
            self.transport.loseConnection()

    def _https_port(self, host: str) -> int | None:
        """Where plain HTTP for ``host`` is redirected: the HTTPS port of this connection's route (of the
        terminating route for ``host`` on ``acme.port``); None when no route would serve it."""
        route = self.route
        if route is None or route.name == ACME_PORT_ROUTE:
            route = self.context.table.https_route(host, self.client_ip)
        if route is None:
            return None
        port = route.https_port(self.port)
        if port == self.port:
            # Served on this very port: the one the client reached (a configured port 0 is an ephemeral one).
            port = int(getattr(self.transport.getHost(), "port", port))
        return port

    def _host_check(self, route: ProxyRoute, server_name: str | None) -> Callable[[str], bool]:
        table, port, client_ip = self.context.table, self.port, self.client_ip

        def host_allowed(host: str) -> bool:
            # With SNI, the request must be for that very name (RFC 9110 §7.4: else 421). Without, it must
            # at least be a name this route would have been chosen for.
            if server_name is not None:
                return host == server_name
            return table.match(port, host, client_ip) is route

        return host_allowed

    def _forwarder(
        self,
        route: ProxyRoute,
        server_name: str | None,
        counters: RouteCounters,
        *,
        one_request: bool = False,
        proto: bytes = b"https",
        pooled: bool = False,
    ) -> HttpForwarder:
        """``pooled``: the forwarder carries one request (an HTTP/2 stream's) and shares backend
        connections with the connection's other forwarders of ``route`` (see BackendPool)."""
        return self._forwarders(
            route, server_name, counters, one_request=one_request, proto=proto, pooled=pooled
        )()

    def _forwarders(
        self,
        route: ProxyRoute,
        server_name: str | None,
        counters: RouteCounters,
        *,
        one_request: bool = False,
        proto: bytes = b"https",
        pooled: bool = False,
    ) -> Callable[[], HttpForwarder]:
        """What makes the forwarders :meth:`_forwarder` describes, all with one policy."""
        host_allowed = self._host_check(route, server_name)

        tls = None
        if route.tls_mode == "terminate-and-reencrypt":

            def tls(target: Target) -> IOpenSSLClientConnectionCreator:
                return self.context.backend_tls(route, target, server_name)

        context = self.context
        pool = context.backend_pool
        h2c = route.target.protocol == "h2c" and tls is None
        port = route.target.port_for(self.port)
        client_ip = self.client_ip
        # What a pooled connection must match besides its target: the routes it was opened under, and the
        # name sent as SNI to a re-encrypting route's backend.
        base = (context.generation, route.name, server_name if tls is not None else None)

        def acquire(forwarder: HttpForwarder) -> HttpBackend | Deferred[Any]:
            """Balancing chooses the target for every backend connection a forwarder takes; an idle one to
            that target is taken at once, else one is opened (trying the others in order on failure)."""
            order = context.targets(route, port, client_ip) if 1 <= port <= 65535 else []
            request = forwarder._request
            if h2c and order and not (request is not None and request.upgrade_websocket):
                # One stream of a shared HTTP/2 connection to the target balancing chose (WebSocket
                # upgrades stay on HTTP/1.1 connections: h2c has no Upgrade).
                def opener(protocol: Callable[[], Protocol]) -> Deferred[Any]:
                    return Deferred.fromCoroutine(self._open_backend(route, protocol, None, order=order))

                return context.h2c_pool.stream((order[0], port), HttpBackend(forwarder), opener)
            if order and pool.count:
                backend = pool.take(forwarder, (*base, order[0]))
                if backend is not None:
                    return backend
            opening = Deferred.fromCoroutine(
                self._open_backend(route, lambda: HttpBackend(forwarder), tls, order=order)
            )
            return opening.addCallback(_keyed, base)

        def connect(protocol: Callable[[], Protocol]) -> Deferred[Any]:
            return Deferred.fromCoroutine(self._open_backend(route, protocol, tls))

        policy = ForwardingPolicy(
            client_ip=self.client_ip,
            # A PROXY header was read only from a trusted peer: that peer may also vouch for X-Forwarded-For.
            trust_forwarded=self._header is not None,
            host_allowed=host_allowed,
            idle_timeout=_idle_timeout(route),
            one_request=one_request,
            proto=proto,
            gate=self.context.gate_for(route),
            request_fields=route.request_fields,
            response_fields=route.response_fields,
            websocket_idle=route.websocket_idle,
            websocket_max_age=route.websocket_max_age,
            on_upgrade=self._upgraded,
            pool=pool,
            acquire=acquire,
        )
        reactor = context.reactor
        return lambda: HttpForwarder(policy, connect=connect, counters=counters, clock=reactor)

    def _spliced(self, route: ProxyRoute, backend: BackendProtocol) -> None:
        settings = self.context.settings
        if settings.keep_alive and hasattr(backend.transport, "setTcpKeepAlive"):
            backend.transport.setTcpKeepAlive(True)
        header = (
            b""
            if settings.proxy_protocol == "none"
            else proxyprotocol.encode(settings.proxy_protocol, self.client_address, self.local_address)
        )
        idle = route.connection_timeout_ms / 1000 if route.connection_timeout_ms is not None else None
        self.splice = Splice(
            self.transport,
            backend,
            counters=self.context.counters[route.name],
            clock=self.context.reactor,
            idle_timeout=idle,
            on_done=self._release_route,
        )
        if self._buffer:
            pending = b"".join(self._buffer)
            self._buffer = []
        else:
            pending = b""
        self._state = _State.SPLICED
        if self._opening is None:
            self.splice.start(header + pending)
        else:
            self.splice.start(header)
            if pending:
                self._opening_data(pending)
        if self._client_eof and self._state == _State.SPLICED:
            self._spliced_eof()

    def _opening_data(self, data: bytes) -> None:
        """The client's first bytes on a connection spliced before any was read: forwarded once they
        cannot start a PROXY header, refused if they do; held (at most 11 bytes) while it cannot be told,
        for up to ``sniTimeout``."""
        assert self._opening is not None and self.splice is not None
        if not self._opening and data and data[0] not in _HEADER_STARTS:
            # Neither PROXY header can start so (what opens_with_header would say, False): forwarded.
            self._opening = None
            self.splice.client_data(data)
            return
        opening = self._opening + data
        verdict = proxyprotocol.opens_with_header(opening)
        if verdict is None:
            self._opening = opening
            if self._deadline is None:
                self._deadline = self.context.sni_deadline(self)
            return
        self._opening = None
        self._cancel_deadline()
        if verdict:
            self._refuse_spliced(_CLIENT_HEADER)
        else:
            self.splice.client_data(opening)

    def _opening_deadline(self) -> None:
        self._deadline = None
        if self._state == _State.SPLICED and self._opening:
            self._refuse_spliced(_CLIENT_HEADER)

    def _spliced_eof(self) -> None:
        assert self.splice is not None
        if self._opening:  # the start of a PROXY header, and no more: refused as the peek would
            self._refuse_spliced(_CLIENT_HEADER)
        else:
            self.splice.client_eof()

    # -- ending ----------------------------------------------------------------------------------------

    def _refuse(self, counters: RouteCounters | None, why: str) -> None:
        """Close the client without a byte written; ``counters``: the route that turned it away."""
        self._note_refusal(counters, why)
        self._state = _State.CLOSED
        self._cancel_deadline()
        self._close_refused()

    def _close_refused(self) -> None:
        """Close so that a client still sending reads our FIN, not a reset. Closing a socket with unread
        bytes makes the kernel answer RST, and the client's next send then fails (EPIPE) before it has read
        the end: a TLS scanner's SSLv2 probe, say, or a request body behind a refused head. So: FIN now,
        drop what still comes (dataReceived ignores a closed session), close on the client's EOF or after
        REFUSAL_LINGER seconds."""
        transport = self.transport
        if self._client_eof or not hasattr(transport, "loseWriteConnection"):
            transport.loseConnection()
            return
        transport.loseWriteConnection()
        transport.resumeProducing()  # a peek may have paused it: the kernel buffer must drain
        self._linger = self.context.reactor.callLater(REFUSAL_LINGER, transport.loseConnection)

    def _refuse_spliced(self, why: str) -> None:
        """Drop a spliced connection and its backend connection, nothing more forwarded."""
        assert self.splice is not None and self.route is not None
        self._note_refusal(self.context.counters[self.route.name], why)
        self._state = _State.CLOSED
        self._cancel_deadline()
        self.splice.abort(why)

    def _note_refusal(self, counters: RouteCounters | None, why: str) -> None:
        self.refused = why
        self.context.events.emit(
            "connection.error",
            protocol="proxy",
            port=self.port,
            peer=self.client_ip,
            reason=why,
            route=self.route.name if self.route is not None else None,
        )
        if counters is not None:
            counters.refused += 1
        log.info(
            "proxy: refused {client} on port {port}: {why}", client=self.client_ip, port=self.port, why=why
        )

    def _upgraded(self) -> None:
        """A WebSocket upgrade went through: ``maxConnectionLifetime`` no longer applies (the route's
        ``action.websocket.maxAge`` does, in the forwarder)."""
        if self._lifetime is not None:
            self._lifetime.discard(self)
        self._lifetime = None

    def _lifetime_over(self) -> None:
        self._lifetime = None
        if self.splice is not None:
            self.splice.abort("maxConnectionLifetime reached")
        else:
            self.transport.abortConnection()

    def abort(self, reason: str) -> None:
        """Drop the connection (and its backend connection) now: the service's shutdown."""
        if self.splice is not None:
            self.splice.abort(reason)
        else:
            self.transport.abortConnection()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.discard(self)
        self._deadline = None

    def _sni_deadline_over(self) -> None:
        """``sniTimeout`` passed for what this connection was waiting for (see its state)."""
        state = self._state
        if state == _State.HEADER:
            self._header_deadline()
        elif state == _State.PEEK:
            self._peek_deadline()
        else:
            self._opening_deadline()

    def _release_route(self) -> None:
        if self._holds_route and self.route is not None:
            self._holds_route = False
            self.context.counters[self.route.name].active -= 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._state = _State.CLOSED
        context = self.context
        context.sessions.discard(self)
        if context.events_generation != context.events.generation:
            context.see_events()
        if context.wants_disconnect:
            context.events.emit(
                "connection.disconnect",
                protocol="proxy",
                port=self.port,
                route=self.route.name if self.route is not None else None,
                duration=max(0.0, context.reactor.seconds() - self._opened_at),
            )
        if self._deadline is not None:
            self._cancel_deadline()
        if self._lifetime is not None:
            self._lifetime.discard(self)
            self._lifetime = None
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        if self._holds_ip:
            self._holds_ip = False
            self.context.release_ip(self.client_ip)
        if self._receiver is not None:
            # Before the connect is cancelled: its failure must find the forwarder closed, not answer 502
            # into a connection that is gone.
            self._receiver.connectionLost(reason)
            self._receiver = None
        if self._connecting is not None:
            self._connecting.cancel()
        if self.splice is not None:
            self.splice.client_lost()
        else:
            self._release_route()


def _lifetime_over(session: ProxySession) -> None:
    session._lifetime_over()


def _sni_deadline_over(session: ProxySession) -> None:
    session._deadline = None
    session._sni_deadline_over()


class _SplicedBackend(BackendProtocol):
    """A backend connection made by a :class:`_BackendAttempt`: counted open for ``leastConnections`` (when
    some route balances so) from when it is made until it is lost, and handed to the session once made."""

    factory: _BackendAttempt

    counted = False

    def connectionMade(self) -> None:
        super().connectionMade()
        attempt = self.factory
        if attempt.session.context.counts_connections:
            self.counted = True
            connections = attempt.connections
            connections[attempt.target] = connections.get(attempt.target, 0) + 1
        attempt.made(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.counted:
            connections = self.factory.connections
            target = self.factory.target
            left = connections.get(target, 1) - 1
            if left > 0:
                connections[target] = left
            else:
                connections.pop(target, None)
        super().connectionLost(reason)


class _BackendAttempt(ClientFactory):
    """One connection attempt of a session to one target (``targets[index]``), as the factory given to
    ``reactor.connectTCP``: a failure (refused, unreachable, the connector's timeout) marks the target down
    and tries the next; a connection is spliced. :meth:`cancel`: the client went away meanwhile."""

    noisy = False
    protocol = _SplicedBackend  # type: ignore[assignment]  # Twisted's own stub types it loosely
    connector: Any = None
    cancelled = False

    def __init__(self, session: ProxySession, route: ProxyRoute, targets: list[Target], index: int) -> None:
        self.session = session
        self.route = route
        self.targets = targets
        self.index = index
        self.target = targets[index]
        self.connections = session.context.connections

    def made(self, backend: BackendProtocol) -> None:
        session = self.session
        # The backend protocol keeps this factory: without the session here, the connected pair holds no
        # reference cycle through it.
        del self.session
        session._connecting = None
        session.context.health.mark_up(self.target)
        if self.cancelled or session._state == _State.CLOSED:
            backend.transport.loseConnection()
            return
        try:
            session._spliced(self.route, backend)
        except Exception:  # noqa: BLE001 -- a bug here must cost this connection, not leave it hanging
            log.failure("proxy: connecting {client} failed unexpectedly", client=session.client_ip)
            backend.transport.abortConnection()
            session.transport.abortConnection()

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        session = self.session
        if self.cancelled or session._state == _State.CLOSED:
            return
        error = reason.value
        if isinstance(error, ConnectTimeoutError):
            timeout = session.context.settings.connect_timeout
            error = ConnectTimeoutError(f"no connection to {self.target} within {timeout:g}s")
        session._backend_failed(self.route, self.target, error)
        session._try_target(self.route, self.targets, self.index + 1)

    def cancel(self) -> None:
        """Stop connecting (the client went away); a connection made meanwhile is closed."""
        self.cancelled = True
        try:
            self.connector.stopConnecting()
        except NotConnectingError:
            pass  # connected already (and closed by made), or failed


class ProxySessionFactory(ServerFactory):
    """Builds a :class:`ProxySession` for each connection accepted on one configured ``port``."""

    noisy = False

    def __init__(self, context: ProxyContext, port: int) -> None:
        self.context = context
        self.port = port

    def buildProtocol(self, addr: IAddress | None) -> ProxySession:
        session = ProxySession(self.context, self.port)
        session.factory = self
        return session


def total(counters: Iterable[RouteCounters]) -> RouteCounters:
    """The sum of several routes' counters."""
    result = RouteCounters()
    for c in counters:
        result.connections += c.connections
        result.active += c.active
        result.refused += c.refused
        result.bytes_in += c.bytes_in
        result.bytes_out += c.bytes_out
    return result
