"""The check-and-count every user of the engine goes through: :class:`Limiter`.

A :class:`Limit` is a named rate with an action; a :class:`Charge` is one event (or ``cost`` of them) of
one key against one limit. :meth:`Limiter.check` applies a batch of charges as one atomic step in the store
(all within: all counted; one over: nothing counted but the forced ones) and answers with a :class:`Verdict`
naming the limit that refused, so the caller can say which limit in its reply without ever showing the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, NamedTuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from dcrouter.limits.alerts import NEARLY_FULL_USAGE, Alerts
from dcrouter.limits.counters import LocalCounters, Outcome, RedisCounters, SharedCounters, Step
from dcrouter.limits.gcra import Rate

#: What happens when a limit is over: a temporary refusal now (the default), the command held back by the
#: tarpit delay and then let through, or a permanent refusal (``550 5.7.1``, for hard quotas).
Action = Literal["defer", "tarpit", "reject"]

Store = LocalCounters | RedisCounters | SharedCounters


@dataclass(frozen=True)
class Limit:
    """``name`` is unique among the limiter's limits and part of every counter key (``anonymous.messages.0``);
    ``label`` says in replies and alerts which limit this is (``messages per client address: 100 per
    minute``)."""

    name: str
    label: str
    rate: Rate
    action: Action = "defer"
    #: ``(tier, thing, phase)`` under which a refusal counts in :attr:`Limiter.hits` (metric labels, so
    #: made of configured names only: ``("anonymous", "messages", "mail")``).
    metric: tuple[str, str, str] = ("", "", "")

    @cached_property
    def description(self) -> str:
        """For operators (alerts, logs): ``anonymous.messages.0 (messages per client address: ...)``."""
        return f"{self.name} ({self.label})"

    @cached_property
    def prefix(self) -> str:
        """The start of this limit's counter keys: ``name|``."""
        return self.name + "|"


class Charge(NamedTuple):
    """``cost`` events of ``key`` (an IP, a prefix, an address, a user) against ``limit``; ``force`` counts
    them even when over (what has already happened: bytes received, a failed AUTH)."""

    limit: Limit
    key: str
    cost: int = 1
    force: bool = False


@dataclass(frozen=True)
class Verdict:
    """``refused``: the limit that refused (None: all within, all counted); ``retry_after`` seconds."""

    refused: Limit | None
    retry_after: float = 0.0


ALLOWED = Verdict(None)


class Limiter:
    """Checks and counts :class:`Charge` batches in ``store``, raising alerts through ``alerts``."""

    def __init__(self, store: Store, clock: IReactorTime, alerts: Alerts | None = None) -> None:
        self.store = store
        self.clock = clock
        #: The store when it counts in this process, for the fast path (:meth:`LocalCounters.within`).
        self._local = store if isinstance(store, LocalCounters) else None
        self.alerts = alerts if alerts is not None else Alerts()
        #: Refusals by the refusing limit's :attr:`Limit.metric` (and what its users count beside: a
        #: concurrency cap, a tarpit), since start; read by the metrics at scrape time.
        self.hits: dict[tuple[str, str, str], int] = {}
        #: Replies held back by a tarpit, and their seconds in all.
        self.tarpits = 0
        self.tarpit_seconds = 0.0

    def count_hit(self, metric: tuple[str, str, str]) -> None:
        """Count a refusal decided by a user of the limiter (a concurrency cap, a domain's allowedIPs)."""
        self.hits[metric] = self.hits.get(metric, 0) + 1

    def stats(self) -> dict[str, object]:
        """What the metrics read: ``hits``, ``tarpits``, ``tarpitSeconds``, ``keys`` (held in this
        process), ``evictions`` (keys evicted while holding state), ``fallback`` (counting in this process
        because Redis cannot answer)."""
        store = self.store
        local = store if isinstance(store, LocalCounters) else getattr(store, "local", None)
        return {
            "hits": dict(self.hits),
            "tarpits": self.tarpits,
            "tarpitSeconds": self.tarpit_seconds,
            "keys": len(local) if local is not None else 0,
            "evictions": local.evictions if local is not None else 0,
            "fallback": bool(getattr(store, "degraded", False)),
        }

    def check(self, charges: Sequence[Charge]) -> Verdict | Deferred[Verdict]:
        """Check and count ``charges`` in one atomic step. Synchronous with the local store; with Redis a
        Deferred (that never fails: the shared store falls back to local counting), or synchronous while the
        shared store counts locally after a Redis failure."""
        if not charges:
            return ALLOWED
        if self._local is not None and self._local.within(charges):
            return ALLOWED
        steps = [Step(limit.prefix + key, limit.rate, cost, force) for limit, key, cost, force in charges]
        outcome = self.store.apply(steps)
        if isinstance(outcome, Deferred):
            return outcome.addCallback(self._verdict, charges)
        return self._verdict(outcome, charges)

    def _verdict(self, outcome: Outcome, charges: Sequence[Charge]) -> Verdict:
        refused = outcome.refused
        if refused is None and max(outcome.usage) < NEARLY_FULL_USAGE:
            return ALLOWED  # the common case: well within every limit, nothing to alert about
        now = self.clock.seconds()
        alerts = self.alerts
        for index, (charge, usage) in enumerate(zip(charges, outcome.usage, strict=True)):
            limit = charge.limit
            if index == refused:
                alerts.refused(limit.description, charge.key, limit.rate.window, now)
            elif refused is None or charge.force:
                alerts.used(limit.description, charge.key, limit.rate.window, usage, now)
        if refused is None:
            return ALLOWED
        limit = charges[refused].limit
        self.hits[limit.metric] = self.hits.get(limit.metric, 0) + 1
        return Verdict(limit, outcome.retry_after)
