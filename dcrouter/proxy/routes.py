"""The proxy's one route model, and its translation from every configured form.

``smartProxyConfig.routes`` (SmartProxy's route form), the seed's ``domainConfigs`` / ``globalPortRanges`` /
``fromPort`` form, ``httpDomainRoutes`` and ``defaultTarget`` all become :class:`ProxyRoute` values here.
Everything after the config loader (listeners, IP rules, connection caps, metrics) reads only this model, so
an allow list or a connection cap means the same whichever spelling configured it: SmartProxy shipped bugs
where its two spellings were enforced by different code and diverged.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

from dcrouter.config.proxy import (
    HttpDomainRoute,
    SmartProxyConfig,
    domain_config_ports,
    header_pattern,
    hosts,
    http_route_port,
    port_offset,
    port_ranges,
    route_domains,
    route_tls,
    target_port,
)
from dcrouter.config.ratelimits import RateConfig
from dcrouter.limits.gcra import Rate
from dcrouter.net.balance import Method
from dcrouter.net.cidr import CidrSet
from dcrouter.net.domains import normalize_domain
from dcrouter.net.healthcheck import HealthCheckRule


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
class BackendVerification:
    """How ``terminate-and-reencrypt`` checks its backends' certificates: ``verify`` (else any is taken),
    against ``ca_file`` (PEM CA certificates; None: the system's), for ``server_name`` (None: the target
    host)."""

    verify: bool = True
    ca_file: str | None = None
    server_name: str | None = None


VERIFIED = BackendVerification()


@dataclass(frozen=True)
class ProxyTarget:
    """Backends, and their port: None means the port the client connected to, moved by ``offset``
    (``"{port}+1000"``). ``weights`` (one per host; empty: all 1) and ``balancing`` (a
    :data:`~dcrouter.net.balance.METHODS` name) choose the first host a connection tries;
    ``health_check`` (None: passive marks only) keeps failing hosts out; ``verification`` is for
    re-encrypting routes."""

    hosts: tuple[str, ...]
    port: int | None
    offset: int = 0
    weights: tuple[int, ...] = ()
    balancing: Method = "roundRobin"
    health_check: HealthCheckRule | None = None
    verification: BackendVerification = VERIFIED
    #: ``action.target.protocol``: ``http/1.1`` or ``h2c`` (:mod:`dcrouter.proxy.h2c`).
    protocol: str = "http/1.1"

    def weight_list(self) -> list[int]:
        return list(self.weights) if self.weights else [1] * len(self.hosts)

    def port_for(self, connected: int) -> int:
        """The backend port for a client that connected to ``connected``."""
        return self.port if self.port is not None else connected + self.offset


@dataclass(frozen=True)
class CertificateFiles:
    """A certificate and its key, as PEM files (``tls.certificate = {certPath, keyPath}``)."""

    cert_path: str
    key_path: str


@dataclass(frozen=True)
class Redirect:
    """``action.redirect``: ``to`` is a URL template (``{domain}``, ``{path}``, ``{query}``, ``{port}``)."""

    to: str
    status: int = 301


@dataclass(frozen=True)
class StaticContent:
    """``action.static``: files under ``root`` (with ``index`` names for directories), or a fixed
    ``content`` answered with ``status`` and ``content_type``."""

    root: str | None = None
    index: tuple[str, ...] = ("index.html",)
    content: bytes | None = None
    content_type: str = "text/plain; charset=utf-8"
    status: int = 200


@dataclass(frozen=True)
class RouteAction:
    """What a route does with a connection: ``forward`` (to its target), ``redirect``, ``static``,
    ``block`` (``status``: answered to HTTP requests; None: closed) or ``socket-handler`` (``handler``: the
    configured name or dotted path)."""

    type: str = "forward"
    redirect: Redirect | None = None
    static: StaticContent | None = None
    status: int | None = None
    handler: str | None = None

    @cached_property  # asked per connection; the action is frozen
    def answers_http(self) -> bool:
        """Whether the proxy answers HTTP requests itself rather than connecting anywhere."""
        return self.type in ("redirect", "static") or (self.type == "block" and self.status is not None)


FORWARD = RouteAction()


@dataclass(frozen=True)
class FieldChanges:
    """Header fields to set (replacing those of the name) and to remove, names in lower case for removal."""

    set_fields: tuple[tuple[bytes, bytes], ...] = ()
    remove: frozenset[bytes] = frozenset()

    @cached_property  # asked per connection (ProxyRoute.reads_http); the instance is frozen
    def dropped(self) -> frozenset[bytes]:
        """The names whose fields as received are left out: removed ones, and set ones (replaced)."""
        return self.remove | {name.lower() for name, _ in self.set_fields}


NO_CHANGES = FieldChanges()


@dataclass(frozen=True)
class JwtRule:
    """``security.jwtAuth`` as the proxy uses it; exactly one of ``key_file``, ``jwks_file``, ``jwks_url``."""

    algorithms: tuple[str, ...]
    key_file: str | None = None
    jwks_file: str | None = None
    jwks_url: str | None = None
    issuer: str | None = None
    audience: tuple[str, ...] = ()
    leeway: float = 30.0
    refresh: float = 3600.0
    realm: str = "dcrouter"


@dataclass(frozen=True)
class RequestRateRule:
    """``security.rateLimit``: ``rate`` per client address, request path or a header's value (``key_by``)."""

    rate: Rate
    key_by: str = "ip"
    header_name: str | None = None


