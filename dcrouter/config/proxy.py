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

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dcrouter.config import values
from dcrouter.config.ratelimits import RateConfig
from dcrouter.config.ratelimits import window as rate_window
from dcrouter.config.schema import Report, block_check, checked, join, option
from dcrouter.config.tls import pem_files
from dcrouter.net.domains import normalize_domain
from dcrouter.passwords import is_password_hash

_LATER = "it is planned (issue 12) and refused rather than silently ignored"
#: The HTTP statuses a redirect may answer with (RFC 9110 §15.4).
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
#: The placeholders a redirect's ``to`` may use (see docs/proxy.md).
REDIRECT_PLACEHOLDERS = ("domain", "path", "query", "port")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")

# --- one-shape views of multi-shape values -----------------------------------------------------------------


def port_ranges(value: Any) -> list[tuple[int, int]]:
    """``(start, end)`` pairs of a checked ``match.ports`` value: ``443``, ``[80, 443]`` or
    ``[{from = 8000, to = 8099}]`` (integers and tables may be mixed in one list)."""
    items = value if isinstance(value, list) else [value]
    return [(item, item) if isinstance(item, int) else (item["from"], item["to"]) for item in items]


def hosts(value: Any) -> tuple[str, ...]:
    """The target hosts of a checked ``action.target.host`` value (a string or a list of strings)."""
    return (value,) if isinstance(value, str) else tuple(value)


#: ``action.target.port`` as a template: the port the client connected to, plus or minus a number.
PORT_TEMPLATE = re.compile(r"\{port\}(?:\s*([+-])\s*(\d{1,5}))?")


def target_port(value: Any) -> int | None:
    """The port of a checked ``action.target.port``; None for ``"preserve"`` and templates (the port
    connected to, moved by :func:`port_offset`)."""
    return None if isinstance(value, str) else int(value)


def port_offset(value: Any) -> int:
    """What a checked ``action.target.port`` template adds to the port connected to (0 otherwise)."""
    match = PORT_TEMPLATE.fullmatch(value) if isinstance(value, str) else None
    if match is None or match.group(1) is None:
        return 0
    return int(match.group(2)) * (1 if match.group(1) == "+" else -1)


def route_domains(value: Any) -> tuple[str, ...]:
    """The domain patterns of a checked ``match.domains`` value; ``()`` means any name (``"*"`` is
    SmartProxy's spelling of that)."""
    items = [value] if isinstance(value, str) else list(value)
    return () if "*" in items else tuple(items)


def route_tls(route: Any) -> tuple[Any, str]:
    """A route's TLS block and its key relative to the route: SmartProxy's ``action.tls``, or dcrouter's
    older ``tls`` beside ``action`` (both load; setting both is an error)."""
    action_tls = getattr(route.action, "tls", None)
    if action_tls is not None:
        return action_tls, "action.tls"
    return route.tls, "tls"


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
    if value is None or value in ("auto", "store"):
        return None
    if not isinstance(value, Mapping):
        return f'expected "auto", "store" or a {{certPath, keyPath}} table, got {value!r}'
    if set(value) != {"certPath", "keyPath"}:
        keys = sorted(map(str, value))
        return f"a certificate table has exactly the keys 'certPath' and 'keyPath', got {keys}"
    if not all(isinstance(v, str) and v for v in value.values()):
        return "'certPath' and 'keyPath' must be file names"
    return None


def _certificate_files_spec(value: Any) -> str | None:
    if value == "store":
        return '"store" is a routes[].tls.certificate value; here leave certificate out and set acme'
    if value == "auto":
        return '"auto" is not needed here: with acme.enabled, useNetworkProxy entries get ACME certificates'
    return _certificate_spec(value)


# --- block checks ------------------------------------------------------------------------------------------


@block_check("from_", "to")
def _range_order(block: PortRangeConfig, path: str, report: Report) -> None:
    if block.from_ > block.to:
        report.error(join(path, "to"), f"{block.to} is less than {join(path, 'from')} ({block.from_})")


#: The table each action type is configured by (``forward``: ``target``), and the types that answer HTTP.
_ACTION_TABLES = {
    "forward": "target",
    "redirect": "redirect",
    "static": "static",
    "socket-handler": "socketHandler",
}


@block_check("type", "target", "load_balancing", "health_check")
def _action_backends(action: RouteAction, path: str, report: Report) -> None:
    """Balancing and health checks are about targets: elsewhere they would be silently unused."""
    if action.type != "forward":
        if action.load_balancing != "roundRobin":
            report.error(join(path, "loadBalancing"), f'has no effect with type "{action.type}"')
        if action.health_check is not None:
            report.error(join(path, "healthCheck"), f'has no effect with type "{action.type}"')
        return
    check = action.health_check
    if (
        check is not None
        and check.port is None
        and action.target is not None
        and target_port(action.target.port) is None
    ):
        report.error(
            join(path, "healthCheck.port"),
            f"required: the target's port ({action.target.port!r}) depends on the connection",
        )


