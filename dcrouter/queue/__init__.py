"""The delivery queue: the IDeliveryQueue interface's backends (memory, disk; redis later)."""

from dcrouter.queue.item import Priority, QueueItem, QueueItemStatus

__all__ = ["Priority", "QueueItem", "QueueItemStatus"]
