"""The retry schedule: exponential backoff with a cap and bounded jitter, and when to give up."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from dcrouter.config.smtp import SmtpConfig
from dcrouter.delivery.retry import RetryDecision, RetryPolicy, delay


def fixed(value: float):
    return lambda: value


class DelayTests(TestCase):
    def test_doubles_from_base(self) -> None:
        self.assertEqual(
            [delay(n, 300, 14_400, fixed(0.5)) for n in range(1, 6)], [300, 600, 1200, 2400, 4800]
        )

    def test_capped_at_maximum(self) -> None:
        self.assertEqual(delay(6, 300, 14_400, fixed(0.5)), 9600)
        self.assertEqual(delay(7, 300, 14_400, fixed(0.5)), 14_400)
        self.assertEqual(delay(50, 300, 14_400, fixed(0.5)), 14_400)

    def test_huge_attempt_numbers_stay_cheap(self) -> None:
        self.assertEqual(delay(10**6, 1, 60, fixed(0.5)), 60)

    def test_jitter_bounds(self) -> None:
        self.assertAlmostEqual(delay(1, 300, 14_400, fixed(0.0)), 270.0)
        self.assertAlmostEqual(delay(1, 300, 14_400, fixed(0.999999)), 330.0, places=3)
        # At the cap, jitter still spreads retries (up to 10 % above the maximum).
        self.assertAlmostEqual(delay(20, 300, 14_400, fixed(0.0)), 12_960.0)
        self.assertAlmostEqual(delay(20, 300, 14_400, fixed(0.75)), 15_120.0)

    def test_attempts_start_at_one(self) -> None:
        self.assertRaises(ValueError, delay, 0, 300, 14_400, fixed(0.5))


class PolicyTests(TestCase):
    def policy(self, **changes: int) -> RetryPolicy:
        return RetryPolicy.from_config(SmtpConfig(hostname="mx.test", **changes))

    def test_from_config_in_seconds(self) -> None:
        self.assertEqual(
            self.policy(), RetryPolicy(max_retries=40, base_delay=300, max_delay=14_400, lifetime=432_000)
        )

    def test_decisions(self) -> None:
        policy = self.policy(max_retries=3)
        self.assertEqual(
            policy.decide(attempts=2, created_at=0, now=100, failed_temporarily=True), RetryDecision.RETRY
        )
        self.assertEqual(
            policy.decide(attempts=3, created_at=0, now=100, failed_temporarily=True),
            RetryDecision.RETRY_LIMIT,
        )
        # An attempt that only found its destination busy does not use up the last retry...
        self.assertEqual(
            policy.decide(attempts=3, created_at=0, now=100, failed_temporarily=False), RetryDecision.RETRY
        )
        # ...but the lifetime runs regardless.
        self.assertEqual(
            policy.decide(attempts=1, created_at=0, now=432_000, failed_temporarily=False),
            RetryDecision.EXPIRED,
        )
        self.assertEqual(
            policy.decide(attempts=1, created_at=0, now=431_999, failed_temporarily=True), RetryDecision.RETRY
        )

    def test_next_delay_uses_the_configured_numbers(self) -> None:
        policy = self.policy(base_retry_delay=60_000, max_retry_delay=240_000)
        self.assertEqual([policy.next_delay(n, fixed(0.5)) for n in (1, 2, 3, 4)], [60, 120, 240, 240])

    def test_default_schedule(self) -> None:
        """Doubling from 5 minutes to the 4 hour cap, then every 4 hours until the 5 day lifetime, which comes
        before the 40 attempts maxRetries allows (the table in docs/delivery.md)."""
        rows = self.policy().schedule()
        self.assertEqual(
            [(n, wait) for n, wait, _ in rows[:9]],
            [
                (1, 300),
                (2, 600),
                (3, 1200),
                (4, 2400),
                (5, 4800),
                (6, 9600),
                (7, 14_400),
                (8, 14_400),
                (9, 14_400),
            ],
        )
        self.assertEqual(rows[8][2], 62_100)
        self.assertEqual({wait for _, wait, _ in rows[6:]}, {14_400})
        self.assertEqual(len(rows), 34)  # 35 attempts in all: the 35th ends at the lifetime
        self.assertLess(rows[-1][2], 432_000)
        self.assertGreaterEqual(rows[-1][2] + 14_400, 432_000)

    def test_schedule_cut_by_lifetime(self) -> None:
        rows = self.policy(queue_lifetime=800_000).schedule()
        self.assertEqual([n for n, _, _ in rows], [1])
