"""The options schema: one dataclass per block of the configuration, field by field; this module holds the
top level (:class:`DcRouterOptions`) and the checks across its blocks.

Keys in files are the seed's camelCase names (``maxMessageSize``); attributes are their snake_case twins
(``max_message_size``). ``option()`` (:mod:`dcrouter.config.schema`) records the file key where the mechanical
conversion would be wrong (``targetIPs``), the documentation line, whether the key is a dcrouter addition to
the seed, and whether the feature behind it is built yet. The loader (``dcrouter.config.load``) and the
reference in ``docs/configuration.md`` are both derived from these declarations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from dcrouter.config.api import ApiConfig
from dcrouter.config.delivery import MtaConfig
from dcrouter.config.dns import DnsServerConfig, dns_name, zone_of
from dcrouter.config.observe import EventsConfig, MetricsConfig
from dcrouter.config.proxy import (
    HttpDomainRoute,
    SmartProxyConfig,
    acme_names,
    claimed_ports,
    terminates_somewhere,
)
from dcrouter.config.schema import Report, block_check, checked, option
from dcrouter.config.smtp import SmtpConfig, generated_certificate_paths, smtp_tls_needs
from dcrouter.config.tls import SharedTlsConfig, TlsConfig

_T = TypeVar("_T")


def _tls_usable(tls: TlsConfig | None) -> bool:
    return tls is not None and (
        tls.self_signed or tls.acme or (tls.cert_path is not None and tls.key_path is not None)
    )


@block_check(
    "smtp_config.ports",
    "smtp_config.implicit_tls_ports",
    "smtp_config.submission_ports",
    "smtp_config.tls",
    "smtp_config.auth",
    "smtp_config.hostname",
    "smtp_config.queue_storage",
    "smtp_config.persistent_path",
    "tls",
)
def smtp_tls_needed(options: DcRouterOptions, path: str, report: Report) -> None:
    """Implicit TLS cannot work without a certificate, nor submission (AUTH only after TLS). When the file
    names none (the top-level ``tls`` certificate counts: the router falls back to it), the router generates
    a self-signed one, so a minimal configuration starts; this warning says so, and where it is kept."""
    smtp = options.smtp_config
    assert smtp is not None  # the needs through smtp_config are met only when it is set
    shared = options.tls
    usable = _tls_usable(smtp.tls) or (
        shared is not None and shared.cert_path is not None and shared.key_path is not None
    )
    reasons = smtp_tls_needs(smtp)
    if usable or not reasons:
        return
    if smtp.queue_storage == "memory":
        where = "in memory at every start (queueStorage 'memory' keeps nothing)"
    else:
        cert, key = generated_certificate_paths(smtp.persistent_path)
        where = f"at {cert} on first start and kept there (key: {key})"
    report.warning(
        "smtpConfig.tls",
        f"not set, but {' and '.join(reasons)}: a self-signed certificate for {smtp.hostname} is generated "
        f"{where}. Clients that verify certificates refuse it; set certPath and keyPath for production",
    )


@block_check("smtp_config", "smart_proxy_config", "http_domain_routes")
def router_has_work(options: DcRouterOptions, path: str, report: Report) -> None:
    """SMTP and the proxy are each work enough; with neither, the process would only idle."""
    if options.smtp_config is None and options.smart_proxy_config is None and not options.http_domain_routes:
        report.warning("smtpConfig", "not set, so dcrouter has nothing to run")


@block_check("smart_proxy_config", "http_domain_routes", "smtp_config.ports")
def proxy_smtp_ports(options: DcRouterOptions, path: str, report: Report) -> None:
    """SMTP and the proxy cannot both listen on one port: the second bind would fail at start-up, so the
    config is refused with both key paths named instead."""
    assert options.smtp_config is not None  # the need smtp_config.ports is met only when it is set
    smtp_ports = options.smtp_config.ports
    for where, start, end in claimed_ports(options.smart_proxy_config, options.http_domain_routes):
        for i, p in enumerate(smtp_ports):
            if start <= p <= end:
                report.error(where, f"port {p} is also smtpConfig.ports[{i}]")


def _loaded(options: Any, attr: str, cls: type[_T]) -> _T | None:
    """Block ``attr`` of the top level when it loaded without error (a check that does not need it gets
    a partial view of a failed block, or nothing), else None."""
    value = getattr(options, attr, None)
    return value if isinstance(value, cls) else None


@block_check("dns_server_config")
def dns_server_fits(options: DcRouterOptions, path: str, report: Report) -> None:
    """The zones need name servers (``smtpConfig.hostname`` stands in), and the server's TCP port is not one
    SMTP, the proxy or the API listens on. (Runs without smtpConfig too: it reads the other blocks only when
    they loaded.)"""
    dns = options.dns_server_config
    if dns is None:
        return
    smtp = _loaded(options, "smtp_config", SmtpConfig)
    if not dns.nameservers and getattr(options, "smtp_config", None) is None:
        report.error("dnsServerConfig.nameservers", "required without smtpConfig (whose hostname stands in)")
    if smtp is not None and dns.udp_port in smtp.ports:
        report.error("dnsServerConfig.udpPort", f"port {dns.udp_port} is also smtpConfig.ports (TCP)")
    proxy = _loaded(options, "smart_proxy_config", SmartProxyConfig)
    routes = getattr(options, "http_domain_routes", None)
    for where, start, end in claimed_ports(proxy, routes if isinstance(routes, list) else None):
        if start <= dns.udp_port <= end:
            report.error("dnsServerConfig.udpPort", f"port {dns.udp_port} is also {where} (TCP)")
    api = _loaded(options, "api_config", ApiConfig)
    if api is not None and api.enabled and api.port == dns.udp_port:
        report.error("dnsServerConfig.udpPort", f"port {dns.udp_port} is also apiConfig.port (TCP)")


@block_check("smtp_config.tls", "smtp_config.hostname", "smart_proxy_config")
def smtp_acme(options: DcRouterOptions, path: str, report: Report) -> None:
    """SMTP's certificate from ACME needs ACME enabled, and for HTTP-01 a proxy that answers port 80."""
    smtp = options.smtp_config
    assert smtp is not None  # the needs through smtp_config are met only when it is set
    if smtp.tls is None or not smtp.tls.acme:
        return
    proxy = options.smart_proxy_config
    if proxy is None or proxy.acme is None or not proxy.acme.enabled:
        report.error("smtpConfig.tls.acme", "needs smartProxyConfig.acme.enabled = true (the account and CA)")
    elif proxy.acme.challenge == "http-01" and not terminates_somewhere(proxy):
        report.error(
            "smtpConfig.tls.acme",
            "HTTP-01 is answered by the proxy on acme.port only when it terminates TLS for some route; "
            'use smartProxyConfig.acme.challenge = "dns-01" with dnsServerConfig',
        )