@block_check("type", "target", "redirect", "static", "status", "socket_handler")
def _action_target(action: RouteAction, path: str, report: Report) -> None:
    """Each type needs its own table and takes no other's: a ``redirect`` table on a ``forward`` route
    would otherwise be silently unused."""
    given = {
        "target": action.target,
        "redirect": action.redirect,
        "static": action.static,
        "socketHandler": action.socket_handler,
        "status": action.status,
    }
    wanted = _ACTION_TABLES.get(action.type)
    if wanted is not None and given[wanted] is None:
        report.error(join(path, wanted), f'required for type "{action.type}"')
    for key, value in given.items():
        if value is None or key == wanted or (key == "status" and action.type == "block"):
            continue
        report.error(join(path, key), f'has no effect with type "{action.type}"')


def _redirect_template(value: str) -> str | None:
    for name in _PLACEHOLDER.findall(value):
        if name not in REDIRECT_PLACEHOLDERS:
            known = ", ".join(f"{{{n}}}" for n in REDIRECT_PLACEHOLDERS)
            return f"unknown placeholder {{{name}}} (known: {known})"
    if "{" in _PLACEHOLDER.sub("", value) or "}" in _PLACEHOLDER.sub("", value):
        return f"unbalanced braces in {value!r}"
    return values.one_line(value)


def _redirect_status(value: int) -> str | None:
    if value not in REDIRECT_STATUSES:
        return f"a redirect status is one of {', '.join(map(str, REDIRECT_STATUSES))}: {value}"
    return None


def _http_status(value: int) -> str | None:
    return None if 200 <= value <= 599 else f"an HTTP status from 200 to 599: {value}"


def _block_status(value: int) -> str | None:
    return None if 400 <= value <= 599 else f"a block answers an error status (400-599): {value}"


def _directory(value: str) -> str | None:
    import os

    if not os.path.isdir(value):
        return f"no such directory: {value!r}"
    return None


def _index_name(value: str) -> str | None:
    if not value or "/" in value or value in (".", ".."):
        return f"an index is a file name in the directory, got {value!r}"
    return None


@block_check("root", "content")
def _static_source(static: RouteStatic, path: str, report: Report) -> None:
    """A static action serves files from ``root`` or answers ``content``, one of the two."""
    if (static.root is None) == (static.content is None):
        report.error(path, "set exactly one of 'root' (a directory of files) and 'content' (a fixed body)")


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
#: Action types the proxy answers itself over HTTP (plain, or after terminating TLS).
HTTP_ACTIONS = ("redirect", "static")


@block_check("routes")
def _route_actions(proxy: SmartProxyConfig, path: str, report: Report) -> None:
    """Where the TLS block is (one place only), and which TLS modes each action can work with."""
    for i, route in enumerate(proxy.routes):
        here = f"{join(path, 'routes')}[{i}]"
        if route.tls is not None and route.action.tls is not None:
            report.error(join(here, "tls"), f"set both here and as {join(here, 'action.tls')}; keep one")
        tls, key = route_tls(route)
        mode = tls.mode if tls is not None else "passthrough"
        kind = route.action.type
        if kind in HTTP_ACTIONS and mode == "terminate-and-reencrypt":
            report.error(join(here, key + ".mode"), f'a "{kind}" action has no target to re-encrypt to')
        if kind in HTTP_ACTIONS and tls is not None and mode == "passthrough":
            report.error(
                join(here, key + ".mode"),
                f'a "{kind}" action answers HTTP itself: it needs "terminate" (HTTPS) or no tls (plain HTTP)',
            )
        conditions = [k for k, v in (("path", route.match.path), ("headers", route.match.headers)) if v]
        for name in conditions:
            if mode == "passthrough" and tls is not None:
                report.error(
                    join(here, f"match.{name}"), "is read from HTTP requests: passed-through TLS hides them"
                )
            if kind == "socket-handler":
                report.error(
                    join(here, f"match.{name}"), 'is read from HTTP requests: a "socket-handler" gets none'
                )
        for where, given in (
            (
                join(here, "security.basicAuth"),
                route.security is not None and route.security.basic_auth is not None,
            ),
            (join(here, "action.headers"), route.action.headers is not None),
            (
                join(here, "security.jwtAuth"),
                route.security is not None and route.security.jwt_auth is not None,
            ),
            (
                join(here, "security.rateLimit"),
                route.security is not None and route.security.rate_limit is not None,
            ),
        ):
            if not given:
                continue
            if mode == "passthrough" and tls is not None:
                report.error(where, "works on HTTP requests: passed-through TLS hides them")
            if kind == "socket-handler" or (kind == "block" and route.action.status is None):
                report.error(where, f'has no effect with action type "{kind}"')
        security = route.security
        if security is not None and security.basic_auth is not None and security.jwt_auth is not None:
            report.error(
                join(here, "security.jwtAuth"), "a request carries one Authorization: basicAuth or jwtAuth"
            )
        target = getattr(route.action, "target", None)
        if target is not None and target.protocol == "h2c":
            where = join(here, "action.target.protocol")
            if kind != "forward":
                report.error(where, f'has no effect with action type "{kind}"')
            elif mode == "terminate-and-reencrypt":
                report.error(
                    where,
                    '"h2c" is cleartext: not with "terminate-and-reencrypt" (HTTP/2 over TLS '
                    "to backends is not offered)",
                )
            elif mode == "passthrough" and tls is not None:
                report.error(where, '"h2c" forwards HTTP requests: passed-through TLS hides them')
        if kind == "socket-handler" and mode != "passthrough":
            report.error(join(here, key + ".mode"), f'has no effect with action type "{kind}"')


