"""The schema of ``smtpConfig``: the SMTP store-and-forward gateway, and the checks across its keys.

The blocks it holds are declared next to their own checks: ``tls`` in :mod:`dcrouter.config.tls`, ``auth`` in
:mod:`dcrouter.config.auth`, ``domainConfigs`` and ``callout`` in :mod:`dcrouter.config.domains`,
``routingRules`` and ``delivery`` in :mod:`dcrouter.config.delivery`, ``scanners``, ``transformations`` and
``mimeLimits`` in :mod:`dcrouter.config.processing`, ``rateLimits`` in :mod:`dcrouter.config.ratelimits`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from dcrouter.config import values
from dcrouter.config.auth import AuthConfig
from dcrouter.config.delivery import DeliveryConfig, RoutingRuleConfig
from dcrouter.config.domains import CalloutConfig, DomainConfig
from dcrouter.config.processing import MimeLimitsConfig, ScannerConfig, TransformationConfig
from dcrouter.config.ratelimits import IngressLimitsConfig
from dcrouter.config.schema import Report, block_check, checked, join, option, set_in_file
from dcrouter.config.tls import TlsConfig
from dcrouter.config.verification import VerificationConfig
from dcrouter.mail.dkimkeys import is_rsa_key
from dcrouter.net.domains import normalize_domain
from dcrouter.net.redis_url import parse_redis_url


def _listed(ports: Iterable[int], known: list[int]) -> list[tuple[int, int]]:
    return [(i, p) for i, p in enumerate(ports) if p not in known]


@block_check("ports", "implicit_tls_ports", "submission_ports")
def smtp_port_roles(smtp: SmtpConfig, path: str, report: Report) -> None:
    """implicitTlsPorts and submissionPorts give roles to ports that are listened on. Their defaults name the
    standard ports (465, 587) and apply only if those are in ``ports``; a list the file sets must be a subset,
    which catches a role given to a port that was mistyped or forgotten in ``ports``."""
    roles = (
        ("implicitTlsPorts", "implicit_tls_ports", smtp.implicit_tls_ports),
        ("submissionPorts", "submission_ports", smtp.submission_ports),
    )
    for key, attr, ports in roles:
        if not set_in_file(smtp, attr):
            continue
        for i, p in _listed(ports, smtp.ports):
            report.error(f"{join(path, key)}[{i}]", f"port {p} is not in {join(path, 'ports')}")
    for i, p in enumerate(smtp.implicit_tls_ports):
        if p in smtp.ports and p not in smtp.submission_ports:
            # RFC 8314 section 3.3: port 465 is message submission over implicit TLS.
            report.warning(
                f"{join(path, 'implicitTlsPorts')}[{i}]",
                f"port {p} is not in {join(path, 'submissionPorts')}, so it accepts mail without AUTH; "
                "RFC 8314 makes implicit TLS a submission port",
            )


@block_check("ports", "submission_ports", "auth")
def smtp_users_present(smtp: SmtpConfig, path: str, report: Report) -> None:
    auth = smtp.auth
    if auth.users or auth.ldap_url or auth.oauth2 or auth.providers:
        return
    submission = [p for p in smtp.submission_ports if p in smtp.ports]
    users = join(path, "auth.users")
    if submission:
        report.warning(users, f"empty, so nobody can submit mail on submission ports {submission}")
    elif smtp.auth.required:
        report.warning(users, f"empty while {join(path, 'auth.required')} is true, so no mail is accepted")


@block_check("max_connections", "max_connections_per_ip")
def smtp_connection_caps(smtp: SmtpConfig, path: str, report: Report) -> None:
    if smtp.max_connections_per_ip > smtp.max_connections:
        report.error(
            join(path, "maxConnectionsPerIP"),
            f"{smtp.max_connections_per_ip} is more than {join(path, 'maxConnections')} "
            f"({smtp.max_connections})",
        )


@block_check("base_retry_delay", "max_retry_delay")
def smtp_retry_delays(smtp: SmtpConfig, path: str, report: Report) -> None:
    if smtp.max_retry_delay < smtp.base_retry_delay:
        report.error(
            join(path, "maxRetryDelay"),
            f"{smtp.max_retry_delay} is less than {join(path, 'baseRetryDelay')} ({smtp.base_retry_delay})",
        )


@block_check("domain_configs", "base_retry_delay", "max_retry_delay")
def domain_retry_delays(smtp: SmtpConfig, path: str, report: Report) -> None:
    """A domainConfigs entry's retry delays, with smtpConfig's for the one it leaves unset, must still make
    a schedule: the bound not below the first delay."""
    for i, entry in enumerate(smtp.domain_configs):
        if entry.base_retry_delay is None and entry.max_retry_delay is None:
            continue
        base = entry.base_retry_delay if entry.base_retry_delay is not None else smtp.base_retry_delay
        bound = entry.max_retry_delay if entry.max_retry_delay is not None else smtp.max_retry_delay
        if bound < base:
            where = f"{join(path, 'domainConfigs')}[{i}]"
            report.error(
                f"{where}.maxRetryDelay" if entry.max_retry_delay is not None else f"{where}.baseRetryDelay",
                f"the retry delay bound ({bound}) is less than the first delay ({base})",
            )


@block_check("queue_storage", "redis_url")
def smtp_queue_storage(smtp: SmtpConfig, path: str, report: Report) -> None:
    if smtp.queue_storage == "memory":
        report.warning(join(path, "queueStorage"), "'memory': queued messages are lost when dcrouter stops")
    if smtp.redis_url is not None:
        try:
            parse_redis_url(smtp.redis_url)
        except ValueError as e:
            report.error(join(path, "redisUrl"), str(e))
    elif smtp.queue_storage == "redis":
        report.error(
            join(path, "redisUrl"),
            "required with queueStorage 'redis' (redis://host:port/db, unix:///path or "
            "redis+sentinel://host:port,host:port/master-name/db)",
        )


@block_check("domain_configs")
def smtp_domains_once(smtp: SmtpConfig, path: str, report: Report) -> None:
    """A domain in two entries would make routing depend on their order."""
    owner: dict[str, int] = {}
    for i, entry in enumerate(smtp.domain_configs):
        for j, domain in enumerate(entry.domains):
            norm = normalize_domain(domain[2:]) if domain.startswith("*.") else normalize_domain(domain)
            norm = ("*." if domain.startswith("*.") else "") + norm
            if norm in owner and owner[norm] != i:
                report.error(
                    f"{join(path, 'domainConfigs')}[{i}].domains[{j}]",
                    f"{domain!r} is also in {join(path, 'domainConfigs')}[{owner[norm]}]",
                )
            owner.setdefault(norm, i)


@block_check("domain_configs", "callout", "socket_timeout")
def smtp_callout_timeout(smtp: SmtpConfig, path: str, report: Report) -> None:
    """A client waiting for a callout sends nothing: past socketTimeout its session would be closed first."""
    if not any(entry.verify_recipients == "callout" for entry in smtp.domain_configs):
        return
    if smtp.callout.timeout >= smtp.socket_timeout:
        report.warning(
            join(path, "callout.timeout"),
            f"{smtp.callout.timeout} is not less than {join(path, 'socketTimeout')} ({smtp.socket_timeout}): "
            "a session waiting for a callout would time out first",
        )


@block_check("default_server", "default_port", "use_tls")
def smtp_default_route(smtp: SmtpConfig, path: str, report: Report) -> None:
    """Without defaultServer, mail outside domainConfigs and routingRules goes by MX to port 25 with
    opportunistic TLS, so defaultPort and useTls (which apply to defaultServer only) would be ignored."""
    if smtp.default_server is not None:
        return
    if set_in_file(smtp, "default_port"):
        report.warning(
            join(path, "defaultPort"),
            f"has no effect without {join(path, 'defaultServer')}: other mail goes by MX, to port 25",
        )
    if smtp.use_tls:
        report.warning(
            join(path, "useTls"),
            f"has no effect without {join(path, 'defaultServer')}: mail delivered by MX uses STARTTLS "
            "when offered, and is not refused without it",
        )


@block_check("routing_rules")
def smtp_routing_rules(smtp: SmtpConfig, path: str, report: Report) -> None:
    """A rule's name is its route's name, the key of delivery limits and connection pools: two rules with one
    name would share them while sending to different servers."""
    first: dict[str, int] = {}
    for i, rule in enumerate(smtp.routing_rules):
        if rule.name in first:
            report.error(
                f"{join(path, 'routingRules')}[{i}].name",
                f"{rule.name!r} is also {join(path, 'routingRules')}[{first[rule.name]}]",
            )
        first.setdefault(rule.name, i)


@block_check("domain_configs", "transformations", "scanners", "content_scanning")
def smtp_processing(smtp: SmtpConfig, path: str, report: Report) -> None:
    """Keys that only make sense together: a signing key for each signed domain, scanners that run."""
    keyed: list[str] = []
    for i, domain in enumerate(smtp.domain_configs):
        where = f"{join(path, 'domainConfigs')}[{i}]"
        if domain.sign_dkim and domain.dkim_options is None:
            report.error(join(where, "dkimOptions"), "is required by signDkim")
        if domain.dkim_options is not None:
            keyed.extend(domain.domains)
        if domain.add_headers and not domain.header_info:
            report.warning(join(where, "headerInfo"), "addHeaders is set but headerInfo is empty")
    for i, entry in enumerate(smtp.transformations):
        where = f"{join(path, 'transformations')}[{i}]"
        if entry.type != "dkimSign":
            continue
        if entry.private_key is not None:
            continue
        for name in entry.domains:
            if name not in keyed:
                report.error(
                    join(where, "domains"),
                    f"{name!r} has no key: give privateKey here or dkimOptions in its domainConfigs entry",
                )
    if smtp.scanners and not smtp.content_scanning:
        report.warning(join(path, "scanners"), "not used: contentScanning is off")
    if smtp.content_scanning and not smtp.scanners:
        report.warning(join(path, "contentScanning"), "is on but no scanners are configured")


@block_check("proxy_protocol", "trusted_proxies")
def smtp_proxy_protocol(smtp: SmtpConfig, path: str, report: Report) -> None:
    """PROXY headers are read only from trustedProxies, so one without the other does nothing."""
    if smtp.proxy_protocol != "none" and not smtp.trusted_proxies:
        report.error(
            join(path, "trustedProxies"),
            f"is empty while {join(path, 'proxyProtocol')} is {smtp.proxy_protocol!r}: no peer may send a "
            "PROXY header",
        )
    if smtp.proxy_protocol == "none" and smtp.trusted_proxies:
        report.error(
            join(path, "proxyProtocol"),
            f"is 'none' while {join(path, 'trustedProxies')} is set: say which PROXY protocol version "
            "(v1, v2 or any) the trusted proxies send",
        )


@block_check("verification", "domain_configs")
def smtp_arc_sign(smtp: SmtpConfig, path: str, report: Report) -> None:
    """arcSign's key: given with it, or the dkimOptions of the domainConfigs entry listing its domain; RSA
    (dkimpy seals with rsa-sha256 only)."""
    arc = smtp.verification.arc_sign
    if arc is None:
        return
    where = join(path, "verification.arcSign")
    if (arc.key_selector is None) != (arc.private_key is None):
        report.error(where, "give keySelector and privateKey together, or neither")
        return
    key = arc.private_key
    if key is None:
        wanted = arc.domain_name.lower()
        entry = next(
            (
                d
                for d in smtp.domain_configs
                if d.dkim_options is not None and wanted in (n.lower() for n in d.domains)
            ),
            None,
        )
        if entry is None or entry.dkim_options is None:
            report.error(
                join(where, "domainName"),
                f"{arc.domain_name!r} has no key: give keySelector and privateKey, or dkimOptions in its "
                f"{join(path, 'domainConfigs')} entry",
            )
            return
        key = entry.dkim_options.private_key
    if not smtp.verification.enabled:
        report.warning(where, f"not used: {join(path, 'verification.enabled')} is false")
    if not is_rsa_key(key):
        report.error(where, "ARC seals with rsa-sha256: the key must be an RSA key")


def generated_certificate_paths(persistent_path: str) -> tuple[str, str]:
    """Where the router keeps the self-signed certificate and key it generates when SMTP needs TLS and the
    configuration names no certificate (the disk and redis queues; a memory queue's is never written)."""
    directory = os.path.join(persistent_path, "tls")
    return os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")


def smtp_tls_needs(smtp: SmtpConfig) -> list[str]:
    """Why SMTP needs a certificate, one reason per role that cannot work without TLS; empty when nothing
    does (an MX port serves without TLS, it only cannot offer STARTTLS then)."""
    implicit = [p for p in smtp.implicit_tls_ports if p in smtp.ports]
    submission = [p for p in smtp.submission_ports if p in smtp.ports and p not in implicit]
    reasons = []
    if implicit:
        reasons.append(f"smtpConfig.implicitTlsPorts lists {implicit}")
    if submission and not smtp.auth.allow_insecure:
        reasons.append(f"submission ports {submission} offer AUTH only after STARTTLS")
    return reasons


@checked(
    smtp_port_roles,
    smtp_users_present,
    smtp_connection_caps,
    smtp_retry_delays,
    domain_retry_delays,
    smtp_queue_storage,
    smtp_domains_once,
    smtp_default_route,
    smtp_callout_timeout,
    smtp_routing_rules,
    smtp_processing,
    smtp_proxy_protocol,
    smtp_arc_sign,
)
@dataclass(frozen=True)
class SmtpConfig:
    # Server
    ports: list[int] = option(
        factory=lambda: [25, 587, 465],
        doc="Ports to accept SMTP on.",
        check=values.all_of(values.not_empty, values.unique),
        each=values.port,
    )
    hostname: str = option(
        factory=socket.getfqdn,
        doc="Name used in the greeting, EHLO and Received headers.",
        check=values.host_name,
        shown_default="the machine's fully qualified name",
    )
    banner: str | None = option(
        None,
        doc="Greeting text after `ESMTP` (`220 <hostname> ESMTP <banner>`; default `dcrouter`); one line.",
        check=values.one_line,
    )
    max_message_size: int = option(
        52_428_800, doc="Largest message accepted, in bytes (advertised as SIZE).", check=values.positive
    )
    tls: TlsConfig | None = option(
        None,
        doc="Certificate for STARTTLS and implicit TLS. Not set while implicitTlsPorts or submissionPorts "
        "are listened on: a self-signed one is generated under persistentPath (`tls/cert.pem`; in memory "
        "with the memory queue) and a warning says so.",
    )
    auth: AuthConfig = option(factory=AuthConfig, doc="SMTP AUTH.")
    # Routing
    domain_configs: list[DomainConfig] = option(
        factory=list, doc="Domains this gateway accepts mail for from anyone, and where it relays it."
    )
    default_server: str | None = option(
        None,
        doc="Relay for recipients no domainConfigs entry matches (host name or IP).",
        check=values.host_or_ip,
    )
    default_port: int = option(25, doc="Port on defaultServer.", check=values.port)
    use_tls: bool = option(False, doc="Require STARTTLS towards defaultServer.")
    # Processing
    content_scanning: bool = option(False, doc="Run `scanners` on every message before it is accepted.")
    scanners: list[ScannerConfig] = option(
        factory=list, doc="Content scanners, in order (docs/processing.md); used when contentScanning is on."
    )
    transformations: list[TransformationConfig] = option(
        factory=list, doc="Changes made to every message before it is queued, in order (docs/processing.md)."
    )
    max_parallel_processing: int = option(
        64,
        doc="Messages processed (scanned, transformed, signed) at once; beyond it the end of DATA is "
        "answered 451 4.3.2.",
        check=values.positive,
    )
    processing_timeout: int = option(
        120_000,
        doc="Milliseconds processing one message may take before it is answered 451 4.4.1.",
        check=values.duration,
    )
    header_processing: bool = option(
        True, doc="Apply header transformations and domainConfigs' headerInfo (off: they are skipped)."
    )
    dkim_signing: bool = option(
        True, doc="Apply DKIM signing (signDkim, dkimSign); off: no message is signed."
    )
    mime_limits: MimeLimitsConfig = option(
        factory=MimeLimitsConfig,
        addition=True,
        doc="How much of a message is inspected; beyond a limit it is unscannable (docs/processing.md).",
    )
    # Queue
    queue_storage: Literal["memory", "disk", "redis"] = option(
        "disk",
        doc="Where queued mail is kept. `memory` loses it on exit (a warning says so); `redis` shares one "
        "queue between several dcrouter processes (needs `redisUrl`; bodies over 1 MiB go where "
        "`redisBodyStore` says).",
    )
    persistent_path: str = option(
        "/var/spool/dcrouter",
        doc="Directory of the disk queue; with `redis`, of the receive spool, the consumer name locks "
        "and (with `redisBodyStore` `directory`) message bodies over 1 MiB.",
        check=values.file_path,
    )
    max_retries: int = option(
        40,
        doc="Delivery attempts before a message bounces. The default lets queueLifetime (5 days) decide, as "
        "operators of other MTAs expect.",
        check=values.non_negative,
    )
    base_retry_delay: int = option(
        300_000, doc="Milliseconds before the first retry; doubles per attempt.", check=values.duration
    )
    max_retry_delay: int = option(
        14_400_000, doc="Upper bound of the retry delay, in milliseconds.", check=values.duration
    )
    # dcrouter's additions
    bind_address: str = option(
        "0.0.0.0",
        addition=True,
        doc="IP address the SMTP ports listen on (`::` for all IPv6).",
        check=values.ip_address,
    )
    implicit_tls_ports: list[int] = option(
        factory=lambda: [465],
        addition=True,
        doc="Ports of `ports` that speak TLS from the first byte (they never offer STARTTLS).",
        check=values.unique,
        each=values.port,
    )
    submission_ports: list[int] = option(
        factory=lambda: [587, 465],
        addition=True,
        doc="Ports of `ports` where AUTH is required before MAIL. 465 is here by default because RFC 8314 "
        "makes implicit TLS a submission port.",
        check=values.unique,
        each=values.port,
    )
    relay_networks: list[str] = option(
        factory=list,
        addition=True,
        doc="CIDRs whose clients may relay to any domain without AUTH (a bare address is one host; "
        "host bits set, as in `10.1.2.3/8`, are an error).",
        each=values.cidr,
    )
    max_connections: int = option(
        1000, addition=True, doc="Concurrent SMTP connections in total.", check=values.positive
    )
    max_connections_per_ip: int = option(
        20,
        key="maxConnectionsPerIP",
        addition=True,
        doc="Concurrent SMTP connections per client IP; at most maxConnections.",
        check=values.positive,
    )
    max_recipients: int = option(
        100, addition=True, doc="Recipients per message (more get 452 4.5.3).", check=values.positive
    )
    connection_timeout: int = option(
        1_800_000, addition=True, doc="Milliseconds a whole SMTP session may last.", check=values.duration
    )
    socket_timeout: int = option(
        300_000, addition=True, doc="Milliseconds of client silence before 421 4.4.2.", check=values.duration
    )
    data_timeout: int = option(
        600_000, addition=True, doc="Milliseconds one DATA transfer may take in total.", check=values.duration
    )
    max_command_line_length: int = option(
        512,
        addition=True,
        doc="Longest command line in octets, CRLF included (RFC 5321 4.5.3.1.4); at least 512.",
        check=values.at_least(512),
    )
    max_line_length: int = option(
        1000,
        addition=True,
        doc="Longest message text line in octets, CRLF included (RFC 5321 4.5.3.1.6); at least 1000.",
        check=values.at_least(1000),
    )
    max_bad_commands: int = option(
        20,
        addition=True,
        doc="Unknown or out-of-sequence commands before the session is closed.",
        check=values.positive,
    )
    max_junk_commands: int = option(
        100,
        addition=True,
        doc="NOOP, RSET, VRFY, HELP and repeated HELO/EHLO (from a client neither authenticated nor in "
        "relayNetworks) a session may send before each further one also counts toward maxBadCommands "
        "(Postfix's smtpd_junk_command_limit); the count restarts after each accepted message.",
        check=values.positive,
    )
    command_timeout: int = option(
        300_000,
        addition=True,
        doc="Milliseconds a client may take to send one command line, counted from its first byte: bytes "
        "dripped slowly do not extend it (Postfix's smtpd_timeout with smtpd_per_request_deadline). Also the "
        "allowance a DATA transfer starts with (minDataRate). 421 4.4.2 and close.",
        check=values.duration,
    )
    min_data_rate: int = option(
        500,
        addition=True,
        doc="Octets per second a DATA transfer must keep up: it starts with commandTimeout to go, and each "
        "octet received adds 1/minDataRate s, never to more than commandTimeout ahead (Postfix's "
        "smtpd_min_data_rate). 421 4.4.2 and close. 0: no rate, only dataTimeout.",
        check=values.non_negative,
    )
    pregreet_delay: int = option(
        0,
        addition=True,
        doc="Milliseconds to wait before the 220 greeting; a client that sends anything before it gets "
        "521 5.5.1 and is disconnected (postscreen's pregreet test). 0: greet at once.",
        check=values.non_negative,
    )
    shutdown_grace_period: int = option(
        30_000,
        addition=True,
        doc="Milliseconds a stop (SIGTERM) gives mail transactions in flight to finish. Listening stops at "
        "once, idle sessions get 421 4.3.2 at once, the others after their transaction or when the period "
        "ends.",
        check=values.non_negative,
    )
    proxy_protocol: Literal["none", "v1", "v2", "any"] = option(
        "none",
        addition=True,
        doc="PROXY protocol header (HAProxy's) that connections from `trustedProxies` must open with, on "
        "every SMTP port: `v1`, `v2` or `any` (either). The address it carries is the client's for "
        "relayNetworks, connection limits, the Received field, logs and SPF. A trusted peer that sends no "
        "valid header, or none within proxyHeaderTimeout, is disconnected (as Postfix's "
        "smtpd_upstream_proxy_protocol); any other peer that opens with a PROXY header is disconnected. "
        "`LOCAL`/`UNKNOWN` headers (health checks) keep the proxy's own address.",
    )
    trusted_proxies: list[str] = option(
        factory=list,
        addition=True,
        doc="CIDRs of the load balancers allowed to send a PROXY header to the SMTP ports; required by "
        "proxyProtocol.",
        each=values.cidr,
    )
    proxy_header_timeout: int = option(
        5_000,
        addition=True,
        doc="Milliseconds a trusted proxy has to send its whole PROXY header; then the connection is closed.",
        check=values.duration,
    )
    max_received_headers: int = option(
        50,
        addition=True,
        doc="Received headers (hops) above which a message is refused as a loop.",
        check=values.positive,
    )
    redis_url: str | None = option(
        None,
        addition=True,
        doc="Redis of the `redis` queue: `redis://[:password@]host:port/db`, `unix:///path/redis.sock` "
        "(`?db=N`), or with Sentinel `redis+sentinel://[:password@]host:port,host:port/master-name/db` "
        "(`?wait=N`: replicas an enqueue waits for, default 1). Run Redis with `appendonly yes` and "
        "`appendfsync always` (with Sentinel also `min-replicas-to-write 1`), or an acknowledged message can "
        "be lost (dcrouter warns at start-up; docs/queue.md).",
    )
    redis_body_store: Literal["redis", "directory"] = option(
        "redis",
        addition=True,
        doc="Where the `redis` queue keeps bodies over 1 MiB: `redis` (in Redis, in 256 KiB chunks; Redis is "
        "then the only thing several hosts share) or `directory` (files under `persistentPath`, which every "
        "process sharing the Redis must then mount from one shared file system). Smaller bodies are always "
        "in Redis. No object store: there is no well-kept Twisted client for one.",
    )
    redis_consumer_name: str | None = option(
        None,
        addition=True,
        doc="First part of this process's consumer name on the `redis` queue (`<name>/<slot>`, the owner "
        "of its claims); default: the host name. Processes sharing one Redis but not one `persistentPath` "
        "must each have their own (docs/queue.md).",
        check=values.not_empty,
    )
    check_interval: int = option(
        1_000,
        doc="Milliseconds between looks at the queue for due messages (enqueue also wakes delivery).",
        check=values.duration,
    )
    max_per_destination: int = option(
        20, doc="Deliveries in flight at once to one destination (route).", check=values.positive
    )
    queue_lifetime: int = option(
        432_000_000,
        addition=True,
        doc="Milliseconds after which an undelivered message bounces (default 5 days).",
        check=values.duration,
    )
    delay_warning_after: int = option(
        14_400_000,
        addition=True,
        doc="Milliseconds after which the sender gets one delay warning (RFC 3464 `delayed`); 0: never.",
        check=values.non_negative,
    )
    finished_retention: int = option(
        86_400_000,
        addition=True,
        doc="Milliseconds a delivered, bounced or failed message stays queryable before it is purged.",
        check=values.non_negative,
    )
    orphan_retention: int = option(
        604_800_000,
        addition=True,
        doc="Milliseconds a body file set aside in `persistentPath/orphans/` at start-up (no queue entry "
        "names it: never acknowledged, or already removed) is kept for inspection before it is deleted "
        "(checked hourly; default 7 days); 0: kept forever.",
        check=values.non_negative,
    )
    routing_rules: list[RoutingRuleConfig] = option(
        factory=list, doc="Sender/recipient pattern rules, evaluated before domainConfigs."
    )
    delivery: DeliveryConfig = option(
        factory=DeliveryConfig, addition=True, doc="Outbound delivery (the seed's DeliveryManager options)."
    )
    max_queue_size: int = option(
        0,
        addition=True,
        doc="Queued messages at which new mail gets 452 4.3.1 (0: no limit). With the disk queue and "
        "`workers` > 1, each worker's partition holds its share (this divided by `workers`, rounded up).",
        check=values.non_negative,
    )
    verification: VerificationConfig = option(
        factory=VerificationConfig,
        addition=True,
        doc="Inbound SPF, DKIM, DMARC and ARC verification (docs/verification.md).",
    )
    callout: CalloutConfig = option(
        factory=CalloutConfig,
        addition=True,
        doc="Recipient callouts (domainConfigs' verifyRecipients `callout`): timeout, cache, concurrency.",
    )
    rate_limits: IngressLimitsConfig = option(
        factory=IngressLimitsConfig,
        addition=True,
        doc="Rate limits, tiers and quotas on SMTP clients (docs/limits.md).",
    )
