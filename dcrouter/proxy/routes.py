"""The proxy's one route model, and its translation from every configured form.

``smartProxyConfig.routes`` (SmartProxy's route form), the seed's ``domainConfigs`` / ``globalPortRanges`` /
``fromPort`` form, ``httpDomainRoutes`` and ``defaultTarget`` all become :class:`ProxyRoute` values here.
Everything after the config loader (listeners, IP rules, connection caps, metrics) reads only this model, so
an allow list or a connection cap means the same whichever spelling configured it: SmartProxy shipped bugs
where its two spellings were enforced by different code and diverged.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dcrouter.config.proxy import (
    HttpDomainRoute,
    SmartProxyConfig,
    domain_config_ports,
    hosts,
    http_route_port,
    port_ranges,
    route_domains,
    target_port,
)
from dcrouter.config.ratelimits import RateConfig
from dcrouter.limits.gcra import Rate
from dcrouter.net.cidr import CidrSet
from dcrouter.net.domains import normalize_domain


class Networks(CidrSet):
    """A :class:`CidrSet` that compares equal to another holding the same networks, so two routes
    configured in different spellings can be compared as values."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        entries = list(cidrs)
        super().__init__(entries)
        self.networks: frozenset[str] = frozenset(str(ipaddress.ip_network(e.strip())) for e in entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Networks) and self.networks == other.networks

    def __hash__(self) -> int:
        return hash(self.networks)

    def __repr__(self) -> str:
        return f"Networks({sorted(self.networks)!r})"


def _networks(cidrs: Sequence[str]) -> Networks | None:
    """None for an empty list: no rule, rather than a rule no address satisfies."""
    return Networks(cidrs) if cidrs else None


@dataclass(frozen=True)
class PortRange:
    """The ports ``start`` to ``end``, both included."""

    start: int
    end: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.start <= port <= self.end


@dataclass(frozen=True)
class ProxyTarget:
    """Backends tried round robin, and their port: None means the port the client connected to."""

    hosts: tuple[str, ...]
    port: int | None


@dataclass(frozen=True)
class CertificateFiles:
    """A certificate and its key, as PEM files (``tls.certificate = {certPath, keyPath}``)."""

    cert_path: str
    key_path: str


#: The TLS modes that end TLS at the proxy and forward HTTP.
TERMINATING = frozenset({"terminate", "terminate-and-reencrypt"})


@dataclass(frozen=True)
class ProxyRoute:
    """One route. ``domains`` empty means any name, and connections that carry none. ``client_ips`` selects
    (a client outside it makes the route not match, and the next one is tried); ``allow`` and ``block``
    refuse (a client they exclude is closed once this route was chosen). ``source`` is the key path the
    route came from, for error messages and logs. ``tls_mode`` is ``passthrough``, ``terminate`` or
    ``terminate-and-reencrypt``; a terminating route's ``certificate`` is files, ``"auto"`` (ACME) or None
    (whatever the certificate store holds for the name), and ``tls_profile`` the TLS policy profile it
    terminates with (``intermediate`` or ``modern``, see :mod:`dcrouter.net.tls`)."""

    name: str
    priority: int
    ports: tuple[PortRange, ...]
    domains: tuple[str, ...]
    client_ips: CidrSet | None
    allow: CidrSet | None
    block: CidrSet | None
    target: ProxyTarget
    tls_mode: str
    max_connections: int | None
    connection_timeout_ms: int | None
    source: str
    certificate: CertificateFiles | str | None = None
    tls_profile: str = "intermediate"
    #: New connections per window from all clients together (``connectionRate``); None: no limit.
    connection_rate: Rate | None = None

    @property
    def terminates(self) -> bool:
        return self.tls_mode in TERMINATING

    def permits(self, client_ip: str) -> bool:
        """Whether this route serves ``client_ip``: not in ``block`` (which wins), and in ``allow`` if set."""
        if self.block is not None and client_ip in self.block:
            return False
        return self.allow is None or client_ip in self.allow

    def listens_on(self, port: int) -> bool:
        return any(port in r for r in self.ports)

    def https_port(self, arrived: int) -> int:
        """The port a client that sent plain HTTP to ``arrived`` is redirected to for HTTPS on this
        (terminating) route: 443 when the route listens there, else its lowest other port, else
        ``arrived`` itself (the one port serves both)."""
        if self.listens_on(443):
            return 443
        others = [r.start + 1 if r.start == arrived else r.start for r in self.ports]
        return min((p for p, r in zip(others, self.ports, strict=True) if p <= r.end), default=arrived)


