"""Targets and their health: which servers of a destination to try first, and which to skip for a while after
they failed. Shared by mail delivery (a route's servers) and the proxy (a route's backends).

Active health checks (:mod:`dcrouter.net.healthcheck`) hold a target out altogether (``check_failed``) until
they pass again (``check_passed``): ``order`` leaves it out, ``arrange`` too.

Load balancing across configured targets is round robin: each call to ``order`` for the same key starts one
place further along; an ordered list such as MX hosts keeps its order (``rotate=False``: RFC 5321 §5.1, lower
preference first). A target
that refused a connection or timed out is marked down for ``down_time`` seconds; down targets move to the end
of the order rather than out of it, so a message is never held back only because every mark is stale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime


@dataclass(frozen=True)
class Target:
    """One server to connect to. ``host`` is the name to verify its certificate against and to send as SNI
    (the MX or target host name; the address itself for IP literals); ``address`` is an IPv4 or IPv6
    address."""

    host: str
    address: str
    port: int

    def __str__(self) -> str:
        """``address:port`` (``[address]:port`` for IPv6), as in attempt histories and results."""
        if ":" in self.address:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


class TargetHealth:
    """Down marks per server (address and port, whatever name led to it) and round-robin positions per key.

    One instance is shared by every delivery of a process. Marks live in memory only: after a restart every
    target is up again, which costs at most one failed connection each.
    """

    def __init__(self, clock: IReactorTime, down_time: float) -> None:
        """``down_time``: seconds a mark lasts (``delivery.targetDownTime`` / 1000)."""
        self._clock = clock
        self._down_time = down_time
        # (address, port) -> the time the mark expires
        self._down: dict[tuple[str, int], float] = {}
        # key (a route's name) -> where the next round-robin order starts
        self._next: dict[str, int] = {}
        # (address, port) of targets an active health check holds down
        self._failing: set[tuple[str, int]] = set()

    def order(self, key: str, targets: Sequence[Target], *, rotate: bool = True) -> list[Target]:
        """``targets`` in the order to try them: up targets first (rotated per call for ``key``, a route's
        name, unless ``rotate`` is false: then as given), then down targets, those coming back soonest
        first. A permutation of ``targets`` less those an active health check holds down (mail delivery
        runs none)."""
        ordered = list(targets)
        if rotate and ordered:
            start = self._next.get(key, 0) % len(ordered)
            self._next[key] = (start + 1) % len(ordered)
            ordered = ordered[start:] + ordered[:start]
        return self.arrange(ordered)

    def arrange(self, preferred: Sequence[Target]) -> list[Target]:
        """``preferred`` (a balancer's order) without the targets an active check holds down, and with
        passively marked ones moved to the end, those coming back soonest first."""
        if not self._down and not self._failing:
            return list(preferred)  # nothing marked (the usual case): the preferred order as it is
        up: list[Target] = []
        down: list[tuple[float, Target]] = []
        for target in preferred:
            if _key(target) in self._failing:
                continue
            if self.is_down(target):
                down.append((self._down[_key(target)], target))
            else:
                up.append(target)
        down.sort(key=lambda pair: pair[0])  # stable: equal expiries keep the order above
        return up + [target for _, target in down]

    def mark_down(self, target: Target) -> None:
        """Skip ``target`` until ``down_time`` from now (a later failure extends the mark)."""
        now = self._clock.seconds()
        # Drop expired marks here so the table holds only servers that failed recently.
        for key in [k for k, until in self._down.items() if until <= now]:
            del self._down[key]
        self._down[_key(target)] = now + self._down_time

    def mark_up(self, target: Target) -> None:
        """Forget any mark on ``target`` (it just accepted a connection)."""
        if self._down:
            self._down.pop(_key(target), None)

    def check_failed(self, target: Target) -> None:
        """An active health check took ``target`` down: no new connection until :meth:`check_passed`."""
        self._failing.add(_key(target))

    def check_passed(self, target: Target) -> None:
        """An active health check brought ``target`` back (a passive mark on it is forgotten too)."""
        self._failing.discard(_key(target))
        self._down.pop(_key(target), None)

    def is_failing(self, target: Target) -> bool:
        """True while an active health check holds ``target`` down."""
        return _key(target) in self._failing

    def is_down(self, target: Target) -> bool:
        """True while a mark on ``target`` has not expired."""
        until = self._down.get(_key(target))
        if until is None:
            return False
        if until <= self._clock.seconds():
            del self._down[_key(target)]
            return False
        return True


def _key(target: Target) -> tuple[str, int]:
    return target.address, target.port