def _acme_name_errors(names: tuple[str, ...], challenge: str) -> str | None:
    """Why ACME (by ``challenge``) cannot obtain a certificate for ``names``, or None. Whether DNS-01 names
    lie in the DNS server's zones is checked at the top level (dcrouter.config.options)."""
    if not names:
        return 'ACME needs the names to request: list them in match.domains (not empty or "*")'
    wildcards = [n for n in names if n.startswith("*.")]
    if wildcards and challenge != "dns-01":
        # RFC 8555 §8.3 / Let's Encrypt: wildcards need DNS-01, which dcrouter does not answer.
        return (
            f"ACME by HTTP-01 cannot obtain wildcard certificates ({', '.join(wildcards)}); "
            'use acme.challenge = "dns-01" with dnsServerConfig, or certificate files'
        )
    return None


def acme_names(proxy: SmartProxyConfig, path: str) -> list[tuple[str, str]]:
    """``(key path, name)`` of every name ACME orders a certificate for (as
    :func:`dcrouter.acme.service.certificate_orders` picks them)."""
    found: list[tuple[str, str]] = []
    for i, route in enumerate(proxy.routes):
        tls, _ = route_tls(route)
        if tls is not None and tls.mode in _TERMINATING and tls.certificate == "auto":
            where = f"{join(path, 'routes')}[{i}].match.domains"
            found.extend((where, name) for name in route_domains(route.match.domains))
    for i, entry in enumerate(proxy.domain_configs):
        if entry.use_network_proxy and entry.certificate is None:
            where = f"{join(path, 'domainConfigs')}[{i}].domains"
            found.extend((where, name) for name in entry.domains)
    return found


@block_check("routes", "domain_configs", "acme")
def _acme_certificates(proxy: SmartProxyConfig, path: str, report: Report) -> None:
    """A certificate "auto" is one ACME obtains: it needs ACME enabled, a terminating route, and exact names
    (HTTP-01 proves one host name at a time)."""
    acme_on = proxy.acme is not None and proxy.acme.enabled
    challenge = proxy.acme.challenge if proxy.acme is not None else "http-01"
    for i, route in enumerate(proxy.routes):
        tls, key = route_tls(route)
        if tls is None or tls.certificate != "auto":
            continue
        here = f"{join(path, 'routes')}[{i}]"
        if tls.mode not in _TERMINATING:
            report.error(
                join(here, f"{key}.certificate"), f'"auto" needs {join(here, key + ".mode")} "terminate"'
            )
        if not acme_on:
            report.error(
                join(here, f"{key}.certificate"), f'"auto" needs {join(path, "acme.enabled")} = true'
            )
        problem = _acme_name_errors(route_domains(route.match.domains), challenge)
        if problem:
            report.error(join(here, "match.domains"), problem)
    if not acme_on:
        return
    for i, entry in enumerate(proxy.domain_configs):
        if entry.use_network_proxy and entry.certificate is None:
            problem = _acme_name_errors(tuple(entry.domains), challenge)
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
        tls, key = route_tls(route)
        if tls is not None and tls.tls_profile is not None and tls.mode not in _TERMINATING:
            here = f"{join(path, 'routes')}[{i}].{key}"
            report.error(join(here, "tlsProfile"), f'has no effect with mode "{tls.mode}"')
        if tls is not None and not tls.http2 and tls.mode not in _TERMINATING:
            here = f"{join(path, 'routes')}[{i}].{key}"
            report.error(join(here, "http2"), f'has no effect with mode "{tls.mode}"')
        if route.action.websocket is not None and (
            route.action.type != "forward" or (tls is not None and tls.mode not in _TERMINATING)
        ):
            here = f"{join(path, 'routes')}[{i}].action.websocket"
            report.error(here, "applies to forward routes that read HTTP (terminated, or plain HTTP)")
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
        tls, key = route_tls(route)
        here = f"{join(path, 'routes')}[{i}].{key}"
        if tls is None:
            continue
        if tls.mode in _TERMINATING and tls.certificate is None:
            report.error(
                join(here, "certificate"),
                f'required with mode "{tls.mode}": {{certPath, keyPath}}, "auto" (ACME) or "store"',
            )
        elif (tls.mode not in _TERMINATING and tls.certificate == "store") or (
            tls.mode not in _TERMINATING and isinstance(tls.certificate, Mapping)
        ):
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
    challenge: Literal["http-01", "dns-01"] = option(
        "http-01",
        addition=True,
        doc='How control of a name is proven: `"http-01"` (answered on `port`) or `"dns-01"` (TXT records '
        "published by the router's own DNS server, `dnsServerConfig`, which must serve the names' zones; "
        "the only way to a wildcard certificate).",
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
    connection_rate: RateConfig | None = option(
        None,
        addition=True,
        doc="New connections this entry forwards per window, from all clients together (more are closed); "
        "not set: no limit.",
    )


#: The ``match.tlsVersion`` names, as ``smtpConfig.tls.minVersion`` spells them.
TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")


def _tls_version(value: str) -> str | None:
    return None if value in TLS_VERSIONS else f"one of {', '.join(TLS_VERSIONS)}, got {value!r}"


def _path_pattern(value: str) -> str | None:
    if not value.startswith("/"):
        return f"a path starts with '/': {value!r}"
    return values.one_line(value)


def header_pattern(value: str) -> re.Pattern[str] | None:
    """The regular expression a ``match.headers`` value between slashes holds; None for an exact value."""
    if len(value) >= 2 and value.startswith("/") and value.endswith("/"):
        return re.compile(value[1:-1])
    return None


def _header_patterns(value: dict[str, str]) -> str | None:
    for name, pattern in value.items():
        if not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name):
            return f"not a header field name: {name!r}"
        try:
            header_pattern(pattern)
        except re.error as error:
            return f"{name}: not a regular expression: {error}"
    return None


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
    path: str | None = option(
        None,
        doc="HTTP routes: the request path (without the query) is this prefix (`/api` takes `/api` and "
        "`/api/...`, not `/apix`; `/api/` takes what starts with it) or matches this glob (`*`, `?`, "
        "`[...]`, e.g. `/img/*.png`).",
        check=_path_pattern,
    )
    headers: dict[str, str] | None = option(
        None,
        doc="HTTP routes: request header fields (name = value) that must all be present; a value is exact, "
        "or a regular expression between slashes (`/^curl\\//`).",
        check=_header_patterns,
    )
    tls_version: list[str] = option(
        factory=list,
        doc='TLS versions (`"TLSv1.2"`, `"TLSv1.3"`): the highest version the ClientHello offers must be one '
        "of them; "
        "a connection that is not TLS does not match. Empty: any.",
        check=values.unique,
        each=_tls_version,
    )


