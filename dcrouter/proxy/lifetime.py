"""One timer for many connections with the same time limit (``maxConnectionLifetime``, ``sniTimeout``).

Connections that must end ``seconds`` after they were accepted expire in the order they were accepted, so
they are kept in that order (an ``OrderedDict``: adding, removing and looking at the oldest are O(1)) and one
timer waits for the oldest. That replaces a ``callLater`` and its cancellation per connection (a heap push
and, on cancellation, a heap rebuild now and then) by a dictionary insert and delete. The timer fires
exactly when the oldest connection's lifetime is over, as a timer of its own would.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime

T = TypeVar("T")


class Deadlines(Generic[T]):
    """Items that expire ``seconds`` after :meth:`add`; ``expire(item)`` is called for each at that time
    unless :meth:`discard` took it out first. No timer is pending while there is no item."""

    def __init__(self, clock: IReactorTime, seconds: float, expire: Callable[[T], None]) -> None:
        self._clock = clock
        self.seconds = seconds
        self._expire = expire
        self._due: OrderedDict[T, float] = OrderedDict()
        self._call: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._due)

    def add(self, item: T) -> None:
        """Expire ``item`` ``seconds`` from now (an item added again moves to the end, as it must)."""
        due = self._due
        if item in due:
            del due[item]
        due[item] = self._clock.seconds() + self.seconds
        if self._call is None:
            self._call = self._clock.callLater(self.seconds, self._fire)

    def discard(self, item: T) -> None:
        if self._due.pop(item, None) is not None and not self._due and self._call is not None:
            self._call.cancel()
            self._call = None

    def _fire(self) -> None:
        self._call = None
        now = self._clock.seconds()
        due = self._due
        while due:
            item, when = next(iter(due.items()))
            if when > now:
                if self._call is None:  # an expiry may have added an item, and armed the timer
                    self._call = self._clock.callLater(when - now, self._fire)
                return
            del due[item]
            self._expire(item)
