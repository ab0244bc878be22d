"""The rate-limit engine on a Clock: GCRA arithmetic, the local counters (atomic batches, idle expiry, the cap
and its eviction under address rotation), alerts and their deduplication."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from dcrouter.limits.alerts import FULL, HITS, NEARLY_FULL, Alerts, LimitAlert
from dcrouter.limits.counters import LocalCounters, Step
from dcrouter.limits.gcra import Rate, decide
from dcrouter.limits.ingress import ip_prefix
from dcrouter.limits.limiter import Charge, Limit, Limiter

PER_MINUTE = Rate(100, 60.0)


def allowed_in_a_row(counters: LocalCounters, key: str, rate: Rate, tries: int) -> int:
    return sum(counters.apply([Step(key, rate)]).allowed for _ in range(tries))


class RateTests(unittest.TestCase):
    def test_bounds(self) -> None:
        Rate(1, 1.0)
        Rate(10_000, 86_400.0)
        for bad in ((0, 60.0), (1, 0.5), (1, 86_401.0)):
            self.assertRaises(ValueError, Rate, *bad)
        self.assertRaises(ValueError, Rate, 10, 60.0, 0)

    def test_decide_from_idle_and_refusal(self) -> None:
        rate = Rate(2, 10.0)  # one per 5 s, burst 2
        first = decide(rate, None, 100.0)
        self.assertEqual((first.allowed, first.tat, first.usage), (True, 105.0, 0.5))
        second = decide(rate, first.tat, 100.0)
        self.assertEqual((second.allowed, second.tat, second.usage), (True, 110.0, 1.0))
        third = decide(rate, second.tat, 100.0)
        self.assertFalse(third.allowed)
        self.assertEqual(third.tat, 110.0)  # a refusal leaves the state as it was
        self.assertEqual(third.retry_after, 5.0)
        self.assertTrue(decide(rate, second.tat, 105.0).allowed)

    def test_force_counts_past_the_limit(self) -> None:
        rate = Rate(1, 10.0)
        forced = decide(rate, 110.0, 100.0, force=True)
        self.assertFalse(forced.allowed)
        self.assertEqual(forced.tat, 120.0)

    def test_cost_zero_asks_without_counting(self) -> None:
        rate = Rate(1, 10.0)
        self.assertTrue(decide(rate, None, 100.0, 0).allowed)
        self.assertEqual(decide(rate, None, 100.0, 0).tat, 100.0)
        self.assertFalse(decide(rate, 110.0, 100.0, 0).allowed)


class LocalCountersTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.counters = LocalCounters(self.clock)

    def test_burst_then_the_sustained_rate(self) -> None:
        """100 per minute from idle: exactly 100 at once, then one every 0.6 s."""
        self.assertEqual(allowed_in_a_row(self.counters, "a", PER_MINUTE, 200), 100)
        self.clock.advance(0.59)
        self.assertEqual(allowed_in_a_row(self.counters, "a", PER_MINUTE, 5), 0)
        self.clock.advance(0.01)
        self.assertEqual(allowed_in_a_row(self.counters, "a", PER_MINUTE, 5), 1)
        self.clock.advance(6.0)
        self.assertEqual(allowed_in_a_row(self.counters, "a", PER_MINUTE, 50), 10)
        self.clock.advance(60.0)
        self.assertEqual(allowed_in_a_row(self.counters, "a", PER_MINUTE, 200), 100)

    def test_bursts_that_do_not_divide_evenly(self) -> None:
        """window / count is not exact in floating point, and an epoch clock carries little precision: a
        burst of n is still exactly n."""
        clock = Clock()
        clock.advance(1_800_000_000)  # an epoch time, as the reactor's clock reads
        counters = LocalCounters(clock)
        for n in (3, 7, 11, 13, 17, 29, 97, 9_999):
            self.assertEqual(allowed_in_a_row(counters, f"k{n}", Rate(n, 60.0), n + 3), n, n)
            self.assertEqual(allowed_in_a_row(counters, f"d{n}", Rate(n, 86_400.0), n + 3), n, n)

    def test_windows_from_a_second_to_a_day(self) -> None:
        per_second = Rate(5, 1.0)
        self.assertEqual(allowed_in_a_row(self.counters, "s", per_second, 10), 5)
        self.clock.advance(1.0)
        self.assertEqual(allowed_in_a_row(self.counters, "s", per_second, 10), 5)
        quota = Rate(10_000, 86_400.0)  # 10,000 messages a day per user
        self.assertEqual(allowed_in_a_row(self.counters, "u", quota, 10_050), 10_000)
        self.clock.advance(8.64 * 10)
        self.assertEqual(allowed_in_a_row(self.counters, "u", quota, 50), 10)
        self.clock.advance(86_400)
        self.assertEqual(allowed_in_a_row(self.counters, "u", quota, 10_050), 10_000)

    def test_smaller_burst_spreads_events(self) -> None:
        rate = Rate(60, 60.0, burst=1)
        self.assertEqual(allowed_in_a_row(self.counters, "a", rate, 10), 1)
        for _ in range(59):
            self.clock.advance(1.0)
            self.assertEqual(allowed_in_a_row(self.counters, "a", rate, 10), 1)

    def test_batch_is_one_step(self) -> None:
        """One refusing limit: nothing of the batch is counted, except forced steps."""
        tight, loose = Rate(1, 60.0), Rate(100, 60.0)
        self.counters.apply([Step("tight", tight)])
        outcome = self.counters.apply(
            [Step("loose", loose), Step("tight", tight), Step("forced", loose, force=True)]
        )
        self.assertEqual(outcome.refused, 1)
        self.assertAlmostEqual(outcome.retry_after, 60.0)
        self.assertIsNone(self.counters.tat("loose"))
        self.assertIsNotNone(self.counters.tat("forced"))
        self.assertEqual(allowed_in_a_row(self.counters, "loose", loose, 200), 100)

    def test_idle_keys_expire(self) -> None:
        for i in range(50):
            self.counters.apply([Step(f"k{i}", PER_MINUTE)])
        self.assertEqual(len(self.counters), 50)
        self.clock.advance(0.61)  # each key's single event is spent: all idle
        for _ in range(20):
            self.counters.apply([Step("other", PER_MINUTE)])
        # A few idle keys go from the cold end with each use: no timer, no sweep.
        self.assertEqual(len(self.counters), 1)

    def test_cap_holds_under_address_rotation(self) -> None:
        """20,000 source addresses, a cap of 1,000: memory stays at the cap, the least recently used go,
        and a limit per /24 network still holds the rotating sender."""
        counters = LocalCounters(self.clock, max_keys=1_000)
        per_ip, per_net = Rate(5, 3600.0), Rate(50, 3600.0)
        counters.apply([Step("victim", per_ip)])
        allowed = 0
        for i in range(20_000):
            ip = f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"
            net = ip_prefix(ip, 24, 64)
            allowed += counters.apply([Step(f"ip|{ip}", per_ip), Step(f"net|{net}", per_net)]).allowed
            self.assertLessEqual(len(counters), 1_000)
        self.assertIsNone(counters.tat("victim"))  # evicted: least recently used
        self.assertGreater(counters.evictions, 0)
        # Each /24 let 50 through although every address was new.
        self.assertEqual(allowed, 50 * (20_000 // 256) + min(50, 20_000 % 256))

    def test_refuses_a_bad_cap(self) -> None:
        self.assertRaises(ValueError, LocalCounters, self.clock, 0)
        self.assertRaises(ValueError, LocalCounters, self.clock, 10, 0)

    def test_shared_by_workers(self) -> None:
        """Two workers counting for themselves (share=2): each allows half of the burst and of the rate, so
        together they allow what one process would."""
        workers = [LocalCounters(self.clock, share=2) for _ in range(2)]
        self.assertEqual([allowed_in_a_row(w, "a", PER_MINUTE, 200) for w in workers], [50, 50])
        self.clock.advance(0.6)
        self.assertEqual([allowed_in_a_row(w, "a", PER_MINUTE, 5) for w in workers], [0, 0])
        self.clock.advance(0.6)  # 1.2 s: one event's worth for each
        self.assertEqual([allowed_in_a_row(w, "a", PER_MINUTE, 5) for w in workers], [1, 1])
        # The fast path counts the same way.
        limit = Limit("x", "x", PER_MINUTE)
        fresh = LocalCounters(self.clock, share=2)
        self.assertEqual(sum(fresh.within([Charge(limit, "k", 1, False)]) for _ in range(200)), 40)


class PrefixTests(unittest.TestCase):
    def test_prefixes(self) -> None:
        self.assertEqual(ip_prefix("192.0.2.77", 24, 64), "192.0.2.0/24")
        self.assertEqual(ip_prefix("::ffff:192.0.2.77", 24, 64), "192.0.2.0/24")
        self.assertEqual(ip_prefix("2001:db8:1:2:3:4:5:6", 24, 64), "2001:db8:1:2::/64")
        self.assertEqual(ip_prefix("not-an-ip", 24, 64), "not-an-ip")


class AlertTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.alerts = Alerts(hits=3)
        self.seen: list[LimitAlert] = []
        self.alerts.observers.append(self.seen.append)
        self.limit = Limit(
            "anonymous.messages.0", "messages per client address: 10 per minute", Rate(10, 60.0)
        )
        self.limiter = Limiter(LocalCounters(self.clock), self.clock, self.alerts)

    def send(self, n: int, key: str = "192.0.2.1") -> int:
        return sum(self.limiter.check([Charge(self.limit, key)]).refused is None for _ in range(n))

    def kinds(self) -> list[tuple[str, str]]:
        return [(a.kind, a.key) for a in self.seen]

    def test_once_per_key_per_window(self) -> None:
        self.assertEqual(self.send(7), 7)
        self.assertEqual(self.kinds(), [])
        self.assertEqual(self.send(1), 1)
        self.assertEqual(self.kinds(), [(NEARLY_FULL, "192.0.2.1")])
        self.assertEqual(self.send(2), 2)
        self.assertEqual(self.kinds()[1:], [(FULL, "192.0.2.1")])
        self.assertEqual(self.send(10), 0)
        self.assertEqual(self.kinds()[2:], [(HITS, "192.0.2.1")])
        self.assertEqual(self.seen[-1].count, 3)
        self.send(5, key="192.0.2.2")
        self.assertEqual(len(self.seen), 3)  # another key: under 80%
        self.clock.advance(60)  # the next window: alerts again
        self.send(30)
        self.assertEqual([k for k, _ in self.kinds()[3:]], [NEARLY_FULL, FULL, HITS])
        self.assertIn("messages per client address", self.seen[0].limit)

    def test_default_observer_logs_one_warning(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.send(25)
        lines = [e for e in events if e.get("log_namespace") == "dcrouter.limits.alerts"]
        self.assertEqual([e["kind"] for e in lines], [NEARLY_FULL, FULL, HITS])
        self.assertTrue(all(e["log_level"] is LogLevel.warn for e in lines))
        expected = "anonymous.messages.0 (messages per client address: 10 per minute) for 192.0.2.1"
        self.assertIn(expected, formatEvent(lines[1]))

    def test_an_observer_that_fails_does_not_stop_the_others(self) -> None:
        def broken(alert: LimitAlert) -> None:
            raise RuntimeError("observer bug")

        self.alerts.observers.insert(0, broken)
        self.send(11)
        self.assertEqual(len(self.seen), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_memory_is_bounded(self) -> None:
        alerts = Alerts(hits=1, max_keys=10)
        for i in range(100):
            alerts.refused("l", f"k{i}", 60.0, 0.0)
        self.assertEqual(len(alerts._seen), 10)


class WorkersShareTests(unittest.TestCase):
    """With ``workers = 2`` and nothing shared to count in (the disk queue), the router's SMTP limits and the
    proxy's connection rates each count 1/2 in every worker; with one worker, the whole."""

    def router(self, workers: int) -> Any:
        from dcrouter import DcRouter

        directory = os.path.abspath(self.mktemp())
        options = {
            "workers": workers,
            "smtpConfig": {
                "ports": [2525],
                "hostname": "mx.test",
                "persistentPath": directory,
                "rateLimits": {"anonymous": {"messages": [{"count": 100, "window": 60000}]}},
                "domainConfigs": [{"domains": ["example.com"], "targetIPs": ["127.0.0.1"], "port": 9}],
            },
            "smartProxyConfig": {
                "connectionRatePerIP": {"count": 60, "window": 60000},
                "routes": [
                    {
                        "match": {"ports": [8080]},
                        "action": {"type": "forward", "target": {"host": "127.0.0.1", "port": 9}},
                    }
                ],
            },
        }
        return DcRouter(options, reactor=Clock())  # type: ignore[arg-type]

    def test_two_workers_count_half(self) -> None:
        router = self.router(2)
        self.assertEqual(router.limits.limiter.store.share, 2)
        self.assertEqual(router.proxy.context.limiter.store.share, 2)

    def test_one_worker_counts_whole(self) -> None:
        router = self.router(1)
        self.assertEqual(router.limits.limiter.store.share, 1)
        self.assertEqual(router.proxy.context.limiter.store.share, 1)
