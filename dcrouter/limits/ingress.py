"""The limits of SMTP sessions, built from ``smtpConfig.rateLimits`` and ``domainConfigs``: the built-in
:class:`~dcrouter.interfaces.IIngressLimits` (docs/limits.md says what each limit does and replies).

Replies say which limit refused (``messages per client address: 100 per minute``), never the counted key
(the address, the user). A tier of a session is decided at each check, so a session that authenticates
moves to the ``authenticated`` tier at once.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from zope.interface import implementer

from dcrouter.config.domains import DomainConfig
from dcrouter.config.ratelimits import IngressLimitsConfig, LimitConfig, TierConfig, tier_limits
from dcrouter.config.smtp import SmtpConfig
from dcrouter.interfaces import IIngressLimits
from dcrouter.limits.alerts import Alerts
from dcrouter.limits.counters import LocalCounters, RedisCounters, SharedCounters
from dcrouter.limits.gcra import Rate
from dcrouter.limits.limiter import ALLOWED, Charge, Limit, Limiter, Verdict
from dcrouter.log import logger
from dcrouter.mail.address import Address
from dcrouter.mail.reply import Reply
from dcrouter.net.cidr import CidrSet
from dcrouter.net.domains import DomainMatcher

log = logger(__name__)

_PER_TEXT = {
    "ip": "client address",
    "ipPrefix": "client network",
    "sender": "sender",
    "senderDomain": "sender domain",
    "recipientDomain": "recipient domain",
    "user": "user",
    "port": "port",
}
_WINDOW_TEXT = {1_000: "second", 60_000: "minute", 3_600_000: "hour", 86_400_000: "day"}

Result = Reply | None | Deferred[Reply | None]


class SessionView(Protocol):
    """What the limits read of an SMTP session."""

    peer_host: str
    local_port: int
    auth_user: str | None


def window_text(window_ms: int) -> str:
    """``minute`` for 60000, ``90 seconds`` for 90000."""
    named = _WINDOW_TEXT.get(window_ms)
    if named:
        return named
    seconds = window_ms / 1000
    return f"{seconds:g} seconds"


@dataclass(frozen=True)
class _Rule:
    """One configured limit: what it counts per (``per``) and the engine's :class:`Limit`."""

    per: str
    limit: Limit


@dataclass(frozen=True)
class _Tier:
    name: str
    connections: int | None
    rules: dict[str, tuple[_Rule, ...]]


#: The SMTP phase at which each thing is checked (a metric label).
_PHASE = {
    "connectionRate": "connect",
    "authFailures": "auth",
    "messages": "mail",
    "recipients": "rcpt",
    "bytes": "mail",
}


def _rule(name: str, tier: str, thing: str, entry: LimitConfig) -> _Rule:
    unit = {"connectionRate": "connections", "authFailures": "failed AUTH attempts"}.get(thing, thing)
    label = f"{unit} per {_PER_TEXT[entry.per]}: {entry.count} per {window_text(entry.window)}"
    rate = Rate(entry.count, entry.window / 1000, entry.burst)
    phase = "rcpt" if thing == "messages" and entry.per == "recipientDomain" else _PHASE[thing]
    return _Rule(entry.per, Limit(name, label, rate, entry.action, (tier, thing, phase)))


def _tier(name: str, config: TierConfig) -> _Tier:
    rules = {
        thing: tuple(_rule(f"{name}.{thing}.{i}", name, thing, e) for i, e in enumerate(entries))
        for thing, entries in tier_limits(config).items()
    }
    # Messages per recipient domain are counted at RCPT, the others at MAIL: split once, here.
    messages = rules["messages"]
    rules["messages"] = tuple(r for r in messages if r.per != "recipientDomain")
    rules["messagesPerRecipientDomain"] = tuple(r for r in messages if r.per == "recipientDomain")
    return _Tier(name, config.connections, rules)


@dataclass(frozen=True)
class _DomainRules:
    """A domainConfigs entry's client rules."""

    label: str
    allowed: CidrSet | None
    max_recipients: int | None
    messages: _Rule | None


#: Metric labels of the domainConfigs rules (tier ``domain``: every entry together, a bounded label set).
_DOMAIN_MESSAGES = ("domain", "maxMessagesPerMinute", "rcpt")
_DOMAIN_ALLOWED = ("domain", "allowedIPs", "rcpt")
_DOMAIN_RECIPIENTS = ("domain", "maxRecipientsPerMessage", "rcpt")


