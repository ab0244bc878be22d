"""RouteSlots on its own: per-route slots, waiters in order and capped, and the claim sizing of a look (the
manager's behaviour with a queue is in test_delivery_manager's LimitTests and BacklogTests)."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.delivery.slots import RouteSlots


def slots(per_route: int = 2, concurrency: int = 10, check_interval: float = 1.0) -> RouteSlots:
    return RouteSlots(per_route=per_route, concurrency=concurrency, check_interval=check_interval)


class SlotTests(SynchronousTestCase):
    def test_free_slots_are_taken_at_once(self) -> None:
        routes = slots(per_route=2)
        self.assertTrue(self.successResultOf(routes.acquire("a")))
        self.assertTrue(self.successResultOf(routes.acquire("a")))
        self.assertTrue(self.successResultOf(routes.acquire("b")))
        self.assertEqual((routes.taken("a"), routes.taken("b"), routes.waiting("a")), (2, 1, 0))

    def test_release_frees_the_slot(self) -> None:
        routes = slots(per_route=1)
        self.successResultOf(routes.acquire("a"))
        routes.release("a")
        self.assertEqual(routes.taken("a"), 0)
        self.assertTrue(self.successResultOf(routes.acquire("a")))

    def test_release_hands_the_slot_to_the_first_waiter(self) -> None:
        routes = slots(per_route=2)
        for _ in range(2):
            self.successResultOf(routes.acquire("a"))
        first, second = routes.acquire("a"), routes.acquire("a")
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertEqual(routes.waiting("a"), 2)
        routes.release("a")
        self.assertTrue(self.successResultOf(first))
        self.assertNoResult(second)
        # The slot changed hands: as many taken as before, one waiter fewer.
        self.assertEqual((routes.taken("a"), routes.waiting("a")), (2, 1))
        routes.release("a")
        self.assertTrue(self.successResultOf(second))
        routes.release("a")
        routes.release("a")
        self.assertEqual((routes.taken("a"), routes.waiting("a")), (0, 0))

    def test_waiting_places_are_capped_per_route(self) -> None:
        routes = slots(per_route=1)
        self.successResultOf(routes.acquire("a"))
        waiting = routes.acquire("a")
        self.assertFalse(self.successResultOf(routes.acquire("a")))  # the one waiting place is taken
        self.assertEqual(routes.waiting("a"), 1)
        # Another route has places of its own.
        self.successResultOf(routes.acquire("b"))
        self.assertNoResult(routes.acquire("b"))
        routes.release("a")
        self.assertTrue(self.successResultOf(waiting))

    def test_a_caller_that_may_not_wait_is_refused(self) -> None:
        routes = slots(per_route=1)
        self.successResultOf(routes.acquire("a"))
        self.assertFalse(self.successResultOf(routes.acquire("a", may_wait=False)))
        self.assertEqual(routes.waiting("a"), 0)
        routes.release("a")
        self.assertEqual(routes.taken("a"), 0)
        # A free slot is taken even by a caller that may not wait.
        self.assertTrue(self.successResultOf(routes.acquire("a", may_wait=False)))

    def test_release_waiters_refuses_every_waiter(self) -> None:
        routes = slots(per_route=2)
        for name in ("a", "a", "b", "b"):
            self.successResultOf(routes.acquire(name))
        waiters = [routes.acquire(name) for name in ("a", "b", "b")]
        routes.release_waiters()
        self.assertEqual([self.successResultOf(w) for w in waiters], [False, False, False])
        self.assertEqual((routes.waiting("a"), routes.waiting("b")), (0, 0))
        # The slots still taken are freed by their own releases, with nobody to hand them to.
        routes.release("a")
        self.assertEqual(routes.taken("a"), 1)

    def test_a_refused_waiter_runs_on_among_the_new_waiters(self) -> None:
        """A waiter refused by release_waiters runs on at once (its attempt goes on to its next group): a slot
        released meanwhile is freed, not handed to a waiter that is about to be refused."""
        routes = slots(per_route=1)
        self.successResultOf(routes.acquire("a"))
        self.successResultOf(routes.acquire("b"))
        seen: list[tuple[bool, int, int]] = []

        def next_group(ok: bool) -> None:
            routes.release("b")  # another attempt's slot, freed while the waiters are refused
            seen.append((ok, routes.taken("b"), routes.waiting("b")))

        routes.acquire("a").addCallback(next_group)
        waiting_b = routes.acquire("b")
        routes.release_waiters()
        self.assertEqual(seen, [(False, 0, 0)])
        self.assertFalse(self.successResultOf(waiting_b))


class ClaimSizeTests(SynchronousTestCase):
    def fill(self, routes: RouteSlots, route: str, count: int) -> list[Deferred[bool]]:
        return [routes.acquire(route) for _ in range(count)]

    def test_free_delivery_slots_when_no_route_is_busy(self) -> None:
        routes = slots(per_route=20, concurrency=50)
        self.assertEqual(routes.claim_size(0, 0.0), 40)  # an idle look: what one route can start or queue for
        self.assertEqual(slots(per_route=20, concurrency=30).claim_size(0, 0.0), 30)
        self.assertEqual(routes.claim_size(45, 0.0), 5)
        self.assertEqual(routes.claim_size(50, 0.0), 0)
        self.assertEqual(routes.claim_size(60, 0.0), 0)

    def test_bounded_by_what_the_busiest_route_can_start_or_queue_for(self) -> None:
        routes = slots(per_route=2, concurrency=10)
        self.fill(routes, "a", 3)  # two running, one waiting
        self.fill(routes, "b", 1)
        self.assertEqual(routes.claim_size(4, 0.0), 1)  # 2 x 2 - 3
        self.fill(routes, "a", 1)
        self.assertEqual(routes.claim_size(5, 0.0), 0)  # a is full: slots and waiting places

    def test_a_route_full_for_a_whole_check_interval_no_longer_bounds(self) -> None:
        routes = slots(per_route=1, concurrency=10, check_interval=2.0)
        self.fill(routes, "a", 2)
        self.assertEqual(routes.claim_size(2, 100.0), 0)
        self.assertEqual(routes.claim_size(2, 101.9), 0)
        self.assertEqual(routes.claim_size(2, 102.0), 8)  # it hangs: every free slot again
        self.assertEqual(routes.claim_size(2, 103.0), 8)

    def test_progress_restarts_the_full_time(self) -> None:
        """A route that was not full at some look starts counting again from the next look it is full at."""
        routes = slots(per_route=1, concurrency=10, check_interval=2.0)
        held = self.fill(routes, "a", 2)
        self.assertEqual(routes.claim_size(2, 100.0), 0)
        routes.release("a")  # a delivery finished: its waiter takes the slot
        self.assertTrue(self.successResultOf(held[1]))
        self.assertEqual(routes.claim_size(1, 101.0), 1)  # not full at this look
        self.fill(routes, "a", 1)
        self.assertEqual(routes.claim_size(2, 102.0), 0)  # full again since 102
        self.assertEqual(routes.claim_size(2, 103.9), 0)
        self.assertEqual(routes.claim_size(2, 104.0), 8)

    def test_a_look_with_no_free_slot_does_not_count_as_one(self) -> None:
        """With no free delivery slot a look claims nothing and leaves the full times as they are."""
        routes = slots(per_route=1, concurrency=3, check_interval=2.0)
        self.fill(routes, "a", 2)
        self.assertEqual(routes.claim_size(3, 100.0), 0)  # no free slot: the full time does not start
        self.assertEqual(routes.claim_size(2, 101.0), 0)  # starts here
        self.assertEqual(routes.claim_size(2, 102.9), 0)
        self.assertEqual(routes.claim_size(2, 103.0), 1)


class ScheduleTests(SynchronousTestCase):
    def test_each_route_gets_what_it_can_still_start_or_queue_for(self) -> None:
        routes = slots(per_route=2, concurrency=10)
        for _ in range(3):  # two running, one waiting
            routes.acquire("a")
        routes.acquire("b")
        count, schedule = routes.schedule(in_flight=4, now=0.0, closed=["paused"])
        self.assertEqual(count, 6)
        self.assertEqual(dict(schedule.limits), {"a": 1, "b": 3, "paused": 0})
        self.assertEqual(schedule.default, 4)  # an idle route: 2 x per_route
        self.assertEqual(schedule.unrouted, 1)  # the busiest route's room, as claim_size

    def test_no_free_slot_claims_nothing(self) -> None:
        count, schedule = slots(concurrency=2).schedule(in_flight=2, now=0.0)
        self.assertEqual((count, schedule.default, schedule.unrouted), (0, 0, 0))

    def test_a_route_that_reached_no_server_is_down_then_probed_then_forgotten(self) -> None:
        routes = slots(per_route=2, check_interval=5.0)
        routes.record("a", reached=False, now=100.0)
        self.assertEqual(routes.schedule(0, 104.0)[1].limit("a"), 0)
        self.assertEqual(routes.schedule(0, 105.0)[1].limit("a"), 1)  # one probe at a time
        routes.acquire("a")
        self.assertEqual(routes.schedule(1, 105.0)[1].limit("a"), 0)
        routes.release("a")
        routes.record("a", reached=False, now=106.0)
        self.assertEqual(routes.down(), {"a": 111.0})
        self.assertEqual(routes.schedule(0, 111.0 + 49.0)[1].limit("a"), 1)
        self.assertEqual(routes.schedule(0, 111.0 + 50.0)[1].limit("a"), 4)  # forgotten: a full share
        self.assertEqual(routes.down(), {})
        routes.record("b", reached=False, now=0.0)
        routes.record("b", reached=True, now=1.0)
        self.assertEqual(routes.schedule(0, 1.0)[1].limit("b"), 4)

    def test_a_route_with_a_limit_of_its_own_gets_twice_that(self) -> None:
        routes = RouteSlots(per_route=2, concurrency=50, check_interval=1.0, limits={"big": 5})
        routes.acquire("big")
        _, schedule = routes.schedule(in_flight=1, now=0.0)
        self.assertEqual((schedule.limit("big"), schedule.limit("other")), (9, 4))
        routes.set_limits(2, {"small": 1})
        self.assertEqual(routes.schedule(in_flight=1, now=0.0)[1].limit("small"), 2)