@dataclass(frozen=True)
class BasicAuthRule:
    """``security.basicAuth``: the realm named in the challenge, and ``(username, scrypt hash)`` pairs."""

    realm: str
    users: tuple[tuple[str, str], ...]


#: ClientHello version numbers (``supported_versions``, else the legacy version) by ``match.tlsVersion`` name.
TLS_VERSION_NUMBERS = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Request:
    """What request conditions look at: the path (percent-encoded as sent, without the query) and the
    header fields, by lower-case name, every value in order."""

    path: str
    headers: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class RequestConditions:
    """``match.path`` and ``match.headers``: ``path`` a prefix or a glob (see :meth:`path_matches`);
    ``headers`` (lower-case name, exact value or compiled pattern) pairs that must all hold."""

    path: str | None = None
    headers: tuple[tuple[str, str | re.Pattern[str]], ...] = ()

    def __bool__(self) -> bool:
        return self.path is not None or bool(self.headers)

    @property
    def specificity(self) -> tuple[int, int, int]:
        """Larger is more specific: a prefix before a glob before no path, longer before shorter, then
        the number of header conditions."""
        kind = 0 if self.path is None else 1 if _GLOB.search(self.path) else 2
        return kind, len(self.path or ""), len(self.headers)

    def path_matches(self, path: str) -> bool:
        """A glob must match the whole path; a prefix ending in ``/`` matches what starts with it, any
        other prefix the path itself and what continues it after a ``/``."""
        pattern = self.path
        if pattern is None:
            return True
        if _GLOB.search(pattern):
            return fnmatch.fnmatchcase(path, pattern)
        if pattern.endswith("/"):
            return path.startswith(pattern)
        return path == pattern or path.startswith(pattern + "/")

    def matches(self, request: Request) -> bool:
        if not self.path_matches(request.path):
            return False
        for name, wanted in self.headers:
            present = request.headers.get(name, ())
            if isinstance(wanted, str):
                if wanted not in present:
                    return False
            elif not any(wanted.search(value) for value in present):
                return False
        return True


NO_CONDITIONS = RequestConditions()
#: A forward route's target when it has none (the other action types).
NO_TARGET = ProxyTarget((), None)

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
    action: RouteAction = FORWARD
    conditions: RequestConditions = NO_CONDITIONS
    tls_versions: frozenset[int] = frozenset()
    basic_auth: BasicAuthRule | None = None
    jwt_auth: JwtRule | None = None
    request_rate: RequestRateRule | None = None
    request_fields: FieldChanges = NO_CHANGES
    response_fields: FieldChanges = NO_CHANGES
    #: A terminating route offers ``h2`` by ALPN.
    http2: bool = True
    #: ``action.websocket``: seconds an upgraded connection may be idle, and may last; None: no limit.
    websocket_idle: float | None = None
    websocket_max_age: float | None = None

    @cached_property  # asked per connection; the route is frozen
    def reads_http(self) -> bool:
        """Whether requests must be read one by one even on a plain route that forwards (credentials are
        checked, or header fields changed): such a route forwards HTTP rather than splicing bytes."""
        return (
            self.basic_auth is not None
            or self.jwt_auth is not None
            or self.request_rate is not None
            or bool(self.request_fields.dropped or self.response_fields.dropped)
            or self.websocket_idle is not None
            or self.websocket_max_age is not None
            or self.target.protocol == "h2c"
        )

    #: New connections per window from all clients together (``connectionRate``); None: no limit.
    connection_rate: Rate | None = None

    @cached_property
    def terminates(self) -> bool:
        return self.tls_mode in TERMINATING

    @cached_property  # asked per connection; the route is frozen
    def splices(self) -> bool:
        """Whether a connection routed here that is not plain HTTP is spliced to a target as it is: a
        ``forward`` that neither terminates TLS nor reads HTTP requests."""
        return self.action.type == "forward" and not self.terminates and not self.reads_http

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


