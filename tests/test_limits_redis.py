"""The limiter's counters in a real redis-server (tests/redis_server.py): several limiters (as several
processes would) share one limit exactly, the check-and-count is one step, keys expire by themselves, and an
unreachable Redis falls back to local counting with one log line."""

from __future__ import annotations

import random

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from dcrouter.limits.counters import LocalCounters, RedisCounters, SharedCounters
from dcrouter.limits.gcra import Rate
from dcrouter.limits.limiter import Charge, Limit, Limiter, Verdict
from dcrouter.net.redis_url import parse_redis_url
from dcrouter.queue.redis_connection import RedisConnection
from tests.daemons import free_port
from tests.redis_server import SKIP_REASON, start_redis

#: 100 a day: nothing refills during a test, so "exactly 100" is exact.
SHARED = Limit("anonymous.messages.0", "messages per client address: 100 per day", Rate(100, 86_400.0))


class RedisLimiterTests(TestCase):
    skip = SKIP_REASON

    def setUp(self) -> None:
        self.redis = start_redis(self)

    def limiter(self, url: str | None = None, timeout: float = 2.0) -> Limiter:
        connection = RedisConnection(parse_redis_url(url or self.redis.url), reactor=reactor, timeout=timeout)
        self.addCleanup(connection.disconnect)
        store = SharedCounters(RedisCounters(connection.call), LocalCounters(reactor), reactor)
        return Limiter(store, reactor)

    async def check(self, limiter: Limiter, charges: list[Charge]) -> Verdict:
        verdict = limiter.check(charges)
        if isinstance(verdict, Deferred):
            return await verdict
        return verdict

    async def test_two_limiters_share_a_limit_of_100_exactly(self) -> None:
        limiters = [self.limiter(), self.limiter()]
        rng = random.Random(7)
        allowed = [0, 0]
        for _ in range(250):
            which = rng.randrange(2)
            verdict = await self.check(limiters[which], [Charge(SHARED, "192.0.2.1")])
            allowed[which] += verdict.refused is None
        self.assertEqual(sum(allowed), 100)
        self.assertTrue(all(allowed), allowed)  # both took a share

    async def test_a_burst_that_does_not_divide_evenly(self) -> None:
        """7 a minute: the seventh of a burst is allowed although 60000 / 7 * 7 is not exactly 60000."""
        limiter = self.limiter()
        odd = Limit("odd", "seven a minute", Rate(7, 60.0))
        verdicts = [await self.check(limiter, [Charge(odd, "k")]) for _ in range(8)]
        self.assertEqual([v.refused is None for v in verdicts], [True] * 7 + [False])

    async def test_concurrent_checks_from_both_are_atomic(self) -> None:
        """Checks in flight together (pipelined on both pools) still let exactly 100 through."""
        # A generous deadline: on a loaded machine 240 pipelined scripts overran 2 s, and a connection
        # replaced mid-test falls back to local counting, which is not what this test is about.
        limiters = [self.limiter(timeout=15.0), self.limiter(timeout=15.0)]
        pending = [limiters[i % 2].check([Charge(SHARED, "192.0.2.2")]) for i in range(240)]
        verdicts = [await d for d in pending]  # type: ignore[misc]
        self.assertEqual(sum(v.refused is None for v in verdicts), 100)

    async def test_a_refused_batch_counts_nothing_and_keys_expire(self) -> None:
        limiter = self.limiter()
        tight = Limit("t", "tight", Rate(1, 60.0))
        loose = Limit("l", "loose", Rate(100, 60.0))
        first = await self.check(limiter, [Charge(tight, "k")])
        self.assertIsNone(first.refused)
        second = await self.check(limiter, [Charge(loose, "k"), Charge(tight, "k")])
        self.assertEqual(second.refused, tight)
        self.assertTrue(59.0 < second.retry_after <= 60.0, second.retry_after)
        self.assertEqual(self.redis.command("EXISTS", "dcrouter:limit:l|k"), b":0\r\n")
        ttl = int(self.redis.command("PTTL", "dcrouter:limit:t|k")[1:].strip())
        self.assertTrue(0 < ttl <= 60_000, ttl)  # the key goes when its debt is paid

    async def test_unreachable_redis_falls_back_to_local_counting_and_says_so_once(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        limiter = self.limiter(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
        limit = Limit("x", "three", Rate(3, 60.0))
        first = limiter.check([Charge(limit, "k")])
        self.assertIsInstance(first, Deferred)  # Redis is tried first, within its deadline
        verdicts = [await first]  # type: ignore[misc]
        # Then, for a while, checks are answered at once by local counting: no deadline per command.
        for _ in range(4):
            verdict = limiter.check([Charge(limit, "k")])
            assert isinstance(verdict, Verdict)
            verdicts.append(verdict)
        self.assertEqual([v.refused is None for v in verdicts], [True, True, True, False, False])
        fallback = [e for e in events if "counting in this process" in e.get("log_format", "")]
        self.assertEqual(len(fallback), 1)
        self.assertEqual(fallback[0]["log_level"], LogLevel.warn)
        self.flushLoggedErrors()
