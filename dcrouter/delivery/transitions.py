"""What a delivery attempt changes on a queued message, as values. Every function here is pure (no I/O, no
clock: ``now`` is an argument): given a :class:`QueueItem`, the recipient results of an attempt, the retry
policy and ``now``, it returns the :class:`Transition` to write. The
:class:`~dcrouter.delivery.manager.DeliveryManager` reads, routes and calls the transport, then applies each
transition with one ``queue.update`` (after queueing the DSN it names).

What a caller may rely on:

- **A group's record** (:func:`record_group`): the group's final outcomes (delivered or permanent, each
  ``{"outcome", "reply", "target", "at", "route"}``), a ``history`` entry ``{"at", "route", "tried",
  "results"}``, ``destination`` when the item had none, and ``status`` DELIVERED in the same write when every
  recipient of the message is then delivered.
- **After the attempt** (:func:`assess`): nothing pending, FINISH; otherwise the retry policy's decision with
  ``attempts`` counting this attempt when it tried a destination: DEFER when it had temporary failures,
  PUT_BACK when it only found destinations busy, GIVE_UP when out of retries or expired.
- **The transitions**: :func:`deferral` (DEFERRED, ``priority=RETRY``, the next attempt, the first pending
  recipient's last error, the delay warning when due), :func:`put_back` (no retry used up), :func:`give_up`
  (pending recipients fail for good with ``451 4.4.7``), :func:`finish` (DELIVERED, FAILED for the null
  sender, or BOUNCED with ``bounce_id`` once the bounce is queued; DEFERRED for ``retry_delay`` when it
  cannot be).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dcrouter.delivery.bounces import DsnRequest, dsn_queue_id
from dcrouter.delivery.outcome import DeliveryReport, Outcome, RecipientResult
from dcrouter.delivery.retry import RetryDecision, RetryPolicy
from dcrouter.queue.item import Priority, QueueItem, QueueItemStatus

#: The temporary failure of a recipient the transport gave no result for.
NO_RESULT = (451, "4.3.0", "No result for this recipient (local error)")
#: The temporary failure of every pending recipient when routing raised.
ROUTING_FAILED = (451, "4.3.0", "Local error in routing")
#: ``last_error`` of a finished message whose bounce could not be queued.
BOUNCE_NOT_QUEUED = "4.3.0 Cannot queue the bounce"


@dataclass(frozen=True)
class Transition:
    """One write: ``changes`` are the keyword arguments of one ``queue.update``. When ``dsn`` is set, it is
    queued first, and ``unsent`` is written instead of ``changes`` if it cannot be."""

    changes: Mapping[str, Any]
    dsn: DsnRequest | None = None
    unsent: Mapping[str, Any] | None = None

    def to_write(self, *, dsn_queued: bool) -> Mapping[str, Any]:
        """The changes to write, given whether ``dsn`` (if any) was queued."""
        if dsn_queued or self.dsn is None or self.unsent is None:
            return self.changes
        return self.unsent


class Next(enum.Enum):
    """What follows an attempt (see :func:`assess`)."""

    FINISH = "finish"  # nothing pending: delivered, bounced or failed
    DEFER = "defer"  # temporary failures: try again after the policy's delay
    PUT_BACK = "put back"  # only destinations busy: back to the queue, no retry used up
    GIVE_UP = "give up"  # out of retries or expired: the pending recipients fail for good, then FINISH


@dataclass(frozen=True)
class Assessment:
    """What follows an attempt, with ``attempts`` (this one included when it tried a destination) and the
    retry policy's decision (RETRY unless ``step`` is GIVE_UP)."""

    step: Next
    attempts: int
    decision: RetryDecision = RetryDecision.RETRY


def local_failure(recipient: str, code: int, enhanced: str, text: str) -> RecipientResult:
    """A temporary failure of ``recipient`` described by us (no server answered it)."""
    return RecipientResult(recipient, Outcome.TEMPORARY, code, enhanced, text)


def routing_failed(pending: Sequence[str]) -> dict[str, RecipientResult]:
    """The results of an attempt whose routing raised (a rule plugin's bug): every pending recipient fails
    temporarily, so the message is retried rather than lost."""
    return {rcpt: local_failure(rcpt, *ROUTING_FAILED) for rcpt in pending}


def one_result_each(route_name: str, report: DeliveryReport, rcpts: Sequence[str]) -> DeliveryReport:
    """The report of route ``route_name`` for ``rcpts`` from the transport's ``report``: exactly one result
    per recipient, in their order; results for others are dropped, and a recipient without one fails
    temporarily (a transport bug must not lose it)."""
    by_rcpt = {r.recipient: r for r in report.results if r.recipient in rcpts}
    results = [by_rcpt.get(rcpt) or local_failure(rcpt, *NO_RESULT) for rcpt in rcpts]
    return DeliveryReport(route_name, results, list(report.tried))


def record_group(item: QueueItem, route_name: str, report: DeliveryReport, now: float) -> Transition:
    """The record of one route group's report (see the module docstring)."""
    outcomes = dict(item.outcomes)
    for r in report.results:
        if r.outcome is not Outcome.TEMPORARY:
            outcomes[r.recipient] = {
                "outcome": r.outcome.value,
                "reply": r.reply,
                "target": r.target,
                "at": now,
                "route": route_name,
            }
    entry = {
        "at": now,
        "route": route_name,
        "tried": list(report.tried),
        "results": [
            {"recipient": r.recipient, "outcome": r.outcome.value, "reply": r.reply, "target": r.target}
            for r in report.results
        ],
    }
    changes: dict[str, Any] = {"outcomes": outcomes, "history": [*item.history, entry]}
    if item.destination is None:
        changes["destination"] = route_name
    delivered = Outcome.DELIVERED.value
    if len(outcomes) == len(item.envelope.recipients) and all(
        o["outcome"] == delivered for o in outcomes.values()
    ):
        # The common case, every recipient delivered: the outcomes and the final status go in one durable
        # write instead of two (each an fsync'd commit on the disk queue).
        changes["status"] = QueueItemStatus.DELIVERED
    return Transition(changes)


