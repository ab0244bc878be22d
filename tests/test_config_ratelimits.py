"""``smtpConfig.rateLimits`` and the domainConfigs' rateLimits and allowedIPs: loading and every check, with
key paths."""

from __future__ import annotations

import copy
from typing import Any

from twisted.trial import unittest

from dcrouter.config import ConfigError, load_options

BASE: dict[str, Any] = {
    "smtpConfig": {
        "ports": [2525],
        "hostname": "mx.example.com",
        "domainConfigs": [{"domains": ["example.com"], "targetIPs": ["10.0.0.10"]}],
    }
}


def with_limits(limits: dict[str, Any], **domain: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    raw["smtpConfig"]["rateLimits"] = limits
    raw["smtpConfig"]["domainConfigs"][0].update(domain)
    return raw


class RateLimitsConfigTests(unittest.TestCase):
    def errors(self, raw: dict[str, Any]) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            load_options(raw)
        return caught.exception.errors

    def test_a_full_block_loads(self) -> None:
        raw = with_limits(
            {
                "anonymous": {
                    "connections": 5,
                    "connectionRate": [{"count": 30, "window": 60000}],
                    "messages": [{"count": 100, "window": 3600000}, {"count": 300, "per": "ipPrefix"}],
                    "recipients": [{"count": 500, "window": 3600000, "burst": 50}],
                    "bytes": [{"count": 100000000, "window": 86400000}],
                    "authFailures": [{"count": 5, "window": 600000}],
                },
                "authenticated": {
                    "messages": [{"count": 10000, "window": 86400000, "per": "user", "action": "reject"}]
                },
                "tiers": [
                    {"name": "partner", "networks": ["198.51.100.0/24"], "messages": [{"count": 5000}]}
                ],
                "tarpitDelay": 2000,
                "maxKeys": 5000,
                "alertAfter": 3,
            },
            allowedIPs=["192.0.2.0/24"],
            rateLimits={"maxMessagesPerMinute": 10, "maxRecipientsPerMessage": 5},
        )
        options = load_options(raw).options
        assert options.smtp_config is not None
        limits = options.smtp_config.rate_limits
        self.assertEqual(limits.anonymous.messages[1].per, "ipPrefix")
        self.assertEqual(limits.authenticated.messages[0].action, "reject")
        self.assertEqual(limits.tiers[0].name, "partner")
        self.assertEqual(limits.anonymous.data_bytes[0].count, 100000000)
        entry = options.smtp_config.domain_configs[0]
        self.assertEqual(entry.allowed_ips, ["192.0.2.0/24"])
        assert entry.rate_limits is not None
        self.assertEqual(entry.rate_limits.max_messages_per_minute, 10)

    def test_errors_name_their_key_paths(self) -> None:
        raw = with_limits(
            {
                "anonymous": {
                    "messages": [{"count": 0}, {"count": 1, "window": 500}, {"count": 1, "per": "user"}],
                    "connectionRate": [{"count": 1, "per": "sender"}],
                    "authFailures": [{"count": 1, "action": "bounce"}],
                    "messagez": [],
                },
                "tiers": [
                    {"name": "p", "networks": ["10.1.2.3/8"]},
                    {"name": "p", "networks": []},
                ],
                "ipv4Prefix": 33,
            },
            allowedIPs=["nonsense"],
            rateLimits={"maxMessagesPerMinute": 0, "perHour": 1},
        )
        paths = sorted(e.split(": ")[0] for e in self.errors(raw))
        prefix = "smtpConfig.rateLimits."
        self.assertEqual(
            paths,
            sorted(
                [
                    "smtpConfig.domainConfigs[0].allowedIPs[0]",
                    "smtpConfig.domainConfigs[0].rateLimits.maxMessagesPerMinute",
                    "smtpConfig.domainConfigs[0].rateLimits.perHour",
                    prefix + "anonymous.messagez",
                    prefix + "anonymous.messages[0].count",
                    prefix + "anonymous.messages[1].window",
                    prefix + "anonymous.connectionRate[0].per",
                    prefix + "anonymous.authFailures[0].action",
                    prefix + "tiers[0].networks[0]",
                    prefix + "tiers[1].networks",
                    prefix + "ipv4Prefix",
                ]
            ),
        )

    def test_user_key_only_for_authenticated_sessions(self) -> None:
        raw = with_limits(
            {
                "anonymous": {"messages": [{"count": 1, "per": "user"}]},
                "tiers": [
                    {"name": "p", "networks": ["10.0.0.0/8"], "recipients": [{"count": 1, "per": "user"}]}
                ],
                "relayNetworks": {"bytes": [{"count": 1, "per": "user"}]},
            }
        )
        errors = self.errors(raw)
        self.assertEqual(
            sorted(e.split(": ")[0] for e in errors),
            [
                "smtpConfig.rateLimits.anonymous.messages[0].per",
                "smtpConfig.rateLimits.relayNetworks.bytes[0].per",
                "smtpConfig.rateLimits.tiers[0].recipients[0].per",
            ],
        )
        self.assertIn("only in the authenticated tier", errors[0])

    def test_reject_only_for_quotas(self) -> None:
        raw = with_limits(
            {
                "anonymous": {
                    "connectionRate": [{"count": 1, "action": "reject"}],
                    "authFailures": [{"count": 1, "action": "reject"}],
                    "messages": [{"count": 1, "action": "reject"}],
                }
            }
        )
        self.assertEqual(
            [e.split(": ")[0] for e in self.errors(raw)],
            [
                "smtpConfig.rateLimits.anonymous.connectionRate[0].action",
                "smtpConfig.rateLimits.anonymous.authFailures[0].action",
            ],
        )

    def test_tier_names_once(self) -> None:
        raw = with_limits(
            {"tiers": [{"name": "p", "networks": ["10.0.0.0/8"]}, {"name": "p", "networks": ["11.0.0.0/8"]}]}
        )
        self.assertEqual(self.errors(raw), ["smtpConfig.rateLimits.tiers[1].name: 'p' is listed twice"])

    def test_delivery_rate_limits(self) -> None:
        raw = copy.deepcopy(BASE)
        raw["smtpConfig"]["delivery"] = {
            "globalRateLimit": 100,
            "perServerRateLimit": 20,
            "perDomainRateLimit": {"example.org": 5},
        }
        delivery = load_options(raw).options.smtp_config.delivery  # type: ignore[union-attr]
        self.assertEqual(delivery.per_domain_rate_limit, {"example.org": 5})
        raw["smtpConfig"]["delivery"] = {
            "globalRateLimit": 0,
            "perDomainRateLimit": {"*.example.org": 5},
        }
        self.assertEqual(
            self.errors(raw),
            [
                "smtpConfig.delivery.globalRateLimit: must be at least 1: 0",
                "smtpConfig.delivery.perDomainRateLimit: not a domain name: '*.example.org'",
            ],
        )
        raw["smtpConfig"]["delivery"] = {"perDomainRateLimit": {"example.org": 0}}
        (error,) = self.errors(raw)
        self.assertIn("example.org: must be a positive number of messages per minute: 0", error)