def _domain_rules(index: int, entry: DomainConfig) -> _DomainRules:
    limits = entry.rate_limits
    per_minute = limits.max_messages_per_minute if limits is not None else None
    messages = None
    if per_minute is not None:
        label = f"messages to {entry.domains[0]}: {per_minute} per minute"
        limit = Limit(f"domain.{index}.messages", label, Rate(per_minute, 60.0), metric=_DOMAIN_MESSAGES)
        messages = _Rule("recipientDomain", limit)
    return _DomainRules(
        label=entry.domains[0],
        allowed=CidrSet(entry.allowed_ips) if entry.allowed_ips else None,
        max_recipients=limits.max_recipients_per_message if limits is not None else None,
        messages=messages,
    )


#: Addresses whose spellings and networks are remembered (parsing one costs more than a whole check).
_ADDRESS_CACHE = 4096


@lru_cache(maxsize=_ADDRESS_CACHE)
def normal_ip(ip: str) -> str:
    """One spelling per address (an IPv4-mapped IPv6 address as its IPv4 address)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


@lru_cache(maxsize=_ADDRESS_CACHE)
def ip_prefix(ip: str, v4: int, v6: int) -> str:
    """The network of ``ip``: its /``v4`` or /``v6`` (the address itself when it is not an IP)."""
    try:
        address = ipaddress.ip_address(normal_ip(ip))
    except ValueError:
        return ip
    bits = v4 if address.version == 4 else v6
    return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))


@implementer(IIngressLimits)
class IngressLimits:
    """The limits of one gateway's SMTP listeners (see the module docstring), counted by ``limiter``.
    ``clock`` runs tarpit delays."""

    def __init__(self, config: SmtpConfig, limiter: Limiter, clock: IReactorTime) -> None:
        limits: IngressLimitsConfig = config.rate_limits
        self.limiter = limiter
        self._clock = clock
        self._hostname = config.hostname
        self._v4 = limits.ipv4_prefix
        self._v6 = limits.ipv6_prefix
        self._tarpit = limits.tarpit_delay / 1000
        self._anonymous = _tier("anonymous", limits.anonymous)
        self._authenticated = _tier("authenticated", limits.authenticated)
        self._relay = _tier("relayNetworks", limits.relay_networks)
        self._relay_networks = CidrSet(config.relay_networks)
        self._named = [(CidrSet(t.networks), _tier(f"tier:{t.name}", t)) for t in limits.tiers]
        entries = [(entry, _domain_rules(i, entry)) for i, entry in enumerate(config.domain_configs)]
        self._domain_list = [rules for _, rules in entries]
        self._domains: DomainMatcher[_DomainRules] = DomainMatcher(
            (domain, rules) for entry, rules in entries for domain in entry.domains
        )
        #: Whether any domainConfigs entry has client rules (the RCPT checks are skipped otherwise).
        self._domain_rules = any(
            rules.allowed is not None or rules.max_recipients is not None or rules.messages is not None
            for _, rules in entries
        )
        self._open: dict[str, int] = {}
        self._network_tier = lru_cache(maxsize=_ADDRESS_CACHE)(self._tier_by_address)

    def rules(self) -> dict[str, tuple[str, Limit]]:
        """Every configured limit by name, with what it counts per (``ip``, ``sender``, ...)."""
        found: dict[str, tuple[str, Limit]] = {}
        tiers = [self._anonymous, self._authenticated, self._relay, *(tier for _, tier in self._named)]
        for tier in tiers:
            for rules in tier.rules.values():
                for rule in rules:
                    found[rule.limit.name] = (rule.per, rule.limit)
        for domain in self._domain_list:
            if domain.messages is not None:
                found[domain.messages.limit.name] = (domain.messages.per, domain.messages.limit)
        return found

    # Tiers and keys

    def tier(self, session: SessionView) -> str:
        """The name of the tier ``session`` is in now."""
        return self._tier(session).name

    def _tier(self, session: SessionView) -> _Tier:
        if session.auth_user:
            return self._authenticated
        return self._network_tier(session.peer_host)

    def _tier_by_address(self, ip: str) -> _Tier:
        for networks, tier in self._named:
            if ip in networks:
                return tier
        if ip in self._relay_networks:
            return self._relay
        return self._anonymous

    def _key(
        self,
        per: str,
        session: SessionView,
        sender: Address | None = None,
        recipient: Address | None = None,
    ) -> str | None:
        """The counter key of ``per`` for this event, or None when the event has none (no user)."""
        if per == "ip":
            return normal_ip(session.peer_host)
        if per == "ipPrefix":
            return ip_prefix(session.peer_host, self._v4, self._v6)
        if per == "port":
            return str(session.local_port)
        if per == "user":
            return session.auth_user
        if per == "sender":
            return "<>" if sender is None or sender.is_null else str(sender).lower()
        if per == "senderDomain":
            return "<>" if sender is None or sender.is_null else sender.domain.lower()
        if per == "recipientDomain" and recipient is not None:
            return recipient.domain.lower()
        return None

    def _charges(
        self,
        rules: Sequence[_Rule],
        session: SessionView,
        *,
        sender: Address | None = None,
        recipient: Address | None = None,
        cost: int = 1,
        force: bool = False,
    ) -> list[Charge]:
        charges = []
        for rule in rules:
            key = self._key(rule.per, session, sender, recipient)
            if key is not None:
                charges.append(Charge(rule.limit, key, cost, force))
        return charges

    def _decide(self, charges: list[Charge], refusal: Callable[[Limit], Reply]) -> Result:
        if not charges:
            return None
        verdict = self.limiter.check(charges)
        if verdict is ALLOWED:
            return None
        if isinstance(verdict, Deferred):
            return verdict.addCallback(self._answer, refusal)
        return self._answer(verdict, refusal)

    def _answer(self, verdict: Verdict, refusal: Callable[[Limit], Reply]) -> Result:
        if verdict is ALLOWED:
            return None
        limit = verdict.refused
        if limit is None:
            return None
        if limit.action == "tarpit":
            log.info("Rate limit reached, holding the reply back: {limit}", limit=limit.name)
            self.limiter.tarpits += 1
            self.limiter.tarpit_seconds += self._tarpit
            return deferLater(self._clock, self._tarpit, lambda: None)
        if limit.action == "reject":
            return Reply(550, "5.7.1", f"Quota exceeded ({limit.label})")
        return refusal(limit)

    # Connections

    def connection_opened(self, session: SessionView) -> Result:
        tier = self._tier(session)
        ip = normal_ip(session.peer_host)
        # Counted whatever the answer: connection_closed follows every connection_opened.
        self._open[ip] = self._open.get(ip, 0) + 1
        if tier.connections is not None and self._open[ip] > tier.connections:
            self.limiter.count_hit((tier.name, "connections", "connect"))
            return Reply(421, "4.7.0", f"{self._hostname} Too many connections from your address")
        charges = self._charges(tier.rules["connectionRate"], session)
        return self._decide(
            charges,
            lambda limit: Reply(
                421,
                "4.7.0",
                f"{self._hostname} Connection rate limit exceeded ({limit.label}), try again later",
            ),
        )

    def connection_closed(self, session: SessionView) -> None:
        ip = normal_ip(session.peer_host)
        count = self._open.get(ip, 0)
        if count <= 1:
            self._open.pop(ip, None)
        else:
            self._open[ip] = count - 1

    def forget_connections(self) -> None:
        """Forget the open connection counts (the limits are put out of use: closes go uncounted)."""
        self._open.clear()

    def connections_from(self, ip: str) -> int:
        """Connections counted from ``ip`` (tests)."""
        return self._open.get(normal_ip(ip), 0)

    # AUTH

    def check_auth(self, session: SessionView) -> Result:
        charges = self._charges(self._tier(session).rules["authFailures"], session, cost=0)
        return self._decide(
            charges,
            lambda limit: Reply(
                421,
                "4.7.0",
                f"{self._hostname} Too many failed authentications ({limit.label}), try again later",
            ),
        )

    def auth_failed(self, session: SessionView) -> None:
        charges = self._charges(self._tier(session).rules["authFailures"], session, force=True)
        _settle(self.limiter.check(charges))

    # Transaction

    def check_mail(self, session: SessionView, sender: Address, size: int) -> Result:
        rules = self._tier(session).rules
        charges = self._charges(rules["messages"], session, sender=sender)
        charges += self._charges(rules["bytes"], session, sender=sender, cost=size)
        return self._decide(
            charges,
            lambda limit: Reply(451, "4.7.1", f"Rate limit exceeded ({limit.label}), try again later"),
        )

    def check_recipient_rules(
        self, session: SessionView, recipient: Address, accepted: Sequence[str]
    ) -> Reply | None:
        if not self._domain_rules:
            return None
        rules = self._domain(recipient)
        if rules is None:
            return None
        if rules.allowed is not None and not session.auth_user and session.peer_host not in rules.allowed:
            self.limiter.count_hit(_DOMAIN_ALLOWED)
            return Reply(
                550, "5.7.1", f"<{recipient}>: Client address not allowed to send mail to this domain"
            )
        if rules.max_recipients is not None:
            same = sum(1 for text in accepted if self._domain_of(text) is rules)
            if same >= rules.max_recipients:
                self.limiter.count_hit(_DOMAIN_RECIPIENTS)
                return Reply(452, "4.5.3", f"Too many recipients at {rules.label} in one message")
        return None

    def check_recipient(
        self, session: SessionView, sender: Address, recipient: Address, accepted: Sequence[str]
    ) -> Result:
        tier = self._tier(session)
        charges = self._charges(tier.rules["recipients"], session, sender=sender, recipient=recipient)
        domain = recipient.domain.lower()
        if not any(_domain_part(text) == domain for text in accepted):
            # The first recipient at this domain: the message counts toward the domain's message limits.
            charges += self._charges(
                tier.rules["messagesPerRecipientDomain"], session, sender=sender, recipient=recipient
            )
            rules = self._domain(recipient) if self._domain_rules else None
            if rules is not None and rules.messages is not None:
                charges.append(Charge(rules.messages.limit, f"domain.{rules.label}"))
        return self._decide(
            charges,
            lambda limit: Reply(
                451, "4.7.1", f"<{recipient}>: Rate limit exceeded ({limit.label}), try again later"
            ),
        )

    def message_accepted(self, session: SessionView, sender: Address, size: int) -> None:
        rules = self._tier(session).rules["bytes"]
        _settle(self.limiter.check(self._charges(rules, session, sender=sender, cost=size, force=True)))

    def _domain(self, recipient: Address) -> _DomainRules | None:
        if not recipient.domain or recipient.is_literal:
            return None
        return self._domains.match(recipient.domain)

    def _domain_of(self, text: str) -> _DomainRules | None:
        domain = _domain_part(text)
        return self._domains.match(domain) if domain else None


def _domain_part(text: str) -> str:
    return text.rpartition("@")[2].lower() if "@" in text else ""


def _settle(result: Any) -> None:
    """Counting whose answer nobody waits for: log a failure instead of dropping it."""
    if isinstance(result, Deferred):
        result.addErrback(lambda failure: log.failure("Counting toward a rate limit failed", failure))


def limits_configured(config: SmtpConfig) -> bool:
    """Whether any SMTP limit is configured (without one, sessions are not asked about limits at all)."""
    limits = config.rate_limits
    tiers = [limits.anonymous, limits.authenticated, limits.relay_networks, *limits.tiers]
    if any(t.connections is not None or any(tier_limits(t).values()) for t in tiers):
        return True
    return any(
        entry.allowed_ips
        or (
            entry.rate_limits is not None
            and (entry.rate_limits.max_messages_per_minute or entry.rate_limits.max_recipients_per_message)
        )
        for entry in config.domain_configs
    )


def carried_over(
    old: dict[str, tuple[str, Limit]], new: dict[str, tuple[str, Limit]]
) -> dict[str, float | None]:
    """What :meth:`~dcrouter.limits.counters.LocalCounters.carry_over` does with each old limit's counters
    when the limits change at run time: a limit with the same name, key (``per``) and window keeps the events
    it counted, rescaled to its new count or burst (so a lowered limit applies to them at once); any other
    old limit's counters are dropped. Unchanged limits are left out (nothing to do)."""
    changes: dict[str, float | None] = {}
    for name, (per, limit) in old.items():
        kept = new.get(name)
        if kept is None or kept[0] != per or kept[1].rate.window != limit.rate.window:
            changes[name] = None
        elif kept[1].rate != limit.rate:
            changes[name] = kept[1].rate.interval / limit.rate.interval
    return changes