def rate(config: RateConfig | None) -> Rate | None:
    """The engine's rate for a ``connectionRate`` table (window in milliseconds), or None."""
    if config is None:
        return None
    return Rate(config.count, config.window / 1000, config.burst)


def _ranges(pairs: Iterable[tuple[int, int]]) -> tuple[PortRange, ...]:
    return tuple(PortRange(start, end) for start, end in pairs)


def _certificate(value: Any) -> CertificateFiles | str | None:
    if isinstance(value, dict):
        return CertificateFiles(value["certPath"], value["keyPath"])
    return value if isinstance(value, str) else None


def _from_route(route: Any, index: int) -> ProxyRoute:
    source = f"smartProxyConfig.routes[{index}]"
    security = route.security
    target = route.action.target
    return ProxyRoute(
        name=route.name if route.name is not None else source,
        priority=route.priority,
        ports=_ranges(port_ranges(route.match.ports)),
        domains=route_domains(route.match.domains),
        client_ips=_networks(route.match.client_ip),
        allow=_networks(security.ip_allow_list) if security else None,
        block=_networks(security.ip_block_list) if security else None,
        target=ProxyTarget(hosts(target.host), target_port(target.port)),
        tls_mode=route.tls.mode if route.tls else "passthrough",
        max_connections=security.max_connections if security else None,
        connection_timeout_ms=route.connection_timeout,
        source=source,
        certificate=_certificate(route.tls.certificate) if route.tls else None,
        tls_profile=(route.tls.tls_profile if route.tls else None) or "intermediate",
        connection_rate=rate(security.connection_rate) if security else None,
    )


def _from_domain_config(config: Any, index: int) -> ProxyRoute:
    entry = config.domain_configs[index]
    source = f"smartProxyConfig.domainConfigs[{index}]"
    # Only the fromPort fallback maps the port (to toPort); portRanges and globalPortRanges keep it.
    on_from_port = not entry.port_ranges and not config.global_port_ranges
    port = (config.to_port or config.from_port) if on_from_port else None
    return ProxyRoute(
        name=source,
        priority=0,
        ports=_ranges(domain_config_ports(config, index)),
        domains=tuple(entry.domains),
        client_ips=None,
        allow=_networks(entry.allowed_ips),
        block=_networks(entry.blocked_ips),
        target=ProxyTarget(tuple(entry.target_ips) or (config.target_ip,), port),
        tls_mode="terminate" if entry.use_network_proxy else "passthrough",
        max_connections=entry.max_connections,
        connection_timeout_ms=entry.connection_timeout,
        source=source,
        # With acme.enabled and no files, ACME obtains the entry's certificate.
        certificate=_certificate(entry.certificate) or ("auto" if entry.use_network_proxy else None),
        tls_profile=entry.tls_profile or "intermediate",
        connection_rate=rate(entry.connection_rate),
    )


def _from_port_route(config: Any) -> ProxyRoute:
    return ProxyRoute(
        name="smartProxyConfig.fromPort",
        priority=0,
        ports=(PortRange(config.from_port, config.from_port),),
        domains=(),
        client_ips=None,
        allow=None,
        block=None,
        target=ProxyTarget((config.target_ip,), config.to_port or config.from_port),
        tls_mode="passthrough",
        max_connections=None,
        connection_timeout_ms=None,
        source="smartProxyConfig.fromPort",
    )


def _from_http_route(route: Any, index: int) -> ProxyRoute:
    source = f"httpDomainRoutes[{index}]"
    port = http_route_port(route)
    return ProxyRoute(
        name=source,
        priority=0,
        ports=(PortRange(port, port),),
        domains=(route.domain,),
        client_ips=None,
        allow=None,
        block=None,
        target=ProxyTarget((route.target_server_ip,), route.target_server_port),
        tls_mode="passthrough",
        max_connections=None,
        connection_timeout_ms=None,
        source=source,
    )


