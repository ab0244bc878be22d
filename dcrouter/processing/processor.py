"""EmailProcessor: what happens to a received message before it is queued.

For now the chain has one stage, queueing; scanning, transformations and routing are added by later work
(see the project's issues) as stages in front of it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from twisted.internet.defer import Deferred

from dcrouter.envelope import Envelope
from dcrouter.interfaces import IDeliveryQueue
from dcrouter.log import logger
from dcrouter.queue.item import Priority, QueueItem
from dcrouter.smtp.spool import SpooledMessage

log = logger("dcrouter.processing")


def new_queue_id() -> str:
    """A queue id: 20 upper-case hex digits, unique without coordination, safe in file names."""
    return secrets.token_hex(10).upper()


class EmailProcessor:
    """Takes a complete message from ingress and returns a Deferred firing with the durable QueueItem.

    The Deferred fails with :class:`dcrouter.interfaces.QueueError` (temporary: 4xx) when it cannot be queued.
    ``on_queued``, when set, is called with each item once it is durable (delivery uses it to start at once
    instead of at its next periodic look).
    """

    def __init__(self, queue: IDeliveryQueue, clock_seconds: Callable[[], float]) -> None:
        self._queue = queue
        self._now = clock_seconds
        self.on_queued: Callable[[QueueItem], object] | None = None

    def process(
        self,
        envelope: Envelope,
        message: SpooledMessage,
        queue_id: str | None = None,
        *,
        priority: int = Priority.FRESH,
    ) -> Deferred:
        now = self._now()
        item = QueueItem(
            id=queue_id or new_queue_id(),
            envelope=envelope,
            size=message.size,
            priority=priority,
            created_at=now,
            next_attempt_at=now,
        )
        queued = self._queue.enqueue(item, message)
        if self.on_queued is not None:
            queued.addCallback(self._notify)
        return queued

    def _notify(self, item: QueueItem) -> QueueItem:
        assert self.on_queued is not None
        try:
            self.on_queued(item)
        except Exception:  # noqa: BLE001 (logged; a listener's bug must not fail a durable enqueue)
            # The message is durable whatever a listener does: never turn its 250 into an error.
            log.failure("on_queued listener failed for {queue_id}", queue_id=item.id)
        return item