def rebuild_ingress_limits(previous: IngressLimits, config: SmtpConfig, clock: IReactorTime) -> IngressLimits:
    """The limits of ``config`` counted by ``previous``'s limiter (same store, same alerts and their
    observers), for a change at run time: the open connection counts move over, and the counters are
    carried over as :func:`carried_over` says. With Redis, the local fallback's counters are carried over;
    the shared ones in Redis are kept as they are (a changed limit reads a key's stored time debt at its new
    rate) and expire by themselves."""
    limiter = previous.limiter
    limiter.alerts.hits = config.rate_limits.alert_after
    current = IngressLimits(config, limiter, clock)
    current._open = previous._open
    store = limiter.store
    local = store if isinstance(store, LocalCounters) else getattr(store, "local", None)
    if isinstance(local, LocalCounters):
        local.carry_over(carried_over(previous.rules(), current.rules()))
    return current


def build_ingress_limits(
    config: SmtpConfig,
    clock: IReactorTime,
    redis_call: Callable[..., Deferred[Any]] | None = None,
    workers: int = 1,
) -> IngressLimits | None:
    """The SMTP limits of ``config``, counting in this process, or shared through Redis when ``redis_call``
    (a Redis client's ``call(method, *args)``) is given; None when no limit is configured. Without Redis,
    ``workers`` processes each count 1/``workers`` of every limit (:class:`LocalCounters`' ``share``)."""
    if not limits_configured(config):
        return None
    limits = config.rate_limits
    local = LocalCounters(clock, limits.max_keys, share=1 if redis_call is not None else workers)
    store: LocalCounters | SharedCounters = local
    if redis_call is not None:
        store = SharedCounters(RedisCounters(redis_call), local, clock)
    alerts = Alerts(hits=limits.alert_after, max_keys=limits.max_keys)
    return IngressLimits(config, Limiter(store, clock, alerts), clock)