def _action(action: Any) -> RouteAction:
    if action.type == "forward":
        return FORWARD
    redirect = action.redirect
    static = action.static
    return RouteAction(
        type=action.type,
        redirect=Redirect(redirect.to, redirect.status) if redirect is not None else None,
        static=StaticContent(
            root=static.root,
            index=tuple(static.index),
            content=static.content.encode("utf-8") if static.content is not None else None,
            content_type=static.content_type,
            status=static.status,
        )
        if static is not None
        else None,
        status=action.status,
        handler=action.socket_handler,
    )


def _from_route(route: Any, index: int) -> ProxyRoute:
    source = f"smartProxyConfig.routes[{index}]"
    security = route.security
    target = route.action.target
    tls, _ = route_tls(route)
    return ProxyRoute(
        name=route.name if route.name is not None else source,
        priority=route.priority,
        ports=_ranges(port_ranges(route.match.ports)),
        domains=route_domains(route.match.domains),
        client_ips=_networks(route.match.client_ip),
        allow=_networks(security.ip_allow_list) if security else None,
        block=_networks(security.ip_block_list) if security else None,
        target=_target(route.action, tls) if target is not None else NO_TARGET,
        tls_mode=tls.mode if tls else "passthrough",
        max_connections=security.max_connections if security else None,
        connection_timeout_ms=route.connection_timeout,
        source=source,
        certificate=_certificate(tls.certificate) if tls else None,
        tls_profile=(tls.tls_profile if tls else None) or "intermediate",
        http2=tls.http2 if tls else True,
        websocket_idle=_seconds(route.action.websocket.idle_timeout) if route.action.websocket else None,
        websocket_max_age=_seconds(route.action.websocket.max_age) if route.action.websocket else None,
        action=_action(route.action),
        conditions=_conditions(route.match),
        tls_versions=frozenset(TLS_VERSION_NUMBERS[v] for v in route.match.tls_version),
        basic_auth=_basic_auth(security.basic_auth) if security and security.basic_auth else None,
        jwt_auth=_jwt_auth(security.jwt_auth) if security and security.jwt_auth else None,
        request_rate=_request_rate(security.rate_limit) if security and security.rate_limit else None,
        request_fields=_changes(route.action.headers.request if route.action.headers else None),
        response_fields=_changes(route.action.headers.response if route.action.headers else None),
        connection_rate=rate(security.connection_rate) if security else None,
    )


def _target(action: Any, tls: Any) -> ProxyTarget:
    target = action.target
    check = action.health_check
    rule = None
    if check is not None:
        rule = HealthCheckRule(
            kind=check.type,
            interval=check.interval / 1000,
            timeout=check.timeout / 1000,
            rise=check.rise,
            fall=check.fall,
            path=check.path,
            expect=tuple(check.expect_status),
            host=check.host,
            port=check.port,
        )
    verification = VERIFIED
    if tls is not None:
        verification = BackendVerification(tls.verify_backend, tls.backend_ca_file, tls.server_name)
    return ProxyTarget(
        hosts(target.host),
        target_port(target.port),
        port_offset(target.port),
        weights=tuple(target.weights),
        balancing=action.load_balancing,
        health_check=rule,
        verification=verification,
        protocol=target.protocol,
    )


def _changes(config: Any) -> FieldChanges:
    if config is None:
        return NO_CHANGES
    return FieldChanges(
        tuple((name.encode("ascii"), value.encode("utf-8")) for name, value in config.set_fields.items()),
        frozenset(name.lower().encode("ascii") for name in config.remove),
    )


def _request_rate(config: Any) -> RequestRateRule:
    return RequestRateRule(
        Rate(config.count, config.window / 1000, config.burst), config.key_by, config.header_name
    )


def _jwt_auth(config: Any) -> JwtRule:
    return JwtRule(
        algorithms=tuple(config.algorithms),
        key_file=config.key_file,
        jwks_file=config.jwks_file,
        jwks_url=config.jwks_url,
        issuer=config.issuer,
        audience=tuple(config.audience),
        leeway=config.leeway / 1000,
        refresh=config.jwks_refresh / 1000,
        realm=config.realm,
    )


def _basic_auth(config: Any) -> BasicAuthRule:
    return BasicAuthRule(config.realm, tuple((u.username, u.password) for u in config.users))


