"""Where the limiter's state lives: :class:`LocalCounters` (this process), :class:`RedisCounters` (shared by
every process on one Redis, one Lua script per check) and :class:`SharedCounters` (Redis, falling back to
local counting while Redis cannot answer).

A store takes a batch of :class:`Step` and applies it as one atomic step: every step that is not ``force``
must be allowed, otherwise nothing is counted except the ``force`` steps, and the answer names the first
refusing step. That is what lets one message be checked against several limits (per IP, per sender, per
recipient domain) without a refusal by one of them being counted by the others.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from dcrouter.limits.alerts import NEARLY_FULL_USAGE
from dcrouter.limits.gcra import Rate, decide
from dcrouter.log import logger

log = logger(__name__)

#: Keys a local store holds at most, by default (about 100 bytes each).
DEFAULT_MAX_KEYS = 100_000
#: Expired keys dropped from the cold end of the store per step, so idle keys go without a sweep timer.
_EXPIRE_PER_STEP = 4


class Step(NamedTuple):
    """One key's share of a check: ``cost`` events at ``rate``; ``force`` counts it whatever the outcome."""

    key: str
    rate: Rate
    cost: int = 1
    force: bool = False


class Outcome(NamedTuple):
    """``refused``: the index of the first step over its limit, or None when all were within (and counted).
    ``retry_after``: seconds until that step would be allowed. ``usage``: per step, the share of its burst
    in use afterwards (what alerts look at)."""

    refused: int | None
    retry_after: float
    usage: tuple[float, ...]

    @property
    def allowed(self) -> bool:
        return self.refused is None


