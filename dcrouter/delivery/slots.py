"""RouteSlots: the per-destination limit of delivery, its waiting places, and how much a look at the queue
claims. A plain object: the :class:`~dcrouter.delivery.manager.DeliveryManager` asks it, nothing here reads
the queue or the clock.

What a caller may rely on:

- **Slots.** At most ``per_route`` slots are taken at once per route name (``limits`` gives some routes a
  limit of their own: domainConfigs' ``maxPerDestination``; "``per_route``" below means the route's limit).
  :meth:`RouteSlots.acquire` takes one when it is free; when they are all taken, the caller waits for one, in
  arrival order, up to ``per_route`` waiters per route. :meth:`RouteSlots.release` hands the slot straight
  to the route's first waiter (its load stays as it is), or frees it.
- **Refusals.** ``acquire`` fires with False at once when ``per_route`` attempts already wait for the route,
  or when the caller may not wait (the manager is stopping); :meth:`RouteSlots.release_waiters` fires every
  waiter with False (stopping), after which waiters exist again only when a caller is allowed to wait.
- **Destination-aware claims.** :meth:`RouteSlots.schedule` is what one look claims: every free slot
  (``concurrency`` minus the attempts in flight), shared between destinations by a
  :class:`~dcrouter.queue.contract.ClaimSchedule` the queue applies in its claim: each route at most what it
  can still start or queue for (twice ``per_route`` minus its slots taken and its waiters; 0 when full or
  paused), and a route that is **down** (its last attempt reached no server: :meth:`RouteSlots.record`)
  nothing for a ``check_interval``, then one attempt at a time until one reaches a server. Messages with no
  recorded destination get :meth:`RouteSlots.claim_size`, the bound below.
- **Claim sizing (unrouted mail).** :meth:`RouteSlots.claim_size` is how many messages with no recorded
  destination one look claims: the free delivery slots (``concurrency`` minus the attempts in flight), but no
  more than the fullest route can still start or queue for (twice ``per_route`` minus its slots taken and its
  waiters), unless that route has stayed full (slots and waiting places all taken) at every look for a whole
  ``check_interval``: then every free slot, as if it were not there.

Why a look claims no more than that: a claimed message beyond it is put back for a ``checkInterval``. With one
busy destination and a backlog, every finished delivery claimed ``concurrentDeliveries - 2 *
maxPerDestination`` messages only to put them back, and the destination then sat idle until they were due
again (bench/relay: half the throughput at 100 senders). A destination that makes progress frees a place at
each delivery, and the next look claims the next message in order, whatever its destination. One that does not
would hold back the mail behind it for every other destination: after a ``checkInterval`` the looks claim past
it again, and its messages beyond the waiting places are put back, which lets the following looks reach the
others.

Why waiters rather than putting back at once: with one busy destination, most claimed messages would go back
to the queue for a ``checkInterval`` each, and that destination's throughput would collapse. Waiting is
bounded (the waiters are claimed messages, so ``concurrency`` bounds them all) and capped per route, so one
slow destination cannot hold every slot while others wait.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from twisted.internet.defer import Deferred, succeed

from dcrouter.queue.contract import ClaimSchedule

#: A down route not probed again for this many ``check_interval``s after its down time (no mail for it came
#: due) is forgotten: its next attempts get a full share again.
FORGET_DOWN_AFTER = 10


class RouteSlots:
    """The delivery slots of every route; see the module docstring. ``check_interval`` is in seconds, in the
    unit of the ``now`` given to :meth:`claim_size`."""

    def __init__(
        self,
        *,
        per_route: int,
        concurrency: int,
        check_interval: float,
        limits: Mapping[str, int] | None = None,
    ) -> None:
        self._per_route = per_route
        #: Routes with a limit of their own (domainConfigs' maxPerDestination) instead of ``per_route``.
        self._limits: dict[str, int] = dict(limits or {})
        self._concurrency = concurrency
        self._check_interval = check_interval
        #: Slots taken per route name; a route with none taken has no entry.
        self._load: dict[str, int] = {}
        #: Attempts waiting for a slot of a route at its limit, in arrival order; each is fired with True when
        #: a release hands its slot over, or False by release_waiters.
        self._waiters: dict[str, deque[Deferred[bool]]] = {}
        #: Routes whose slots and waiting places were all taken at every claim_size since this time.
        self._full_since: dict[str, float] = {}
        #: Routes whose last attempt reached no server: until when they get nothing (then one at a time).
        self._down_until: dict[str, float] = {}

    def set_limits(self, per_route: int, limits: Mapping[str, int]) -> None:
        """New limits from the next acquire on (slots taken beyond a lowered limit are kept until released;
        waiters keep waiting)."""
        self._per_route, self._limits = per_route, dict(limits)

    def limit(self, route: str) -> int:
        """The most slots ``route`` may take at once."""
        return self._limits.get(route, self._per_route)

    def taken(self, route: str) -> int:
        """Slots of ``route`` taken now."""
        return self._load.get(route, 0)

    def in_use(self) -> dict[str, int]:
        """Slots taken now, per route that has any."""
        return dict(self._load)

    def waiting(self, route: str) -> int:
        """Attempts waiting for a slot of ``route`` now."""
        return len(self._waiters.get(route, ()))

    def acquire(self, route: str, *, may_wait: bool = True) -> Deferred[bool]:
        """Take a slot of ``route``: fires with True once it is the caller's (at once when one is free), with
        False when the caller should put its recipients back instead (no waiting place, ``may_wait`` false, or
        :meth:`release_waiters` meanwhile). Every True must be followed by one :meth:`release`."""
        limit = self.limit(route)
        if self._load.get(route, 0) < limit:
            self._load[route] = self._load.get(route, 0) + 1
            return succeed(True)
        waiters = self._waiters.setdefault(route, deque())
        if len(waiters) >= limit or not may_wait:
            if not waiters:
                del self._waiters[route]
            return succeed(False)
        handed_over: Deferred[bool] = Deferred()
        waiters.append(handed_over)
        return handed_over

    def release(self, route: str) -> None:
        """Give back a slot of ``route``: to its first waiter if any, otherwise free."""
        waiters = self._waiters.get(route)
        if waiters:
            waiter = waiters.popleft()
            if not waiters:
                del self._waiters[route]
            waiter.callback(True)  # the slot changes hands: the route's load stays as it is
            return
        self._load[route] -= 1
        if not self._load[route]:
            del self._load[route]

    def release_waiters(self) -> None:
        """Fire every waiter with False (delivery stops: they put their messages back)."""
        # Emptied first: a waiter's caller runs on at once and may acquire or release other routes' slots.
        waiting, self._waiters = self._waiters, {}
        for waiters in waiting.values():
            for waiter in waiters:
                waiter.callback(False)

    def claim_size(self, in_flight: int, now: float) -> int:
        """How many messages a look at ``now`` claims with ``in_flight`` attempts running (see the module
        docstring); each call is a look, and updates how long each route has been full."""
        free = self._concurrency - in_flight
        if free <= 0:
            return 0
        room, stuck, full = 2 * self._per_route, False, set()
        # Waiters exist only for routes at their limit, so every route with waiters is in _load.
        for name, load in self._load.items():
            taken = load + len(self._waiters.get(name, ()))
            capacity = 2 * self.limit(name)
            room = min(room, max(0, capacity - taken))
            if taken >= capacity:
                full.add(name)
                since = self._full_since.setdefault(name, now)
                stuck = stuck or now - since >= self._check_interval
        for name in [n for n in self._full_since if n not in full]:
            del self._full_since[name]
        return free if stuck else min(free, room)

    def record(self, route: str, *, reached: bool, now: float) -> None:
        """What an attempt to ``route`` found: ``reached`` a server (it answered, whatever it said), or none
        (refused, timed out, no address): then the route is down for a ``check_interval``, and probed by one
        attempt at a time after that until one reaches a server."""
        if reached:
            self._down_until.pop(route, None)
        else:
            self._down_until[route] = now + self._check_interval

    def down(self) -> dict[str, float]:
        """Routes down now (their last attempt reached no server), with when they are probed again."""
        return dict(self._down_until)

    def schedule(self, in_flight: int, now: float, closed: Iterable[str] = ()) -> tuple[int, ClaimSchedule]:
        """How many messages a look at ``now`` claims with ``in_flight`` attempts running, and how the claim
        shares them between destinations (see the module docstring). ``closed``: routes that get nothing
        (paused by an operator). Each call is a look (it sizes the unrouted share as claim_size)."""
        unrouted = self.claim_size(in_flight, now)
        free = self._concurrency - in_flight
        if free <= 0:
            return 0, ClaimSchedule({}, 0, 0)
        limits: dict[str, int] = {}
        for name, load in self._load.items():
            limits[name] = max(0, 2 * self.limit(name) - load - len(self._waiters.get(name, ())))
        # Routes with a limit of their own and nothing in flight: their share when idle.
        for name, own in self._limits.items():
            limits.setdefault(name, 2 * own)
        for name, until in list(self._down_until.items()):
            if now >= until + FORGET_DOWN_AFTER * self._check_interval and name not in self._load:
                # Not probed for a while: it has no mail due. Forgotten, so the marks stay bounded.
                del self._down_until[name]
                continue
            if now < until:
                limits[name] = 0
            else:  # probing: one attempt at a time, no waiters
                limits[name] = max(0, 1 - self._load.get(name, 0) - len(self._waiters.get(name, ())))
        for name in closed:
            limits[name] = 0
        return free, ClaimSchedule(limits, default=min(free, 2 * self._per_route), unrouted=unrouted)