def _target_port_spec(value: Any) -> str | None:
    if value == "preserve":
        return None
    if isinstance(value, str) and PORT_TEMPLATE.fullmatch(value):
        return None
    if not _is_int(value):
        return f'expected a port number, "preserve" or "{{port}}+N" / "{{port}}-N", got {value!r}'
    return values.port(value)


@block_check("host", "weights")
def _target_weights(target: RouteTarget, path: str, report: Report) -> None:
    hosts = [target.host] if isinstance(target.host, str) else list(target.host)
    if target.weights and len(target.weights) != len(hosts):
        report.error(
            join(path, "weights"), f"one weight per host: {len(hosts)} hosts, {len(target.weights)} weights"
        )


@checked(_target_weights)
@dataclass(frozen=True)
class RouteTarget:
    host: Any = option(
        doc="Backend host name or IP, or a list of them, shared out by the action's `loadBalancing`.",
        check=_host_spec,
        each=_host_item,
    )
    port: Any = option(
        "preserve",
        doc='Backend port; `"preserve"` (or `"{port}"`): the port the client connected to; `"{port}+N"` / '
        '`"{port}-N"`: that port moved by N.',
        check=_target_port_spec,
    )
    weights: list[int] = option(
        factory=list,
        addition=True,
        doc="One positive weight per `host`, in the same order (a host of weight 2 gets twice the share of "
        "one of weight 1); empty: all 1.",
        each=values.all_of(values.positive, lambda v: "at most 1000" if v > 1000 else None),
    )
    protocol: Literal["http/1.1", "h2c"] = option(
        "http/1.1",
        addition=True,
        doc="How HTTP requests go to the backend: `http/1.1`, or `h2c` (HTTP/2 over cleartext TCP with prior "
        "knowledge, RFC 9113 §3.3: requests share a few multiplexed connections per target). `h2c` needs a "
        'route that reads HTTP requests and reaches its backend in cleartext: `tls.mode = "terminate"`, or '
        "a plain-HTTP route (no `tls`); not a passthrough or `terminate-and-reencrypt` route. WebSocket "
        "upgrades on an `h2c` route still go to the backend over HTTP/1.1.",
    )


def _http_path(value: str) -> str | None:
    if not value.startswith("/") or any(c in value for c in " \r\n\t"):
        return f"an absolute path without spaces, such as /healthz, got {value!r}"
    return None


def _expect_status(value: int) -> str | None:
    return None if 100 <= value <= 599 else f"an HTTP status (100 to 599), got {value}"