def _collapse(ports: list[int]) -> tuple[PortRange, ...]:
    """Ascending ports as the fewest ranges (a default route over 1-65535 is one range, not 65535)."""
    ranges: list[PortRange] = []
    for p in ports:
        if ranges and ranges[-1].end == p - 1:
            ranges[-1] = PortRange(ranges[-1].start, p)
        else:
            ranges.append(PortRange(p, p))
    return tuple(ranges)


def _default_route(config: Any, ports: list[int], below: int) -> ProxyRoute:
    default = config.default_target
    return ProxyRoute(
        name="smartProxyConfig.defaultTarget",
        priority=below,
        ports=_collapse(ports),
        domains=(),
        client_ips=None,
        allow=None,
        block=None,
        target=ProxyTarget((default.host,), default.port),
        tls_mode="passthrough",
        max_connections=None,
        connection_timeout_ms=None,
        source="smartProxyConfig.defaultTarget",
    )


#: The name (and source) of the route build_routes adds on ``acme.port``.
ACME_PORT_ROUTE = "smartProxyConfig.acme.port"


def _acme_port_route(config: Any, terminating: list[ProxyRoute], below: int) -> ProxyRoute:
    """Plain HTTP on ``acme.port`` for the terminated names: challenges answered, the rest redirected to
    HTTPS (a terminating route answers plain HTTP that way). Lowest priority: a route of the config's own on
    that port and name wins."""
    any_name = any(not r.domains for r in terminating)
    domains = () if any_name else tuple(dict.fromkeys(d for r in terminating for d in r.domains))
    return ProxyRoute(
        name=ACME_PORT_ROUTE,
        priority=below,
        ports=(PortRange(config.acme.port, config.acme.port),),
        domains=domains,
        client_ips=None,
        allow=None,
        block=None,
        target=terminating[0].target,
        tls_mode="terminate",
        max_connections=None,
        connection_timeout_ms=None,
        source=ACME_PORT_ROUTE,
    )


def build_routes(
    config: SmartProxyConfig | None, http_routes: Sequence[HttpDomainRoute] | None
) -> list[ProxyRoute]:
    """The routes of a loaded ``smartProxyConfig`` (a :class:`~dcrouter.config.proxy.SmartProxyConfig` or
    None) and ``httpDomainRoutes``, in the order that breaks ties between equal matches: ``routes`` as given,
    then ``domainConfigs``, then ``httpDomainRoutes``, then the ``fromPort`` → ``targetIP`` catch-all, and
    last the ``defaultTarget`` route, on every listening port with a priority below all others. With an
    ``acme`` block and terminating routes, a route on ``acme.port`` (below all others too) answers ACME
    challenges and redirects the terminated names to HTTPS.

    The config must have passed the loader's checks (the translation assumes them)."""
    routes: list[ProxyRoute] = []
    if config is not None:
        routes += [_from_route(r, i) for i, r in enumerate(config.routes)]
        routes += [_from_domain_config(config, i) for i in range(len(config.domain_configs))]
    routes += [_from_http_route(r, i) for i, r in enumerate(http_routes or ())]
    if config is not None and config.from_port is not None and config.target_ip is not None:
        routes.append(_from_port_route(config))
    terminating = [r for r in routes if r.terminates]
    if config is not None and config.acme is not None and terminating:
        below = min((r.priority for r in routes), default=0) - 1
        routes.append(_acme_port_route(config, terminating, below))
    if config is not None and config.default_target is not None:
        ports = listening_ports(routes, config)
        if ports:
            below = min((r.priority for r in routes), default=0) - 1
            routes.append(_default_route(config, ports, below))
    return routes


def listening_ports(routes: Iterable[ProxyRoute], config: SmartProxyConfig | None = None) -> list[int]:
    """Every port any route claims, ascending; with ``config`` (a SmartProxyConfig) also its
    ``globalPortRanges`` and ``fromPort``, which are listened on even when no route uses them (their
    connections go to the default target, or are closed)."""
    ports: set[int] = set()
    ranges = [r for route in routes for r in route.ports]
    if config is not None:
        ranges += [PortRange(r.from_, r.to) for r in config.global_port_ranges]
        if config.from_port is not None:
            ranges.append(PortRange(config.from_port, config.from_port))
    for r in ranges:
        ports.update(range(r.start, r.end + 1))
    return sorted(ports)


