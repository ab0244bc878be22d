"""Tests for dcrouter.delivery.routing: rules, domainConfigs, defaultServer and MX, in that order."""

from __future__ import annotations

from typing import Any

from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dcrouter.config import load_options
from dcrouter.config.delivery import RoutingRuleConfig
from dcrouter.config.smtp import SmtpConfig
from dcrouter.delivery.route import Route
from dcrouter.delivery.routing import PatternRule, RecipientRouter
from dcrouter.interfaces import IRoutingRule
from dcrouter.mail.patterns import AddressPatterns, parse_address_pattern


def smtp_config(**keys: Any) -> SmtpConfig:
    """A loaded smtpConfig (through the real loader, so the config checks run too)."""
    raw: dict[str, Any] = {"ports": [2525], "hostname": "mx.gateway.test"}
    raw.update(keys)
    config = load_options({"smtpConfig": raw}).options.smtp_config
    assert config is not None
    return config


DOMAINS = [
    {
        "domains": ["example.com"],
        "targetIPs": ["10.0.0.1"],
        "port": 2525,
        "useTls": True,
        "authentication": {"user": "u", "pass": "p"},
    },
    {"domains": ["*.example.com"], "targetIPs": ["10.0.0.2", "10.0.0.3"]},
    {"domains": ["*.b.example.com", "Bücher.example"], "targetIPs": ["relay.b.test"]},
]


@implementer(IRoutingRule)
class FixedRule:
    """A plugin rule routing every recipient whose local part is ``local``."""

    def __init__(self, name: str, priority: int, local: str) -> None:
        self.name = name
        self.priority = priority
        self.local = local

    def route(self, sender: str, recipient: str) -> Route | None:
        if recipient.partition("@")[0] != self.local:
            return None
        return Route(name=f"rule:{self.name}", targets=("192.0.2.99",))


class DomainRoutingTests(unittest.TestCase):
    def setUp(self) -> None:
        self.table = RecipientRouter(smtp_config(domainConfigs=DOMAINS))

    def test_exact_domain(self) -> None:
        route = self.table.route("a@sender.test", "x@example.com")
        self.assertEqual(
            route,
            Route(
                name="domain:example.com",
                targets=("10.0.0.1",),
                port=2525,
                require_tls=True,
                auth_user="u",
                auth_password="p",
            ),
        )

    def test_wildcard_covers_sub_domains_not_the_domain(self) -> None:
        self.assertEqual(
            self.table.route("", "x@a.example.com"),
            Route(name="domain:*.example.com", targets=("10.0.0.2", "10.0.0.3")),
        )
        self.assertEqual(self.table.route("", "x@c.a.example.com").name, "domain:*.example.com")

    def test_most_specific_wildcard_wins(self) -> None:
        self.assertEqual(self.table.route("", "x@a.b.example.com").name, "domain:*.b.example.com")
        self.assertEqual(self.table.route("", "x@b.example.com").name, "domain:*.example.com")

    def test_domain_case_and_idna(self) -> None:
        self.assertEqual(self.table.route("", "x@EXAMPLE.com").name, "domain:example.com")
        self.assertEqual(self.table.route("", "x@xn--bcher-kva.example").name, "domain:xn--bcher-kva.example")

    def test_no_match_goes_by_mx(self) -> None:
        self.assertEqual(
            self.table.route("", "x@Other.ORG"), Route(name="mx:other.org", mx_domain="other.org")
        )

    def test_address_literal_goes_by_mx_route(self) -> None:
        # Delivery refuses mx:[...] permanently (dcrouter.delivery.mx.AddressLiteralRefused).
        self.assertEqual(
            self.table.route("", "x@[192.0.2.1]"), Route(name="mx:[192.0.2.1]", mx_domain="[192.0.2.1]")
        )

    def test_bare_postmaster_is_the_gateway_hostname(self) -> None:
        table = RecipientRouter(
            smtp_config(
                domainConfigs=[{"domains": ["gateway.test", "*.gateway.test"], "targetIPs": ["10.1.1.1"]}]
            )
        )
        self.assertEqual(table.route("", "postmaster").name, "domain:*.gateway.test")


class DefaultServerTests(unittest.TestCase):
    def test_default_server(self) -> None:
        table = RecipientRouter(
            smtp_config(domainConfigs=DOMAINS, defaultServer="smart.test", defaultPort=587, useTls=True)
        )
        self.assertEqual(
            table.route("", "x@other.org"),
            Route(name="default", targets=("smart.test",), port=587, require_tls=True),
        )
        self.assertEqual(table.route("", "x@[192.0.2.1]").name, "default")
        self.assertEqual(table.route("", "x@example.com").name, "domain:example.com")


RULES = [
    {
        "name": "billing",
        "priority": 10,
        "senders": ["*@billing.example.com"],
        "targetIPs": ["10.9.0.1"],
        "port": 2526,
        "useTls": True,
        "authentication": {"user": "bu", "pass": "bp"},
    },
    {"name": "bounces", "priority": 20, "senders": ["<>"], "targetIPs": ["10.9.0.2"]},
    {"name": "ceo", "priority": 5, "recipients": ["Boss@example.com"], "targetIPs": ["10.9.0.3"]},
    {
        "name": "subs",
        "senders": ["*@*.corp.test"],
        "recipients": ["*@example.com"],
        "targetIPs": ["10.9.0.4"],
    },
]


