"""``/api/v1/rate-limits`` over a real listening port (a DcRouter with a memory queue on 127.0.0.1), its
effect over a real SMTP session (smtplib in a thread), and the carry-over of counters on a Clock."""

from __future__ import annotations

import os
import smtplib
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from dcrouter import DcRouter
from dcrouter.config import load_file, load_options
from dcrouter.limits.counters import LocalCounters
from dcrouter.limits.ingress import build_ingress_limits, rebuild_ingress_limits
from dcrouter.mail.address import parse_mail_argument
from dcrouter.observe.metrics import RouterMetrics
from tests.test_api import READER, ApiTestBase, router_options
from tests.test_api_routing import RoutingRouterBase, smtp_options

ANONYMOUS_100 = {"anonymous": {"messages": [{"count": 100, "window": 60000}]}}


class RateLimitApiTests(ApiTestBase):
    async def start_limits(self, smtp: dict[str, Any] | None = None) -> DcRouter:
        options = router_options({"rateLimits": ANONYMOUS_100, **(smtp or {})})
        return await self.start_router(options, paused=True)

    async def test_scopes(self) -> None:
        await self.start_limits()
        code, _, _ = await self.call("GET", "/api/v1/rate-limits", token=None)
        self.assertEqual(code, 401)
        code, _, _ = await self.call("GET", "/api/v1/rate-limits", token=READER)
        self.assertEqual(code, 200)
        for method, path, data in [
            ("PUT", "/api/v1/rate-limits", {"rateLimits": {}}),
            ("POST", "/api/v1/rate-limits/outbound", {"domain": "example.org", "limit": 5}),
            ("DELETE", "/api/v1/rate-limits/outbound/example.org", None),
        ]:
            code, answer, _ = await self.call(method, path, token=READER, body=data)
            self.assertEqual((code, answer["error"]["code"]), (403, "forbidden"), path)

    async def test_get_answers_what_put_takes(self) -> None:
        await self.start_limits({"delivery": {"globalRateLimit": 600, "perDomainRateLimit": {"b.test": 6}}})
        code, body, _ = await self.call("GET", "/api/v1/rate-limits")
        self.assertEqual(code, 200)
        messages = body["rateLimits"]["anonymous"]["messages"]
        self.assertEqual(
            messages, [{"count": 100, "window": 60000, "burst": None, "per": "ip", "action": "defer"}]
        )
        self.assertEqual(body["domainConfigs"], [{"domains": ["example.com"], "rateLimits": None}])
        self.assertEqual(
            body["delivery"],
            {"globalRateLimit": 600, "perServerRateLimit": None, "perDomainRateLimit": {"b.test": 6}},
        )
        code, again, _ = await self.call("PUT", "/api/v1/rate-limits", body=body)
        self.assertEqual((code, again.pop("persisted")), (200, False))
        self.assertEqual(again, body)

    async def test_invalid_limits_change_nothing(self) -> None:
        router = await self.start_limits()
        before = router.limits
        code, body, _ = await self.call(
            "PUT",
            "/api/v1/rate-limits",
            body={
                "rateLimits": {"anonymous": {"messages": [{"count": 0}], "bogus": 1}},
                "domainConfigs": [{"domains": ["example.com"], "rateLimits": {"maxMessagesPerMinute": "x"}}],
                "delivery": {"perDomainRateLimit": {"not a domain": 5}, "maxRetries": 3},
            },
        )
        self.assertEqual((code, body["error"]["code"]), (422, "invalid_config"))
        errors = body["error"]["errors"]
        for path in [
            "smtpConfig.rateLimits.anonymous.messages[0].count",
            "smtpConfig.rateLimits.anonymous.bogus",
            "smtpConfig.domainConfigs[0].rateLimits.maxMessagesPerMinute",
            "smtpConfig.delivery.perDomainRateLimit",
            "smtpConfig.delivery.maxRetries",
        ]:
            self.assertTrue(any(e.startswith(path) for e in errors), (path, errors))
        self.assertIs(router.limits, before)
        code, body, _ = await self.call("PUT", "/api/v1/rate-limits", body={"domainConfigs": []})
        self.assertEqual(code, 422)
        self.assertIn("smtpConfig.domainConfigs", body["error"]["message"])
        code, body, _ = await self.call(
            "PUT", "/api/v1/rate-limits", body={"domainConfigs": [{"domains": ["other.test"]}]}
        )
        self.assertEqual(code, 422)
        self.assertIn("smtpConfig.domainConfigs[0].domains", body["error"]["message"])
        code, body, _ = await self.call("PUT", "/api/v1/rate-limits", body={"rateLimits": []})
        self.assertEqual((code, body["error"]["code"]), (400, "bad_field"))

    def smtp_mail(self) -> Any:
        """One session: EHLO, then MAIL FROM; its reply."""

        def run() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", self.smtp_port(), local_hostname="client.test", timeout=10) as s:
                s.ehlo()
                reply = s.mail("a@sender.test")
                s.rset()
                return reply

        return deferToThread(run)

    async def test_lowering_the_anonymous_limit_holds_the_next_mail(self) -> None:
        router = await self.start_limits()
        for _ in range(3):
            code, _ = await self.smtp_mail()
            self.assertEqual(code, 250)
        code, body, _ = await self.call(
            "PUT", "/api/v1/rate-limits", body={"rateLimits": {"anonymous": {"messages": [{"count": 2}]}}}
        )
        self.assertEqual(code, 200, body)
        self.assertEqual(body["rateLimits"]["anonymous"]["messages"][0]["count"], 2)
        # The three messages counted under 100 a minute are kept: two a minute is over at once.
        code, text = await self.smtp_mail()
        self.assertEqual(code, 451)
        code, scraped, _ = await self.call("GET", "/metrics")
        self.assertIn(
            b'dcrouter_rate_limit_hits_total{phase="mail",protocol="smtp",thing="messages",'
            b'tier="anonymous"} 1.0',
            scraped,
        )
        self.assertTrue(
            text.startswith(b"4.7.1 Rate limit exceeded (messages per client address: 2 per"), text
        )
        code, body, _ = await self.call("PUT", "/api/v1/rate-limits", body={"rateLimits": ANONYMOUS_100})
        self.assertEqual(code, 200)
        code, _ = await self.smtp_mail()
        self.assertEqual(code, 250)
        # No limit at all: the policy is asked about none.
        code, body, _ = await self.call("PUT", "/api/v1/rate-limits", body={"rateLimits": {}})
        self.assertEqual(code, 200)
        self.assertIsNone(router.limits)
        code, _ = await self.smtp_mail()
        self.assertEqual(code, 250)

    async def test_domain_limit_set_at_run_time(self) -> None:
        await self.start_limits({"rateLimits": {}})

        def run() -> list[int]:
            codes = []
            with smtplib.SMTP("127.0.0.1", self.smtp_port(), local_hostname="client.test", timeout=10) as s:
                s.ehlo()
                for _ in range(3):
                    s.mail("a@sender.test")
                    codes.append(s.rcpt("b@example.com")[0])
                    s.rset()
            return codes

        code, body, _ = await self.call(
            "PUT",
            "/api/v1/rate-limits",
            body={"domainConfigs": [{"domains": ["example.com"], "rateLimits": {"maxMessagesPerMinute": 2}}]},
        )
        self.assertEqual(code, 200, body)
        self.assertEqual(await deferToThread(run), [250, 250, 451])
        # A routing change starts from the configuration as it now is: the limit set here is kept.
        code, routing, _ = await self.call("GET", "/api/v1/routing")
        self.assertEqual(routing["domainConfigs"][0]["rateLimits"], {"maxMessagesPerMinute": 2})
        code, body, _ = await self.call("PUT", "/api/v1/routing", body=routing)
        self.assertEqual(code, 200, body)
        code, body, _ = await self.call("GET", "/api/v1/rate-limits")
        self.assertEqual(body["domainConfigs"][0]["rateLimits"]["maxMessagesPerMinute"], 2)

    async def test_outbound_set_and_clear(self) -> None:
        router = await self.start_limits()
        assert router.delivery is not None
        shaper = router.delivery.shaper
        code, body, _ = await self.call(
            "POST", "/api/v1/rate-limits/outbound", body={"domain": "Example.org", "limit": 30}
        )
        self.assertEqual((code, body["perDomainRateLimit"]), (200, {"example.org": 30}))
        self.assertEqual(shaper.rate_limits(), {"example.org": 30})
        code, body, _ = await self.call("GET", "/api/v1/rate-limits")
        self.assertEqual(body["delivery"]["perDomainRateLimit"], {"example.org": 30})
        for bad in [{"domain": "not a domain", "limit": 5}, {"domain": "example.org", "limit": 0}]:
            code, body, _ = await self.call("POST", "/api/v1/rate-limits/outbound", body=bad)
            self.assertEqual((code, body["error"]["code"]), (422, "invalid_config"), bad)
            self.assertIn("smtpConfig.delivery.perDomainRateLimit", body["error"]["message"])
        code, body, _ = await self.call("DELETE", "/api/v1/rate-limits/outbound/example.org")
        self.assertEqual((code, body["perDomainRateLimit"]), (200, {}))
        code, body, _ = await self.call("DELETE", "/api/v1/rate-limits/outbound/example.org")
        self.assertEqual((code, body["error"]["code"]), (404, "not_found"))
        code, body, _ = await self.call("DELETE", "/api/v1/rate-limits/outbound/bad..name")
        self.assertEqual((code, body["error"]["code"]), (400, "bad_domain"))
        code, body, _ = await self.call(
            "PUT",
            "/api/v1/rate-limits",
            body={"delivery": {"globalRateLimit": 120, "perServerRateLimit": 60}},
        )
        self.assertEqual(code, 200)
        self.assertEqual(
            shaper.settings(),
            {"globalRateLimit": 120, "perServerRateLimit": 60, "perDomainRateLimit": {}},
        )
        self.assertEqual(router.options.smtp_config.delivery.global_rate_limit, 120)


