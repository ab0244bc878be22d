"""Tests for dcrouter.net.targets: round robin, preference order and down marks on a Clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from dcrouter.net.targets import Target, TargetHealth

T1 = Target("one.test", "10.0.0.1", 25)
T2 = Target("two.test", "10.0.0.2", 25)
T3 = Target("three.test", "10.0.0.3", 25)
POOL = "domain:example.com"
OTHER_POOL = "default"
MX_ROUTE = "mx:example.org"


class TargetHealthTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.health = TargetHealth(self.clock, down_time=300)

    def test_round_robin_per_route(self) -> None:
        orders = [self.health.order(POOL, [T1, T2, T3]) for _ in range(4)]
        self.assertEqual(orders, [[T1, T2, T3], [T2, T3, T1], [T3, T1, T2], [T1, T2, T3]])
        # Another route has its own position.
        self.assertEqual(self.health.order(OTHER_POOL, [T1, T2, T3]), [T1, T2, T3])
        self.assertEqual(self.health.order(POOL, [T1, T2, T3]), [T2, T3, T1])

    def test_mx_route_keeps_preference_order(self) -> None:
        for _ in range(3):
            self.assertEqual(self.health.order(MX_ROUTE, [T3, T1, T2], rotate=False), [T3, T1, T2])

    def test_down_targets_go_last(self) -> None:
        self.health.mark_down(T1)
        self.assertTrue(self.health.is_down(T1))
        self.assertEqual(self.health.order(MX_ROUTE, [T1, T2, T3], rotate=False), [T2, T3, T1])
        self.assertEqual(self.health.order(POOL, [T1, T2, T3]), [T2, T3, T1])
        self.assertEqual(self.health.order(POOL, [T1, T2, T3]), [T2, T3, T1])  # rotation start was T2
        self.assertEqual(self.health.order(POOL, [T1, T2, T3]), [T3, T2, T1])

    def test_all_down_still_tried_soonest_back_first(self) -> None:
        self.health.mark_down(T2)
        self.clock.advance(10)
        self.health.mark_down(T1)
        self.clock.advance(10)
        self.health.mark_down(T3)
        self.assertEqual(self.health.order(MX_ROUTE, [T1, T2, T3], rotate=False), [T2, T1, T3])

    def test_marks_expire(self) -> None:
        self.health.mark_down(T1)
        self.clock.advance(299)
        self.assertTrue(self.health.is_down(T1))
        self.clock.advance(1)
        self.assertFalse(self.health.is_down(T1))
        self.assertEqual(self.health.order(MX_ROUTE, [T1, T2], rotate=False), [T1, T2])

    def test_later_failure_extends_mark(self) -> None:
        self.health.mark_down(T1)
        self.clock.advance(200)
        self.health.mark_down(T1)
        self.clock.advance(200)
        self.assertTrue(self.health.is_down(T1))

    def test_mark_up(self) -> None:
        self.health.mark_down(T1)
        self.health.mark_up(T1)
        self.assertFalse(self.health.is_down(T1))
        self.health.mark_up(T2)  # never marked: nothing happens
        self.assertFalse(self.health.is_down(T2))

    def test_mark_is_per_address_and_port(self) -> None:
        self.health.mark_down(T1)
        self.assertTrue(self.health.is_down(Target("alias.test", "10.0.0.1", 25)))
        self.assertFalse(self.health.is_down(Target("one.test", "10.0.0.1", 587)))

    def test_changing_target_count(self) -> None:
        self.assertEqual(self.health.order(POOL, [T1, T2, T3]), [T1, T2, T3])
        self.assertEqual(self.health.order(POOL, [T1, T2]), [T2, T1])
        self.assertEqual(self.health.order(POOL, []), [])