@block_check("type", "path", "expect_status", "host")
def _check_kind_fields(check: HealthCheckConfig, path: str, report: Report) -> None:
    if check.type == "http":
        return
    for key, value, default in (
        ("path", check.path, "/"),
        ("expectStatus", check.expect_status, [200]),
        ("host", check.host, None),
    ):
        if value != default:
            report.error(join(path, key), f'has no effect with type "{check.type}" (only "http")')


@checked(_check_kind_fields)
@dataclass(frozen=True)
class HealthCheckConfig:
    type: Literal["tcp", "tls", "http"] = option(
        "tcp",
        doc="`tcp`: a connection is accepted; `tls`: a TLS handshake completes (verified as the route "
        "verifies its backends); `http`: `GET path` answers a status in `expectStatus` (over TLS on a "
        "`terminate-and-reencrypt` route).",
    )
    interval: int = option(
        2000, doc="Milliseconds between checks of each target (HAProxy's `inter`).", check=values.duration
    )
    timeout: int = option(
        1000, doc="Milliseconds a check may take; longer is a failure.", check=values.duration
    )
    rise: int = option(2, doc="Checks passed in a row that bring a down target back.", check=values.positive)
    fall: int = option(
        3,
        doc="Checks failed in a row that take a target down (no new connection until it rises).",
        check=values.positive,
    )
    path: str = option("/", doc="For `http`: the path requested.", check=_http_path)
    expect_status: list[int] = option(
        factory=lambda: [200],
        doc="For `http`: the statuses of a healthy target.",
        check=values.not_empty,
        each=_expect_status,
    )
    host: str | None = option(
        None, doc="For `http`: the `Host` header; not set: the target's host.", check=values.host_name
    )
    port: int | None = option(
        None,
        doc='The port checked; not set: the target\'s port (then required to be a number, not `"preserve"`).',
        check=values.port,
    )


@dataclass(frozen=True)
class RouteRedirect:
    to: str = option(
        doc="Where to: a URL template with `{domain}` (the request's host name), `{path}` (its path), "
        "`{query}` (`?` and its query, or nothing) and `{port}` (the port the client connected to).",
        check=_redirect_template,
    )
    status: int = option(301, doc="301, 302, 303, 307 or 308.", check=_redirect_status)


@checked(_static_source)
@dataclass(frozen=True)
class RouteStatic:
    root: str | None = option(
        None,
        doc="Directory whose files are served (GET and HEAD; content type by file name; nothing outside it, "
        "also through symbolic links).",
        check=_directory,
    )
    index: list[str] = option(
        factory=lambda: ["index.html"],
        doc="With `root`: files served for a directory's path, the first that exists.",
        each=_index_name,
    )
    content: str | None = option(None, doc="A fixed body answered to every request (instead of `root`).")
    content_type: str = option(
        "text/plain; charset=utf-8", doc="With `content`: its Content-Type.", check=values.one_line
    )
    status: int = option(200, doc="With `content`: the status answered.", check=_http_status)


@block_check("mode", "verify_backend", "backend_ca_file", "server_name")
def _backend_options(tls: RouteTls, path: str, report: Report) -> None:
    if tls.mode == "terminate-and-reencrypt":
        if not tls.verify_backend and tls.backend_ca_file is not None:
            report.error(join(path, "backendCaFile"), "has no effect with verifyBackend = false")
        return
    for key, value, default in (
        ("verifyBackend", tls.verify_backend, True),
        ("backendCaFile", tls.backend_ca_file, None),
        ("serverName", tls.server_name, None),
    ):
        if value != default:
            report.error(join(path, key), f'has no effect with mode "{tls.mode}"')


@checked(_backend_options)
@dataclass(frozen=True)
class RouteTls:
    mode: Literal["passthrough", "terminate", "terminate-and-reencrypt"] = option(
        "passthrough",
        doc="`passthrough`: TLS bytes are forwarded as they are, routed by SNI. `terminate`: TLS ends here "
        "with `certificate` and HTTP/1.1 goes to the target in plain text (with X-Forwarded-For/-Proto); "
        "plain HTTP on the route's ports is redirected to HTTPS. `terminate-and-reencrypt`: the same, over "
        "TLS to the target, whose certificate is verified (`verifyBackend`).",
    )
    certificate: Any = option(
        None,
        doc='`"auto"`: obtained by ACME (needs `smartProxyConfig.acme.enabled`); `{certPath, keyPath}`; or '
        "`\"store\"`: whatever the router's certificate store holds for the name, by default SMTP's "
        "certificate "
        "(`smtpConfig.tls`, self-signed with `selfSigned`).",
        check=_certificate_spec,
    )
    tls_profile: Literal["modern", "intermediate"] | None = option(
        None, addition=True, doc=f"With a terminating mode: the {_PROFILE_DOC}"
    )
    verify_backend: bool = option(
        True,
        addition=True,
        doc="With `terminate-and-reencrypt`: verify the target's certificate (chain to `backendCaFile`, or "
        "the system's CAs; name `serverName`, or the target host). `false` connects to any certificate "
        "(a self-signed backend): say so knowingly, the hop is then open to a man in the middle.",
    )
    backend_ca_file: str | None = option(
        None,
        addition=True,
        doc="With `terminate-and-reencrypt`: PEM file of the CA certificates the target's certificate must "
        "chain to (instead of the system's).",
        check=values.ca_certificates_file,
    )
    server_name: str | None = option(
        None,
        addition=True,
        doc="With `terminate-and-reencrypt`: the name sent as SNI to the target and verified in its "
        "certificate; not set: the target host (an IP address is verified as one).",
        check=values.host_name,
    )
    http2: bool = option(
        True,
        addition=True,
        doc="With a terminating mode: offer HTTP/2 (`h2`) by ALPN besides HTTP/1.1; each stream goes to the "
        "target as an HTTP/1.1 request (see docs/proxy.md, HTTP/2). false: ALPN offers `http/1.1` only.",
    )