class LimiterMetricsTests(TestCase):
    """The limiter's figures as the metrics registry exports them (parsed by prometheus_client)."""

    def test_hits_tarpits_keys_and_evictions(self) -> None:
        clock = Clock()
        config = smtp_config(
            {
                "maxKeys": 2,
                "tarpitDelay": 2000,
                "anonymous": {"connections": 1, "messages": [{"count": 1}, {"count": 1, "per": "sender"}]},
                "authenticated": {"messages": [{"count": 1, "action": "tarpit", "per": "user"}]},
            }
        )
        limits = build_ingress_limits(config, clock)
        assert limits is not None
        metrics = RouterMetrics()
        metrics.watch_limits("smtp", limits.limiter.stats)
        sender = parse_mail_argument("FROM:<a@sender.test>", utf8=False)[0]
        first, second = Session("192.0.2.1"), Session("192.0.2.2")
        self.assertIsNone(limits.connection_opened(first))
        self.assertIsNotNone(limits.connection_opened(first))  # over connections: 1
        self.assertIsNone(limits.check_mail(first, sender, 1))
        self.assertIsNotNone(limits.check_mail(first, sender, 1))  # the per-ip limit refuses first
        user = Session("192.0.2.3")
        user.auth_user = "alice"
        self.assertIsNone(limits.check_mail(user, sender, 1))
        limits.check_mail(user, sender, 1)  # tarpit: held back 2 s
        other = parse_mail_argument("FROM:<b@other.test>", utf8=False)[0]
        self.assertIsNone(limits.check_mail(second, other, 1))  # new keys into a store of 2: evictions
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics.render().decode())
            for s in family.samples
        }

        def hits(tier: str, thing: str, phase: str) -> float:
            labels = {"protocol": "smtp", "tier": tier, "thing": thing, "phase": phase}
            return samples[("dcrouter_rate_limit_hits_total", tuple(sorted(labels.items())))]

        self.assertEqual(hits("anonymous", "connections", "connect"), 1)
        self.assertEqual(hits("anonymous", "messages", "mail"), 1)
        self.assertEqual(hits("authenticated", "messages", "mail"), 1)
        smtp = (("protocol", "smtp"),)
        self.assertEqual(samples[("dcrouter_rate_limit_tarpits_total", smtp)], 1)
        self.assertEqual(samples[("dcrouter_rate_limit_tarpit_seconds_total", smtp)], 2.0)
        self.assertEqual(samples[("dcrouter_rate_limit_keys", smtp)], 2)
        self.assertGreaterEqual(samples[("dcrouter_rate_limit_evictions_total", smtp)], 1)
        self.assertEqual(samples[("dcrouter_rate_limit_redis_fallback", smtp)], 0)
        clock.advance(3)