class RuleTests(unittest.TestCase):
    def setUp(self) -> None:
        self.table = RecipientRouter(
            smtp_config(domainConfigs=DOMAINS, defaultServer="smart.test", routingRules=RULES)
        )

    def test_sender_rule_before_domains(self) -> None:
        self.assertEqual(
            self.table.route("invoice@Billing.Example.COM", "x@example.com"),
            Route(
                name="rule:billing",
                targets=("10.9.0.1",),
                port=2526,
                require_tls=True,
                auth_user="bu",
                auth_password="bp",
            ),
        )

    def test_priority_order(self) -> None:
        # Both "ceo" (5) and "billing" (10) match; the lower priority value wins.
        self.assertEqual(self.table.route("a@billing.example.com", "Boss@example.com").name, "rule:ceo")

    def test_local_part_is_case_sensitive(self) -> None:
        self.assertEqual(self.table.route("a@x.test", "Boss@EXAMPLE.COM").name, "rule:ceo")
        self.assertEqual(self.table.route("a@x.test", "boss@example.com").name, "domain:example.com")

    def test_null_sender(self) -> None:
        self.assertEqual(self.table.route("", "x@other.org").name, "rule:bounces")
        self.assertEqual(self.table.route("x@y.test", "x@other.org").name, "default")

    def test_senders_and_recipients_both_required(self) -> None:
        self.assertEqual(self.table.route("a@eu.corp.test", "x@example.com").name, "rule:subs")
        self.assertEqual(self.table.route("a@eu.corp.test", "x@a.example.com").name, "domain:*.example.com")
        # '*.corp.test' is the sub-domains only.
        self.assertEqual(self.table.route("a@corp.test", "x@example.com").name, "domain:example.com")

    def test_plugin_rule_by_priority(self) -> None:
        self.table.add_rule(FixedRule("plugin", 1, "Boss"))
        self.assertEqual(self.table.route("", "Boss@example.com").name, "rule:plugin")

    def test_equal_priority_keeps_config_rules_first(self) -> None:
        table = RecipientRouter(smtp_config(routingRules=RULES), rules=[FixedRule("late", 5, "Boss")])
        self.assertEqual(table.route("", "Boss@example.com").name, "rule:ceo")
        self.assertEqual(table.route("", "Boss@other.org").name, "rule:late")

    def test_pattern_rule_provides_interface(self) -> None:
        rule = PatternRule(RoutingRuleConfig(name="r", target_ips=["10.0.0.1"], priority=7))
        self.assertTrue(verifyObject(IRoutingRule, rule))
        self.assertEqual(rule.priority, 7)
        # No patterns at all: every sender and recipient.
        self.assertEqual(rule.route("", "a@b.test"), Route(name="rule:r", targets=("10.0.0.1",)))


class GroupTests(unittest.TestCase):
    def test_three_routes_in_recipient_order(self) -> None:
        table = RecipientRouter(smtp_config(domainConfigs=DOMAINS, routingRules=RULES[2:3]))
        recipients = ["a@other.org", "b@example.com", "Boss@example.com", "c@other.org", "d@example.com"]
        groups = table.group("s@x.test", recipients)
        self.assertEqual(
            [(route.name, rcpts) for route, rcpts in groups],
            [
                ("mx:other.org", ["a@other.org", "c@other.org"]),
                ("domain:example.com", ["b@example.com", "d@example.com"]),
                ("rule:ceo", ["Boss@example.com"]),
            ],
        )

    def test_same_targets_under_two_patterns_stay_apart(self) -> None:
        # The route name is the destination key (pools, limits), so equal servers do not merge routes.
        table = RecipientRouter(
            smtp_config(domainConfigs=[{"domains": ["a.test", "*.a.test"], "targetIPs": ["10.0.0.1"]}])
        )
        groups = table.group("", ["x@a.test", "y@s.a.test", "z@a.test"])
        self.assertEqual(
            [(r.name, rc) for r, rc in groups],
            [("domain:a.test", ["x@a.test", "z@a.test"]), ("domain:*.a.test", ["y@s.a.test"])],
        )

    def test_empty(self) -> None:
        self.assertEqual(RecipientRouter(smtp_config()).group("", []), [])


class PatternTests(unittest.TestCase):
    def test_matches(self) -> None:
        patterns = AddressPatterns(["*@*.example.com", "bob@a.example.com", "<>"])
        self.assertTrue(patterns.matches("alice@a.example.com"))  # the wildcard, though bob@ is more specific
        self.assertTrue(patterns.matches("bob@a.example.com"))
        self.assertFalse(patterns.matches("bob@example.com"))
        self.assertTrue(patterns.matches(""))
        self.assertFalse(patterns.matches("postmaster"))
        self.assertFalse(patterns.matches("x@[192.0.2.1]"))

    def test_null_only_when_listed(self) -> None:
        self.assertFalse(AddressPatterns(["*@example.com"]).matches(""))

    def test_quoted_local_part(self) -> None:
        self.assertTrue(AddressPatterns(['"a b"@example.com']).matches('"a b"@example.com'))

    def test_invalid(self) -> None:
        for bad in [
            "example.com",
            "@example.com",
            "*",
            "*@*",
            "bo*@example.com",
            "a b@example.com",
            "*@exa mple.com",
            "*@a.*.com",
            "",
        ]:
            with self.assertRaises(ValueError, msg=bad):
                parse_address_pattern(bad)
        with self.assertRaises(ValueError):
            parse_address_pattern("<>", allow_null=False)
