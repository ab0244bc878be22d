"""Per-destination delivery settings of a domainConfigs entry: maxPerDestination and the retry schedule
(maxRetries, baseRetryDelay, maxRetryDelay), honoured by the DeliveryManager on a Clock, and swapped by
``reconfigure`` (a routing change) from the next attempt on."""

from __future__ import annotations

from typing import Any

from dcrouter.config import ConfigError, load_options
from dcrouter.config.domains import DomainConfig
from dcrouter.delivery.manager import DeliveryManager
from dcrouter.delivery.routing import RecipientRouter
from dcrouter.processing.processor import EmailProcessor
from dcrouter.queue.item import QueueItemStatus
from tests.test_delivery_manager import START, ManagerTestsBase, config


def entry(domain: str, **settings: Any) -> DomainConfig:
    return DomainConfig(domains=[domain], target_ips=[f"mx.{domain}"], **settings)


class RouteSettingsTests(ManagerTestsBase):
    def start(self, **changes: Any) -> DeliveryManager:
        # Routed by domainConfigs (no catch-all rule): route names are domain:<pattern>.
        self.config = config(**changes)
        self.processor = EmailProcessor(self.queue, self.clock.seconds)
        self.routes = RecipientRouter(self.config)
        self.manager = DeliveryManager(
            queue=self.queue,
            routes=self.routes,
            transport=self.transport,
            submit_dsn=self.processor.submit_local,
            config=self.config,
            clock=self.clock,
            random=lambda: 0.5,
        )
        self.manager.startService()
        self.addCleanup(self.stop)
        self.clock.advance(0)
        return self.manager

    def test_retry_schedule_per_destination(self) -> None:
        self.start(
            base_retry_delay=300_000,
            domain_configs=[
                entry("slow.test", base_retry_delay=60_000, max_retry_delay=60_000, max_retries=2),
                entry("other.test"),
                entry("senders.test"),  # where the bounce goes
            ],
        )
        self.transport.script["bob@slow.test"] = ["451 4.2.0 Later"] * 5
        self.transport.script["carol@other.test"] = ["451 4.2.0 Later", "250 2.0.0 Ok"]
        slow = self.send("alice@senders.test", "bob@slow.test")
        other = self.send("alice@senders.test", "carol@other.test")
        self.assertEqual(self.item(slow).next_attempt_at, START + 60)
        self.assertEqual(self.item(other).next_attempt_at, START + 300)
        self.advance_to(START + 60)
        # Second failed attempt of two allowed: bounced, not retried.
        self.assertEqual([c["at"] for c in self.transport.to("bob@slow.test")], [START, START + 60])
        self.assertEqual(self.item(slow).status, QueueItemStatus.BOUNCED)
        self.assertEqual(self.item(other).status, QueueItemStatus.DEFERRED)
        self.advance_to(START + 300)
        self.assertEqual(self.item(other).status, QueueItemStatus.DELIVERED)
        limit, policy = self.manager.settings_for("domain:slow.test")
        self.assertEqual(
            (limit, policy.max_retries, policy.base_delay, policy.max_delay), (20, 2, 60.0, 60.0)
        )

    def test_max_per_destination_per_entry(self) -> None:
        self.start(max_per_destination=5, domain_configs=[entry("one.test", max_per_destination=1)])
        self.transport.hold = True
        self.send("alice@senders.test", "a@one.test")
        self.send("alice@senders.test", "b@one.test")
        self.assertEqual(len(self.transport.calls), 1)  # the second waits for the route's one slot
        self.transport.release()
        self.clock.advance(0)
        self.assertEqual(len(self.transport.calls), 2)
        self.transport.release()
        self.clock.advance(0)

    def test_reconfigure_applies_to_the_next_attempt(self) -> None:
        self.start(base_retry_delay=300_000, domain_configs=[entry("slow.test")])
        self.transport.script["bob@slow.test"] = ["451 4.2.0 Later"] * 5
        qid = self.send("alice@senders.test", "bob@slow.test")
        self.assertEqual(self.item(qid).next_attempt_at, START + 300)
        new = config(base_retry_delay=300_000, domain_configs=[entry("slow.test", base_retry_delay=30_000)])
        self.routes.reconfigure(new)
        self.manager.reconfigure(new)
        self.advance_to(START + 300)
        # The second failure waits twice the new base delay (attempt 2), not 600 s.
        self.assertEqual(self.item(qid).next_attempt_at, START + 300 + 60)


class RouteSettingsConfigTests(ManagerTestsBase):
    def test_checked_with_key_paths(self) -> None:
        raw = {
            "smtpConfig": {
                "domainConfigs": [
                    {"domains": ["a.test"], "targetIPs": ["127.0.0.1"], "maxPerDestination": 0},
                    {"domains": ["b.test"], "targetIPs": ["127.0.0.1"], "maxRetryDelay": 1000},
                    {"domains": ["c.test"], "targetIPs": ["127.0.0.1"], "maxRetries": -1},
                ]
            }
        }
        with self.assertRaises(ConfigError) as caught:
            load_options(raw)
        paths = sorted(e.split(":")[0] for e in caught.exception.errors)
        self.assertEqual(
            paths,
            [
                "smtpConfig.domainConfigs[0].maxPerDestination",
                "smtpConfig.domainConfigs[2].maxRetries",
            ],
        )
        del raw["smtpConfig"]["domainConfigs"][0]["maxPerDestination"]
        del raw["smtpConfig"]["domainConfigs"][2]["maxRetries"]
        with self.assertRaises(ConfigError) as caught:
            load_options(raw)
        self.assertEqual(
            [e.split(":")[0] for e in caught.exception.errors], ["smtpConfig.domainConfigs[1].maxRetryDelay"]
        )
