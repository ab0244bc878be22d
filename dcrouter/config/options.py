"""The options schema: one dataclass per block of the configuration, field by field.

Keys in files are the seed's camelCase names (``maxMessageSize``); attributes are their snake_case twins
(``max_message_size``). ``option()`` records the file key where the mechanical conversion would be wrong
(``targetIPs``), the documentation line, whether the key is a dcrouter addition to the seed, and whether the
feature behind it is built yet. The loader (``dcrouter.config.load``) and the reference in
``docs/configuration.md`` are both derived from these declarations.
"""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass, field
from typing import Any, Literal

MISSING = dataclasses.MISSING


def option(
    default: Any = MISSING,
    *,
    factory: Any = MISSING,
    key: str | None = None,
    doc: str = "",
    addition: bool = False,
    unsupported: str | None = None,
) -> Any:
    """Declare one configuration key.

    ``unsupported``: the feature is not built yet; any value other than the default is refused with
    "not supported yet" and this text.
    """
    metadata = {"key": key, "doc": doc, "addition": addition, "unsupported": unsupported}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TlsConfig:
    cert_path: str | None = option(None, doc="PEM certificate chain for STARTTLS and implicit TLS.")
    key_path: str | None = option(None, doc="PEM private key matching certPath.")
    ca_path: str | None = option(None, doc="PEM bundle of CAs sent as the chain (intermediates).")
    min_version: Literal["TLSv1.2", "TLSv1.3"] = option("TLSv1.2", doc="Lowest TLS version accepted.")
    ciphers: str | None = option(
        None, addition=True, doc="OpenSSL cipher string for TLS 1.2 (TLS 1.3 suites are OpenSSL's defaults)."
    )
    self_signed: bool = option(
        False,
        addition=True,
        doc="Generate a self-signed certificate at certPath/keyPath on first start when they do not exist "
        "(for trials; use a real certificate in production).",
    )


@dataclass(frozen=True)
class UserConfig:
    username: str = option(doc="Login name for SMTP AUTH.")
    password: str = option(
        doc="A hash made by `dcrouter hash-password` (`scrypt$...`), or plain text (logs a warning)."
    )


@dataclass(frozen=True)
class AuthConfig:
    required: bool = option(False, doc="Require AUTH before MAIL on every port (it always is on submissionPorts).")
    methods: list[Literal["PLAIN", "LOGIN", "OAUTH2"]] = option(
        factory=lambda: ["PLAIN", "LOGIN"], doc="SASL mechanisms offered (after TLS only)."
    )
    users: list[UserConfig] = option(factory=list, doc="Accounts allowed to authenticate.")
    ldap_url: str | None = option(None, unsupported="LDAP authentication is not built yet.")
    allow_insecure: bool = option(
        False, addition=True, doc="Offer and accept AUTH on connections without TLS (for tests only)."
    )
    max_failures: int = option(
        10, addition=True, doc="Failed AUTH attempts per client IP or per user name, within failureWindow, "
        "after which further attempts are refused with 454 4.7.0 until the window passes."
    )
    failure_window: int = option(
        900_000, addition=True, doc="Milliseconds over which AUTH failures are counted."
    )
    failure_delay: int = option(
        1_000, addition=True, doc="Milliseconds added to the reply per recent failure (slows down guessing)."
    )


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
    private_key: str = option(doc="PEM private key, inline or a file path.")


@dataclass(frozen=True)
class DomainConfig:
    domains: list[str] = option(doc="Recipient domains: exact names or `*.example.com` wildcards.")
    target_ips: list[str] = option(
        factory=list, key="targetIPs", doc="Servers (host names or IPs) mail for these domains is relayed to."
    )
    port: int = option(25, doc="Port on the target servers.")
    use_tls: bool = option(False, doc="Require STARTTLS towards the targets.")
    authentication: AuthenticationConfig | None = option(None, doc="AUTH towards the targets.")
    allowed_ips: list[str] = option(
        factory=list, key="allowedIPs", unsupported="Per-domain sender IP rules are not built yet."
    )
    rate_limits: RateLimitsConfig | None = option(None, doc="Per-domain limits.")
    add_headers: bool = option(False, unsupported="Header transformations are not built yet.")
    header_info: list[HeaderInfo] = option(factory=list, unsupported="Header transformations are not built yet.")
    sign_dkim: bool = option(False, unsupported="DKIM signing is not built yet.")
    dkim_options: DkimOptions | None = option(None, unsupported="DKIM signing is not built yet.")