def assess(
    item: QueueItem, *, tried: bool, failed_temporarily: bool, policy: RetryPolicy, now: float
) -> Assessment:
    """What follows the attempt that left ``item`` as it is. ``tried``: some group reached the transport (or
    routing failed); ``failed_temporarily``: some recipient failed temporarily."""
    if not item.pending_recipients():
        return Assessment(Next.FINISH, item.attempts)
    attempts = item.attempts + int(tried)
    decision = policy.decide(
        attempts=attempts, created_at=item.created_at, now=now, failed_temporarily=failed_temporarily
    )
    if decision is not RetryDecision.RETRY:
        return Assessment(Next.GIVE_UP, attempts, decision)
    return Assessment(Next.DEFER if failed_temporarily else Next.PUT_BACK, attempts)


def deferral(
    item: QueueItem,
    temporary: Mapping[str, RecipientResult],
    *,
    attempts: int,
    now: float,
    wait: float,
    destination: str | None,
    warn: bool,
) -> Transition:
    """DEFERRED until ``now + wait``, with the last error of the first pending recipient that has one, and
    ``destination`` (where it waits now) when known. With ``warn``, the delay warning listing the pending
    recipients is queued first, and ``warned_at`` set once it is."""
    pending = item.pending_recipients()
    changes: dict[str, Any] = {
        "status": QueueItemStatus.DEFERRED,
        "priority": Priority.RETRY,
        "attempts": attempts,
        "next_attempt_at": now + wait,
        "last_error": next((temporary[r].reply for r in pending if r in temporary), item.last_error),
    }
    if destination is not None:
        changes["destination"] = destination
    if not warn:
        return Transition(changes)
    rows = []
    for rcpt in pending:
        last = temporary.get(rcpt)
        rows.append((rcpt, last.reply if last else (item.last_error or ""), last.target if last else ""))
    return Transition({**changes, "warned_at": now}, DsnRequest("delayed", tuple(rows)), unsent=changes)


def put_back(
    item: QueueItem, *, now: float, delay: float, attempts: int | None = None, destination: str | None = None
) -> Transition:
    """Back to a ready state, due after ``delay``. No retry is used up: ``attempts`` only counts groups tried
    in the attempt, when some were (the others found their destination busy). ``destination``, when given,
    is recorded (a message queued without one: claims then schedule it with its destination's mail)."""
    attempts = item.attempts if attempts is None else attempts
    status = QueueItemStatus.QUEUED if attempts == 0 else QueueItemStatus.DEFERRED
    changes: dict[str, Any] = {"status": status, "next_attempt_at": now + delay, "attempts": attempts}
    if destination is not None:
        changes["destination"] = destination
    return Transition(changes)


def give_up_reason(item: QueueItem, *, attempts: int, decision: RetryDecision, now: float) -> str:
    """Why the pending recipients fail for good: expired, or out of retries."""
    if decision is RetryDecision.EXPIRED:
        return f"Message expired after {(now - item.created_at) / 3600:.1f} hours in the queue"
    return f"Retry limit reached after {attempts} attempts"


def give_up(
    item: QueueItem, temporary: Mapping[str, RecipientResult], *, attempts: int, reason: str, now: float
) -> Transition:
    """Every pending recipient failed for good (``451 4.4.7 <reason>; last error: ...``). Its status is
    :func:`finish`'s, a write of its own after this one."""
    outcomes = dict(item.outcomes)
    for rcpt in item.pending_recipients():
        last = temporary.get(rcpt)
        last_error = last.reply if last else (item.last_error or "none")
        outcomes[rcpt] = {
            "outcome": Outcome.PERMANENT.value,
            "reply": f"451 4.4.7 {reason}; last error: {last_error}",
            "target": last.target if last else "",
            "at": now,
            "route": "",
        }
    return Transition({"outcomes": outcomes, "attempts": attempts, "last_error": f"4.4.7 {reason}"})


def failed_recipients(item: QueueItem) -> list[str]:
    """The recipients of ``item`` recorded as failed for good, in envelope order."""
    return [r for r in item.envelope.recipients if item.outcomes[r]["outcome"] == Outcome.PERMANENT.value]


def finish(item: QueueItem, *, now: float, retry_delay: float) -> Transition:
    """The final status of ``item``, which has no recipient pending: DELIVERED; FAILED when some failed and
    it is from the null sender (never a DSN to it); otherwise BOUNCED with ``bounce_id``, once the bounce
    listing the failed recipients is queued, or DEFERRED for ``retry_delay`` when it cannot be (the next
    attempt finds nothing pending and tries the bounce again)."""
    failed = failed_recipients(item)
    if not failed:
        return Transition({"status": QueueItemStatus.DELIVERED})
    if not item.envelope.mail_from:
        return Transition({"status": QueueItemStatus.FAILED})
    rows = tuple((r, item.outcomes[r]["reply"], item.outcomes[r]["target"]) for r in failed)
    return Transition(
        {"status": QueueItemStatus.BOUNCED, "bounce_id": dsn_queue_id(item.id, "failed")},
        DsnRequest("failed", rows),
        unsent={
            "status": QueueItemStatus.DEFERRED,
            "next_attempt_at": now + retry_delay,
            "last_error": BOUNCE_NOT_QUEUED,
        },
    )
