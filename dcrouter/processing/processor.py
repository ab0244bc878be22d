"""EmailProcessor: what happens to a received message before it is queued.

For now the chain has one stage, queueing; scanning, transformations and routing are added by later work
(see the project's issues) as stages in front of it.
"""

from __future__ import annotations

import secrets
from typing import Callable

from twisted.internet.defer import Deferred

from dcrouter.envelope import Envelope
from dcrouter.interfaces import IDeliveryQueue
from dcrouter.queue.item import QueueItem
from dcrouter.smtp.spool import SpooledMessage


def new_queue_id() -> str:
    """A queue id: 20 upper-case hex digits, unique without coordination, safe in file names."""
    return secrets.token_hex(10).upper()


class EmailProcessor:
    """Takes a complete message from ingress and returns a Deferred firing with the durable QueueItem.

    The Deferred fails with :class:`dcrouter.interfaces.QueueError` (temporary: 4xx) when it cannot be queued.
    """

    def __init__(self, queue: IDeliveryQueue, clock_seconds: Callable[[], float]) -> None:
        self._queue = queue
        self._now = clock_seconds

    def process(self, envelope: Envelope, message: SpooledMessage, queue_id: str | None = None) -> Deferred:
        now = self._now()
        item = QueueItem(
            id=queue_id or new_queue_id(),
            envelope=envelope,
            size=message.size,
            created_at=now,
            next_attempt_at=now,
        )
        return self._queue.enqueue(item, message)
