"""The open-files limit (RLIMIT_NOFILE) a router needs, and raising it at start-up.

Each SMTP session holds one descriptor, each proxied connection two (client and backend). With the usual
soft limit of 1,024 (or the 20,000 of a container), a router configured for 100,000 sessions would stop
accepting long before ``maxConnections`` -- and say nothing about why. So at start-up (``twistd dcrouter``):

- :func:`wanted_descriptors` adds up what the configuration asks: SMTP ``maxConnections`` plus twice every
  proxy cap (``routes[].security.maxConnections``, ``domainConfigs[].maxConnections``), plus headroom for
  delivery's outgoing connections, the queue, logs and listeners (:data:`HEADROOM` and a tenth). A proxy with
  an uncapped route asks for as many as the system allows (None).
- :func:`raise_nofile` raises the soft limit to that (never lowers it), up to the hard limit; as root it
  raises the hard limit too (up to ``/proc/sys/fs/nr_open``). It returns what it did, and
  :func:`apply_nofile` logs it: info when the limit suffices, a warning naming the numbers and the way out
  (``LimitNOFILE=`` in the systemd unit, ``ulimit -n``, ``nofile`` in limits.conf) when it cannot.

``bench.ingress`` raises its own limits with the same function.
"""

from __future__ import annotations

import dataclasses
import resource
from collections.abc import Callable
from typing import Any

from dcrouter.log import logger

log = logger(__name__)

#: Descriptors kept for everything that is not a client connection (listeners, the queue, logs, DNS...).
HEADROOM = 1024
#: Where the kernel's ceiling for a hard limit is read (as root the hard limit may go up to it).
NR_OPEN = "/proc/sys/fs/nr_open"


@dataclasses.dataclass(frozen=True)
class NofileOutcome:
    """What :func:`raise_nofile` found and did. ``wanted`` None: as many as allowed."""

    wanted: int | None
    before: tuple[int, int]
    after: tuple[int, int]
    error: str | None = None

    @property
    def enough(self) -> bool:
        soft = self.after[0]
        if self.wanted is None:
            return soft == self.after[1] or soft == resource.RLIM_INFINITY
        return soft == resource.RLIM_INFINITY or soft >= self.wanted


def wanted_descriptors(options: Any) -> int | None:
    """Descriptors the configuration ``options`` (DcRouterOptions) can need at once; None: no bound."""
    total = 0
    smtp = getattr(options, "smtp_config", None)
    if smtp is not None:
        total += smtp.max_connections
    proxy = getattr(options, "smart_proxy_config", None)
    if proxy is not None:
        caps = [route.security.max_connections if route.security else None for route in proxy.routes]
        caps += [entry.max_connections for entry in proxy.domain_configs]
        if proxy.from_port is not None or proxy.global_port_ranges or None in caps:
            return None  # a listener without a cap: as many as allowed
        total += 2 * sum(c for c in caps if c is not None)
    return total + total // 10 + HEADROOM


def _nr_open() -> int:
    try:
        with open(NR_OPEN) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1 << 20  # Linux's default


def raise_nofile(
    wanted: int | None,
    *,
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
    is_root: bool | None = None,
    nr_open: Callable[[], int] = _nr_open,
) -> NofileOutcome:
    """Raise RLIMIT_NOFILE towards ``wanted`` (None: the hard limit); never lowers either limit. As root
    (``is_root``; default: the effective uid is 0) the hard limit is raised first when ``wanted`` is above
    it, up to ``nr_open()``. A refusal is reported in ``error``, not raised."""
    import os

    if is_root is None:
        is_root = os.geteuid() == 0
    before = getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = before
    error = None
    infinite = resource.RLIM_INFINITY
    if wanted is not None and is_root and hard != infinite and wanted > hard:
        new_hard = min(wanted, nr_open())
        if new_hard > hard:
            try:
                setrlimit(resource.RLIMIT_NOFILE, (soft, new_hard))
                hard = new_hard
            except (OSError, ValueError) as e:
                error = f"raising the hard limit to {new_hard}: {e}"
    target = hard if wanted is None else (wanted if hard == infinite else min(wanted, hard))
    if soft != infinite and target > soft:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as e:
            error = f"raising the soft limit to {target}: {e}"
    return NofileOutcome(wanted, before, (soft, hard), error)


def apply_nofile(options: Any, **kwargs: Any) -> NofileOutcome:
    """:func:`raise_nofile` for what ``options`` needs, logged (a warning when it falls short)."""
    wanted = wanted_descriptors(options)
    outcome = raise_nofile(wanted, **kwargs)
    asked = "as many as allowed" if wanted is None else str(wanted)
    if outcome.enough and outcome.error is None:
        log.info(
            "open files limit: {soft} (hard {hard}; was {old_soft}/{old_hard}); the configuration asks"
            " {asked}",
            soft=outcome.after[0],
            hard=outcome.after[1],
            old_soft=outcome.before[0],
            old_hard=outcome.before[1],
            asked=asked,
        )
    else:
        log.warn(
            "open files limit: {soft} (hard {hard}) but the configuration asks {asked} (maxConnections of"
            " SMTP and the proxy, plus headroom){why}: connections beyond it will be refused. Raise it:"
            " LimitNOFILE= in the systemd unit, ulimit -n, or nofile in /etc/security/limits.conf",
            soft=outcome.after[0],
            hard=outcome.after[1],
            asked=asked,
            why=f"; {outcome.error}" if outcome.error else "",
        )
    return outcome