class LocalCounters:
    """Counters in this process: a dict from key to TAT, in least-recently-used order, bounded.

    Memory is bounded two ways: a key whose TAT has passed holds nothing and is dropped as the store is
    used (a few from the cold end per step, no timer), and at most ``max_keys`` are held. When a new key
    would pass the cap, the least recently used key is evicted (after the expired ones): under a flood of
    new source addresses the state of the addresses seen least recently is what is lost, and losing it
    only makes that key start fresh (the limit forgets, it never refuses wrongly). Prefix keys (/24, /64)
    are what still holds an attacker who rotates addresses inside a network. ``evictions`` counts keys
    evicted while still holding state, for a metric.

    ``share``: how many processes enforce the same limits with counters of their own (``workers``, when
    nothing shared such as Redis counts for them): each event then costs ``share`` times its cost, so each
    process allows 1/``share`` of every rate and burst and together they keep to the configured limit.
    """

    def __init__(self, clock: IReactorTime, max_keys: int = DEFAULT_MAX_KEYS, share: int = 1) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be positive: {max_keys}")
        if share < 1:
            raise ValueError(f"share must be positive: {share}")
        self._clock = clock
        self.max_keys = max_keys
        self.share = share
        self._tats: OrderedDict[str, float] = OrderedDict()
        self.evictions = 0
        self._calls = 0

    def __len__(self) -> int:
        return len(self._tats)

    def tat(self, key: str) -> float | None:
        """The stored TAT of ``key`` (tests and the fallback's hand-over), or None."""
        return self._tats.get(key)

    def within(self, charges: Sequence[Any]) -> bool:
        """The fast path of a check (every message runs several): count ``charges`` and answer True when
        each is within its limit and, once counted, uses less than :data:`NEARLY_FULL_USAGE` of its burst
        (so there is nothing to refuse or alert about); otherwise count nothing and answer False, and the
        caller goes through :meth:`apply`. A charge is a :class:`~dcrouter.limits.limiter.Charge`:
        ``(limit, key, cost, force)`` where ``limit`` has ``prefix`` and ``rate``; its counter key is
        ``limit.prefix + key``, as :meth:`apply`'s steps name it."""
        now = self._clock.seconds()
        tats = self._tats
        # Expired keys are dropped in batches (the same number per step on average as apply's, at a
        # sixteenth of the calls).
        self._calls += 1
        if not self._calls & 15 and tats:
            self._expire(now, _EXPIRE_PER_STEP * 16)
        news = []
        share = self.share
        for limit, key, cost, _ in charges:
            rate = limit.rate
            full = limit.prefix + key
            tat = tats.get(full)
            base = now if tat is None or tat < now else tat
            new = base + cost * share * rate.interval
            if new - now >= rate.capacity * NEARLY_FULL_USAGE:
                return False
            news.append((full, new))
        for full, new in news:
            if full in tats:
                tats.move_to_end(full)
                tats[full] = new
            else:
                self._store(full, new, now)
        return True

    def apply(self, steps: Sequence[Step]) -> Outcome:
        """Apply ``steps`` as one atomic step (see the module docstring); synchronous."""
        now = self._clock.seconds()
        tats = self._tats
        if tats:
            self._expire(now)
        # The common case first, inline (this runs several times per message): every step within its limit.
        news = []
        usage = []
        share = self.share
        for step in steps:
            rate = step.rate
            tat = tats.get(step.key)
            base = now if tat is None or tat < now else tat
            new = base + step.cost * share * rate.interval
            debt = new - now
            if (
                debt > rate.capacity + rate.slack if step.cost else base - now >= rate.capacity - rate.slack
            ) and not step.force:
                return self._refuse(steps, now)
            news.append(new)
            usage.append(min(1.0, debt / rate.capacity))
        for step, new in zip(steps, news, strict=True):
            self._store(step.key, new, now)
        return Outcome(None, 0.0, tuple(usage))

    def _refuse(self, steps: Sequence[Step], now: float) -> Outcome:
        """Some step is over its limit: count only the forced ones."""
        tats = self._tats
        decisions = [decide(s.rate, tats.get(s.key), now, s.cost * self.share, force=s.force) for s in steps]
        refused = next(
            i for i, (s, d) in enumerate(zip(steps, decisions, strict=True)) if not (d.allowed or s.force)
        )
        usage = []
        for step, decision in zip(steps, decisions, strict=True):
            if step.force:
                self._store(step.key, decision.tat, now)
                usage.append(decision.usage)
            else:
                usage.append(decide(step.rate, tats.get(step.key), now, 0).usage)
        return Outcome(refused, decisions[refused].retry_after, tuple(usage))

    def _store(self, key: str, tat: float, now: float) -> None:
        tats = self._tats
        if key in tats:
            tats.move_to_end(key)
        elif len(tats) >= self.max_keys:
            self._expire(now, limit=None)
            if len(tats) >= self.max_keys:
                _, oldest = tats.popitem(last=False)
                if oldest > now:
                    self.evictions += 1
        tats[key] = tat

    def carry_over(self, changes: dict[str, float | None]) -> int:
        """After the limits changed at run time: for each limit name in ``changes`` (the part of a key
        before ``|``), scale its keys' debt by the factor (a rate whose count or burst changed keeps the
        events it counted: ``new interval / old interval``), or drop its keys when the factor is None (a
        limit gone, or now counted per something else or over another window). Keys of limits not named
        are kept as they are. Returns the keys changed or dropped. Walks the whole store once: for an
        operator's change, never per message."""
        if not changes:
            return 0
        now = self._clock.seconds()
        tats = self._tats
        touched = 0
        for key in list(tats):
            name = key.partition("|")[0]
            if name not in changes:
                continue
            factor = changes[name]
            touched += 1
            if factor is None:
                del tats[key]
            elif tats[key] > now:
                tats[key] = now + (tats[key] - now) * factor
        return touched

    def _expire(self, now: float, limit: int | None = _EXPIRE_PER_STEP) -> None:
        """Drop keys whose TAT has passed from the cold end: ``limit`` of them at most, or all when None
        (only when the cap is reached, so a full sweep is paid once per cap's worth of new keys at most)."""
        tats = self._tats
        if limit is None:
            for key in [k for k, tat in tats.items() if tat <= now]:
                del tats[key]
            return
        for _ in range(limit):
            if not tats:
                return
            key, tat = next(iter(tats.items()))
            if tat > now:
                return
            del tats[key]


