"""When a message that could not be delivered is tried again, and when dcrouter gives up on it.

What a caller may rely on:

- :func:`delay` is ``min(base * 2**(attempt - 1), maximum)`` with a jitter of at most 10 % either way, in the
  unit of ``base`` and ``maximum``. The jitter is applied after the cap, so at the cap retries still spread
  out (a result may reach ``1.1 * maximum``); it never goes below ``0.9 * min(...)``. With an injected
  ``random`` the result is deterministic: ``random() == 0.5`` gives no jitter at all.
- :class:`RetryPolicy` holds the numbers of one ``SmtpConfig`` in seconds and answers the two questions the
  DeliveryManager asks after an attempt left recipients pending: when is the next attempt, and is it time to
  give up (``maxRetries`` attempts made, or ``queueLifetime`` passed since the message was queued).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from dcrouter.config.domains import DomainConfig
from dcrouter.config.smtp import SmtpConfig

#: Fraction of the delay by which it may be moved either way, so that messages that failed together (a
#: destination that was down) do not all come back in the same second.
JITTER = 0.10


def delay(attempt: int, base: float, maximum: float, random: Callable[[], float]) -> float:
    """The wait after failed attempt number ``attempt`` (1 for the first failure) before the next one.

    ``random`` returns a float in [0, 1) (``random.random``); 0.5 means no jitter.
    """
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, not {attempt}")
    # Cap the exponent before computing the power, so attempt 2000 does not build a huge integer.
    exponent = min(attempt - 1, 64)
    nominal = min(base * (2**exponent), maximum)
    factor = 1.0 + JITTER * (2.0 * random() - 1.0)
    return max(0.0, nominal * factor)


class RetryDecision(enum.StrEnum):
    """What to do with a message whose attempt left recipients pending."""

    RETRY = "retry"
    #: ``maxRetries`` attempts have been made.
    RETRY_LIMIT = "retry limit reached"
    #: ``queueLifetime`` has passed since the message was queued.
    EXPIRED = "expired"


@dataclass(frozen=True)
class RetryPolicy:
    """The retry numbers of the configuration, in seconds."""

    max_retries: int
    base_delay: float
    max_delay: float
    lifetime: float

    @classmethod
    def from_config(cls, config: SmtpConfig) -> RetryPolicy:
        """From ``maxRetries``, ``baseRetryDelay``, ``maxRetryDelay`` and ``queueLifetime`` (milliseconds)."""
        return cls(
            max_retries=config.max_retries,
            base_delay=config.base_retry_delay / 1000.0,
            max_delay=config.max_retry_delay / 1000.0,
            lifetime=config.queue_lifetime / 1000.0,
        )

    def for_entry(self, entry: DomainConfig) -> RetryPolicy:
        """This policy with a domainConfigs entry's own ``maxRetries``, ``baseRetryDelay`` and
        ``maxRetryDelay`` where it sets them."""
        return RetryPolicy(
            max_retries=entry.max_retries if entry.max_retries is not None else self.max_retries,
            base_delay=entry.base_retry_delay / 1000.0
            if entry.base_retry_delay is not None
            else self.base_delay,
            max_delay=entry.max_retry_delay / 1000.0 if entry.max_retry_delay is not None else self.max_delay,
            lifetime=self.lifetime,
        )

    def decide(
        self, *, attempts: int, created_at: float, now: float, failed_temporarily: bool
    ) -> RetryDecision:
        """Decide after an attempt. ``attempts`` counts attempts made, this one included;
        ``failed_temporarily`` says whether this attempt had a temporary failure (an attempt that could not
        even try, because its destination was busy, does not use up a retry but does age)."""
        if now - created_at >= self.lifetime:
            return RetryDecision.EXPIRED
        if failed_temporarily and attempts >= self.max_retries:
            return RetryDecision.RETRY_LIMIT
        return RetryDecision.RETRY

    def next_delay(self, attempt: int, random: Callable[[], float]) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (see :func:`delay`)."""
        return delay(attempt, self.base_delay, self.max_delay, random)

    def schedule(self) -> list[tuple[int, float, float]]:
        """``(attempt, delay after it, time since the first attempt)`` without jitter, for every retry that
        ``max_retries`` allows and the lifetime does not cut off: the table in ``docs/delivery.md``."""
        rows = []
        elapsed = 0.0
        for attempt in range(1, self.max_retries):
            wait = delay(attempt, self.base_delay, self.max_delay, lambda: 0.5)
            elapsed += wait
            if elapsed >= self.lifetime:
                break
            rows.append((attempt, wait, elapsed))
        return rows
