"""Alerts about limits: a limit refused ``hits`` times in one of its windows, or a key's use of a limit
reaching 80% and 100% of its burst. Each is raised once per key, limit and window (deduplicated), as a
:class:`LimitAlert` handed to every observer in :attr:`Alerts.observers`: a warning log line by default,
and whatever subscribes later (an event bus) without the limiter changing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from dcrouter.log import logger

log = logger(__name__)

#: The kinds of alert: refused ``hits`` times in a window; use at 80%; use at 100%.
HITS = "hits"
NEARLY_FULL = "80%"
FULL = "100%"
#: The share of a limit's burst in use at which :data:`NEARLY_FULL` is raised.
NEARLY_FULL_USAGE = 0.8


@dataclass(frozen=True)
class LimitAlert:
    """``kind`` (:data:`HITS`, :data:`NEARLY_FULL`, :data:`FULL`); ``limit``, the limit's name and its
    description as replies give it; ``key``, the counted key (an IP, an address: for operators, never sent
    to clients); ``count``, refusals so far in the window; ``window`` seconds; ``at`` (clock seconds)."""

    kind: str
    limit: str
    key: str
    count: int
    window: float
    at: float


def log_alert(alert: LimitAlert) -> None:
    """The default observer: one warning line."""
    log.warn(
        "Rate limit alert ({kind}): {limit} for {key}",
        kind=alert.kind,
        limit=alert.limit,
        key=alert.key,
        count=alert.count,
        window=alert.window,
    )


@dataclass
class _Window:
    number: int
    refusals: int = 0
    raised: set[str] = field(default_factory=set)


class Alerts:
    """Deduplicates alerts and hands them to :attr:`observers` (callables taking a :class:`LimitAlert`; an
    observer that raises is logged and the others still run). Memory: at most ``max_keys`` (key, limit)
    pairs are remembered, the least recently alerted forgotten first (at worst an alert is repeated).
    ``hits``: refusals in a window that raise a :data:`HITS` alert (0: none)."""

    def __init__(self, *, hits: int = 10, max_keys: int = 10_000) -> None:
        self.hits = hits
        self.max_keys = max_keys
        self.observers: list[Callable[[LimitAlert], object]] = [log_alert]
        self._seen: OrderedDict[tuple[str, str], _Window] = OrderedDict()

    def used(self, limit: str, key: str, window: float, usage: float, now: float) -> None:
        """Note that ``key`` uses ``usage`` of ``limit`` after an allowed event."""
        if usage >= NEARLY_FULL_USAGE:
            self._raise(NEARLY_FULL, limit, key, window, now, refused=False)
        if usage >= 1.0 - 1e-6:
            self._raise(FULL, limit, key, window, now, refused=False)

    def refused(self, limit: str, key: str, window: float, now: float) -> None:
        """Note that ``limit`` refused an event of ``key``."""
        self._raise(FULL, limit, key, window, now, refused=True)

    def _raise(self, kind: str, limit: str, key: str, window: float, now: float, *, refused: bool) -> None:
        state = self._state(limit, key, window, now)
        if refused:
            state.refusals += 1
            if self.hits and state.refusals == self.hits and HITS not in state.raised:
                state.raised.add(HITS)
                self._emit(LimitAlert(HITS, limit, key, state.refusals, window, now))
        if kind not in state.raised:
            state.raised.add(kind)
            self._emit(LimitAlert(kind, limit, key, state.refusals, window, now))

    def _state(self, limit: str, key: str, window: float, now: float) -> _Window:
        number = int(now // window)
        seen = self._seen
        state = seen.get((key, limit))
        if state is None or state.number != number:
            if state is None and len(seen) >= self.max_keys:
                seen.popitem(last=False)
            state = seen[(key, limit)] = _Window(number)
        seen.move_to_end((key, limit))
        return state

    def _emit(self, alert: LimitAlert) -> None:
        for observer in list(self.observers):
            try:
                observer(alert)
            except Exception:  # noqa: BLE001 (an observer's bug must not stop the limiter)
                log.failure("Rate limit alert observer failed", observer=repr(observer))
