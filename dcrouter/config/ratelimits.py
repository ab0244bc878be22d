"""The schema of ``smtpConfig.rateLimits`` (a dcrouter addition): tiers of limits on what SMTP clients do,
counted by the engine in :mod:`dcrouter.limits` (docs/limits.md).

A session belongs to one tier: ``authenticated`` once it has authenticated, else the first entry of
``tiers`` whose ``networks`` hold its address, else ``relayNetworks`` when its address is in
``smtpConfig.relayNetworks``, else ``anonymous``. A tier lists, per thing counted, the limits that apply:
each a rate (``count`` per ``window`` milliseconds, ``burst`` at once), a key that says what one counter
counts for (``per``: the client address, its network, the sender, ...), and an ``action``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dcrouter.config import values
from dcrouter.config.schema import BlockCheck, Report, ValueCheck, block_check, checked, join, option

#: What a counter is kept for: the client address, its /24 (IPv4) or /64 (IPv6) network (see ipv4Prefix,
#: ipv6Prefix), the envelope sender, its domain, the recipient's domain, the authenticated user, the
#: listening port.
Per = Literal["ip", "ipPrefix", "sender", "senderDomain", "recipientDomain", "user", "port"]

#: The keys each counted thing may be kept per (a connection has no sender yet; bytes are counted per
#: message, not per recipient).
ALLOWED_PER: dict[str, frozenset[str]] = {
    "connectionRate": frozenset({"ip", "ipPrefix", "port"}),
    "authFailures": frozenset({"ip", "ipPrefix", "port"}),
    "messages": frozenset({"ip", "ipPrefix", "sender", "senderDomain", "recipientDomain", "user", "port"}),
    "recipients": frozenset({"ip", "ipPrefix", "sender", "senderDomain", "recipientDomain", "user", "port"}),
    "bytes": frozenset({"ip", "ipPrefix", "sender", "senderDomain", "user", "port"}),
}


def _at_most(maximum: int) -> ValueCheck:
    def check(value: int) -> str | None:
        if value > maximum:
            return f"must be at most {maximum}: {value}"
        return None

    return check


def window(value: int) -> str | None:
    """A window from one second to one day, in milliseconds."""
    if not 1_000 <= value <= 86_400_000:
        return f"must be 1000 (one second) to 86400000 (one day) milliseconds: {value}"
    return None


@dataclass(frozen=True)
class RateConfig:
    count: int = option(doc="Connections allowed per window.", check=values.positive)
    window: int = option(
        60_000, doc="The window in milliseconds, one second (1000) to one day (86400000).", check=window
    )
    burst: int | None = option(
        None,
        doc="Connections allowed at once from idle (default: count); past it, spaced window/count apart.",
        check=values.positive,
    )


@dataclass(frozen=True)
class LimitConfig:
    count: int = option(
        doc="Events allowed per window (messages, recipients, bytes, ...).", check=values.positive
    )
    window: int = option(
        60_000, doc="The window in milliseconds, one second (1000) to one day (86400000).", check=window
    )
    burst: int | None = option(
        None,
        doc="Events allowed at once from idle (default: count). Past it, events are spaced window/count "
        "apart: GCRA, see docs/limits.md.",
        check=values.positive,
    )
    per: Per = option("ip", doc="What one counter counts for (see docs/limits.md, Keys).")
    action: Literal["defer", "tarpit", "reject"] = option(
        "defer",
        doc="When over: `defer` refuses temporarily (421/451/452), `tarpit` holds the reply back by "
        "tarpitDelay and then lets the command through, `reject` refuses for good (550 5.7.1: hard "
        "quotas).",
    )


def _keys_of(attr: str, key: str) -> BlockCheck[TierConfig]:
    """A check that each limit of ``key`` is kept per something the counted thing has when it is counted
    (one check per list, so a mistake in another list does not hide this one)."""

    def run(tier: TierConfig, path: str, report: Report) -> None:
        for i, limit in enumerate(getattr(tier, attr)):
            if limit.action == "reject" and key in ("connectionRate", "authFailures"):
                report.error(
                    f"{join(path, key)}[{i}].action",
                    "'reject' is for quotas on messages, recipients and bytes; a connection is refused "
                    "with 421 4.7.0 ('defer') or slowed ('tarpit')",
                )
            if limit.per not in ALLOWED_PER[key]:
                allowed = ", ".join(sorted(ALLOWED_PER[key]))
                report.error(
                    f"{join(path, key)}[{i}].per", f"{key} cannot be counted per {limit.per!r} ({allowed})"
                )

    return block_check(attr)(run)


_TIER_CHECKS = tuple(
    _keys_of(attr, key)
    for attr, key in (
        ("connection_rate", "connectionRate"),
        ("messages", "messages"),
        ("recipients", "recipients"),
        ("data_bytes", "bytes"),
        ("auth_failures", "authFailures"),
    )
)


def tier_limits(tier: TierConfig) -> dict[str, list[LimitConfig]]:
    """The tier's limits by the file key of what they count."""
    return {
        "connectionRate": tier.connection_rate,
        "messages": tier.messages,
        "recipients": tier.recipients,
        "bytes": tier.data_bytes,
        "authFailures": tier.auth_failures,
    }


