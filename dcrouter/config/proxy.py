"""The schema of ``smartProxyConfig`` and ``httpDomainRoutes``: the TCP/TLS/HTTP proxy's options.

Two spellings are accepted, as SmartProxy accepted them: the seed's (``fromPort``/``toPort``/``targetIP``,
``globalPortRanges``, ``domainConfigs``) and SmartProxy's later route form (``routes``). Both are translated
into one route model by :mod:`dcrouter.proxy.routes`; nothing else reads these classes' raw forms.

A few keys of the route form may hold one of several shapes (``match.ports``: an integer or a list of
integers and ``{from, to}`` tables; ``action.target.host``: a string or a list). The loader converts a
declared union by its first member only, so those keys are declared ``Any`` and checked here by value; the
helpers :func:`port_ranges`, :func:`hosts`, :func:`target_port` and :func:`route_domains` turn a checked
value into one shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dcrouter.config import values
from dcrouter.config.schema import Report, block_check, checked, join, option
from dcrouter.config.tls import pem_files
from dcrouter.net.domains import normalize_domain

_FORWARD_ONLY = 'Only "forward" is built.'

# --- one-shape views of multi-shape values -----------------------------------------------------------------


def port_ranges(value: Any) -> list[tuple[int, int]]:
    """``(start, end)`` pairs of a checked ``match.ports`` value: ``443``, ``[80, 443]`` or
    ``[{from = 8000, to = 8099}]`` (integers and tables may be mixed in one list)."""
    items = value if isinstance(value, list) else [value]
    return [(item, item) if isinstance(item, int) else (item["from"], item["to"]) for item in items]


def hosts(value: Any) -> tuple[str, ...]:
    """The target hosts of a checked ``action.target.host`` value (a string or a list of strings)."""
    return (value,) if isinstance(value, str) else tuple(value)


def target_port(value: Any) -> int | None:
    """The port of a checked ``action.target.port``; None for ``"preserve"`` (the port connected to)."""
    return None if value == "preserve" else int(value)


def route_domains(value: Any) -> tuple[str, ...]:
    """The domain patterns of a checked ``match.domains`` value; ``()`` means any name (``"*"`` is
    SmartProxy's spelling of that)."""
    items = [value] if isinstance(value, str) else list(value)
    return () if "*" in items else tuple(items)


# --- value checks of multi-shape keys ----------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return type(value) is int


def _port_item(value: Any) -> str | None:
    """One item of ``match.ports``: a port, or a ``{from, to}`` table of ports with from <= to."""
    if _is_int(value):
        return values.port(value)
    if not isinstance(value, Mapping):
        return f"expected a port number or a {{from, to}} table, got {value!r}"
    if set(value) != {"from", "to"}:
        return f"a port range has exactly the keys 'from' and 'to', got {sorted(map(str, value))}"
    start, end = value["from"], value["to"]
    if not (_is_int(start) and _is_int(end)):
        return f"'from' and 'to' must be integers, got {start!r} and {end!r}"
    if start > end:
        return f"'from' ({start}) is more than 'to' ({end})"
    return values.port(start) or values.port(end)


def _port_spec(value: Any) -> str | None:
    if _is_int(value):
        return values.port(value)
    if not isinstance(value, list):
        return f"expected a port number or a list of ports and {{from, to}} tables, got {value!r}"
    return values.not_empty(value)


def _host_spec(value: Any) -> str | None:
    if isinstance(value, str):
        return values.host_or_ip(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return f"expected a host name or IP address, or a list of them, got {value!r}"
    return values.not_empty(value)


def _host_item(value: Any) -> str | None:
    return values.host_or_ip(value) if isinstance(value, str) else None


def _target_port_spec(value: Any) -> str | None:
    if value == "preserve":
        return None
    if not _is_int(value):
        return f'expected a port number or "preserve", got {value!r}'
    return values.port(value)


def _domains_spec(value: Any) -> str | None:
    if isinstance(value, str):
        return _domain_item(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return f"expected a domain pattern or a list of them, got {value!r}"
    return values.unique(value)


def _domain_item(value: Any) -> str | None:
    if value == "*" or not isinstance(value, str):
        return None
    return values.domain_pattern(value)


def _certificate_spec(value: Any) -> str | None:
    if value is None or value == "auto":
        return None
    if not isinstance(value, Mapping):
        return f'expected "auto" or a {{certPath, keyPath}} table, got {value!r}'
    if set(value) != {"certPath", "keyPath"}:
        keys = sorted(map(str, value))
        return f"a certificate table has exactly the keys 'certPath' and 'keyPath', got {keys}"
    if not all(isinstance(v, str) and v for v in value.values()):
        return "'certPath' and 'keyPath' must be file names"
    return None


def _certificate_files_spec(value: Any) -> str | None:
    if value == "auto":
        return '"auto" is not needed here: with acme.enabled, useNetworkProxy entries get ACME certificates'
    return _certificate_spec(value)


# --- block checks ------------------------------------------------------------------------------------------


@block_check("from_", "to")
def _range_order(block: PortRangeConfig, path: str, report: Report) -> None:
    if block.from_ > block.to:
        report.error(join(path, "to"), f"{block.to} is less than {join(path, 'from')} ({block.from_})")


@block_check("type", "target")
def _action_target(action: RouteAction, path: str, report: Report) -> None:
    if action.type == "forward" and action.target is None:
        report.error(join(path, "target"), 'required for type "forward"')


@block_check("from_port", "to_port", "target_ip")
def _from_port_pair(proxy: SmartProxyConfig, path: str, report: Report) -> None:
    """toPort and targetIP describe where fromPort forwards to; without fromPort they would mean nothing."""
    if proxy.from_port is not None:
        return
    for key, value in (("toPort", proxy.to_port), ("targetIP", proxy.target_ip)):
        if value is not None:
            report.error(join(path, key), f"has no effect without {join(path, 'fromPort')}")


@block_check("domain_configs", "global_port_ranges", "from_port", "target_ip")
def _domain_config_ports(proxy: SmartProxyConfig, path: str, report: Report) -> None:
    """An entry listens on its portRanges, else on globalPortRanges, else on fromPort; it forwards to its
    targetIPs, else to targetIP."""
    fallback_ports = bool(proxy.global_port_ranges) or proxy.from_port is not None
    for i, entry in enumerate(proxy.domain_configs):
        here = f"{join(path, 'domainConfigs')}[{i}]"
        if not entry.port_ranges and not fallback_ports:
            report.error(
                join(here, "portRanges"),
                f"required when neither {join(path, 'globalPortRanges')} nor {join(path, 'fromPort')} is set",
            )
        if not entry.target_ips and proxy.target_ip is None:
            report.error(join(here, "targetIPs"), f"required when {join(path, 'targetIP')} is not set")


def domain_config_ports(proxy: SmartProxyConfig, index: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` port ranges ``domainConfigs[index]`` listens on (see the block check above)."""
    entry = proxy.domain_configs[index]
    if entry.port_ranges:
        return [(r.from_, r.to) for r in entry.port_ranges]
    if proxy.global_port_ranges:
        return [(r.from_, r.to) for r in proxy.global_port_ranges]
    return [(proxy.from_port, proxy.from_port)] if proxy.from_port is not None else []


def _overlap(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    return any(s1 <= e2 and s2 <= e1 for s1, e1 in a for s2, e2 in b)


def _pattern_key(pattern: str) -> str:
    wildcard = pattern.startswith("*.")
    return ("*." if wildcard else "") + normalize_domain(pattern[2:] if wildcard else pattern)


@block_check("domain_configs", "global_port_ranges", "from_port")
def _domains_once(proxy: SmartProxyConfig, path: str, report: Report) -> None:
    """One name in two domainConfigs entries on a shared port would route by the order of the entries
    (SmartProxy took the first); the route form says which wins with priority instead."""
    seen: list[tuple[str, int, list[tuple[int, int]]]] = []
    for i, entry in enumerate(proxy.domain_configs):
        ports = domain_config_ports(proxy, i)
        for j, domain in enumerate(entry.domains):
            key = _pattern_key(domain)
            other = next((k for name, k, p in seen if name == key and k != i and _overlap(p, ports)), None)
            if other is not None:
                report.error(
                    f"{join(path, 'domainConfigs')}[{i}].domains[{j}]",
                    f"{domain!r} is also in {join(path, 'domainConfigs')}[{other}] on the same port",
                )
            seen.append((key, i, ports))


@block_check("routes")
def _route_names(proxy: SmartProxyConfig, path: str, report: Report) -> None:
    """A route's name keys its counters and log lines: two routes with one name would be indistinguishable."""
    first: dict[str, int] = {}
    for i, route in enumerate(proxy.routes):
        if route.name is None:
            continue
        if route.name in first:
            report.error(
                f"{join(path, 'routes')}[{i}].name",
                f"{route.name!r} is also {join(path, 'routes')}[{first[route.name]}]",
            )
        first.setdefault(route.name, i)


@block_check("sni_enabled", "from_port", "domain_configs", "global_port_ranges", "routes")
def _sni_disabled(proxy: SmartProxyConfig, path: str, report: Report) -> None:
    """With sniEnabled = false, fromPort forwards every connection without reading a name, so a route that
    selects by name there could never be chosen."""
    if proxy.sni_enabled or proxy.from_port is None:
        return
    port = proxy.from_port
    claim = [(port, port)]
    for i in range(len(proxy.domain_configs)):
        if _overlap(domain_config_ports(proxy, i), claim):
            report.error(
                f"{join(path, 'domainConfigs')}[{i}]",
                f"listens on {join(path, 'fromPort')} ({port}), where {join(path, 'sniEnabled')} is false",
            )
    for i, route in enumerate(proxy.routes):
        if route_domains(route.match.domains) and _overlap(port_ranges(route.match.ports), claim):
            report.error(
                f"{join(path, 'routes')}[{i}].match.domains",
                f"selects by name on {join(path, 'fromPort')} ({port}), where {join(path, 'sniEnabled')} is "
                "false",
            )


_TERMINATING = ("terminate", "terminate-and-reencrypt")


def _acme_name_errors(names: tuple[str, ...]) -> str | None:
    """Why ACME (HTTP-01) cannot obtain a certificate for ``names``, or None."""
    if not names:
        return 'ACME needs the names to request: list them in match.domains (not empty or "*")'
    wildcards = [n for n in names if n.startswith("*.")]
    if wildcards:
        # RFC 8555 §8.3 / Let's Encrypt: wildcards need DNS-01, which dcrouter does not answer.
        return (
            f"ACME by HTTP-01 cannot obtain wildcard certificates ({', '.join(wildcards)}); "
            "use certificate files"
        )
    return None


@block_check("routes", "domain_configs", "acme")
def _acme_certificates(proxy: SmartProxyConfig, path: str, report: Report) -> None:
    """A certificate "auto" is one ACME obtains: it needs ACME enabled, a terminating route, and exact names
    (HTTP-01 proves one host name at a time)."""
    acme_on = proxy.acme is not None and proxy.acme.enabled
    for i, route in enumerate(proxy.routes):
        if route.tls is None or route.tls.certificate != "auto":
            continue
        here = f"{join(path, 'routes')}[{i}]"
        if route.tls.mode not in _TERMINATING:
            report.error(join(here, "tls.certificate"), f'"auto" needs {join(here, "tls.mode")} "terminate"')
        if not acme_on:
            report.error(join(here, "tls.certificate"), f'"auto" needs {join(path, "acme.enabled")} = true')
        problem = _acme_name_errors(route_domains(route.match.domains))
        if problem:
            report.error(join(here, "match.domains"), problem)
    if not acme_on:
        return
    for i, entry in enumerate(proxy.domain_configs):
        if entry.use_network_proxy and entry.certificate is None:
            problem = _acme_name_errors(tuple(entry.domains))
            if problem:
                report.error(f"{join(path, 'domainConfigs')}[{i}].domains", problem)


def _certificate_files(certificate: Any, path: str, report: Report) -> None:
    """A ``{certPath, keyPath}`` table must name readable PEM files that match (as smtpConfig.tls)."""
    if isinstance(certificate, Mapping) and not _certificate_spec(certificate):
        pem_files(certificate["certPath"], certificate["keyPath"], None, False, path, report)


_PROFILE_DOC = (
    "TLS policy towards clients (docs/security.md): `intermediate` accepts TLS 1.3 and TLS 1.2 with ECDHE "
    "and AEAD suites only (Mozilla's intermediate profile, without DHE); `modern` accepts TLS 1.3 only. "
    "Not set: `intermediate`."
)


@block_check("routes", "domain_configs")
def _termination_profiles(proxy: SmartProxyConfig, path: str, report: Report) -> None:
    """A TLS profile applies where the proxy ends TLS; elsewhere it would be silently unused."""
    for i, route in enumerate(proxy.routes):
        tls = route.tls
        if tls is not None and tls.tls_profile is not None and tls.mode not in _TERMINATING:
            here = f"{join(path, 'routes')}[{i}].tls"
            report.error(join(here, "tlsProfile"), f'has no effect with mode "{tls.mode}"')
    for i, entry in enumerate(proxy.domain_configs):
        if entry.tls_profile is not None and not entry.use_network_proxy:
            here = f"{join(path, 'domainConfigs')}[{i}]"
            report.error(join(here, "tlsProfile"), "has no effect without useNetworkProxy = true")


@block_check("routes", "domain_configs", "acme")
def _termination_certificates(proxy: SmartProxyConfig, path: str, report: Report) -> None:
    """A terminating route needs a certificate (files, or "auto" for ACME); a certificate on a route that
    does not terminate would be silently unused."""
    acme_on = proxy.acme is not None and proxy.acme.enabled
    for i, route in enumerate(proxy.routes):
        here = f"{join(path, 'routes')}[{i}].tls"
        tls = route.tls
        if tls is None:
            continue
        if tls.mode in _TERMINATING and tls.certificate is None:
            report.error(
                join(here, "certificate"),
                f'required with mode "{tls.mode}": {{certPath, keyPath}}, or "auto" (ACME)',
            )
        elif tls.mode not in _TERMINATING and isinstance(tls.certificate, Mapping):
            report.error(join(here, "certificate"), f'has no effect with mode "{tls.mode}"')
        _certificate_files(tls.certificate, join(here, "certificate"), report)
    for i, entry in enumerate(proxy.domain_configs):
        here = f"{join(path, 'domainConfigs')}[{i}]"
        if entry.use_network_proxy and entry.certificate is None and not acme_on:
            report.error(
                join(here, "useNetworkProxy"),
                f"needs a certificate: {join(here, 'certificate')}, or {join(path, 'acme.enabled')} = true",
            )
        if entry.certificate is not None and not entry.use_network_proxy:
            report.error(join(here, "certificate"), "has no effect without useNetworkProxy = true")
        _certificate_files(entry.certificate, join(here, "certificate"), report)


# --- the schema --------------------------------------------------------------------------------------------


@checked(_range_order)
@dataclass(frozen=True)
class PortRangeConfig:
    from_: int = option(key="from", doc="First port of the range.", check=values.port)
    to: int = option(doc="Last port of the range (inclusive); at least `from`.", check=values.port)


#: Let's Encrypt's ACME directories, chosen by ``acme.useProduction`` when ``acme.directoryUrl`` is not set.
LETSENCRYPT_PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"
LETSENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"


def acme_directory_url(acme: AcmeConfig) -> str:
    """The directory an ``acme`` block uses: ``directoryUrl``, else Let's Encrypt by ``useProduction``."""
    if acme.directory_url:
        return str(acme.directory_url)
    return LETSENCRYPT_PRODUCTION if acme.use_production else LETSENCRYPT_STAGING


def _https_url(value: str) -> str | None:
    # RFC 8555 §6.1: ACME is HTTPS only; a plain http:// directory would let anyone on the path issue for us.
    return None if value.startswith("https://") else f"must be an https:// URL, got {value!r}"


@block_check("enabled", "account_email")
def _acme_account(acme: AcmeConfig, path: str, report: Report) -> None:
    """Let's Encrypt mails expiry warnings and policy changes to the account contact; without one a failing
    renewal goes unnoticed until the certificate expires."""
    if acme.enabled and not acme.account_email:
        report.error(join(path, "accountEmail"), f"required when {join(path, 'enabled')} is true")


@checked(_acme_account)
@dataclass(frozen=True)
class AcmeConfig:
    port: int = option(80, doc="Port the HTTP-01 challenge is answered on.", check=values.port)
    enabled: bool = option(
        False,
        doc="Obtain and renew certificates for terminated domains (domainConfigs with useNetworkProxy, and "
        'routes with `tls.certificate = "auto"`) by HTTP-01.',
    )
    auto_renew: bool = option(True, doc="Renew certificates before they expire.")
    use_production: bool = option(
        False, doc="Use Let's Encrypt's production directory (default: its staging directory)."
    )
    renew_threshold_days: int = option(
        30, doc="Renew a certificate this many days before it expires.", check=values.positive
    )
    account_email: str | None = option(
        None, doc="Contact address of the ACME account; required when enabled.", check=values.not_empty
    )
    directory_url: str | None = option(
        None,
        addition=True,
        doc="ACME directory URL of a private CA; overrides useProduction.",
        check=values.all_of(values.not_empty, _https_url),
    )
    state_directory: str = option(
        "/var/lib/dcrouter/acme",
        addition=True,
        doc="Directory of the ACME account key and the certificates obtained (keys are written mode 0600).",
        check=values.file_path,
    )


@dataclass(frozen=True)
class ProxyDomainConfig:
    domains: list[str] = option(
        doc="Names (TLS SNI or HTTP Host) this entry serves: exact names or `*.example.com` wildcards.",
        check=values.all_of(values.not_empty, values.unique),
        each=values.domain_pattern,
    )
    allowed_ips: list[str] = option(
        factory=list,
        key="allowedIPs",
        doc="CIDRs of clients allowed to connect (a bare address is one host); empty: everyone. "
        "`0.0.0.0/0` is IPv4 only; add `::/0` for IPv6.",
        each=values.cidr,
    )
    blocked_ips: list[str] = option(
        factory=list,
        key="blockedIPs",
        doc="CIDRs of clients refused; wins over allowedIPs.",
        each=values.cidr,
    )
    target_ips: list[str] = option(
        factory=list,
        key="targetIPs",
        doc="Backends (host names or IPs), used round robin; empty: smartProxyConfig.targetIP.",
        check=values.unique,
        each=values.host_or_ip,
    )
    port_ranges: list[PortRangeConfig] = option(
        factory=list,
        doc="Ports this entry applies on, each forwarded to the same port on the backend; empty: "
        "globalPortRanges (same port), else fromPort (forwarded to toPort).",
    )
    connection_timeout: int | None = option(
        None,
        doc="Milliseconds a connection may be idle before it is closed; not set: no idle limit.",
        check=values.duration,
    )
    use_network_proxy: bool = option(
        False,
        doc="Terminate TLS for these domains and forward HTTP/1.1 (with X-Forwarded-For/-Proto) to the "
        "targets; plain HTTP on the entry's ports is redirected to HTTPS. The certificate: `certificate`, "
        "else ACME (`acme.enabled`).",
    )
    certificate: Any = option(
        None,
        addition=True,
        doc="`{certPath, keyPath}`: the certificate a `useNetworkProxy` entry terminates with (else ACME).",
        check=_certificate_files_spec,
    )
    tls_profile: Literal["modern", "intermediate"] | None = option(
        None, addition=True, doc=f"With `useNetworkProxy`: the {_PROFILE_DOC}"
    )
    max_connections: int | None = option(
        None,
        addition=True,
        doc="Concurrent connections this entry forwards; not set: no limit.",
        check=values.positive,
    )


@dataclass(frozen=True)
class RouteMatch:
    ports: Any = option(
        doc="Ports the route listens on: a port, or a list of ports and `{from, to}` tables.",
        check=_port_spec,
        each=_port_item,
    )
    domains: Any = option(
        factory=list,
        doc="Names (TLS SNI or HTTP Host): a pattern or a list of them; `*.example.com` wildcards; empty or "
        '`"*"`: any name, and connections without a name.',
        check=_domains_spec,
        each=_domain_item,
    )
    client_ip: list[str] = option(
        factory=list,
        doc="CIDRs the client must be in for the route to match at all (other clients try the next "
        "route); empty: any client.",
        each=values.cidr,
    )


@dataclass(frozen=True)
class RouteTarget:
    host: Any = option(
        doc="Backend host name or IP, or a list of them used round robin.", check=_host_spec, each=_host_item
    )
    port: Any = option(
        "preserve",
        doc='Backend port, or `"preserve"`: the port the client connected to.',
        check=_target_port_spec,
    )


@checked(_action_target)
@dataclass(frozen=True)
class RouteAction:
    type: Literal["forward", "redirect", "block", "static", "socket-handler"] = option(
        doc="What the route does.",
        unsupported_values=dict.fromkeys(("redirect", "block", "static", "socket-handler"), _FORWARD_ONLY),
    )
    target: RouteTarget | None = option(None, doc="Where `forward` sends connections.")


@dataclass(frozen=True)
class RouteTls:
    mode: Literal["passthrough", "terminate", "terminate-and-reencrypt"] = option(
        "passthrough",
        doc="`passthrough`: TLS bytes are forwarded as they are, routed by SNI. `terminate`: TLS ends here "
        "with `certificate` and HTTP/1.1 goes to the target in plain text (with X-Forwarded-For/-Proto); "
        "plain HTTP on the route's ports is redirected to HTTPS. `terminate-and-reencrypt`: the same, over "
        "TLS to the target (its certificate is not verified).",
    )
    certificate: Any = option(
        None,
        doc='`"auto"`: obtained by ACME (needs `smartProxyConfig.acme.enabled`); or `{certPath, keyPath}`.',
        check=_certificate_spec,
    )
    tls_profile: Literal["modern", "intermediate"] | None = option(
        None, addition=True, doc=f"With a terminating mode: the {_PROFILE_DOC}"
    )


@dataclass(frozen=True)
class RouteSecurity:
    ip_allow_list: list[str] = option(
        factory=list, doc="CIDRs of clients allowed (others are refused); empty: everyone.", each=values.cidr
    )
    ip_block_list: list[str] = option(
        factory=list, doc="CIDRs of clients refused; wins over ipAllowList.", each=values.cidr
    )
    max_connections: int | None = option(
        None, doc="Concurrent connections this route forwards; not set: no limit.", check=values.positive
    )


# kw_only: SmartProxy puts the optional name first, before the required match and action.
@dataclass(frozen=True, kw_only=True)
class RouteConfig:
    name: str | None = option(
        None,
        doc="Shown in logs and metrics; unique. Not set: `smartProxyConfig.routes[<index>]`.",
        check=values.all_of(values.not_empty, values.one_line),
    )
    priority: int = option(0, doc="Among routes matching equally well, the higher priority wins.")
    match: RouteMatch = option(doc="Which connections the route takes.")
    action: RouteAction = option(doc="What happens to them.")
    tls: RouteTls | None = option(None, doc="TLS handling; not set: passthrough.")
    security: RouteSecurity | None = option(None, doc="Client IP rules and connection cap.")
    connection_timeout: int | None = option(
        None,
        addition=True,
        doc="Milliseconds a connection may be idle; as domainConfigs[].connectionTimeout.",
        check=values.duration,
    )


@dataclass(frozen=True)
class DefaultTarget:
    host: str = option(doc="Backend host name or IP.", check=values.host_or_ip)
    port: int | None = option(
        None, doc="Backend port; not set: the port the client connected to.", check=values.port
    )


@checked(
    _from_port_pair,
    _domain_config_ports,
    _domains_once,
    _route_names,
    _sni_disabled,
    _acme_certificates,
    _termination_certificates,
    _termination_profiles,
)
@dataclass(frozen=True)
class SmartProxyConfig:
    from_port: int | None = option(
        None, doc="A port to listen on; connections no route takes go to targetIP:toPort.", check=values.port
    )
    to_port: int | None = option(None, doc="Backend port for fromPort; not set: fromPort.", check=values.port)
    target_ip: str | None = option(
        None,
        key="targetIP",
        doc="Backend for fromPort, and for domainConfigs entries without targetIPs.",
        check=values.host_or_ip,
    )
    sni_enabled: bool = option(
        True, doc="Route connections on fromPort by TLS SNI / HTTP Host; false: forward all to targetIP."
    )
    global_port_ranges: list[PortRangeConfig] = option(
        factory=list, doc="Ports to listen on; domainConfigs entries without portRanges apply on them."
    )
    acme: AcmeConfig | None = option(None, doc="Certificates from an ACME CA (Let's Encrypt).")
    domain_configs: list[ProxyDomainConfig] = option(
        factory=list, doc="Per-domain routing: the seed's form, translated into routes."
    )
    routes: list[RouteConfig] = option(
        factory=list, doc="Routes in SmartProxy's route form; checked before domainConfigs among equals."
    )
    bind_address: str = option(
        "0.0.0.0",
        addition=True,
        doc="IP address the proxy ports listen on (`::` for all IPv6).",
        check=values.ip_address,
    )
    max_connections_per_ip: int = option(
        100,
        key="maxConnectionsPerIP",
        addition=True,
        doc="Concurrent proxied connections per client IP, over all routes.",
        check=values.positive,
    )
    default_target: DefaultTarget | None = option(
        None, addition=True, doc="Where connections no route takes go; not set: they are closed."
    )
    proxy_protocol: Literal["none", "v1", "v2"] = option(
        "none", addition=True, doc="PROXY protocol header sent to backends, so they see the client address."
    )
    trusted_proxies: list[str] = option(
        factory=list,
        addition=True,
        doc="CIDRs allowed to send an incoming PROXY protocol header (v1 or v2); from anyone else it is "
        "refused.",
        each=values.cidr,
    )
    sni_timeout: int = option(
        10_000,
        addition=True,
        doc="Milliseconds to wait for a TLS ClientHello or HTTP Host header before using the default route.",
        check=values.duration,
    )
    max_connection_lifetime: int = option(
        86_400_000,
        addition=True,
        doc="Milliseconds after which any proxied connection is closed.",
        check=values.duration,
    )
    keep_alive: bool = option(
        True, addition=True, doc="TCP keep-alive on both sides of a proxied connection."
    )


@dataclass(frozen=True)
class HttpDomainRoute:
    domain: str = option(
        doc="Host name (HTTP Host or TLS SNI): exact or `*.` wildcard.", check=values.domain_pattern
    )
    target_server_ip: str = option(
        key="targetServerIP", doc="Backend host name or IP.", check=values.host_or_ip
    )
    target_server_port: int = option(doc="Backend port.", check=values.port)
    use_tls: bool = option(
        False,
        doc="The route carries HTTPS: routed by SNI on port 443 and passed through (the backend holds the "
        "certificate); false: plain HTTP routed by Host on port 80.",
    )
    listen_port: int | None = option(
        None, addition=True, doc="Port the proxy takes this route on instead of 80 / 443.", check=values.port
    )


def http_route_port(route: HttpDomainRoute) -> int:
    """The port an ``httpDomainRoutes`` entry is listened on."""
    if route.listen_port is not None:
        return int(route.listen_port)
    return 443 if route.use_tls else 80


def claimed_ports(
    proxy: SmartProxyConfig | None, http_routes: list[HttpDomainRoute] | None
) -> list[tuple[str, int, int]]:
    """``(key path, start, end)`` of every port range the proxy listens on, as written in the file."""
    claims: list[tuple[str, int, int]] = []
    base = "smartProxyConfig"
    if proxy is not None:
        if proxy.from_port is not None:
            claims.append((f"{base}.fromPort", proxy.from_port, proxy.from_port))
        for i, r in enumerate(proxy.global_port_ranges):
            claims.append((f"{base}.globalPortRanges[{i}]", r.from_, r.to))
        for i, entry in enumerate(proxy.domain_configs):
            for j, r in enumerate(entry.port_ranges):
                claims.append((f"{base}.domainConfigs[{i}].portRanges[{j}]", r.from_, r.to))
        for i, route in enumerate(proxy.routes):
            where = f"{base}.routes[{i}].match.ports"
            multiple = isinstance(route.match.ports, list)
            for j, (start, end) in enumerate(port_ranges(route.match.ports)):
                claims.append((f"{where}[{j}]" if multiple else where, start, end))
        if proxy.acme is not None and _terminates_somewhere(proxy):
            # The proxy then listens on acme.port too (challenges, redirects to HTTPS): see proxy/routes.py.
            claims.append((f"{base}.acme.port", proxy.acme.port, proxy.acme.port))
    for i, http_route in enumerate(http_routes or ()):
        port = http_route_port(http_route)
        claims.append((f"httpDomainRoutes[{i}]", port, port))
    return claims


def _terminates_somewhere(proxy: SmartProxyConfig) -> bool:
    """Whether any route of ``proxy`` terminates TLS (a routes[] tls.mode other than passthrough, or a
    domainConfigs entry with useNetworkProxy)."""
    if any(entry.use_network_proxy for entry in proxy.domain_configs):
        return True
    return any(route.tls is not None and route.tls.mode != "passthrough" for route in proxy.routes)