def _password_hash(value: str) -> str | None:
    if not is_password_hash(value):
        return "must be a hash made by `dcrouter hash-password` (scrypt$...), not a password"
    return None


@dataclass(frozen=True)
class BasicAuthUser:
    username: str = option(
        doc="User name (no colon: Basic credentials are user:password).",
        check=values.all_of(
            values.not_empty, values.one_line, lambda v: "':' is not allowed" if ":" in v else None
        ),
    )
    password: str = option(
        doc="A hash made by `dcrouter hash-password` (`scrypt$...`).", check=_password_hash
    )


def _unique_users(value: list[BasicAuthUser]) -> str | None:
    return values.unique([user.username for user in value])


@dataclass(frozen=True)
class BasicAuthConfig:
    users: list[BasicAuthUser] = option(
        doc="Accounts; passwords checked in constant time, off the reactor.",
        check=values.all_of(values.not_empty, _unique_users),
    )
    realm: str = option("dcrouter", doc="The realm the 401 challenge names.", check=values.one_line)


def _readable_pem_key(value: str) -> str | None:
    try:
        with open(value, "rb") as handle:
            data = handle.read()
    except OSError as error:
        return f"cannot read {value!r}: {error.strerror}"
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        if b"BEGIN CERTIFICATE" in data:
            x509.load_pem_x509_certificate(data)
        else:
            load_pem_public_key(data)
    except ValueError as error:
        return f"{value!r} holds no PEM public key or certificate: {error}"
    return None


def _readable_jwks(value: str) -> str | None:
    import json

    from joserfc.errors import JoseError
    from joserfc.jwk import KeySet

    try:
        with open(value, "rb") as handle:
            document = json.loads(handle.read())
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError('no "keys" list')
        KeySet.import_key_set(document)  # type: ignore[arg-type]
    except OSError as error:
        return f"cannot read {value!r}: {error.strerror}"
    except (JoseError, ValueError, TypeError, KeyError) as error:
        return f"{value!r} is not a usable JWKS: {error}"
    return None


@block_check("key_file", "jwks_file", "jwks_url")
def _jwt_key_source(jwt_auth: JwtAuthConfig, path: str, report: Report) -> None:
    given = [
        k
        for k, v in (
            ("keyFile", jwt_auth.key_file),
            ("jwksFile", jwt_auth.jwks_file),
            ("jwksUrl", jwt_auth.jwks_url),
        )
        if v
    ]
    if len(given) != 1:
        report.error(
            path, f"set exactly one of keyFile, jwksFile and jwksUrl (got {', '.join(given) or 'none'})"
        )


#: Public-key JWS algorithms (RFC 7518, RFC 8037): an HMAC secret would be one more secret in the config.
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


def _jwt_algorithm(value: str) -> str | None:
    if value not in JWT_ALGORITHMS:
        return f"one of {', '.join(JWT_ALGORITHMS)} (public-key algorithms only), got {value!r}"
    return None


@checked(_jwt_key_source)
@dataclass(frozen=True)
class JwtAuthConfig:
    key_file: str | None = option(
        None,
        doc="PEM file of the public key (or a certificate) tokens are signed with.",
        check=_readable_pem_key,
    )
    jwks_file: str | None = option(None, doc="JWKS file of the keys (by `kid`).", check=_readable_jwks)
    jwks_url: str | None = option(
        None,
        doc="JWKS URL (`https://`), fetched at start, every `jwksRefresh`, and when a token names an unknown "
        "`kid` (at most once a minute).",
        check=values.all_of(
            values.one_line, lambda v: None if v.startswith("https://") else "must be an https:// URL"
        ),
    )
    algorithms: list[str] = option(
        factory=lambda: ["RS256", "ES256", "EdDSA"],
        doc="Accepted signature algorithms (public-key only).",
        check=values.all_of(values.not_empty, values.unique),
        each=_jwt_algorithm,
    )
    issuer: str | None = option(None, doc="Required `iss` claim.", check=values.one_line)
    audience: list[str] = option(factory=list, doc="Accepted `aud` values; empty: `aud` not checked.")
    leeway: int = option(
        30_000, doc="Milliseconds of clock difference allowed for `exp` and `nbf`.", check=values.non_negative
    )
    jwks_refresh: int = option(
        3_600_000, doc="Milliseconds between fetches of `jwksUrl`.", check=values.duration
    )
    realm: str = option("dcrouter", doc="The realm the 401 challenge names.", check=values.one_line)


