"""Pacing: GCRA's virtual scheduling used to *delay* events rather than refuse them (outbound shaping).

A :class:`Pacer` hands out the times at which events may happen under a set of rates, one after the other:
an event under rates ``A`` and ``B`` gets the earliest time at or after now when both keys are free, and
moves each key on by its interval. Events are spread evenly at the rate (a burst of one: no surge at the top
of each minute); a backlog of N under a rate of R per minute leaves over N / R minutes.

Memory: a key whose next free time has passed holds nothing and is dropped as the pacer is used; at most
``max_keys`` are kept (the least recently used go first, which can only let a key's next event go earlier).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from twisted.internet.interfaces import IReactorTime

from dcrouter.limits.gcra import Rate


class Pacer:
    """Hands out evenly spaced times per key (see the module docstring), on ``clock``."""

    def __init__(self, clock: IReactorTime, max_keys: int = 100_000) -> None:
        self._clock = clock
        self.max_keys = max_keys
        self._next: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._next)

    def reserve(self, keys: Sequence[tuple[str, Rate]]) -> float:
        """Reserve the next time an event under every ``(key, rate)`` may happen; the seconds from now until
        then (0: now). Each key's next free time moves on by its rate's interval from the reserved time."""
        now = self._clock.seconds()
        self._expire(now)
        at = max([now, *(self._next.get(key, now) for key, _ in keys)])
        for key, rate in keys:
            self._set(key, at + rate.interval)
        return at - now

    def _set(self, key: str, value: float) -> None:
        nexts = self._next
        if key in nexts:
            nexts.move_to_end(key)
        elif len(nexts) >= self.max_keys:
            nexts.popitem(last=False)
        nexts[key] = value

    def _expire(self, now: float) -> None:
        nexts = self._next
        for _ in range(4):
            if not nexts:
                return
            key, value = next(iter(nexts.items()))
            if value > now:
                return
            del nexts[key]