class Session:
    def __init__(self, peer_host: str) -> None:
        self.peer_host = peer_host
        self.local_port = 25
        self.auth_user: str | None = None


def smtp_config(rate_limits: dict[str, Any]) -> Any:
    options = load_options(
        {
            "smtpConfig": {
                "ports": [2525],
                "hostname": "mx.test",
                "domainConfigs": [{"domains": ["example.com"], "targetIPs": ["127.0.0.1"]}],
                "rateLimits": rate_limits,
            }
        }
    ).options
    assert options.smtp_config is not None
    return options.smtp_config


class CarryOverTests(TestCase):
    """What happens to counters when the limits change at run time (docs/limits.md)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.session = Session("192.0.2.1")
        self.sender = parse_mail_argument("FROM:<a@sender.test>", utf8=False)[0]

    def mails(self, limits: Any, count: int) -> list[int]:
        codes = []
        for _ in range(count):
            reply = limits.check_mail(self.session, self.sender, 10)
            codes.append(250 if reply is None else reply.code)
        return codes

    def change(self, limits: Any, rate_limits: dict[str, Any]) -> Any:
        return rebuild_ingress_limits(limits, smtp_config(rate_limits), self.clock)

    def test_same_key_and_window_keeps_the_events_counted(self) -> None:
        limits = build_ingress_limits(smtp_config({"anonymous": {"messages": [{"count": 10}]}}), self.clock)
        self.assertEqual(self.mails(limits, 4), [250] * 4)
        lower = self.change(limits, {"anonymous": {"messages": [{"count": 5}]}})
        self.assertIs(lower.limiter, limits.limiter)
        self.assertEqual(self.mails(lower, 2), [250, 451])
        higher = self.change(lower, {"anonymous": {"messages": [{"count": 10}]}})
        self.assertEqual(self.mails(higher, 6), [250] * 5 + [451])

    def test_another_window_or_key_starts_afresh(self) -> None:
        limits = build_ingress_limits(smtp_config({"anonymous": {"messages": [{"count": 3}]}}), self.clock)
        self.assertEqual(self.mails(limits, 4), [250] * 3 + [451])
        other_window = self.change(limits, {"anonymous": {"messages": [{"count": 3, "window": 120000}]}})
        self.assertEqual(self.mails(other_window, 4), [250] * 3 + [451])
        other_key = self.change(
            other_window, {"anonymous": {"messages": [{"count": 3, "window": 120000, "per": "sender"}]}}
        )
        self.assertEqual(self.mails(other_key, 4), [250] * 3 + [451])
        store = other_key.limiter.store
        assert isinstance(store, LocalCounters)
        self.assertEqual(len(store), 1)  # the keys of the limits gone are dropped

    def test_open_connections_move_over(self) -> None:
        config = {"anonymous": {"connections": 1}}
        limits = build_ingress_limits(smtp_config(config), self.clock)
        self.assertIsNone(limits.connection_opened(self.session))
        changed = self.change(limits, config)
        reply = changed.connection_opened(self.session)
        self.assertEqual(reply.code if reply is not None else None, 421)


class PersistTests(RoutingRouterBase):
    async def test_persist_writes_the_limits_keeping_the_file(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "dcrouter.toml")
        options = smtp_options([{"domains": ["example.com"], "targetIPs": ["127.0.0.1"]}], persist=True)
        smtp, api = options["smtpConfig"], options["apiConfig"]
        text = (
            "# the operator's comment\n[smtpConfig]\n"
            f"ports = {smtp['ports']}  # SMTP\n"
            'bindAddress = "127.0.0.1"\nhostname = "mx.test"\nimplicitTlsPorts = []\nsubmissionPorts = []\n'
            'queueStorage = "memory"\n\n[smtpConfig.rateLimits.anonymous]\n'
            'messages = [{ count = 100 }]\n\n[[smtpConfig.domainConfigs]]\ndomains = ["example.com"]\n'
            'targetIPs = ["127.0.0.1"]\n\n[apiConfig]\nenabled = true\nport = 0\npersist = true\n'
        )
        for token in api["tokens"]:
            text += f'\n[[apiConfig.tokens]]\nname = "{token["name"]}"\ntokenHash = "{token["tokenHash"]}"\n'
            text += f'scope = "{token["scope"]}"\n'
        with open(path, "w") as f:
            f.write(text)
        await self.start_router(load_file(path))
        change = {
            "rateLimits": {"anonymous": {"messages": [{"count": 20}]}},
            "domainConfigs": [{"rateLimits": {"maxMessagesPerMinute": 10}}],
            "delivery": {"globalRateLimit": 600},
        }
        code, body, _ = await self.call("PUT", "/api/v1/rate-limits", body=change)
        self.assertEqual(code, 200, body)
        self.assertTrue(body["persisted"], body)
        with open(path + ".bak") as f:
            self.assertEqual(f.read(), text)
        with open(path) as f:
            written = f.read()
        self.assertIn("# the operator's comment", written)
        self.assertIn("# SMTP", written)
        reread = load_file(path).options.smtp_config
        assert reread is not None
        self.assertEqual(reread.rate_limits.anonymous.messages[0].count, 20)
        limits = reread.domain_configs[0].rate_limits
        self.assertEqual(limits.max_messages_per_minute if limits is not None else None, 10)
        self.assertEqual(reread.delivery.global_rate_limit, 600)