@block_check("key_by", "header_name")
def _rate_key(config: RequestRateConfig, path: str, report: Report) -> None:
    if config.key_by == "header" and not config.header_name:
        report.error(join(path, "headerName"), 'required with keyBy = "header"')
    if config.key_by != "header" and config.header_name:
        report.error(join(path, "headerName"), f'has no effect with keyBy = "{config.key_by}"')


@checked(_rate_key)
@dataclass(frozen=True)
class RequestRateConfig:
    count: int = option(doc="Requests allowed per window (SmartProxy's maxRequests).", check=values.positive)
    window: int = option(
        60_000,
        doc="The window in milliseconds (SmartProxy wrote seconds), one second to one day.",
        check=rate_window,
    )
    burst: int | None = option(
        None,
        doc="Requests allowed at once from idle (default: count); past it, spaced window/count apart (GCRA).",
        check=values.positive,
    )
    key_by: Literal["ip", "path", "header"] = option(
        "ip", doc="What is counted apart: the client address, the request path, or a header's value."
    )
    header_name: str | None = option(None, doc='With keyBy = "header": the field whose value keys the count.')


@dataclass(frozen=True)
class RouteSecurity:
    ip_allow_list: list[str] = option(
        factory=list, doc="CIDRs of clients allowed (others are refused); empty: everyone.", each=values.cidr
    )
    ip_block_list: list[str] = option(
        factory=list, doc="CIDRs of clients refused; wins over ipAllowList.", each=values.cidr
    )
    max_connections: int | None = option(
        None, doc="Concurrent connections this route takes; not set: no limit.", check=values.positive
    )
    connection_rate: RateConfig | None = option(
        None,
        addition=True,
        doc="New connections this route forwards per window, from all clients together (more are closed; "
        "docs/limits.md); not set: no limit.",
    )
    basic_auth: BasicAuthConfig | None = option(
        None,
        doc="HTTP Basic authentication of every request (HTTP routes: terminated, or plain HTTP); a request "
        "without valid credentials is answered `401` with a `WWW-Authenticate` challenge.",
    )
    jwt_auth: JwtAuthConfig | None = option(
        None,
        doc="JWT bearer tokens (`Authorization: Bearer`) required on every request (HTTP routes); "
        "else `401`.",
    )
    rate_limit: RequestRateConfig | None = option(
        None,
        doc="HTTP requests per client (or per path, or per header value) over a window (HTTP routes; "
        "more are answered `429` with `Retry-After`).",
    )


#: Fields an action may not set or remove: they frame the message or belong to the hop (RFC 9110 §7.6.1),
#: or the proxy sets them itself.
RESERVED_FIELDS = frozenset(
    {
        "connection",
        "content-length",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "x-forwarded-for",
        "x-forwarded-proto",
    }
)
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _field_name(name: str) -> str | None:
    if not _FIELD_NAME.fullmatch(name):
        return f"not a header field name: {name!r}"
    if name.lower() in RESERVED_FIELDS:
        return f"{name} is set by the proxy or frames the message; it cannot be changed"
    return None


def _field_values(value: dict[str, str]) -> str | None:
    for name, text in value.items():
        problem = _field_name(name) or values.one_line(text)
        if problem:
            return problem
    return None


@dataclass(frozen=True)
class HeaderChanges:
    set_fields: dict[str, str] = option(
        factory=dict,
        key="set",
        doc="Fields to set (name = value), replacing any of that name.",
        check=_field_values,
    )
    remove: list[str] = option(factory=list, doc="Names of fields to remove.", each=_field_name)


@dataclass(frozen=True)
class RouteHeaders:
    request: HeaderChanges | None = option(None, doc="Changes to requests, before they are forwarded.")
    response: HeaderChanges | None = option(
        None, doc="Changes to responses (the target's, and the proxy's own answers: `set` only)."
    )


@dataclass(frozen=True)
class RouteWebsocket:
    idle_timeout: int | None = option(
        None,
        doc="Milliseconds an upgraded connection (after `101 Switching Protocols`) may go without a byte "
        "either way; not set: no idle limit (the route's `connectionTimeout` ends with the upgrade).",
        check=values.duration,
    )
    max_age: int | None = option(
        None,
        doc="Milliseconds an upgraded connection may last in all; not set: no limit "
        "(`maxConnectionLifetime` does not apply to it).",
        check=values.duration,
    )


