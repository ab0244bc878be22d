"""DeliveryManager: takes due messages from the queue, delivers them recipient group by recipient group, and
decides what happens next: done, retry later, bounce, or warn the sender of a delay. It owns the loop and
the orchestration: per-route slots and claim sizing are :mod:`dcrouter.delivery.slots`'s, what each step
writes (as values) :mod:`dcrouter.delivery.transitions`'s, the DSNs themselves (ids, content, queueing)
:mod:`dcrouter.delivery.bounces`'s.

What a caller may rely on:

- **Scheduling.** While running, the manager looks at the queue at start and every ``checkInterval`` (a
  ``LoopingCall`` on the clock it was given), at once (in the next reactor turn; several calls coalesce into
  one look) on :meth:`DeliveryManager.wake`, and again as soon as an attempt finishes. A look claims up to
  ``delivery.concurrentDeliveries`` minus the attempts in flight, but no more than the busiest route can
  still start or queue for (twice ``maxPerDestination`` minus its attempts running and waiting) unless that
  route has stayed full for a ``checkInterval`` (:class:`~dcrouter.delivery.slots.RouteSlots` sizes the
  claims and keeps the slots below).
- **Per-destination limit.** At most ``maxPerDestination`` transport calls run at once per route name. A
  claimed message whose route is at that limit waits for a slot, in order, up to ``maxPerDestination``
  waiters per route; beyond that its recipients are skipped for this attempt without counting a retry, and
  the message goes back to the queue (its status QUEUED or DEFERRED as before) due again after
  ``checkInterval``. Why both: putting back every message that finds its destination full made a single
  busy destination trickle (each put-back waits a ``checkInterval``); waiting without a cap would let one
  slow destination hold every claimed slot while other destinations wait.
- **Outbound rate limits.** A route group over ``delivery.globalRateLimit``, ``perServerRateLimit`` or
  ``perDomainRateLimit`` (or a limit set with :meth:`DeliveryManager.set_rate_limit`) is not sent: the
  message is put back due at the time :mod:`dcrouter.delivery.shaping` reserved for it, using no retry
  (counted in ``shaped``), and a timer wakes the manager then.
- **Durability per recipient.** After each route group's report, the recipients delivered or failed for good
  are written to the item's ``outcomes`` (and a ``history`` entry ``{"at", "route", "tried", "results"}``)
  with ``queue.update`` before the next group is tried, so a crash never re-sends to a delivered recipient.
  When that write fails the attempt stops there and the item stays claimed (DELIVERING) until the queue's
  recovery returns it: those recipients may be delivered twice (at-least-once, as everywhere).
- **Lost claims.** When the queue answers ``open_body`` with ClaimLost (the Redis queue, when it can no
  longer vouch that the claim is still this process's), the attempt stops where it is, without sending
  that group and without recording anything (counted in ``claims_lost``, logged as a warning): the queue
  has let go of the item, and another process, or a later claim, delivers it.
- **Retries.** Recipients with a temporary failure stay pending; the message becomes DEFERRED with
  ``priority=RETRY``, ``attempts + 1``, ``last_error`` and ``next_attempt_at`` from
  :mod:`dcrouter.delivery.retry`. Once ``maxRetries`` attempts are used or ``queueLifetime`` has passed, the
  pending recipients fail for good (``451 4.4.7 ...``, with their last error).
- **Final status.** All delivered: DELIVERED. Some failed for good: one DSN (:mod:`dcrouter.delivery.bounces`)
  to the envelope sender listing them, queued with id ``<id>B`` and ``priority=BOUNCE``, then BOUNCED with
  ``bounce_id`` set. The DSN is queued before the status is written, so a crash in between re-queues it under
  the same id, which the queue refuses as a duplicate: at most one bounce per message. Mail from the null
  sender never gets one: it becomes FAILED (logged).
- **Delay warning.** Once per message, when ``delayWarningAfter`` > 0 and a deferral happens at least that
  long after the message was queued: a DSN with ``Action: delayed`` (id ``<id>W``), and ``warned_at``.
- **Housekeeping.** Every ``PURGE_INTERVAL`` seconds, finished messages queued more than
  ``queueLifetime + finishedRetention`` ago are purged: each stays queryable at least ``finishedRetention``
  after it finished.
- **Stopping.** ``stopService`` stops claiming and waits up to ``stop_grace`` seconds for attempts in flight.
  Anything still claimed afterwards is returned to the ready state by the queue's recovery at next load.

Log events use the namespace ``dcrouter.delivery`` and carry the message's ``queue_id``.
"""