@block_check("dns_server_config", "smart_proxy_config")
def acme_dns_01(options: DcRouterOptions, path: str, report: Report) -> None:
    """DNS-01 answers come from the router's own server: it must run and serve every name ordered."""
    proxy = options.smart_proxy_config
    if proxy is None or proxy.acme is None or not proxy.acme.enabled or proxy.acme.challenge != "dns-01":
        return
    dns = options.dns_server_config
    if dns is None:
        report.error(
            "smartProxyConfig.acme.challenge", '"dns-01" needs dnsServerConfig (the server answering)'
        )
        return
    zones = [dns_name(z) for z in dns.zones]
    names = acme_names(proxy, "smartProxyConfig")
    smtp = _loaded(options, "smtp_config", SmtpConfig)  # (smtp_acme checks the rest)
    if smtp is not None and smtp.tls is not None and smtp.tls.acme:
        names.append(("smtpConfig.hostname", smtp.hostname))
    for where, name in names:
        bare = name[2:] if name.startswith("*.") else name
        if zone_of(dns_name(bare), zones) is None:
            report.error(
                where, f"{name!r} lies in none of dnsServerConfig.zones, so DNS-01 cannot answer for it"
            )


@block_check("smart_proxy_config.routes", "smtp_config")
def smtp_socket_handler(options: DcRouterOptions, path: str, report: Report) -> None:
    """The ``smtp`` socket handler is dcrouter's own ESMTP server: without smtpConfig there is none."""
    if options.smtp_config is not None:
        return
    assert options.smart_proxy_config is not None  # the need smart_proxy_config.routes is met
    for i, route in enumerate(options.smart_proxy_config.routes):
        if route.action.socket_handler == "smtp":
            report.error(
                f"smartProxyConfig.routes[{i}].action.socketHandler",
                '"smtp" hands connections to dcrouter\'s ESMTP server, which needs smtpConfig',
            )


