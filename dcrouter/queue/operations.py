"""What an operator does to one queued message, on any :class:`~dcrouter.interfaces.IDeliveryQueue`: hold,
release, retry now, delete. The one implementation behind the management API and ``dcrouter queue``.

Each is one write guarded by the status the message was found in (``update_if``/``dequeue_if``), so it acts
only on the message as the operator saw it, whichever process holds the queue: a message claimed for
delivery meanwhile (``delivering``) is refused, never changed under the delivery.

- **hold** (``queued`` or ``deferred`` → ``held``): never claimed for delivery until released (the status
  is stored, so a hold survives restarts). Postfix's ``postsuper -h``.
- **release** (``held`` → ``deferred`` when it has had attempts, else ``queued``): due again at its next
  attempt time as before the hold (at once when that has passed).
- **retry** (``queued`` or ``deferred``): due now.
- **delete** (any status but ``delivering``): the message and its body are removed; no bounce is sent.
"""

from __future__ import annotations

from typing import cast

from dcrouter.interfaces import IDeliveryQueue, StatusMismatch
from dcrouter.queue.item import READY_STATUSES, QueueItem, QueueItemStatus

HELD = QueueItemStatus.HELD

#: Per operation: whether it applies to a message in a status (for listing what a bulk operation would do).
APPLIES = {
    "hold": lambda status: status in READY_STATUSES,
    "release": lambda status: status is HELD,
    "retry": lambda status: status in READY_STATUSES,
    "delete": lambda status: status is not QueueItemStatus.DELIVERING,
}


class NotFound(LookupError):
    """No message of that id in the queue."""

    def __str__(self) -> str:
        return f"no message {self.args[0]} in the queue"


class WrongStatus(Exception):
    """The message is in a status the operation does not apply to; ``item`` is the message as stored."""

    def __init__(self, item: QueueItem, operation: str, wanted: str) -> None:
        status = QueueItemStatus(item.status).value
        super().__init__(
            f"cannot {operation} message {item.id}: it is {status}; {operation} applies to {wanted}"
        )
        self.item = item


async def _get(queue: IDeliveryQueue, item_id: str) -> QueueItem:
    item: QueueItem | None = await queue.get(item_id)
    if item is None:
        raise NotFound(item_id)
    return item


async def _guarded(
    queue: IDeliveryQueue, item: QueueItem, operation: str, wanted: str, **changes: object
) -> QueueItem:
    try:
        updated: QueueItem = await queue.update_if(item.id, item.status, **changes)
    except KeyError:
        raise NotFound(item.id) from None
    except StatusMismatch as mismatch:
        raise WrongStatus(cast(QueueItem, mismatch.item), operation, wanted) from None
    return updated


async def hold(queue: IDeliveryQueue, item_id: str) -> QueueItem:
    item = await _get(queue, item_id)
    if item.status not in READY_STATUSES:
        raise WrongStatus(item, "hold", "queued or deferred messages")
    return await _guarded(queue, item, "hold", "queued or deferred messages", status=HELD)


async def release(queue: IDeliveryQueue, item_id: str) -> QueueItem:
    item = await _get(queue, item_id)
    if item.status is not HELD:
        raise WrongStatus(item, "release", "held messages")
    ready = QueueItemStatus.DEFERRED if item.attempts else QueueItemStatus.QUEUED
    return await _guarded(queue, item, "release", "held messages", status=ready)


async def retry(queue: IDeliveryQueue, item_id: str, now: float) -> QueueItem:
    item = await _get(queue, item_id)
    if item.status not in READY_STATUSES:
        raise WrongStatus(item, "retry", "queued or deferred messages (release a held one first)")
    return await _guarded(queue, item, "retry", "queued or deferred messages", next_attempt_at=now)


async def delete(queue: IDeliveryQueue, item_id: str) -> QueueItem:
    item = await _get(queue, item_id)
    if item.status is QueueItemStatus.DELIVERING:
        raise WrongStatus(item, "delete", "messages not being delivered (try again in a moment)")
    try:
        removed: QueueItem | None = await queue.dequeue_if(item_id, item.status)
    except StatusMismatch as mismatch:
        raise WrongStatus(cast(QueueItem, mismatch.item), "delete", "messages not being delivered") from None
    if removed is None:
        raise NotFound(item_id)
    return removed