from __future__ import annotations

import heapq
import random as random_module
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from dcrouter.config.smtp import SmtpConfig
from dcrouter.delivery import transitions
from dcrouter.delivery.bounces import Bouncer, DsnRequest, SubmitLocal, open_message
from dcrouter.delivery.outcome import DeliveryReport, Outcome, RecipientResult
from dcrouter.delivery.retry import RetryDecision, RetryPolicy
from dcrouter.delivery.route import Route
from dcrouter.delivery.routing import RecipientRouter, domain_name
from dcrouter.delivery.shaping import OutboundShaper
from dcrouter.delivery.slots import RouteSlots
from dcrouter.delivery.transitions import Next
from dcrouter.events import NO_EVENTS, EventBus
from dcrouter.interfaces import (
    ClaimLost,
    IDeliveryQueue,
    IDeliveryTransport,
    ISuppressionList,
    StatusMismatch,
)
from dcrouter.log import enabled, logger
from dcrouter.mail.envelope import Envelope
from dcrouter.queue.item import READY_STATUSES, QueueItem, QueueItemStatus
from dcrouter.queue.operations import NotFound, WrongStatus

log = logger(__name__)

#: Routes whose last failure ``last_errors`` remembers (bounded: MX routes are one per recipient domain).
LAST_ERRORS_KEPT = 500

#: Seconds between purges of finished items (a purge is a queue write: not on every look).
PURGE_INTERVAL = 60.0

#: Counters of :meth:`DeliveryManager.get_delivery_stats`, all present from the start.
STAT_KEYS = (
    "claimed",  # messages taken from the queue
    "attempts",  # attempts that called the transport at least once
    "delivered",  # messages finished with every recipient delivered
    "deferred",  # deferrals (a message deferred three times counts three)
    "bounced",  # messages finished with a DSN sent
    "failed",  # messages finished with failures and no DSN (null sender)
    "busy",  # messages put back because their destination was at maxPerDestination
    "shaped",  # messages put back to wait for their time under an outbound rate limit
    "recipients_delivered",
    "recipients_failed",
    "dsn_sent",  # bounces queued
    "delay_warnings",  # delay warnings queued
    "errors",  # local failures: queue writes, transport bugs, routing bugs
    "claims_lost",  # attempts stopped undelivered: the queue could no longer vouch for the claim (ClaimLost)
    "purged",
    "suppressed",  # recipients put on the suppression list (a 5.1.x permanent failure)
)


def _reached(report: DeliveryReport) -> bool:
    """Whether the attempt reached a server of its route (any answer counts; none: refused, timed out, no
    address, every result temporary and without a target)."""
    return any(r.target or r.outcome is not Outcome.TEMPORARY for r in report.results)


def route_settings(config: SmtpConfig, policy: RetryPolicy) -> tuple[dict[str, int], dict[str, RetryPolicy]]:
    """The route names of domainConfigs entries that set ``maxPerDestination`` or a retry key, with their
    limit and their policy (``policy`` with the entry's numbers)."""
    limits: dict[str, int] = {}
    policies: dict[str, RetryPolicy] = {}
    for entry in config.domain_configs:
        names = [f"domain:{domain_name(pattern)}" for pattern in entry.domains]
        if entry.max_per_destination is not None:
            limits.update(dict.fromkeys(names, entry.max_per_destination))
        own = policy.for_entry(entry)
        if own != policy:
            policies.update(dict.fromkeys(names, own))
    return limits, policies


