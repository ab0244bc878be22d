"""What can be done with a quarantined message, on any :class:`~dcrouter.interfaces.IDeliveryQueue`: the one
implementation behind ``dcrouter quarantine`` (:mod:`dcrouter.quarantine`), ``EmailProcessor.release`` and
any API that lists, shows, releases or deletes quarantined mail.

A scanner's ``quarantine`` action queues a message with status ``quarantined`` (its ``last_error`` says why),
where it waits for an operator. A release and a delete are each one write guarded by that status
(``update_if``/``dequeue_if``), so they act only on a message that is still quarantined, whichever process
holds the queue, and never on one another operator has released or deleted meanwhile.
"""

from __future__ import annotations

from typing import cast

from dcrouter.interfaces import IDeliveryQueue, StatusMismatch
from dcrouter.queue.files import message_reader
from dcrouter.queue.item import QueueItem, QueueItemStatus

QUARANTINED = QueueItemStatus.QUARANTINED


class NotQuarantined(LookupError):
    """The queue holds no quarantined message ``item_id``: ``item`` is None when it holds no message of that
    id, else the message in its other status. The text says which, naming the id."""

    def __init__(self, item_id: str, item: QueueItem | None) -> None:
        if item is None:
            text = f"no message {item_id} in the queue"
        else:
            text = f"message {item_id} is {QueueItemStatus(item.status).value}, not quarantined"
        super().__init__(text)
        self.item_id = item_id
        self.item = item

    def __str__(self) -> str:
        # LookupError's str() would quote the text as KeyError's does.
        return str(self.args[0])


async def quarantined(queue: IDeliveryQueue) -> list[QueueItem]:
    """Every quarantined message, oldest first."""
    items: list[QueueItem] = await queue.get_by_status(QUARANTINED)
    return items


async def get_quarantined(queue: IDeliveryQueue, item_id: str) -> QueueItem:
    """The quarantined message ``item_id``; NotQuarantined when there is none."""
    item: QueueItem | None = await queue.get(item_id)
    if item is None or item.status is not QUARANTINED:
        raise NotQuarantined(item_id, item)
    return item


async def read_head(queue: IDeliveryQueue, item: QueueItem, limit: int) -> bytes:
    """Up to ``limit`` bytes of ``item``'s message as it will be relayed (its header block as processing left
    it, then the body). NotQuarantined when the message was removed meanwhile."""
    try:
        stream = await queue.open_body(item.id)
    except KeyError:
        raise NotQuarantined(item.id, None) from None
    reader = message_reader(item.head, stream, item.body_offset)
    try:
        head: bytes = reader.read(limit)
        return head
    finally:
        reader.close()


async def release(queue: IDeliveryQueue, item_id: str, now: float) -> QueueItem:
    """Make the quarantined message due at ``now`` (status queued, reason cleared), for the queue's holder to
    deliver at its next look at the queue; returns it as stored. NotQuarantined, and nothing changes, when it
    is not (or no longer) quarantined."""
    try:
        released: QueueItem = await queue.update_if(
            item_id, QUARANTINED, status=QueueItemStatus.QUEUED, next_attempt_at=now, last_error=None
        )
    except KeyError:
        raise NotQuarantined(item_id, None) from None
    except StatusMismatch as mismatch:
        raise NotQuarantined(item_id, cast(QueueItem, mismatch.item)) from None
    return released


async def delete(queue: IDeliveryQueue, item_id: str) -> QueueItem:
    """Remove the quarantined message and its body (it is not delivered and no bounce is sent); returns it.
    NotQuarantined, and nothing changes, when it is not (or no longer) quarantined."""
    try:
        removed: QueueItem | None = await queue.dequeue_if(item_id, QUARANTINED)
    except StatusMismatch as mismatch:
        raise NotQuarantined(item_id, cast(QueueItem, mismatch.item)) from None
    if removed is None:
        raise NotQuarantined(item_id, None)
    return removed