#: The check-and-count of :meth:`LocalCounters.apply`, in Redis: KEYS are the steps' keys; ARGV holds, per
#: step, interval, capacity, cost and force (1/0), all in milliseconds and counts. Time is Redis's own (TIME),
#: so processes on several hosts agree whatever their clocks. Each key expires when its TAT passes.
#: Returns {refused index (0 = none, else 1-based), retry after ms, usage per step in millionths}.
GCRA_SCRIPT = """
-- Redis before 5 replicates scripts verbatim and refuses writes after TIME unless told to replicate effects.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local tats, news, refused, retry = {}, {}, 0, 0
for i = 1, n do
  local interval = tonumber(ARGV[4 * i - 3])
  local capacity = tonumber(ARGV[4 * i - 2])
  local cost = tonumber(ARGV[4 * i - 1])
  local force = ARGV[4 * i] == '1'
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  tats[i] = tat
  local new = tat + cost * interval
  news[i] = new
  local allowed
  -- Slack of a thousandth of an interval (dcrouter.limits.gcra.SLACK_SHARE): floating point rounding.
  local slack = math.max(0.001, interval * 0.001)
  if cost > 0 then allowed = (new - now) <= capacity + slack else allowed = (tat - now) < capacity - slack end
  if not allowed and not force and refused == 0 then
    refused = i
    retry = math.max(new - now - capacity, 0)
  end
end
local usage = {}
for i = 1, n do
  local capacity = tonumber(ARGV[4 * i - 2])
  local force = ARGV[4 * i] == '1'
  local tat = tats[i]
  if refused == 0 or force then
    tat = news[i]
    redis.call('SET', KEYS[i], string.format('%.3f', tat), 'PX', math.max(math.ceil(tat - now), 1))
  end
  usage[i] = math.floor(math.min(1, math.max(0, (tat - now) / capacity)) * 1000000)
end
return {refused, math.floor(retry), unpack(usage)}
"""


class RedisCounters:
    """Counters in Redis, applied by :data:`GCRA_SCRIPT` in one atomic step.

    ``call(method, *args)`` is a Redis client's call returning a Deferred (dcrouter's router passes the
    queue's :class:`~dcrouter.queue.redis_connection.RedisConnection` ``call``, so this package needs no
    Redis client of its own); it must fail, not hang, when Redis cannot answer. ``prefix`` namespaces the
    keys (several gateways on one Redis).
    """

    def __init__(self, call: Callable[..., Deferred[Any]], prefix: str = "dcrouter:limit:") -> None:
        self._call = call
        self._prefix = prefix

    def apply(self, steps: Sequence[Step]) -> Deferred[Outcome]:
        keys = [self._prefix + s.key for s in steps]
        args: list[str] = []
        for s in steps:
            args += [
                repr(s.rate.interval * 1000),
                repr(s.rate.capacity * 1000),
                str(s.cost),
                "1" if s.force else "0",
            ]
        d = self._call("eval", GCRA_SCRIPT, keys, args)
        return d.addCallback(_outcome)


def _outcome(reply: Any) -> Outcome:
    refused, retry, *usage = (int(x) for x in reply)
    return Outcome(refused - 1 if refused else None, retry / 1000.0, tuple(u / 1e6 for u in usage))


class SharedCounters:
    """:class:`RedisCounters`, or :class:`LocalCounters` while Redis cannot answer.

    Mail is never refused because the limiter's store is down: a failed Redis call is answered by the local
    counters (this process's share of the traffic only, so a limit is looser during an outage, never
    stricter). After a failure, checks go straight to the local counters (answered at once, no Redis
    deadline to wait out per command) for ``retry_interval`` seconds; then the next check tries Redis
    again, and counting returns to Redis as soon as it answers. The switch is logged once each way, not
    once per call.
    """

    def __init__(
        self, redis: RedisCounters, local: LocalCounters, clock: IReactorTime, retry_interval: float = 5.0
    ) -> None:
        self.redis = redis
        self.local = local
        self.degraded = False
        self._clock = clock
        self._retry_interval = retry_interval
        self._retry_at = 0.0

    def apply(self, steps: Sequence[Step]) -> Outcome | Deferred[Outcome]:
        if self.degraded and self._clock.seconds() < self._retry_at:
            return self.local.apply(steps)
        d = self.redis.apply(steps)
        d.addCallbacks(self._answered, self._failed, errbackArgs=(steps,))
        return d

    def _answered(self, outcome: Outcome) -> Outcome:
        if self.degraded:
            self.degraded = False
            log.info("Rate limits are counted in Redis again")
        return outcome

    def _failed(self, failure: Any, steps: Sequence[Step]) -> Outcome:
        self._retry_at = self._clock.seconds() + self._retry_interval
        if not self.degraded:
            self.degraded = True
            log.warn(
                "Rate limits cannot reach Redis ({error}): counting in this process until it answers",
                error=failure.getErrorMessage(),
            )
        return self.local.apply(steps)
