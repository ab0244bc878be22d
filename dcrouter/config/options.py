"""The options schema: one dataclass per block of the configuration, field by field.

Keys in files are the seed's camelCase names (``maxMessageSize``); attributes are their snake_case twins
(``max_message_size``). ``option()`` (:mod:`dcrouter.config.schema`) records the file key where the mechanical
conversion would be wrong (``targetIPs``), the documentation line, whether the key is a dcrouter addition to
the seed, and whether the feature behind it is built yet. The loader (``dcrouter.config.load``) and the
reference in ``docs/configuration.md`` are both derived from these declarations.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Literal

from dcrouter.config import checks as c
from dcrouter.config import values
from dcrouter.config.processing import (
    MimeLimitsConfig,
    ScannerConfig,
    TransformationConfig,
)
from dcrouter.config.proxy import HttpDomainRoute, SmartProxyConfig
from dcrouter.config.schema import checked, option


@checked(c.tls_material, c.tls_ciphers)
@dataclass(frozen=True)
class TlsConfig:
    cert_path: str | None = option(
        None,
        doc="PEM certificate chain for STARTTLS and implicit TLS (a file path; relative paths are "
        "relative to the working directory).",
    )
    key_path: str | None = option(None, doc="PEM private key matching certPath, unencrypted.")
    ca_path: str | None = option(None, doc="PEM bundle of CAs sent as the chain (intermediates).")
    min_version: Literal["TLSv1.2", "TLSv1.3"] = option(
        "TLSv1.2", doc="Lowest TLS version accepted; raises tlsProfile's minimum, never lowers it."
    )
    tls_profile: Literal["modern", "intermediate"] = option(
        "intermediate",
        addition=True,
        doc="TLS policy of every SMTP port (docs/security.md): `intermediate` accepts TLS 1.3 and TLS 1.2 "
        "with ECDHE and AEAD suites only (Mozilla's intermediate profile, without DHE); `modern` accepts "
        "TLS 1.3 only.",
    )
    ciphers: str | None = option(
        None,
        addition=True,
        doc="Expert override: an OpenSSL cipher string replacing tlsProfile's TLS 1.2 suites (TLS 1.3 suites "
        "are OpenSSL's defaults). An error where TLS 1.2 is not accepted; a warning names the suites it lets "
        "in that the profile leaves out.",
    )
    self_signed: bool = option(
        False,
        addition=True,
        doc="Generate a self-signed certificate at certPath/keyPath on first start when they do not exist "
        "(for trials; use a real certificate in production).",
    )


@checked(c.user_password)
@dataclass(frozen=True)
class UserConfig:
    username: str = option(
        doc="Login name for SMTP AUTH.", check=values.all_of(values.not_empty, values.one_line)
    )
    password: str = option(
        doc="A hash made by `dcrouter hash-password` (`scrypt$...`), or plain text (logs a warning).",
        check=values.not_empty,
    )


@checked(c.auth_unique_users)
@dataclass(frozen=True)
class AuthConfig:
    required: bool = option(
        False, doc="Require AUTH before MAIL on every port (it always is on submissionPorts)."
    )
    methods: list[Literal["PLAIN", "LOGIN", "OAUTH2"]] = option(
        factory=lambda: ["PLAIN", "LOGIN"],
        doc="SASL mechanisms offered (after TLS only).",
        unsupported_values={"OAUTH2": "OAUTH2 is not built yet."},
        check=values.unique,
    )
    users: list[UserConfig] = option(factory=list, doc="Accounts allowed to authenticate.")
    ldap_url: str | None = option(None, unsupported="LDAP authentication is not built yet.")
    allow_insecure: bool = option(
        False, addition=True, doc="Offer and accept AUTH on connections without TLS (for tests only)."
    )
    max_failures: int = option(
        10,
        addition=True,
        doc="Failed AUTH attempts per client IP or per user name, within failureWindow, "
        "after which further attempts are refused with 454 4.7.0 until the window passes.",
        check=values.positive,
    )
    failure_window: int = option(
        900_000,
        addition=True,
        doc="Milliseconds over which AUTH failures are counted.",
        check=values.duration,
    )
    failure_delay: int = option(
        1_000,
        addition=True,
        doc="Milliseconds added to the reply per recent failure (slows down guessing); 0 adds none.",
        check=values.non_negative,
    )


@checked(c.authentication_pair)
@dataclass(frozen=True)
class AuthenticationConfig:
    user: str | None = option(None, doc="User name for AUTH at the target server.")
    pass_: str | None = option(None, key="pass", doc="Password for AUTH at the target server.")


@dataclass(frozen=True)
class RateLimitsConfig:
    max_messages_per_minute: int | None = option(None, unsupported="Rate limits are not built yet.")
    max_recipients_per_message: int | None = option(None, unsupported="Rate limits are not built yet.")


@dataclass(frozen=True)
class HeaderInfo:
    name: str = option(doc="Header field name.")
    value: str = option(doc="Header field value.")


@dataclass(frozen=True)
class DkimOptions:
    domain_name: str = option(doc="d= of the signature.")
    key_selector: str = option(doc="s= of the signature.")
    private_key: str = option(
        doc="PEM private key (RSA 2048+ bits or Ed25519), inline or a file path.",
        check=values.dkim_private_key,
    )


@checked(c.domain_recipients)
@dataclass(frozen=True)
class DomainConfig:
    domains: list[str] = option(
        doc="Recipient domains: exact names or `*.example.com` wildcards. A domain may appear in one entry "
        "only.",
        check=values.all_of(values.not_empty, values.unique),
        each=values.domain_pattern,
    )
    target_ips: list[str] = option(
        factory=list,
        key="targetIPs",
        doc="Servers (host names or IPs) mail for these domains is relayed to; at least one.",
        check=values.not_empty,
        each=values.host_or_ip,
    )
    port: int = option(25, doc="Port on the target servers.", check=values.port)
    use_tls: bool = option(False, doc="Require STARTTLS towards the targets.")
    authentication: AuthenticationConfig | None = option(None, doc="AUTH towards the targets.")
    allowed_ips: list[str] = option(
        factory=list, key="allowedIPs", unsupported="Per-domain sender IP rules are not built yet."
    )
    rate_limits: RateLimitsConfig | None = option(None, doc="Per-domain limits.")
    add_headers: bool = option(
        False, doc="Add headerInfo's fields to mail for these domains (needs headerProcessing)."
    )
    header_info: list[HeaderInfo] = option(factory=list, doc="Header fields added when addHeaders is set.")
    sign_dkim: bool = option(
        False,
        doc="DKIM-sign mail whose From domain is one of these domains, with dkimOptions (needs dkimSigning).",
    )
    dkim_options: DkimOptions | None = option(None, doc="The signing key of signDkim.")
    verify_recipients: Literal["off", "list", "callout"] = option(
        "off",
        addition=True,
        doc="Refuse unknown recipients at RCPT (docs/smtp.md): `off` accepts every address at these domains; "
        "`list` only those in recipients/recipientsFile (every client); `callout` asks the target first "
        "(clients neither authenticated nor in relayNetworks).",
    )
    recipients: list[str] = option(
        factory=list,
        addition=True,
        doc="With verifyRecipients `list`: the addresses that exist: `alice@example.com`, `alice` (at every "
        "domain of the entry), `@example.com` (all of a domain), `*` wildcards in local parts (`alice+*`).",
        each=values.one_line,
    )
    recipients_file: str | None = option(
        None,
        addition=True,
        doc="With verifyRecipients `list`: a file of such entries, one per line (`#` comments; a Postfix "
        "table's `address OK` lines work); re-read when it changes.",
    )
    callout_sender: str = option(
        "",
        addition=True,
        doc="MAIL FROM of callout probes: empty for the null sender `<>`, or an address for targets that "
        "refuse it.",
        check=values.mailbox_or_empty,
    )
    callout_fail_open: bool = option(
        False,
        addition=True,
        doc="Accept a recipient whose callout could not decide (target down, timeout, 4xx) instead of "
        "answering 450 4.1.1.",
    )


@dataclass(frozen=True)
class RoutingRuleConfig:
    name: str = option(
        doc="Name of the rule, shown in logs and as the route `rule:<name>`.", check=values.not_empty
    )
    target_ips: list[str] = option(
        key="targetIPs",
        doc="Servers (host names or IPs) the matching recipients are relayed to.",
        check=values.not_empty,
        each=values.host_or_ip,
    )
    priority: int = option(100, doc="Rules are evaluated in ascending priority, before domainConfigs.")
    senders: list[str] = option(
        factory=list,
        doc="Envelope sender patterns (`*@billing.example.com`, `user@example.com`, `*@*.example.com`, `<>` "
        "for the null sender); empty matches every sender.",
        each=values.sender_pattern,
    )
    recipients: list[str] = option(
        factory=list,
        doc="Recipient patterns, as for senders (without `<>`); empty matches every recipient.",
        each=values.recipient_pattern,
    )
    port: int = option(25, doc="Port on the target servers.", check=values.port)
    use_tls: bool = option(False, doc="Require STARTTLS towards the targets.")
    authentication: AuthenticationConfig | None = option(None, doc="AUTH towards the targets.")


@dataclass(frozen=True)
class DeliveryConfig:
    connection_pool_size: int = option(
        20,
        doc="Open connections kept per destination for reuse; at least maxPerDestination keeps every "
        "concurrent delivery's connection for the next message.",
        check=values.positive,
    )
    socket_timeout: int = option(
        300_000, doc="Milliseconds to wait for any one reply from a target server.", check=values.duration
    )
    concurrent_deliveries: int = option(
        50, doc="Deliveries in flight at once, in total.", check=values.positive
    )
    send_timeout: int = option(
        600_000, doc="Milliseconds one message transaction may take in total.", check=values.duration
    )
    verify_certificates: bool = option(
        False,
        doc="Verify target certificates (host name included); a failure defers the message. Off by default: "
        "opportunistic TLS to MX hosts, as most MTAs do.",
    )
    tls_min_version: Literal["TLSv1.2", "TLSv1.3"] = option(
        "TLSv1.2", doc="Lowest TLS version used outbound."
    )
    global_rate_limit: int | None = option(None, unsupported="Delivery rate limits are not built yet.")
    per_server_rate_limit: int | None = option(None, unsupported="Delivery rate limits are not built yet.")
    per_domain_rate_limit: dict[str, int] | None = option(
        None, unsupported="Delivery rate limits are not built yet."
    )
    helo_name: str | None = option(
        None, addition=True, doc="Name sent in EHLO (default: smtpConfig.hostname).", check=values.host_name
    )
    connect_timeout: int = option(
        30_000,
        addition=True,
        doc="Milliseconds to establish a connection to a target.",
        check=values.duration,
    )
    target_down_time: int = option(
        300_000,
        addition=True,
        doc="Milliseconds a target that refused or timed out is skipped before it is tried again.",
        check=values.duration,
    )
    idle_timeout: int = option(
        30_000,
        addition=True,
        doc="Milliseconds an idle pooled connection is kept open.",
        check=values.duration,
    )
    paused: bool = option(
        False,
        addition=True,
        doc="Start with outbound delivery paused: mail is accepted and queued but not delivered "
        "(maintenance, or a queue-only gateway, like Postfix's defer_transports). Restart without it to "
        "deliver.",
    )
    max_messages_per_connection: int = option(
        100,
        addition=True,
        doc="Messages sent over one connection before it is closed.",
        check=values.positive,
    )


@dataclass(frozen=True)
class CalloutConfig:
    timeout: int = option(
        30_000,
        doc="Milliseconds one recipient callout may take in all (waiting its turn, connecting, TLS, the "
        "replies); then the recipient is unverified.",
        check=values.duration,
    )
    positive_ttl: int = option(
        3_600_000,
        doc="Milliseconds an address the target accepted is remembered (0: not at all).",
        check=values.non_negative,
    )
    negative_ttl: int = option(
        600_000,
        doc="Milliseconds an address the target refused is remembered (0: not at all).",
        check=values.non_negative,
    )
    cache_size: int = option(
        100_000,
        doc="Addresses remembered at most; the least recently used are forgotten first.",
        check=values.positive,
    )
    max_parallel: int = option(
        20, doc="Callouts in flight at once; more wait their turn (within timeout).", check=values.positive
    )


@dataclass(frozen=True)
class MtaConfig:
    dns_servers: list[str] = option(
        factory=list,
        doc="DNS resolvers for MX lookups (`IP`, `IP:port` or `[IPv6]:port`); empty: the system's "
        "/etc/resolv.conf.",
        each=values.dns_server,
    )
    dns_timeout: int = option(5_000, doc="Milliseconds per DNS query attempt.", check=values.duration)


@checked(
    c.smtp_port_roles,
    c.smtp_users_present,
    c.smtp_connection_caps,
    c.smtp_retry_delays,
    c.smtp_queue_storage,
    c.smtp_domains_once,
    c.smtp_default_route,
    c.smtp_callout_timeout,
    c.smtp_routing_rules,
    c.smtp_processing,
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
        "queue between several dcrouter processes (needs `redisUrl`; bodies over 1 MiB go to "
        "`persistentPath`, which those processes must share).",
    )
    persistent_path: str = option(
        "/var/spool/dcrouter",
        doc="Directory of the disk queue; with `redis`, of message bodies over 1 MiB and the receive spool.",
        check=values.not_empty,
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
    max_received_headers: int = option(
        50,
        addition=True,
        doc="Received headers (hops) above which a message is refused as a loop.",
        check=values.positive,
    )
    redis_url: str | None = option(
        None,
        addition=True,
        doc="Redis of the `redis` queue: `redis://[:password@]host:port/db` or `unix:///path/redis.sock` "
        "(`?db=N`). Run Redis with `appendonly yes` and `appendfsync always`, or an acknowledged message can "
        "be lost (dcrouter warns at start-up).",
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
        doc="Queued messages at which new mail gets 452 4.3.1 (0: no limit).",
        check=values.non_negative,
    )
    callout: CalloutConfig = option(
        factory=CalloutConfig,
        addition=True,
        doc="Recipient callouts (domainConfigs' verifyRecipients `callout`): timeout, cache, concurrency.",
    )


@checked(c.shared_tls_material)
@dataclass(frozen=True)
class SharedTlsConfig:
    contact_email: str | None = option(
        None,
        doc="Contact for certificate authorities (ACME).",
        unsupported="ACME is configured under smartProxyConfig.acme (accountEmail); this block takes "
        "certificate files only.",
    )
    domain: str | None = option(
        None, doc="The router's own domain name.", unsupported="Nothing uses the router's own domain yet."
    )
    cert_path: str | None = option(
        None,
        doc="PEM certificate used when a service has none of its own (SMTP: when smtpConfig.tls names "
        "no certificate).",
    )
    key_path: str | None = option(None, doc="PEM private key for certPath, unencrypted.")


@checked(c.router_has_work, c.smtp_tls_needed, c.proxy_smtp_ports)
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
    log_level: Literal["debug", "info", "warn", "error", "critical"] = option(
        "info",
        addition=True,
        doc="Lowest level of dcrouter's own log events that are written; `debug` adds every outbound SMTP "
        "command and reply.",
    )