_CONNECTIONS_DOC = (
    "Concurrent connections per client address in this tier, in this process (none: maxConnectionsPerIP "
    "only)."
)


@checked(*_TIER_CHECKS)
@dataclass(frozen=True)
class TierConfig:
    connections: int | None = option(None, doc=_CONNECTIONS_DOC, check=values.positive)
    connection_rate: list[LimitConfig] = option(
        factory=list, doc="New connections (refused with 421 4.7.0 at connect)."
    )
    messages: list[LimitConfig] = option(
        factory=list,
        doc="Messages, counted at MAIL FROM (451 4.7.1), or at the first RCPT to each domain when per "
        "recipientDomain (451 4.7.1 at RCPT).",
    )
    recipients: list[LimitConfig] = option(factory=list, doc="Recipients, counted at RCPT (451 4.7.1).")
    data_bytes: list[LimitConfig] = option(
        factory=list,
        key="bytes",
        doc="Message bytes, counted when a message is accepted; once over, MAIL FROM gets 451 4.7.1.",
    )
    auth_failures: list[LimitConfig] = option(
        factory=list, doc="Failed AUTH attempts; once over, AUTH gets 421 4.7.0 and the session ends."
    )


@checked(*_TIER_CHECKS)
@dataclass(frozen=True, kw_only=True)
class NetworkTierConfig(TierConfig):
    name: str = option(
        doc="The tier's name (in logs and alerts).", check=values.all_of(values.not_empty, values.one_line)
    )
    networks: list[str] = option(
        doc="CIDRs whose clients are in this tier.", check=values.not_empty, each=values.cidr
    )


@block_check("anonymous", "relay_networks", "tiers")
def limits_user_key(limits: IngressLimitsConfig, path: str, report: Report) -> None:
    """``per = "user"`` only where there is a user: the authenticated tier; tier names once."""
    named = [(f"tiers[{i}]", t) for i, t in enumerate(limits.tiers)]
    for where, tier in [("anonymous", limits.anonymous), ("relayNetworks", limits.relay_networks), *named]:
        for key, entries in tier_limits(tier).items():
            for i, limit in enumerate(entries):
                if limit.per == "user":
                    report.error(
                        f"{join(path, where)}.{key}[{i}].per",
                        "'user' only in the authenticated tier (these clients have not authenticated)",
                    )
    seen: set[str] = set()
    for i, tier in enumerate(limits.tiers):
        if tier.name in seen:
            report.error(f"{join(path, 'tiers')}[{i}].name", f"{tier.name!r} is listed twice")
        seen.add(tier.name)


@checked(limits_user_key)
@dataclass(frozen=True)
class IngressLimitsConfig:
    anonymous: TierConfig = option(
        factory=TierConfig, doc="Clients that are not authenticated and in no other tier."
    )
    authenticated: TierConfig = option(factory=TierConfig, doc="Sessions that have authenticated.")
    relay_networks: TierConfig = option(
        factory=TierConfig,
        key="relayNetworks",
        doc="Clients in smtpConfig.relayNetworks (not authenticated).",
    )
    tiers: list[NetworkTierConfig] = option(
        factory=list,
        doc="Named tiers by client network (a partner's servers), before relayNetworks; the first that holds "
        "the client's address applies.",
    )
    ipv4_prefix: int = option(
        24,
        doc='The IPv4 network size of `per = "ipPrefix"`.',
        check=values.all_of(values.at_least(8), _at_most(32)),
    )
    ipv6_prefix: int = option(
        64,
        doc='The IPv6 network size of `per = "ipPrefix"`.',
        check=values.all_of(values.at_least(16), _at_most(128)),
    )
    tarpit_delay: int = option(
        5_000,
        doc="Milliseconds a reply is held back by a limit whose action is `tarpit`.",
        check=values.duration,
    )
    max_keys: int = option(
        100_000,
        doc="Counters kept in this process at most; past it the least recently used are forgotten "
        "(docs/limits.md, Memory).",
        check=values.positive,
    )
    alert_after: int = option(
        10,
        doc="Refusals of one key by one limit within one window that raise an alert (0: none; 80% and 100% "
        "use alerts are raised regardless).",
        check=values.non_negative,
    )
