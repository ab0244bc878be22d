"""Outbound shaping: ``smtpConfig.delivery``'s ``globalRateLimit``, ``perServerRateLimit`` and
``perDomainRateLimit`` (messages per minute), with :meth:`OutboundShaper.set_rate_limit` and
:meth:`OutboundShaper.clear_rate_limit` for a domain at run time.

What a caller may rely on:

- A message over an outbound limit **waits**; it is never refused, bounced or charged a retry for it. Each
  route group of a message gets a reserved time (:class:`~dcrouter.limits.pacing.Pacer`): the first time
  every limit that applies has room, spacing that destination's messages ``60 / limit`` seconds apart. The
  manager puts the message back due at that time and delivers the group when it is claimed again.
- Limits: the global one (every message transaction), the per-server one (per route: the servers one
  route delivers to, ``domain:example.com``, ``mx:example.org``), and the per-domain one for each recipient
  domain of the group that has an entry.
- Reservations are kept per (message, route) in this process until the group is delivered
  (:meth:`OutboundShaper.delivered`), so a message put back for another reason (a full destination) does
  not queue up again. Counting is per process: with ``workers = N`` (:meth:`OutboundShaper.share_among`)
  each worker paces at 1/N of every limit, so the machine stays within it; separate dcrouter processes on
  one Redis queue each pace their own deliveries.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from twisted.internet.interfaces import IReactorTime

from dcrouter.config.delivery import DeliveryConfig
from dcrouter.limits.gcra import Rate
from dcrouter.limits.pacing import Pacer

#: Reservations kept at most (messages waiting for their time); the oldest go first.
MAX_RESERVATIONS = 100_000


def _per_minute(limit: int, share: int = 1) -> Rate:
    """``limit`` messages per minute, of which this process may send 1/``share``: the same count over a
    period ``share`` times as long, so the count reported stays the configured one."""
    return Rate(limit, 60.0 * share, burst=1)


class OutboundShaper:
    """Paces message transactions by the delivery rate limits (see the module docstring)."""

    def __init__(self, config: DeliveryConfig, clock: IReactorTime) -> None:
        self._clock = clock
        self._pacer = Pacer(clock)
        #: Processes sharing every limit (``workers``): each paces at 1/share of it.
        self._share = 1
        self._global = _per_minute(config.global_rate_limit) if config.global_rate_limit else None
        self._per_server = _per_minute(config.per_server_rate_limit) if config.per_server_rate_limit else None
        self._per_domain: dict[str, Rate] = {
            domain.lower(): _per_minute(limit)
            for domain, limit in (config.per_domain_rate_limit or {}).items()
        }
        self._reserved: OrderedDict[tuple[str, str], float] = OrderedDict()

    @property
    def active(self) -> bool:
        """Whether any limit is set (without one, :meth:`wait` is always 0)."""
        return bool(self._global or self._per_server or self._per_domain)

    def configure(
        self, global_limit: int | None, per_server: int | None, per_domain: dict[str, int] | None
    ) -> None:
        """Replace every outbound limit at run time (``globalRateLimit``, ``perServerRateLimit`` and the
        whole ``perDomainRateLimit`` table, including limits set with :meth:`set_rate_limit`). Times already
        reserved are kept; the pacer's keys are too, so a destination's next message is spaced from its last
        one at the new rate."""
        self._global = _per_minute(global_limit, self._share) if global_limit else None
        self._per_server = _per_minute(per_server, self._share) if per_server else None
        self._per_domain = {d.lower(): _per_minute(n, self._share) for d, n in (per_domain or {}).items()}

    def share_among(self, processes: int) -> None:
        """``processes`` workers deliver from one queue on this machine: from now on this one paces at
        1/``processes`` of every limit (including those set later), so together they keep to it."""
        self._share = max(1, processes)
        settings = self.settings()
        self.configure(
            settings["globalRateLimit"],  # type: ignore[arg-type]
            settings["perServerRateLimit"],  # type: ignore[arg-type]
            settings["perDomainRateLimit"],  # type: ignore[arg-type]
        )

    def settings(self) -> dict[str, object]:
        """The limits in force, as the configuration names them (messages per minute; None: no limit)."""
        return {
            "globalRateLimit": self._global.count if self._global else None,
            "perServerRateLimit": self._per_server.count if self._per_server else None,
            "perDomainRateLimit": self.rate_limits(),
        }

    def set_rate_limit(self, domain: str, limit: int) -> None:
        """Messages per minute to recipients at ``domain`` from now on (replacing any configured one)."""
        if limit < 1:
            raise ValueError(f"a rate limit is a positive number of messages per minute: {limit}")
        self._per_domain[domain.lower()] = _per_minute(limit, self._share)

    def clear_rate_limit(self, domain: str) -> None:
        """No per-domain limit for ``domain`` any more (no error when there was none)."""
        self._per_domain.pop(domain.lower(), None)

    def rate_limits(self) -> dict[str, int]:
        """The per-domain limits in force, messages per minute."""
        return {domain: rate.count for domain, rate in self._per_domain.items()}

    def wait(self, item_id: str, route: str, recipients: Sequence[str]) -> float:
        """Seconds until the group of ``item_id`` to ``route`` (for ``recipients``) may be sent: 0 to send
        now. Reserves its time at the first call; later calls answer from the reservation."""
        if not self.active:
            return 0.0
        now = self._clock.seconds()
        reserved = self._reserved.get((item_id, route))
        if reserved is None:
            keys: list[tuple[str, Rate]] = []
            if self._global is not None:
                keys.append(("global", self._global))
            if self._per_server is not None:
                keys.append((f"server|{route}", self._per_server))
            for domain in sorted({r.rpartition("@")[2].lower() for r in recipients}):
                rate = self._per_domain.get(domain)
                if rate is not None:
                    keys.append((f"domain|{domain}", rate))
            if not keys:
                return 0.0
            reserved = now + self._pacer.reserve(keys)
            if len(self._reserved) >= MAX_RESERVATIONS:
                self._reserved.popitem(last=False)
            self._reserved[(item_id, route)] = reserved
        return max(0.0, reserved - now)

    def delivered(self, item_id: str, route: str) -> None:
        """The group was handed to the transport: its reservation is used."""
        self._reserved.pop((item_id, route), None)