@dataclass(frozen=True)
class SmtpConfig:
    # Server
    ports: list[int] = option(factory=lambda: [25, 587, 465], doc="Ports to accept SMTP on.")
    hostname: str = option(factory=socket.getfqdn, doc="Name used in the greeting, EHLO and Received headers.")
    banner: str | None = option(None, doc="Greeting text after the hostname (default: `ESMTP dcrouter`).")
    max_message_size: int = option(52_428_800, doc="Largest message accepted, in bytes (advertised as SIZE).")
    tls: TlsConfig | None = option(None, doc="Certificate for STARTTLS and implicit TLS.")
    auth: AuthConfig = option(factory=AuthConfig, doc="SMTP AUTH.")
    # Routing
    domain_configs: list[DomainConfig] = option(
        factory=list, doc="Domains this gateway accepts mail for, and where it relays it."
    )
    default_server: str | None = option(None, doc="Relay for recipients no domainConfigs entry matches.")
    default_port: int = option(25, doc="Port on defaultServer.")
    use_tls: bool = option(False, doc="Require STARTTLS towards defaultServer.")
    # Processing
    content_scanning: bool = option(False, unsupported="Content scanning is not built yet.")
    scanners: list[dict[str, Any]] = option(factory=list, unsupported="Content scanners are not built yet.")
    transformations: list[dict[str, Any]] = option(
        factory=list, unsupported="Transformations are not built yet."
    )
    # Queue
    queue_storage: Literal["memory", "disk", "redis"] = option("disk", doc="Where queued mail is kept.")
    persistent_path: str = option("/var/spool/dcrouter", doc="Directory of the disk queue.")
    max_retries: int = option(10, doc="Delivery attempts before a message bounces.")
    base_retry_delay: int = option(300_000, doc="Milliseconds before the first retry; doubles per attempt.")
    max_retry_delay: int = option(14_400_000, doc="Upper bound of the retry delay, in milliseconds.")
    # dcrouter's additions
    bind_address: str = option("0.0.0.0", addition=True, doc="Address the SMTP ports listen on.")
    implicit_tls_ports: list[int] = option(
        factory=lambda: [465], addition=True, doc="Ports of `ports` that speak TLS from the first byte."
    )
    submission_ports: list[int] = option(
        factory=lambda: [587], addition=True, doc="Ports of `ports` where AUTH is required before MAIL."
    )
    relay_networks: list[str] = option(
        factory=list, addition=True, doc="CIDRs whose clients may relay to any domain without AUTH."
    )
    max_connections: int = option(1000, addition=True, doc="Concurrent SMTP connections in total.")
    max_connections_per_ip: int = option(
        20, key="maxConnectionsPerIP", addition=True, doc="Concurrent SMTP connections per client IP."
    )
    max_recipients: int = option(100, addition=True, doc="Recipients per message (more get 452 4.5.3).")
    connection_timeout: int = option(
        1_800_000, addition=True, doc="Milliseconds a whole SMTP session may last."
    )
    socket_timeout: int = option(300_000, addition=True, doc="Milliseconds of client silence before 421 4.4.2.")
    data_timeout: int = option(600_000, addition=True, doc="Milliseconds one DATA transfer may take in total.")
    max_command_line_length: int = option(
        512, addition=True, doc="Longest command line in octets, CRLF included (RFC 5321 4.5.3.1.4)."
    )
    max_line_length: int = option(
        1000, addition=True, doc="Longest message text line in octets, CRLF included (RFC 5321 4.5.3.1.6)."
    )
    max_bad_commands: int = option(
        20, addition=True, doc="Unknown or out-of-sequence commands before the session is closed."
    )
    max_received_headers: int = option(
        50, addition=True, doc="Received headers (hops) above which a message is refused as a loop."
    )
    redis_url: str | None = option(None, addition=True, unsupported="The Redis queue is not built yet.")
    max_queue_size: int = option(
        0, addition=True, doc="Queued messages at which new mail gets 452 4.3.1 (0: no limit)."
    )


@dataclass(frozen=True)
class SharedTlsConfig:
    contact_email: str | None = option(None, doc="Contact for certificate authorities (ACME).")
    domain: str | None = option(None, doc="The router's own domain name.")
    cert_path: str | None = option(None, doc="Certificate used when a service has none of its own.")
    key_path: str | None = option(None, doc="Private key for certPath.")


@dataclass(frozen=True)
class DcRouterOptions:
    smart_proxy_config: dict[str, Any] | None = option(None, unsupported="The proxy is not built yet.")
    http_domain_routes: list[dict[str, Any]] | None = option(None, unsupported="The proxy is not built yet.")
    smtp_config: SmtpConfig | None = option(None, doc="The SMTP store-and-forward gateway.")
    tls: SharedTlsConfig | None = option(None, doc="Certificate shared by the router's services.")
    dns_server_config: dict[str, Any] | None = option(None, unsupported="The DNS server is not built yet.")
    mta_config: dict[str, Any] | None = option(None, unsupported="Direct MX delivery is not built yet.")
