"""The schema of outbound delivery: ``smtpConfig.delivery``, ``smtpConfig.routingRules``, the AUTH a target
server is given, and ``mtaConfig`` (delivery by MX)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dcrouter.config import values
from dcrouter.config.schema import Report, block_check, checked, join, option


def _domain_rates(value: dict[str, int]) -> str | None:
    """Each key a domain, each value a positive number of messages per minute."""
    for domain, limit in value.items():
        found = values.domain_pattern(domain)
        if found is not None or domain.startswith("*."):
            return f"not a domain name: {domain!r}"
        if limit < 1:
            return f"{domain}: must be a positive number of messages per minute: {limit}"
    return None


@block_check("user", "pass_")
def authentication_pair(auth: AuthenticationConfig, path: str, report: Report) -> None:
    if (auth.user is None) != (auth.pass_ is None):
        missing = "pass" if auth.pass_ is None else "user"
        report.error(join(path, missing), "required when the other of user/pass is set")


@checked(authentication_pair)
@dataclass(frozen=True)
class AuthenticationConfig:
    user: str | None = option(None, doc="User name for AUTH at the target server.")
    pass_: str | None = option(None, key="pass", doc="Password for AUTH at the target server.")


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
    global_rate_limit: int | None = option(
        None,
        doc="Messages per minute leaving the gateway in all, spread evenly; more wait (never bounced for it; "
        "docs/limits.md, Outbound).",
        check=values.positive,
    )
    per_server_rate_limit: int | None = option(
        None,
        doc="Messages per minute to one destination (a route: its servers), spread evenly; more wait.",
        check=values.positive,
    )
    per_domain_rate_limit: dict[str, int] | None = option(
        None,
        doc='Messages per minute by recipient domain (`{ "example.com" = 60 }`), spread evenly; more wait. '
        "Changed at run time with DeliveryManager.set_rate_limit/clear_rate_limit.",
        check=_domain_rates,
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
    suppression_ttl: int = option(
        604_800_000,
        addition=True,
        doc="Milliseconds a recipient whose delivery failed with a permanent 5.1.x reply (no such user, bad "
        "domain) is suppressed: mail to it is refused at RCPT with 550 5.1.1 instead of queued to bounce "
        "again (default 7 days; 0: no suppression). Kept with the queue; see docs/api.md#suppression.",
        check=values.non_negative,
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
class MtaConfig:
    dns_servers: list[str] = option(
        factory=list,
        doc="DNS resolvers for MX lookups (`IP`, `IP:port` or `[IPv6]:port`); empty: the system's "
        "/etc/resolv.conf.",
        each=values.dns_server,
    )
    dns_timeout: int = option(5_000, doc="Milliseconds per DNS query attempt.", check=values.duration)