@dataclass
class _PortIndex:
    """The routes of one port, by the names they match, each list in precedence order."""

    exact: dict[str, list[ProxyRoute]] = field(default_factory=dict)
    wildcard: dict[str, list[ProxyRoute]] = field(default_factory=dict)
    any_name: list[ProxyRoute] = field(default_factory=list)

    def add(self, route: ProxyRoute) -> None:
        if not route.domains:
            self.any_name.append(route)
        for pattern in route.domains:
            if pattern.startswith("*."):
                self.wildcard.setdefault(normalize_domain(pattern[2:]), []).append(route)
            else:
                self.exact.setdefault(normalize_domain(pattern), []).append(route)

    def by_name(self, name: str) -> Iterable[list[ProxyRoute]]:
        """The candidate lists for a normalised name, best first: exact, then wildcards from the most
        specific (``*.b.example.com`` before ``*.example.com``), as DomainMatcher orders them."""
        yield self.exact.get(name, [])
        dot = name.find(".")
        while dot != -1:
            name = name[dot + 1 :]
            yield self.wildcard.get(name, [])
            dot = name.find(".")


def _admits(route: ProxyRoute, client_ip: str) -> bool:
    return route.client_ips is None or client_ip in route.client_ips


class RouteTable:
    """Chooses the route of a connection from its port, the name it asked for and the client's address.

    Names match as SMTP's DomainMatcher matches them (normalised for case, one trailing dot and IDNA; exact
    before the most specific wildcard); the levels are walked here rather than with DomainMatcher because a
    route excluded by ``match.clientIp`` must let the next-best pattern be tried.
    """

    def __init__(self, routes: Iterable[ProxyRoute]) -> None:
        self.routes: tuple[ProxyRoute, ...] = tuple(routes)
        # Higher priority first; among equal priorities, the order build_routes gave.
        self._ordered = sorted(self.routes, key=lambda r: -r.priority)
        self._ports: dict[int, _PortIndex] = {}
        self._terminating: _PortIndex | None = None

    def _index(self, port: int) -> _PortIndex:
        index = self._ports.get(port)
        if index is None:
            index = _PortIndex()
            for route in self._ordered:
                if route.listens_on(port):
                    index.add(route)
            self._ports[port] = index
        return index

    def match(self, port: int, server_name: str | None, client_ip: str) -> ProxyRoute | None:
        """The route for a connection to ``port`` from ``client_ip`` that asked for ``server_name`` (TLS SNI
        or HTTP Host; None when it carried none). A route for the name (exact, then the most specific
        wildcard) wins over routes for any name; among routes at one level the highest priority wins. Routes
        whose ``client_ips`` exclude the client are passed over. A name that is not a valid host name is
        treated as no name. None: no route, the connection is to be closed.

        Whether the chosen route then serves the client is :meth:`ProxyRoute.permits`'s answer, not this
        one's: a blocked client is refused by its route, never handed to another."""
        return _choose(self._index(port), server_name, client_ip)

    def https_route(self, host: str, client_ip: str) -> ProxyRoute | None:
        """The terminating route (other than the one on ``acme.port``) that would serve ``host`` over
        HTTPS to ``client_ip``, chosen as :meth:`match` chooses on a port: where plain HTTP for ``host``
        is redirected to."""
        if self._terminating is None:
            self._terminating = _PortIndex()
            for route in self._ordered:
                if route.terminates and route.name != ACME_PORT_ROUTE:
                    self._terminating.add(route)
        return _choose(self._terminating, host, client_ip)


def _choose(index: _PortIndex, server_name: str | None, client_ip: str) -> ProxyRoute | None:
    name = _normalized(server_name)
    if name is not None:
        for candidates in index.by_name(name):
            chosen = next((r for r in candidates if _admits(r, client_ip)), None)
            if chosen is not None:
                return chosen
    return next((r for r in index.any_name if _admits(r, client_ip)), None)


def _normalized(server_name: str | None) -> str | None:
    if server_name is None:
        return None
    try:
        return normalize_domain(server_name)
    except ValueError:
        return None
