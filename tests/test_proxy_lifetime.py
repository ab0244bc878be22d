"""dcrouter.proxy.lifetime.Deadlines on a Clock: one timer for many items, each expiring on time."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.proxy.lifetime import Deadlines


class DeadlinesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.expired: list[str] = []
        self.deadlines: Deadlines[str] = Deadlines(self.clock, 60, self.expired.append)

    def test_each_item_expires_its_lifetime_after_it_was_added(self) -> None:
        self.deadlines.add("a")
        self.clock.advance(10)
        self.deadlines.add("b")
        self.clock.advance(10)
        self.deadlines.add("c")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # one timer for the lot
        self.clock.advance(39.9)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, ["a"])
        self.clock.advance(9.9)
        self.assertEqual(self.expired, ["a"])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, ["a", "b"])
        self.clock.advance(10)
        self.assertEqual(self.expired, ["a", "b", "c"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_discarded_items_do_not_expire_and_no_timer_is_left(self) -> None:
        self.deadlines.add("a")
        self.deadlines.add("b")
        self.deadlines.discard("a")
        self.clock.advance(60)
        self.assertEqual(self.expired, ["b"])
        self.deadlines.add("c")
        self.deadlines.discard("c")
        self.deadlines.discard("c")  # twice: nothing
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.deadlines), 0)

    def test_oldest_discarded_the_next_still_expires_on_time(self) -> None:
        self.deadlines.add("a")
        self.clock.advance(30)
        self.deadlines.add("b")
        self.deadlines.discard("a")
        self.clock.advance(30)  # a's time: nothing due, the timer re-armed for b
        self.assertEqual(self.expired, [])
        self.clock.advance(29.9)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, ["b"])

    def test_an_expiry_that_adds_an_item(self) -> None:
        deadlines: Deadlines[str] = Deadlines(self.clock, 5, lambda item: self.readd(deadlines, item))
        deadlines.add("a")
        deadlines.add("b")
        self.clock.advance(5)
        self.assertEqual(self.expired, ["a", "b"])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(5)
        self.assertEqual(self.expired, ["a", "b", "a2", "b2"])

    def readd(self, deadlines: Deadlines[str], item: str) -> None:
        self.expired.append(item)
        if not item.endswith("2"):
            deadlines.add(item + "2")

    def test_an_item_added_again_expires_from_its_new_start(self) -> None:
        self.deadlines.add("a")
        self.deadlines.add("b")
        self.clock.advance(30)
        self.deadlines.add("a")  # again: due at 90 now, after b
        self.clock.advance(30)
        self.assertEqual(self.expired, ["b"])
        self.clock.advance(29.9)
        self.assertEqual(self.expired, ["b"])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, ["b", "a"])
