"""The generic cell rate algorithm (GCRA, ATM's virtual scheduling form), one number per key.

A :class:`Rate` of ``count`` per ``window`` seconds with a ``burst`` spaces events
``interval = window / count`` apart and lets ``burst`` of them through at once when the key is idle.
The state of a key is its *theoretical arrival time* (TAT): when the key would be idle again. An event
costing ``cost`` is allowed when ``TAT + cost * interval - now <= burst * interval``; allowing it moves
TAT to ``max(TAT, now) + cost * interval``. A key whose TAT is in the past holds nothing (it is
indistinguishable from a key never seen), which is why idle keys can be forgotten and why a store sets
their expiry to TAT.

What a caller may rely on: from idle, exactly ``burst`` events of cost 1 are allowed at one instant; after
that one per ``interval``; over any span of ``t`` seconds at most ``burst + t / interval`` are allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

#: The shortest and longest windows a rate may have (one second, one day).
MIN_WINDOW = 1.0
MAX_WINDOW = 86_400.0
#: Slack in comparisons, as a share of one interval (and at least a microsecond): ``interval * count`` is
#: not exactly the window in floating point, and each step of a TAT near an epoch time (2e9 s) rounds by
#: about 1e-7 s, which a burst of thousands adds up. A thousandth of an interval absorbs that and can never
#: let an extra event through.
SLACK_SHARE = 1e-3
MIN_SLACK = 1e-6


@dataclass(frozen=True)
class Rate:
    """``count`` events per ``window`` seconds, up to ``burst`` at once (default: ``count``)."""

    count: int
    window: float
    burst: int | None = None

    #: Seconds between two events at the sustained rate.
    interval: float = field(init=False, repr=False, compare=False)
    #: Seconds of debt a key may hold: ``burst * interval``.
    capacity: float = field(init=False, repr=False, compare=False)
    #: Seconds of tolerance in comparisons with the capacity (:data:`SLACK_SHARE`).
    slack: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"a rate needs a positive count: {self.count}")
        if not MIN_WINDOW <= self.window <= MAX_WINDOW:
            raise ValueError(f"a rate's window is 1 s to 1 day: {self.window}")
        if self.burst is not None and self.burst < 1:
            raise ValueError(f"a rate's burst is at least 1: {self.burst}")
        # Computed once: every check reads them.
        interval = self.window / self.count
        object.__setattr__(self, "interval", interval)
        object.__setattr__(
            self, "capacity", (self.burst if self.burst is not None else self.count) * interval
        )
        object.__setattr__(self, "slack", max(MIN_SLACK, interval * SLACK_SHARE))


class Decision(NamedTuple):
    """The outcome for one key: ``allowed``; ``tat`` to store (unchanged when refused); ``retry_after``
    seconds until an event of the same cost would be allowed (0 when allowed); ``usage``, the share of the
    burst in use after the decision (0.0 idle, 1.0 full)."""

    allowed: bool
    tat: float
    retry_after: float
    usage: float


def decide(rate: Rate, tat: float | None, now: float, cost: int = 1, *, force: bool = False) -> Decision:
    """Decide an event of ``cost`` against a key whose stored TAT is ``tat`` (None: never seen).

    ``force`` counts the event even when it is over the limit (what was already done, such as bytes
    received or a failed AUTH); the decision still says whether it was within. ``cost`` 0 only asks
    whether the key is over its limit now.
    """
    base = now if tat is None or tat < now else tat
    capacity = rate.capacity
    if cost:
        new_tat = base + cost * rate.interval
        allowed = new_tat - now <= capacity + rate.slack
    else:
        new_tat = base
        allowed = base - now < capacity - rate.slack
    if allowed or force:
        usage = (new_tat - now) / capacity
        return Decision(allowed, new_tat, 0.0 if allowed else new_tat - now - capacity, min(1.0, usage))
    return Decision(False, base, max(new_tat - now - capacity, 0.0), min(1.0, (base - now) / capacity))
