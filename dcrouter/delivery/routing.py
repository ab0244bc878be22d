"""Routing: which Route each recipient of a message takes.

The decision, first answer wins (``RecipientRouter.route``):

1. **Rules** (:class:`~dcrouter.interfaces.IRoutingRule`): ``smtpConfig.routingRules`` as :class:`PatternRule`
   plus rules added by plugins, in ascending ``priority`` (equal priorities keep the order they were given
   in: config rules first, then added ones). The first rule returning a Route wins.
2. **domainConfigs**, by the recipient's domain: an exact name before any wildcard, then the most specific
   wildcard (``*.b.example.com`` before ``*.example.com``). Route ``domain:<matched pattern>``.
3. **defaultServer** with defaultPort and useTls. Route ``default``.
4. **MX**: direct delivery, looked up at delivery time. Route ``mx:<domain>``.

Decisions a caller may rely on:

- Address literals (``user@[192.0.2.1]``) match no pattern and no domainConfigs entry; they go to
  defaultServer when there is one, else to Route ``mx:[192.0.2.1]``, which delivery refuses permanently
  (:class:`dcrouter.delivery.mx.AddressLiteralRefused`, ``550 5.1.2``). Delivering to any IP a client names
  would let authenticated users aim the gateway at internal hosts.
- The bare ``postmaster`` recipient (no domain) is routed as if its domain were ``smtpConfig.hostname``.
- An exception raised by a plugin rule propagates out of ``route``/``group`` (a bug, not a routing answer).
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Sequence

from zope.interface import implementer

from dcrouter.config.delivery import AuthenticationConfig, RoutingRuleConfig
from dcrouter.config.smtp import SmtpConfig
from dcrouter.delivery.route import Route
from dcrouter.interfaces import IRoutingRule
from dcrouter.mail.patterns import AddressPatterns
from dcrouter.net.domains import DomainMatcher, normalize_domain


def _auth(auth: AuthenticationConfig | None) -> tuple[str | None, str | None]:
    if auth is None:
        return None, None
    return auth.user, auth.pass_


@implementer(IRoutingRule)
class PatternRule:
    """A ``smtpConfig.routingRules`` entry: recipients matching ``recipients`` of messages from senders
    matching ``senders`` (an empty list matches all) go to Route ``rule:<name>`` with the entry's targets,
    port, TLS requirement and AUTH."""

    def __init__(self, config: RoutingRuleConfig) -> None:
        """Raises ValueError for an invalid pattern (the config loader has refused those already)."""
        self.name: str = config.name
        self.priority: int = config.priority
        self._senders = AddressPatterns(config.senders) if config.senders else None
        self._recipients = AddressPatterns(config.recipients, allow_null=False) if config.recipients else None
        user, password = _auth(config.authentication)
        self._route = Route(
            name=f"rule:{config.name}",
            targets=tuple(config.target_ips),
            port=config.port,
            require_tls=config.use_tls,
            auth_user=user,
            auth_password=password,
        )

    def route(self, sender: str, recipient: str) -> Route | None:
        if self._senders is not None and not self._senders.matches(sender):
            return None
        if self._recipients is not None and not self._recipients.matches(recipient):
            return None
        return self._route

    def __repr__(self) -> str:
        return f"<PatternRule {self.name!r} priority={self.priority}>"


def domain_name(pattern: str) -> str:
    """The normalised spelling of a domainConfigs pattern, for the route name."""
    if pattern.startswith("*."):
        return "*." + normalize_domain(pattern[2:])
    return normalize_domain(pattern)


class RecipientRouter:
    """Routes recipients by the decision order in this module's docstring; built once per configuration."""

    def __init__(self, config: SmtpConfig, rules: Sequence[IRoutingRule] = ()) -> None:
        """Raises ValueError for an invalid pattern in ``config`` (the loader refuses those already)."""
        #: Rules added other than from the configuration (plugins): kept by :meth:`reconfigure`.
        self._added: list[IRoutingRule] = []
        self._rules: list[IRoutingRule] = []
        self.reconfigure(config)
        for rule in rules:
            self.add_rule(rule)

    def reconfigure(self, config: SmtpConfig) -> None:
        """Route by ``config``'s routingRules, domainConfigs and defaultServer from now on (rules added by
        :meth:`add_rule` stay). Everything is built before anything changes, so a ValueError leaves the
        router as it was, and a caller on the reactor thread swaps it between two routing decisions."""
        rules: list[IRoutingRule] = []
        for rule_config in config.routing_rules:
            bisect.insort_right(rules, PatternRule(rule_config), key=lambda r: r.priority)
        for rule in self._added:
            bisect.insort_right(rules, rule, key=lambda r: r.priority)
        entries: list[tuple[str, Route]] = []
        for domain_config in config.domain_configs:
            user, password = _auth(domain_config.authentication)
            for pattern in domain_config.domains:
                name = domain_name(pattern)
                route = Route(
                    name=f"domain:{name}",
                    targets=tuple(domain_config.target_ips),
                    port=domain_config.port,
                    require_tls=domain_config.use_tls,
                    auth_user=user,
                    auth_password=password,
                )
                entries.append((pattern, route))
        domains: DomainMatcher[Route] = DomainMatcher(entries)
        default: Route | None = None
        if config.default_server:
            default = Route(
                name="default",
                targets=(config.default_server,),
                port=config.default_port,
                require_tls=config.use_tls,
            )
        self._rules, self._domains, self._default = rules, domains, default
        self._hostname = config.hostname

    def add_rule(self, rule: IRoutingRule) -> None:
        """Add a rule; it is evaluated after rules of lower or equal priority that were added before it."""
        self._added.append(rule)
        bisect.insort_right(self._rules, rule, key=lambda r: r.priority)

    def route(self, sender: str, recipient: str) -> Route:
        """The Route for ``recipient`` of a message from ``sender`` (``""`` is the null sender). Never None:
        without any other answer, the recipient's domain is delivered to by MX."""
        for rule in self._rules:
            found = rule.route(sender, recipient)
            if found is not None:
                return found
        _local, at, domain = recipient.rpartition("@")
        if not at:
            domain = self._hostname
        found = self._domains.match(domain)
        if found is not None:
            return found
        if self._default is not None:
            return self._default
        with contextlib.suppress(ValueError):  # an address literal stays as it is; delivery refuses it
            domain = normalize_domain(domain)
        return Route(name=f"mx:{domain}", mx_domain=domain)

    def group(self, sender: str, recipients: Sequence[str]) -> list[tuple[Route, list[str]]]:
        """The recipients split by Route: one entry per distinct Route, in the order of each Route's first
        recipient, each list in the order given. Every recipient appears exactly once."""
        groups: dict[Route, list[str]] = {}
        for recipient in recipients:
            groups.setdefault(self.route(sender, recipient), []).append(recipient)
        return list(groups.items())