def _conditions(match: Any) -> RequestConditions:
    headers = tuple(
        (name.lower(), header_pattern(value) or value) for name, value in (match.headers or {}).items()
    )
    if match.path is None and not headers:
        return NO_CONDITIONS
    return RequestConditions(match.path, headers)


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
        # More specific request conditions first, then higher priority; among equals, build_routes' order.
        self._ordered = sorted(self.routes, key=lambda r: (_negated(r.conditions.specificity), -r.priority))
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

    def match(
        self,
        port: int,
        server_name: str | None,
        client_ip: str,
        *,
        request: Request | Deferral | None = None,
        tls_versions: frozenset[int] | None = None,
    ) -> ProxyRoute | None:
        """The route for a connection to ``port`` from ``client_ip`` that asked for ``server_name`` (TLS SNI
        or HTTP Host; None when it carried none). A route for the name (exact, then the most specific
        wildcard) wins over routes for any name; among routes at one level the highest priority wins. Routes
        whose ``client_ips`` exclude the client are passed over. A name that is not a valid host name is
        treated as no name. None: no route, the connection is to be closed.

        ``request``: the HTTP request head, for routes with ``match.path`` / ``match.headers`` (None: such
        routes do not match; :data:`DEFERRED`: they match, to be chosen again once a request is read).
        ``tls_versions``: the versions a ClientHello offered, for routes with ``match.tlsVersion`` (None: not
        TLS, such routes do not match). Within a name level, more specific request conditions come before
        priority.

        Whether the chosen route then serves the client is :meth:`ProxyRoute.permits`'s answer, not this
        one's: a blocked client is refused by its route, never handed to another."""
        return _choose(self._index(port), server_name, client_ip, request, tls_versions)

    def has_conditions(self, port: int) -> bool:
        """Whether some route on ``port`` selects by request (path or headers)."""
        index = self._index(port)
        groups = [index.any_name, *index.exact.values(), *index.wildcard.values()]
        return any(r.conditions for group in groups for r in group)

    def https_route(self, host: str, client_ip: str) -> ProxyRoute | None:
        """The terminating route (other than the one on ``acme.port``) that would serve ``host`` over
        HTTPS to ``client_ip``, chosen as :meth:`match` chooses on a port: where plain HTTP for ``host``
        is redirected to."""
        if self._terminating is None:
            self._terminating = _PortIndex()
            for route in self._ordered:
                if route.terminates and route.name != ACME_PORT_ROUTE:
                    self._terminating.add(route)
        return _choose(self._terminating, host, client_ip, DEFERRED, None)


class Deferral:
    """The type of :data:`DEFERRED`."""


#: ``RouteTable.match(request=DEFERRED)``: request conditions are not known yet and do not exclude.
DEFERRED = Deferral()


def _negated(key: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(-k for k in key)


def _fits(
    route: ProxyRoute, client_ip: str, request: Request | Deferral | None, versions: frozenset[int] | None
) -> bool:
    if not _admits(route, client_ip):
        return False
    if route.tls_versions and (versions is None or not route.tls_versions & versions):
        return False
    if route.conditions:
        if request is None:
            return False
        if isinstance(request, Request):
            return route.conditions.matches(request)
    return True


def _choose(
    index: _PortIndex,
    server_name: str | None,
    client_ip: str,
    request: Request | Deferral | None,
    versions: frozenset[int] | None,
) -> ProxyRoute | None:
    name = _normalized(server_name)
    if name is not None:
        for candidates in index.by_name(name):
            chosen = next((r for r in candidates if _fits(r, client_ip, request, versions)), None)
            if chosen is not None:
                return chosen
    return next((r for r in index.any_name if _fits(r, client_ip, request, versions)), None)


@lru_cache(maxsize=256)  # asked per TLS connection; clients send a handful of different lists (pure)
def offered_versions(supported_versions: tuple[int, ...], legacy_version: int) -> frozenset[int]:
    """The TLS version a ClientHello will get, as a one-element set: the highest it offers in
    ``supported_versions`` (GREASE values ignored), else its legacy version (RFC 8446 §4.2.1). A client
    offering TLS 1.3 and 1.2 is a TLS 1.3 client: ``match.tlsVersion = ["TLSv1.2"]`` is for those that
    cannot do better."""
    known = [v for v in supported_versions if v in _KNOWN_VERSIONS]
    return frozenset({max(known) if known else legacy_version})


_KNOWN_VERSIONS = frozenset(TLS_VERSION_NUMBERS.values())


def request_of(target: bytes, fields: Iterable[tuple[bytes, bytes]]) -> Request:
    """The :class:`Request` of a request head's target and field lines (origin or absolute form)."""
    if not target.startswith(b"/"):
        match = re.match(rb"[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]*(.*)\Z", target, re.DOTALL)
        target = (match.group(1) if match else b"") or b"/"
    path = target.split(b"?", 1)[0].split(b"#", 1)[0]
    headers: dict[str, tuple[str, ...]] = {}
    for name, value in fields:
        key = name.decode("latin-1").lower()
        headers[key] = (*headers.get(key, ()), value.decode("latin-1"))
    return Request(path.decode("latin-1"), headers)


@lru_cache(maxsize=4096)  # asked per connection, mostly for the same few names (a pure function)
def _normalized(server_name: str | None) -> str | None:
    if server_name is None:
        return None
    try:
        return normalize_domain(server_name)
    except ValueError:
        return None


def _seconds(milliseconds: int | None) -> float | None:
    return milliseconds / 1000 if milliseconds is not None else None