class DeliveryManager(Service):
    """Delivers queued messages; see the module docstring for every promise. ``random`` returns a float in
    [0, 1) and drives the retry jitter (inject it for deterministic schedules)."""

    name = "delivery"  # type: ignore[assignment]
    #: Seconds ``stopService`` waits for attempts in flight.
    stop_grace: float = 30.0

    def __init__(
        self,
        *,
        queue: IDeliveryQueue,
        routes: RecipientRouter,
        transport: IDeliveryTransport,
        submit_dsn: SubmitLocal,
        config: SmtpConfig,
        clock: IReactorTime,
        random: Callable[[], float] = random_module.random,
        events: EventBus = NO_EVENTS,
        suppressions: ISuppressionList | None = None,
    ) -> None:
        self._queue = queue
        #: Where message.delivered/deferred/bounced/dsn_sent, delivery.attempt and error.delivery go.
        self.events = events
        #: Where recipients that hard-bounced (5.1.x) are suppressed, for delivery.suppressionTtl.
        self._suppressions = suppressions if config.delivery.suppression_ttl else None
        self._suppression_ttl = config.delivery.suppression_ttl / 1000.0
        self._routes = routes
        self._transport = transport
        self._config = config
        self._clock = clock
        self._random = random
        self._policy = RetryPolicy.from_config(config)
        self._interval = config.check_interval / 1000.0
        limits, self._route_policies = route_settings(config, self._policy)
        self._slots = RouteSlots(
            per_route=config.max_per_destination,
            concurrency=config.delivery.concurrent_deliveries,
            check_interval=self._interval,
            limits=limits,
        )
        self._bouncer = Bouncer(
            queue=queue,
            submit=submit_dsn,
            hostname=config.hostname,
            policy=self._policy,
            delay_warning_after=config.delay_warning_after / 1000.0,
            wake=self.wake,
        )
        self._active: dict[str, Deferred] = {}
        #: Attempts that delivered nothing because every destination they needed was full.
        self._found_full: set[str] = set()
        self._paused = False
        #: The last failure reply (temporary or permanent) and its time, per route name, most recent last.
        self._last_errors: OrderedDict[str, tuple[str, float]] = OrderedDict()
        #: Route names paused one by one (pause_deliveries(destination)); their recipients are put back.
        self._paused_routes: set[str] = set()
        self._claiming = False
        self._claim_again = False
        #: The periodic look, every checkInterval on the injected clock, while running.
        self._loop: LoopingCall | None = None
        self._wake_call: IDelayedCall | None = None
        self._next_purge = 0.0
        self._idle_waiters: list[Deferred] = []
        self._stats = dict.fromkeys(STAT_KEYS, 0)
        #: The outbound rate limits (delivery.globalRateLimit, perServerRateLimit, perDomainRateLimit).
        self.shaper = OutboundShaper(config.delivery, clock)
        #: When messages waiting under an outbound limit are due: a wake at the earliest, so a paced
        #: destination's messages leave at their times rather than at the next periodic look.
        self._shaped_due: list[float] = []
        self._shaped_call: IDelayedCall | None = None

    # -- service life cycle ----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._look)
        self._loop.clock = self._clock
        # The first look at once: mail left in the queue by the last run starts without waiting.
        looping = self._loop.start(self._interval, now=True)
        looping.addErrback(self._log_failure, "the periodic look at the queue stopped")

    def stopService(self) -> Deferred:
        """Stop claiming; fires once no attempt is in flight, or after ``stop_grace`` seconds."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()
        self._wake_call = None
        if self._shaped_call is not None and self._shaped_call.active():
            self._shaped_call.cancel()
        self._shaped_call = None
        # Attempts waiting for a slot start nothing now: they put their messages back.
        self._slots.release_waiters()
        if self._idle():
            return succeed(None)
        done: Deferred = Deferred()
        self._idle_waiters.append(done)
        timeout = self._clock.callLater(self.stop_grace, self._stop_timed_out, done)

        def cancel_timeout(result: object) -> object:
            if timeout.active():
                timeout.cancel()
            return result

        return done.addBoth(cancel_timeout)

    def _stop_timed_out(self, done: Deferred) -> None:
        log.warn(
            "delivery stopped with {count} attempts still in flight; the queue returns them at next start",
            count=len(self._active),
        )
        if done in self._idle_waiters:
            self._idle_waiters.remove(done)
            done.callback(None)

    def _idle(self) -> bool:
        return not self._active and not self._claiming

    def _notify_idle(self) -> None:
        if self._idle():
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    # -- public controls -------------------------------------------------------------------------------

    def wake(self) -> None:
        """Look for due work in the next reactor turn (calls coalesce); nothing while stopped or paused."""
        if not self.running or self._paused:
            return
        if self._claiming:
            self._claim_again = True
            return
        if self._wake_call is None:
            self._wake_call = self._clock.callLater(0, self._claim_now)

    def pause_deliveries(self, destination: str | None = None) -> None:
        """Claim nothing more; attempts in flight finish. With ``destination`` (a route name, as in a queue
        item's ``destination``: ``domain:example.com``, ``mx:example.org``, ``rule:NAME``, ``default``):
        only recipients routed there wait (put back, counting no retry); other mail goes on."""
        if destination is None:
            self._paused = True
        else:
            self._paused_routes.add(destination)

    def resume_deliveries(self, destination: str | None = None) -> None:
        """Undo ``pause_deliveries`` (with ``destination``: that route's pause only)."""
        if destination is None:
            self._paused = False
        else:
            self._paused_routes.discard(destination)
        self.wake()

    def reload_config(self, config: SmtpConfig) -> None:
        """The retry schedules and per-destination limits of a configuration reload (the routes object is
        reconfigured by the caller), for every claim from now on; attempts in flight finish on the route
        they were given. Wakes the loop: a new route may make mail due."""
        self._config = config
        self._policy = RetryPolicy.from_config(config)
        self._bouncer.policy = self._policy
        self.reconfigure(config)
        self.wake()

    def set_rate_limit(self, domain: str, limit: int) -> None:
        """Send at most ``limit`` messages a minute to recipients at ``domain``, spread evenly, from now on
        (the seed's ``setRateLimit``; replaces ``perDomainRateLimit``'s entry). Mail over it waits."""
        self.shaper.set_rate_limit(domain, limit)

    def clear_rate_limit(self, domain: str) -> None:
        """Lift the per-domain limit of ``domain`` (the seed's ``clearRateLimit``). Messages already given a
        time keep it."""
        self.shaper.clear_rate_limit(domain)

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def paused_destinations(self) -> list[str]:
        return sorted(self._paused_routes)

    def in_flight_by_destination(self) -> dict[str, int]:
        """Deliveries running now, per route name."""
        return self._slots.in_use()

    def last_errors(self) -> dict[str, tuple[str, float]]:
        """The last failure reply and when it came, per route name (the LAST_ERRORS_KEPT most recent)."""
        return dict(self._last_errors)

    async def bounce_now(self, item_id: str, reason: str) -> QueueItem:
        """Fail every pending recipient of ``item_id`` for good with ``reason`` and finish it as an attempt
        would: a DSN to the sender (none for the null sender), status bounced (or failed). Applies to
        queued, deferred and held messages (NotFound, WrongStatus otherwise), claiming it first like a
        delivery so no attempt runs meanwhile."""
        item: QueueItem | None = await self._queue.get(item_id)
        if item is None:
            raise NotFound(item_id)
        wanted = "queued, deferred or held messages"
        if item.status not in (*READY_STATUSES, QueueItemStatus.HELD):
            raise WrongStatus(item, "bounce", wanted)
        try:
            claimed: QueueItem = await self._queue.update_if(
                item_id, item.status, status=QueueItemStatus.DELIVERING
            )
        except StatusMismatch as mismatch:
            raise WrongStatus(mismatch.item, "bounce", wanted) from None  # type: ignore[arg-type]
        now = self._clock.seconds()
        reply = f"550 5.0.0 Returned by the postmaster: {reason}"
        outcomes = dict(claimed.outcomes)
        for rcpt in claimed.pending_recipients():
            outcomes[rcpt] = {
                "outcome": Outcome.PERMANENT.value,
                "reply": reply,
                "target": "",
                "at": now,
                "route": "",
            }
        log.info("{queue_id} bounced by the postmaster: {reason}", queue_id=item_id, reason=reason)
        claimed = await self._write(claimed, {"outcomes": outcomes, "last_error": reply})
        return await self._finish(claimed, now)

    def get_delivery_stats(self) -> dict[str, int]:
        """Counters since start (see ``STAT_KEYS``) plus ``in_flight`` (attempts running now) and
        ``paused`` (1 or 0)."""
        stats = dict(self._stats)
        stats["in_flight"] = len(self._active)
        stats["paused"] = int(self._paused)
        return stats

    # -- the loop --------------------------------------------------------------------------------------

    def _look(self) -> None:
        """The periodic look: purge when due, and claim (in the next reactor turn, with any wake)."""
        self._maybe_purge()
        self.wake()

    def _claim_now(self) -> None:
        self._wake_call = None
        self._claiming = True
        d = Deferred.fromCoroutine(self._claim())
        d.addErrback(self._log_failure, "claiming due messages failed")
        d.addBoth(self._claimed)

    def _claimed(self, _: object) -> None:
        self._claiming = False
        if self._claim_again:
            self._claim_again = False
            self.wake()
        self._notify_idle()

    async def _claim(self) -> None:
        count, schedule = self._slots.schedule(len(self._active), self._clock.seconds(), self._paused_routes)
        if count <= 0 or self._paused or not self.running:
            return
        items = await self._queue.get_next(count, schedule)
        for item in items:
            self._stats["claimed"] += 1
            if self.running:
                self._start(item)
            else:
                # Stopped while the claim was on its way: hand the items back rather than leave them claimed.
                await self._put_back(item, self._clock.seconds(), delay=0.0)

    def _start(self, item: QueueItem) -> None:
        d = Deferred.fromCoroutine(self.deliver_message(item))
        self._active[item.id] = d
        d.addErrback(self._attempt_failed, item.id)
        d.addBoth(self._attempt_done, item.id)

    def _attempt_failed(self, failure: Failure, item_id: str) -> None:
        if failure.check(ClaimLost):
            # Foreseen (Redis unreachable for a while), and safe: nothing was sent, the queue let go of the
            # claim, and the message returns to ready for whichever process claims it next.
            self._stats["claims_lost"] += 1
            log.warn(
                "delivery attempt for {queue_id} stopped undelivered: {error}",
                queue_id=item_id,
                error=failure.getErrorMessage(),
            )
            return
        self._stats["errors"] += 1
        log.failure(
            "delivery attempt for {queue_id} stopped; the message stays claimed until the queue recovers it",
            failure=failure,
            queue_id=item_id,
        )

    def _attempt_done(self, _: object, item_id: str) -> None:
        self._active.pop(item_id, None)
        if item_id in self._found_full:
            # It only found its destination full: claiming again now would most likely find the same, and
            # with a backlog the manager would spin claiming and putting back. The next delivery that
            # finishes, or the next periodic look, looks again.
            self._found_full.discard(item_id)
        else:
            self.wake()  # a slot is free
        self._notify_idle()

    def _wake_at(self, when: float) -> None:
        """Wake when ``when`` comes (one timer, at the earliest such time)."""
        heapq.heappush(self._shaped_due, when)
        if self._shaped_call is None or not self._shaped_call.active() or self._shaped_call.getTime() > when:
            if self._shaped_call is not None and self._shaped_call.active():
                self._shaped_call.cancel()
            self._shaped_call = self._clock.callLater(
                max(0.0, when - self._clock.seconds()), self._shaped_wake
            )

    def _shaped_wake(self) -> None:
        self._shaped_call = None
        now = self._clock.seconds()
        due = self._shaped_due
        while due and due[0] <= now:
            heapq.heappop(due)
        if due:
            self._shaped_call = self._clock.callLater(due[0] - now, self._shaped_wake)
        self.wake()

    def _maybe_purge(self) -> None:
        now = self._clock.seconds()
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_INTERVAL
        # The queue's max_age counts from when an item was queued, and a message can finish as late as
        # queueLifetime after that: purging at lifetime + retention keeps every finished message queryable for
        # at least finishedRetention after it finished (quickly delivered ones stay longer).
        config = self._config
        d = self._queue.purge_expired((config.queue_lifetime + config.finished_retention) / 1000.0)
        d.addCallback(self._purged)
        d.addErrback(self._log_failure, "purging finished messages failed")

    def _purged(self, count: int) -> None:
        self._stats["purged"] += count
        if count:
            log.info("purged {count} finished messages", count=count)

    def _log_failure(self, failure: Failure, why: str) -> None:
        self._stats["errors"] += 1
        log.failure(why, failure=failure)

    # -- one attempt -----------------------------------------------------------------------------------

    async def deliver_message(self, item: QueueItem) -> QueueItem:
        """One attempt for ``item``, already claimed (DELIVERING): deliver its pending recipients group by
        group, record each group's outcomes durably, then defer, finish, bounce or put it back as the module
        docstring says. Returns the item as stored afterwards. Raises when the queue cannot record a result
        (the item then stays claimed for the queue's recovery)."""
        pending = item.pending_recipients()
        temporary: dict[str, RecipientResult] = {}
        tried = False
        try:
            groups = self._routes.group(item.envelope.mail_from, pending) if pending else []
        except Exception:  # noqa: BLE001 (a rule plugin's bug must not lose the message)
            self._stats["errors"] += 1
            log.failure("routing failed for {queue_id}", queue_id=item.id)
            groups, tried = [], True
            temporary = transitions.routing_failed(pending)
        shaped: float | None = None
        for route, rcpts in groups:
            if route.name in self._paused_routes:
                continue  # paused by an operator: these recipients stay pending, the message is put back
            wait = self.shaper.wait(item.id, route.name, rcpts)
            if wait > 0:
                # Over an outbound rate limit: these recipients wait for their time, using no retry.
                shaped = wait if shaped is None else min(shaped, wait)
                continue
            # Waiting is for a running manager: once stopping, a full destination's recipients go back.
            if not await self._slots.acquire(route.name, may_wait=bool(self.running)):
                continue  # these recipients stay pending: the message is put back, using no retry
            tried = True
            self.shaper.delivered(item.id, route.name)
            started = self._clock.seconds()
            try:
                report = await self._deliver_group(item, route, rcpts)
                self._report_group(item, route, report, self._clock.seconds() - started)
            finally:
                # Free for the next message as soon as the destination has answered: holding the slot through
                # the durable record below (a commit that waits behind ingress's under load) halved a busy
                # destination's throughput (bench/relay).
                self._slots.release(route.name)
            self._slots.record(route.name, reached=_reached(report), now=self._clock.seconds())
            item = await self._record(item, route, report)
            temporary.update((r.recipient, r) for r in report.results if r.outcome is Outcome.TEMPORARY)
        if tried:
            self._stats["attempts"] += 1
        if item.status is QueueItemStatus.DELIVERED:
            self._stats["delivered"] += 1
            # One route group's transport line already says the message was delivered; with several groups,
            # this line says when the last of them is done.
            if len(groups) > 1:
                log.info("{queue_id} delivered", queue_id=item.id)
            elif enabled(__name__):
                log.debug("{queue_id} delivered", queue_id=item.id)
            return item
        return await self._conclude(item, temporary, tried=tried, shaped=shaped)

    async def _deliver_group(self, item: QueueItem, route: Route, rcpts: list[str]) -> DeliveryReport:
        """The transport's report for one group, with exactly one result per recipient of ``rcpts``."""
        try:
            report: DeliveryReport = await self._transport.deliver(
                item, route, rcpts, open_body=lambda: open_message(self._queue, item)
            )
        except ClaimLost:
            raise  # not this process's to deliver any more: the attempt stops, recording nothing
        except Exception:  # noqa: BLE001 (an errback is a transport bug: retry rather than lose the message)
            self._stats["errors"] += 1
            log.failure("transport failed for {queue_id} via {route}", queue_id=item.id, route=route.name)
            report = DeliveryReport(route.name)
        return transitions.one_result_each(route.name, report, rcpts)

    def _report_group(self, item: QueueItem, route: Route, report: DeliveryReport, duration: float) -> None:
        """The events of one route group's report (nothing is computed when nobody listens)."""
        events = self.events
        if not any(events.wants(t) for t in ("delivery.attempt", "message.delivered", "error.delivery")):
            return
        counts = dict.fromkeys(Outcome, 0)
        for result in report.results:
            counts[result.outcome] += 1
        delivered, failed = counts[Outcome.DELIVERED], counts[Outcome.PERMANENT]
        deferred = counts[Outcome.TEMPORARY]
        events.emit(
            "delivery.attempt",
            queue_id=item.id,
            route=route.name,
            duration=max(0.0, duration),
            delivered=delivered,
            failed=failed,
            deferred=deferred,
        )
        if delivered:
            events.emit(
                "message.delivered",
                queue_id=item.id,
                route=route.name,
                recipients=delivered,
                duration=max(0.0, duration),
            )
        for permanent, count in ((True, failed), (False, deferred)):
            if count:
                wanted = Outcome.PERMANENT if permanent else Outcome.TEMPORARY
                code = next(r.code for r in report.results if r.outcome is wanted)
                events.emit(
                    "error.delivery",
                    queue_id=item.id,
                    route=route.name,
                    recipients=count,
                    permanent=permanent,
                    reply=code,
                )

    async def _record(self, item: QueueItem, route: Route, report: DeliveryReport) -> QueueItem:
        """Write the group's final outcomes and its history entry; fires once durable."""
        now = self._clock.seconds()
        transition = transitions.record_group(item, route.name, report, now)
        for r in report.results:
            if r.outcome is not Outcome.TEMPORARY:
                key = "recipients_delivered" if r.outcome is Outcome.DELIVERED else "recipients_failed"
                self._stats[key] += 1
            if r.outcome is Outcome.PERMANENT and r.enhanced.startswith("5.1."):
                self._suppress(item, r)
            if r.outcome is not Outcome.DELIVERED:
                self._last_errors[route.name] = (r.reply, now)
                self._last_errors.move_to_end(route.name)
                while len(self._last_errors) > LAST_ERRORS_KEPT:
                    self._last_errors.popitem(last=False)
            # A delivered recipient is in the transport's line about the attempt ("recipients: 1 delivered"),
            # so its own line is debug; deferred and failed recipients keep theirs at info, with the reply.
            if r.outcome is not Outcome.DELIVERED or enabled(__name__):
                (log.debug if r.outcome is Outcome.DELIVERED else log.info)(
                    "{queue_id} to {recipient} via {route}: {outcome} ({reply})",
                    queue_id=item.id,
                    recipient=r.recipient,
                    route=route.name,
                    outcome=r.outcome.value,
                    reply=r.reply,
                )
        return await self._write(item, transition.changes)

    async def _conclude(
        self,
        item: QueueItem,
        temporary: dict[str, RecipientResult],
        *,
        tried: bool,
        shaped: float | None = None,
    ) -> QueueItem:
        now = self._clock.seconds()
        assessment = transitions.assess(
            item, tried=tried, failed_temporarily=bool(temporary), policy=self._policy_for(item), now=now
        )
        step, attempts = assessment.step, assessment.attempts
        if step is Next.FINISH:
            return await self._finish(item, now)
        if step is Next.DEFER:
            return await self._defer(item, temporary, attempts, now)
        if step is Next.PUT_BACK and shaped is not None:
            self._stats["shaped"] += 1
            self._wake_at(now + shaped)
            return await self._put_back(item, now, delay=shaped, attempts=attempts)
        if step is Next.PUT_BACK:
            self._stats["busy"] += 1
            if not tried:
                self._found_full.add(item.id)
            return await self._put_back(item, now, delay=self._interval, attempts=attempts)
        item = await self._give_up(item, temporary, attempts, assessment.decision, now)
        return await self._finish(item, now)

    # -- outcomes of an attempt: the transitions' changes, written -------------------------------------

    async def _write(self, item: QueueItem, changes: Mapping[str, Any]) -> QueueItem:
        """One durable write of ``changes`` to ``item``; the item as stored afterwards."""
        updated: QueueItem = await self._queue.update(item.id, **changes)
        return updated

    async def _defer(
        self, item: QueueItem, temporary: dict[str, RecipientResult], attempts: int, now: float
    ) -> QueueItem:
        wait = self._policy_for(item).next_delay(attempts, self._random)
        pending = item.pending_recipients()
        destination = self._destination(item, pending[0])
        transition = transitions.deferral(
            item,
            temporary,
            attempts=attempts,
            now=now,
            wait=wait,
            destination=destination,
            warn=self._bouncer.warning_due(item, now),
        )
        queued = await self._queue_dsn(item, transition.dsn, now)
        self._stats["deferred"] += 1
        self.events.emit(
            "message.deferred",
            queue_id=item.id,
            destination=destination,
            attempts=attempts,
            pending=len(pending),
            nextAttemptIn=wait,
            error=str(transition.changes["last_error"])[:200],
        )
        log.info(
            "{queue_id} deferred after attempt {attempts}: {pending} recipients pending, next attempt in "
            "{wait:.0f} s ({error})",
            queue_id=item.id,
            attempts=attempts,
            pending=len(pending),
            wait=wait,
            error=transition.changes["last_error"],
        )
        return await self._write(item, transition.to_write(dsn_queued=queued))

    async def _queue_dsn(self, item: QueueItem, dsn: DsnRequest | None, now: float) -> bool:
        """Queue ``dsn`` if there is one; False when it could not be queued (counted and logged: the
        transition says what to write then)."""
        if dsn is None:
            return True
        try:
            await self._bouncer.send(item, dsn, now)
        except ClaimLost:
            raise
        except Exception:  # noqa: BLE001 (the queue is full or down: never let a DSN lose the message's state)
            self._stats["errors"] += 1
            if dsn.action == "delayed":  # a courtesy: the deferral is written without it
                log.failure("cannot queue the delay warning for {queue_id}", queue_id=item.id)
            else:
                log.failure("cannot queue the bounce for {queue_id}; trying again later", queue_id=item.id)
            return False
        self._stats["delay_warnings" if dsn.action == "delayed" else "dsn_sent"] += 1
        self.events.emit("message.dsn_sent", queue_id=item.id, action=dsn.action)
        return True

    def destination_of(self, envelope: Envelope) -> str | None:
        """The route of the first recipient of ``envelope``: the ``destination`` a message is queued with, so
        that claims share delivery between destinations from its first attempt on (None when routing fails:
        it is then claimed as unrouted mail, and its first attempt records where it goes)."""
        if not envelope.recipients:
            return None
        try:
            return self._routes.route(envelope.mail_from, envelope.recipients[0]).name
        except Exception:  # noqa: BLE001 (the attempt routes again and logs what fails)
            return None

    def _suppress(self, item: QueueItem, result: RecipientResult) -> None:
        """Put a recipient that hard-bounced on the suppression list (in the background: a failure to is
        logged, and the delivery's outcome stands)."""
        if self._suppressions is None:
            return
        self._stats["suppressed"] += 1
        try:
            d = self._suppressions.add(result.recipient, result.reply, self._suppression_ttl)
        except ValueError:
            return  # not an address a client could name at RCPT
        d.addErrback(
            lambda failure: log.failure(
                "{queue_id}: cannot suppress {recipient}",
                failure,
                queue_id=item.id,
                recipient=result.recipient,
            )
        )

    def reconfigure(self, config: SmtpConfig) -> None:
        """Per-destination limits and retry schedules of ``config``'s domainConfigs (a routing change) from
        the next attempt on; the global numbers stay as started."""
        limits, self._route_policies = route_settings(config, self._policy)
        self._slots.set_limits(self._config.max_per_destination, limits)

    def settings_for(self, route: str) -> tuple[int, RetryPolicy]:
        """The deliveries in flight allowed at once and the retry policy for the route named ``route``."""
        return self._slots.limit(route), self._route_policies.get(route, self._policy)

    def _policy_for(self, item: QueueItem) -> RetryPolicy:
        """The retry policy of the route the message waits for (its first pending recipient's)."""
        if not self._route_policies:
            return self._policy
        pending = item.pending_recipients()
        route = self._destination(item, pending[0]) if pending else None
        return self._route_policies.get(route or "", self._policy)

    def _destination(self, item: QueueItem, rcpt: str) -> str | None:
        """Where the message waits now (the route of its first pending recipient), for get_by_destination."""
        try:
            return self._routes.route(item.envelope.mail_from, rcpt).name
        except Exception:  # noqa: BLE001 (already logged by the attempt; the destination is informative)
            return None

    async def _put_back(
        self, item: QueueItem, now: float, *, delay: float, attempts: int | None = None
    ) -> QueueItem:
        """Return a claimed item to a ready state, due after ``delay``, using no retry
        (:func:`~dcrouter.delivery.transitions.put_back`)."""
        log.debug("{queue_id} put back (destination busy or stopping)", queue_id=item.id)
        pending = item.pending_recipients()
        destination = self._destination(item, pending[0]) if item.destination is None and pending else None
        transition = transitions.put_back(
            item, now=now, delay=delay, attempts=attempts, destination=destination
        )
        return await self._write(item, transition.changes)

    async def _give_up(
        self,
        item: QueueItem,
        temporary: dict[str, RecipientResult],
        attempts: int,
        decision: RetryDecision,
        now: float,
    ) -> QueueItem:
        """Record every pending recipient as failed for good: expired, or out of retries."""
        reason = transitions.give_up_reason(item, attempts=attempts, decision=decision, now=now)
        transition = transitions.give_up(item, temporary, attempts=attempts, reason=reason, now=now)
        count = len(item.pending_recipients())
        self._stats["recipients_failed"] += count
        log.info(
            "{queue_id}: {reason}; {count} recipients fail", queue_id=item.id, reason=reason, count=count
        )
        return await self._write(item, transition.changes)

    async def _finish(self, item: QueueItem, now: float) -> QueueItem:
        """No recipient is pending: DELIVERED, BOUNCED (after queueing the DSN) or FAILED."""
        transition = transitions.finish(item, now=now, retry_delay=self._policy.base_delay)
        status: QueueItemStatus = transition.changes["status"]
        if status is QueueItemStatus.FAILED:
            log.warn(
                "{queue_id} from the null sender failed for {count} recipients; no bounce is sent for it",
                queue_id=item.id,
                count=len(transitions.failed_recipients(item)),
            )
        if not await self._queue_dsn(item, transition.dsn, now):
            # Nothing is pending, so the next attempt goes straight here and tries the bounce again.
            return await self._write(item, transition.to_write(dsn_queued=False))
        self._stats[status.value] += 1
        log.info("{queue_id} {status}", queue_id=item.id, status=status.value)
        if status in (QueueItemStatus.BOUNCED, QueueItemStatus.FAILED):
            self.events.emit(
                "message.bounced",
                queue_id=item.id,
                status=status.value,
                recipients=len(transitions.failed_recipients(item)),
            )
        return await self._write(item, transition.changes)
