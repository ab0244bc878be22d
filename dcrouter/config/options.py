"""The options schema: one dataclass per block of the configuration, field by field; this module holds the
top level (:class:`DcRouterOptions`) and the checks across its blocks.

Keys in files are the seed's camelCase names (``maxMessageSize``); attributes are their snake_case twins
(``max_message_size``). ``option()`` (:mod:`dcrouter.config.schema`) records the file key where the mechanical
conversion would be wrong (``targetIPs``), the documentation line, whether the key is a dcrouter addition to
the seed, and whether the feature behind it is built yet. The loader (``dcrouter.config.load``) and the
reference in ``docs/configuration.md`` are both derived from these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from dcrouter.config.api import ApiConfig
from dcrouter.config.delivery import MtaConfig
from dcrouter.config.observe import EventsConfig, MetricsConfig
from dcrouter.config.proxy import HttpDomainRoute, SmartProxyConfig, claimed_ports
from dcrouter.config.schema import Report, block_check, checked, option
from dcrouter.config.smtp import SmtpConfig, generated_certificate_paths, smtp_tls_needs
from dcrouter.config.tls import SharedTlsConfig, TlsConfig


def _tls_usable(tls: TlsConfig | None) -> bool:
    return tls is not None and (tls.self_signed or (tls.cert_path is not None and tls.key_path is not None))


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


@checked(router_has_work, smtp_tls_needed, proxy_smtp_ports)
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
    dns_server_config: dict[str, Any] | None = option(None, unsupported="The DNS server is not built yet.")
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
