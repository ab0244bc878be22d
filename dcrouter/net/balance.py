"""Which of a route's targets a new connection tries first: the proxy's ``action.loadBalancing``.

A :class:`Balancer` turns a route's targets (with their weights) into the order to try them; the caller
(:class:`~dcrouter.net.targets.TargetHealth`) then moves down targets out of the way. The order is always
a permutation of the targets, so the ones after the first are the failover order.

- ``roundRobin`` (the default): smooth weighted round robin (nginx's): over any run of ``sum(weights)``
  picks, each target is first ``weight`` times, interleaved rather than in bursts.
- ``leastConnections``: the target with the fewest open connections per unit of weight; ties go round
  robin.
- ``sourceHash``: the same client address gets the same target, by rendezvous (highest random weight)
  hashing: when a target goes down only the clients that were on it move (to their second choice), and
  they come back when it recovers. Weighted as by Schindelhauer and Schomaker: a target with twice the
  weight gets twice the clients.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Literal

from dcrouter.net.targets import Target

Method = Literal["roundRobin", "leastConnections", "sourceHash"]
METHODS: tuple[Method, ...] = ("roundRobin", "leastConnections", "sourceHash")


class Balancer:
    """The try order for one route (one ``key`` of state: round-robin positions live here)."""

    def __init__(self, method: Method = "roundRobin") -> None:
        self.method = method
        # str(target) -> current weight of smooth weighted round robin
        self._current: dict[str, int] = {}

    def order(
        self,
        targets: Sequence[Target],
        weights: Sequence[int] | None = None,
        *,
        client_ip: str = "",
        connections: Mapping[Target, int] | None = None,
    ) -> list[Target]:
        """``targets`` in the order a new connection should try them. ``weights`` (positive, one per target;
        default all 1); ``client_ip`` for ``sourceHash``; ``connections`` (open connections per target) for
        ``leastConnections``."""
        if len(targets) <= 1:
            return list(targets)  # one target: every method's order, and no state moves
        weights = list(weights) if weights is not None else [1] * len(targets)
        if self.method == "sourceHash":
            scores = [_rendezvous(client_ip, t, w) for t, w in zip(targets, weights, strict=True)]
            return [
                t for _, _, t in sorted(zip(scores, range(len(targets)), targets, strict=True), key=_by_score)
            ]
        first = self._smooth_pick(targets, weights)
        start = targets.index(first)
        rotated = list(targets[start:]) + list(targets[:start])
        if self.method == "leastConnections":
            counts = connections or {}
            weight_of = dict(zip(targets, weights, strict=True))
            # Stable sort: equal loads keep the round-robin order, so an idle pool is still spread.
            rotated.sort(key=lambda t: counts.get(t, 0) / weight_of[t])
        return rotated

    def _smooth_pick(self, targets: Sequence[Target], weights: Sequence[int]) -> Target:
        total = sum(weights)
        best: Target | None = None
        best_weight = 0
        for target, weight in zip(targets, weights, strict=True):
            name = str(target)
            current = self._current.get(name, 0) + weight
            self._current[name] = current
            if best is None or current > best_weight:
                best, best_weight = target, current
        assert best is not None
        self._current[str(best)] -= total
        return best


def _by_score(item: tuple[float, int, Target]) -> tuple[float, int]:
    return -item[0], item[1]


def _rendezvous(client_ip: str, target: Target, weight: int) -> float:
    """The weighted rendezvous score of ``target`` for ``client_ip``: ``-weight / ln(h)``, ``h`` uniform in
    (0, 1) from a hash of both; the highest score wins."""
    digest = hashlib.blake2b(f"{client_ip}|{target}".encode(), digest_size=8).digest()
    h = (int.from_bytes(digest, "big") + 1) / (2**64 + 2)
    return -weight / math.log(h)
