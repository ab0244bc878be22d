"""Tests for the configuration checks of routing: routingRules patterns and names, mtaConfig.dnsServers, and
the keys that apply to defaultServer only."""

from __future__ import annotations

from typing import Any

from twisted.trial import unittest

from dcrouter.config import ConfigError, load_options
from dcrouter.net.hostport import split_dns_server


def smtp(**keys: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"ports": [2525], "hostname": "mx.example.com"}
    raw.update(keys)
    return {"smtpConfig": raw}


RULE = "smtpConfig.routingRules[0]"


def rule(**keys: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"name": "r", "targetIPs": ["10.0.0.1"]}
    raw.update(keys)
    return raw


class Case(unittest.TestCase):
    def errors(self, raw: dict[str, Any]) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            load_options(raw)
        return caught.exception.errors


class RoutingRuleTests(Case):
    def test_valid_patterns(self) -> None:
        raw = smtp(
            routingRules=[
                rule(
                    senders=["*@billing.example.com", "<>", "a.b@*.corp.example", '"a b"@x.test'],
                    recipients=["*@Example.COM", "Bob@example.org"],
                )
            ]
        )
        result = load_options(raw)
        self.assertEqual(result.warnings, [])
        options = result.options.smtp_config
        assert options is not None
        self.assertEqual(options.routing_rules[0].senders[1], "<>")

    def test_invalid_patterns_named(self) -> None:
        raw = smtp(
            routingRules=[rule(senders=["billing.example.com", "*@*"], recipients=["<>", "a*@x.test"])]
        )
        self.assertEqual(
            self.errors(raw),
            [
                (
                    f"{RULE}.senders[0]: 'billing.example.com': expected 'local@domain', '*@domain' or "
                    "'*@*.domain'"
                ),
                (
                    f"{RULE}.senders[1]: '*@*': a bare '*' domain matches everything; leave the list empty "
                    "instead"
                ),
                f"{RULE}.recipients[0]: '<>' (the null sender) never is a recipient",
                f"{RULE}.recipients[1]: 'a*@x.test': '*' is only allowed as the whole local part",
            ],
        )

    def test_bad_domain_in_pattern(self) -> None:
        self.assertEqual(
            self.errors(smtp(routingRules=[rule(recipients=["*@exa_mple.com"])])),
            [f"{RULE}.recipients[0]: '*@exa_mple.com': 'exa_mple.com' is not a domain name or '*.' wildcard"],
        )

    def test_rule_names_unique(self) -> None:
        raw = smtp(routingRules=[rule(name="a"), rule(name="b"), rule(name="a")])
        self.assertEqual(
            self.errors(raw), ["smtpConfig.routingRules[2].name: 'a' is also smtpConfig.routingRules[0]"]
        )


class DnsServerTests(Case):
    def test_valid(self) -> None:
        servers = ["192.0.2.53", "192.0.2.53:5353", "2001:db8::53", "[2001:db8::53]:5353", "[::1]"]
        load_options({**smtp(), "mtaConfig": {"dnsServers": servers}})
        self.assertEqual(
            [split_dns_server(s) for s in servers],
            [
                ("192.0.2.53", 53),
                ("192.0.2.53", 5353),
                ("2001:db8::53", 53),
                ("2001:db8::53", 5353),
                ("::1", 53),
            ],
        )

    def test_invalid_named(self) -> None:
        servers = [
            "ns1.example.com",
            "192.0.2.53:0",
            "192.0.2.53:",
            "[192.0.2.53]:53",
            "[::1]x",
            "1.2.3.4:dns",
        ]
        self.assertEqual(
            self.errors({**smtp(), "mtaConfig": {"dnsServers": servers}}),
            [
                (
                    "mtaConfig.dnsServers[0]: 'ns1.example.com': not an IP address (write IP, IP:port or "
                    "[IPv6]:port)"
                ),
                "mtaConfig.dnsServers[1]: '192.0.2.53:0': not a port number (1-65535): '0'",
                "mtaConfig.dnsServers[2]: '192.0.2.53:': empty port",
                "mtaConfig.dnsServers[3]: '[192.0.2.53]:53': brackets are for IPv6 addresses",
                "mtaConfig.dnsServers[4]: '[::1]x': expected '[IPv6]:port'",
                "mtaConfig.dnsServers[5]: '1.2.3.4:dns': not a port number (1-65535): 'dns'",
            ],
        )


class DefaultRouteTests(Case):
    def test_relaying_without_default_server_is_fine(self) -> None:
        # Mail outside domainConfigs now goes by MX.
        self.assertEqual(load_options(smtp(relayNetworks=["10.0.0.0/8"])).warnings, [])

    def test_default_server_keys_without_it(self) -> None:
        self.assertEqual(
            load_options(smtp(defaultPort=587, useTls=True)).warnings,
            [
                (
                    "smtpConfig.defaultPort: has no effect without smtpConfig.defaultServer: other mail goes "
                    "by MX, to port 25"
                ),
                (
                    "smtpConfig.useTls: has no effect without smtpConfig.defaultServer: mail delivered by MX "
                    "uses STARTTLS when offered, and is not refused without it"
                ),
            ],
        )

    def test_default_server_keys_with_it(self) -> None:
        raw = smtp(defaultServer="relay.example.com", defaultPort=587, useTls=True)
        self.assertEqual(load_options(raw).warnings, [])