@checked(_action_target, _action_backends)
@dataclass(frozen=True)
class RouteAction:
    type: Literal["forward", "redirect", "block", "static", "socket-handler"] = option(
        doc="What the route does: `forward` to `target`; answer with a `redirect` or `static` content "
        "(HTTP, plain or terminated); `block` (close, or answer `status` on HTTP); hand the connection "
        "to a `socketHandler`.",
    )
    target: RouteTarget | None = option(None, doc="Where `forward` sends connections.")
    redirect: RouteRedirect | None = option(None, doc="For `redirect`: where to, and the status.")
    static: RouteStatic | None = option(None, doc="For `static`: files from a directory, or a fixed body.")
    status: int | None = option(
        None,
        doc="For `block`: the HTTP status answered to requests (the route must read HTTP: plain, or "
        "terminated); not set: the connection is closed without a byte.",
        check=_block_status,
    )
    socket_handler: str | None = option(
        None,
        doc='For `socket-handler`: `"smtp"` (dcrouter\'s own ESMTP server), an entry point name in the group '
        "`dcrouter.socket_handlers`, or a dotted path (`package.module:handler`).",
        check=values.all_of(values.not_empty, values.one_line),
    )
    tls: RouteTls | None = option(
        None, doc="TLS handling, SmartProxy's place for it (the same as the route's own `tls`; set one)."
    )
    headers: RouteHeaders | None = option(
        None,
        doc="HTTP routes: header fields set or removed on requests (towards the target) and responses "
        "(towards the client).",
    )
    load_balancing: Literal["roundRobin", "leastConnections", "sourceHash"] = option(
        "roundRobin",
        addition=True,
        doc="For `forward`: which target a new connection tries first (the others follow as failover). "
        "`roundRobin`: in turn, by `target.weights`; `leastConnections`: the fewest open connections per "
        "weight; `sourceHash`: by client IP, sticky (consistent hashing: a target going down moves only "
        "its own clients).",
    )
    health_check: HealthCheckConfig | None = option(
        None,
        addition=True,
        doc="For `forward`: active checks of every target (as HAProxy's `check inter rise fall`); a target "
        "that fails `fall` in a row gets no new connection until it passes `rise` in a row. Not set: "
        "passive only (a target refusing a connection is tried last for 30 seconds).",
    )
    websocket: RouteWebsocket | None = option(
        None,
        addition=True,
        doc="Terminated HTTP routes that forward: the idle and age limits of WebSocket connections once "
        "upgraded; not set: neither limit.",
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


@dataclass(frozen=True)
class Http2Config:
    max_concurrent_streams: int = option(
        100,
        doc="Streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).",
        check=values.at_least(1),
    )
    initial_window_size: int = option(
        1_048_576,
        doc="Bytes of request body a stream may send before the proxy has passed them on "
        "(SETTINGS_INITIAL_WINDOW_SIZE, at most 2147483647).",
        check=values.all_of(
            values.positive, lambda v: None if v <= 2**31 - 1 else "must be at most 2147483647"
        ),
    )
    max_header_list_size: int = option(
        65_536,
        doc="Bytes of a request's decoded header list (SETTINGS_MAX_HEADER_LIST_SIZE).",
        check=values.at_least(1024),
    )
    max_header_block_bytes: int = option(
        65_536,
        doc="Bytes of one compressed header block across HEADERS and CONTINUATION frames (CONTINUATION "
        "floods).",
        check=values.at_least(1024),
    )
    max_resets: int = option(
        100,
        doc="Streams the client may reset within `floodWindow` (CVE-2023-44487, rapid reset); past it: "
        "GOAWAY ENHANCE_YOUR_CALM.",
        check=values.at_least(1),
    )
    max_control_frames: int = option(
        100,
        doc="SETTINGS and PING frames the client may send within `floodWindow`; past it: GOAWAY "
        "ENHANCE_YOUR_CALM.",
        check=values.at_least(1),
    )
    flood_window: int = option(
        10_000, doc="Milliseconds over which resets and control frames are counted.", check=values.duration
    )
    idle_timeout: int = option(
        300_000,
        doc="Milliseconds an HTTP/2 connection may have no open stream before GOAWAY.",
        check=values.duration,
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
    _route_actions,
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
    connection_rate_per_ip: RateConfig | None = option(
        None,
        key="connectionRatePerIP",
        addition=True,
        doc="New connections per client IP per window, over all routes (more are closed; docs/limits.md); "
        "not set: no limit.",
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
    http2: Http2Config | None = option(
        None, addition=True, doc="Limits of HTTP/2 connections on terminating routes; not set: the defaults."
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
        if proxy.acme is not None and terminates_somewhere(proxy):
            # The proxy then listens on acme.port too (challenges, redirects to HTTPS): see proxy/routes.py.
            claims.append((f"{base}.acme.port", proxy.acme.port, proxy.acme.port))
    for i, http_route in enumerate(http_routes or ()):
        port = http_route_port(http_route)
        claims.append((f"httpDomainRoutes[{i}]", port, port))
    return claims


def terminates_somewhere(proxy: SmartProxyConfig) -> bool:
    """Whether any route of ``proxy`` terminates TLS (a routes[] tls.mode other than passthrough, or a
    domainConfigs entry with useNetworkProxy)."""
    if any(entry.use_network_proxy for entry in proxy.domain_configs):
        return True
    return any(
        tls is not None and tls.mode != "passthrough" for tls in (route_tls(r)[0] for r in proxy.routes)
    )
