"""Outbound shaping (``delivery.globalRateLimit``, ``perServerRateLimit``, ``perDomainRateLimit``,
``set_rate_limit``/``clear_rate_limit``) on a Clock: messages over a limit wait, spread evenly, and are never
bounced or charged a retry for it."""

from __future__ import annotations

import itertools

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from dcrouter.config.delivery import DeliveryConfig
from dcrouter.delivery.shaping import OutboundShaper
from dcrouter.limits.gcra import Rate
from dcrouter.limits.pacing import Pacer
from dcrouter.queue.item import QueueItemStatus
from tests.test_delivery_manager import START, ManagerTestsBase


class PacerTests(TestCase):
    def test_even_spacing_and_the_slowest_key(self) -> None:
        clock = Clock()
        pacer = Pacer(clock)
        fast, slow = Rate(60, 60.0, 1), Rate(30, 60.0, 1)
        self.assertEqual([pacer.reserve([("a", fast)]) for _ in range(3)], [0.0, 1.0, 2.0])
        self.assertEqual(pacer.reserve([("a", fast), ("b", slow)]), 3.0)
        self.assertEqual(pacer.reserve([("b", slow)]), 5.0)
        clock.advance(100)
        self.assertEqual(pacer.reserve([("a", fast)]), 0.0)
        self.assertEqual(len(pacer), 1)  # the idle key went

    def test_bounded(self) -> None:
        pacer = Pacer(Clock(), max_keys=10)
        for i in range(100):
            pacer.reserve([(f"k{i}", Rate(1, 60.0, 1))])
        self.assertEqual(len(pacer), 10)


class ShaperTests(TestCase):
    def test_limits_apply_together(self) -> None:
        clock = Clock()
        shaper = OutboundShaper(
            DeliveryConfig(global_rate_limit=120, per_domain_rate_limit={"Slow.Example": 30}), clock
        )
        self.assertEqual(shaper.wait("1", "mx:fast.example", ["a@fast.example"]), 0.0)
        self.assertEqual(shaper.wait("2", "mx:fast.example", ["a@fast.example"]), 0.5)
        self.assertEqual(shaper.wait("3", "mx:slow.example", ["a@slow.example"]), 1.0)
        self.assertEqual(shaper.wait("4", "mx:slow.example", ["a@SLOW.example"]), 3.0)
        self.assertEqual(shaper.wait("4", "mx:slow.example", ["a@slow.example"]), 3.0)  # reserved once
        clock.advance(3)
        self.assertEqual(shaper.wait("4", "mx:slow.example", ["a@slow.example"]), 0.0)
        shaper.delivered("4", "mx:slow.example")

    def test_set_and_clear(self) -> None:
        clock = Clock()
        shaper = OutboundShaper(DeliveryConfig(), clock)
        self.assertFalse(shaper.active)
        self.assertEqual([shaper.wait(str(i), "r", ["a@d.example"]) for i in range(3)], [0.0] * 3)
        shaper.set_rate_limit("D.example", 60)
        self.assertEqual(shaper.rate_limits(), {"d.example": 60})
        self.assertEqual([shaper.wait(f"x{i}", "r", ["a@d.example"]) for i in range(3)], [0.0, 1.0, 2.0])
        shaper.clear_rate_limit("d.example")
        shaper.clear_rate_limit("never.example")
        self.assertEqual(shaper.wait("y", "r", ["a@d.example"]), 0.0)
        self.assertRaises(ValueError, shaper.set_rate_limit, "d.example", 0)


    def test_shared_among_workers(self) -> None:
        clock = Clock()
        shaper = OutboundShaper(DeliveryConfig(global_rate_limit=120, per_server_rate_limit=60), clock)
        shaper.share_among(2)  # two workers: each sends at half of every limit
        self.assertEqual([shaper.wait(str(i), "r", ["a@d.example"]) for i in range(3)], [0.0, 2.0, 4.0])
        shaper.set_rate_limit("d.example", 15)  # set later: shared as well (8 s apart, not 4)
        clock.advance(100)
        self.assertEqual([shaper.wait(f"x{i}", "s", ["a@d.example"]) for i in range(2)], [0.0, 8.0])
        # What is reported, and what the API replaces, are the machine's limits.
        self.assertEqual(
            shaper.settings(),
            {"globalRateLimit": 120, "perServerRateLimit": 60, "perDomainRateLimit": {"d.example": 15}},
        )
        shaper.configure(240, None, None)
        clock.advance(100)
        self.assertEqual([shaper.wait(f"y{i}", "t", ["a@e.example"]) for i in range(2)], [0.0, 0.5])


class ManagerShapingTests(ManagerTestsBase):
    def test_per_domain_60_a_minute_spreads_120_messages_over_two_minutes(self) -> None:
        self.start(delivery=DeliveryConfig(per_domain_rate_limit={"paced.test": 60}))
        ids = [self.send("a@senders.test", f"r{i}@paced.test") for i in range(120)]
        other = self.send("a@senders.test", "x@other.test")
        self.advance_to(START + 150)
        times = [call["at"] - START for call in self.transport.calls if call["route"] == "rule:paced.test"]
        self.assertEqual(len(times), 120)
        # One a second, from the first at once to the last about two minutes later: never a burst.
        gaps = [b - a for a, b in itertools.pairwise(times)]
        self.assertTrue(all(gap >= 0.999 for gap in gaps), gaps)
        self.assertLess(times[-1], 121.0)
        self.assertGreaterEqual(times[-1], 119.0)
        # Another domain is not held back; nothing paced used a retry or bounced.
        self.assertEqual(self.transport.to("x@other.test")[0]["at"], START)
        unshaped = self.item(other)
        for item_id in ids:
            item = self.item(item_id)
            self.assertEqual(item.status, QueueItemStatus.DELIVERED)
            self.assertEqual(item.attempts, unshaped.attempts)  # waiting used no retry
        stats = self.manager.get_delivery_stats()
        self.assertEqual(stats["bounced"], 0)
        self.assertGreaterEqual(stats["shaped"], 119)

    def test_global_limit_and_set_rate_limit_at_run_time(self) -> None:
        manager = self.start(delivery=DeliveryConfig(global_rate_limit=30))
        for i in range(4):
            self.send("a@senders.test", f"r{i}@one.test")
        self.advance_to(START + 7)
        self.assertEqual([c["at"] - START for c in self.transport.calls], [0.0, 2.0, 4.0, 6.0])
        manager.set_rate_limit("two.test", 6)  # one every 10 s, under the global limit too
        for i in range(3):
            self.send("a@senders.test", f"r{i}@two.test")
        self.advance_to(START + 40)
        two = [c["at"] - START for c in self.transport.calls if c["route"] == "rule:two.test"]
        self.assertEqual(len(two), 3)
        self.assertTrue(all(b - a >= 10 for a, b in itertools.pairwise(two)), two)
        manager.clear_rate_limit("two.test")