def worker_count(value: Any) -> str | None:
    """``workers``: a positive integer or ``"auto"`` (the number of cores)."""
    if value == "auto" or (type(value) is int and value >= 1):
        return None
    return f'expected a positive integer or "auto", got {value!r}'


def resolve_workers(value: Any) -> int:
    """The number of worker processes ``workers`` asks for (``"auto"``: the machine's cores)."""
    if value == "auto":
        return max(1, os.cpu_count() or 1)
    return int(value)


@block_check("workers")
def workers_need_a_shared_queue(options: DcRouterOptions, path: str, report: Report) -> None:
    """Several workers share the Redis queue, or hold a partition of the disk queue each (docs/decisions.md,
    "Workers"); the memory queue lives inside one process, so it is refused."""
    if resolve_workers(options.workers) <= 1:
        return
    smtp = getattr(options, "smtp_config", None)
    if smtp is not None and smtp.queue_storage == "memory":
        report.error(
            "workers",
            'workers > 1 needs a queue the workers can share: smtpConfig.queueStorage = "disk" (a partition '
            'per worker) or "redis"; the "memory" queue lives inside one process, so mail a worker accepted '
            "could be delivered only by that worker and would be lost when it is restarted",
        )


@checked(
    workers_need_a_shared_queue,
    router_has_work,
    smtp_tls_needed,
    proxy_smtp_ports,
    smtp_socket_handler,
    dns_server_fits,
    smtp_acme,
    acme_dns_01,
)
@dataclass(frozen=True)
class DcRouterOptions:
    smart_proxy_config: SmartProxyConfig | None = option(
        None, doc="The TCP/TLS/HTTP proxy (SmartProxy's options; see docs/proxy.md)."
    )
    http_domain_routes: list[HttpDomainRoute] | None = option(
        None, doc="Simple HTTP/HTTPS routes by host name, kept for backward compatibility (docs/proxy.md)."
    )
    smtp_config: SmtpConfig | None = option(None, doc="The SMTP store-and-forward gateway.")
    tls: SharedTlsConfig | None = option(None, doc="Certificate shared by the router's services.")
    dns_server_config: DnsServerConfig | None = option(
        None,
        doc="The router's own authoritative DNS server for its zones: configured records, and MX, DKIM, SPF "
        "and DMARC records generated from the mail configuration (see docs/dns.md).",
    )
    mta_config: MtaConfig | None = option(None, doc="Direct delivery by MX (when no defaultServer is set).")
    api_config: ApiConfig = option(
        factory=ApiConfig,
        addition=True,
        doc="The management API: queue control, stats, delivery pause, log levels (docs/api.md).",
    )
    log_level: Literal["debug", "info", "warn", "error", "critical"] = option(
        "info",
        addition=True,
        doc="Lowest level of dcrouter's own log events that are written; `debug` adds every outbound SMTP "
        "command and reply.",
    )
    log_format: Literal["text", "json"] = option(
        "text",
        addition=True,
        doc="`json`: under twistd, one JSON object per line (time, level, namespace, message, queueId, "
        "sessionId, fields) instead of text; twistd's `--logger` overrides it. See docs/operations.md.",
    )
    metrics_config: MetricsConfig | None = option(
        None, addition=True, doc="Prometheus metrics on a listener of their own (docs/operations.md)."
    )
    events: EventsConfig | None = option(
        None, addition=True, doc="Webhooks and periodic performance events (docs/operations.md)."
    )
    workers: Any = option(
        1,
        addition=True,
        check=worker_count,
        doc="Worker processes serving the same SMTP and proxy ports under one supervisor (twistd runs the "
        'supervisor): a positive integer, or `"auto"` for the number of cores. Above 1 the queue is '
        '`"redis"` (shared) or `"disk"` (a partition per worker under `persistentPath`, docs/queue.md), '
        'not `"memory"`; the API, metrics listener and DNS server run in worker 0 only '
        '(docs/deployment.md, "Workers").',
    )
