"""The ``memory`` queue backend: for tests and throwaway runs. Everything is lost when the process exits, and
``load()`` says so in the log.

What a caller may rely on:

- Same semantics as the ``disk`` backend (see :mod:`dcrouter.queue.contract`), but every Deferred has already
  fired when the method returns: nothing here waits for I/O.
- Items handed out are copies; changing one changes nothing in the queue until ``update`` is called.
- Bodies: a SpooledMessage with ``.data`` is kept as those bytes. One with ``.path`` (a big message) is *not*
  read into memory: the queue takes the file over where it is and deletes it on ``dequeue``, ``purge_*`` and
  ``save``, so a 50 MB message costs no memory here either.
- ``spool_directory`` is the caller's directory when given, else a fresh temporary directory that the queue
  owns and removes at ``save()``.
- The life cycle is the durable backends' (:class:`~dcrouter.queue.lifecycle.QueueLifecycle`), except that
  there is nothing to open: the queue is open from construction, ``load()`` only prepares the spool directory
  and warns, and ``save()`` drops everything.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from dcrouter.interfaces import DuplicateItem, IDeliveryQueue, QueueFull, QueueUnavailable, StatusMismatch
from dcrouter.log import logger
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.queue.contract import (
    FINAL_STATUSES,
    ClaimSchedule,
    ItemPage,
    QueueFilter,
    check_changes,
    check_item_id,
    check_page,
    destination_counts,
    is_live,
    new_load_counts,
    pick,
)
from dcrouter.queue.item import READY_STATUSES, QueueItem, QueueItemStatus
from dcrouter.queue.lifecycle import QueueLifecycle
from dcrouter.queue.suppression import MemorySuppressionList

log = logger(__name__)


@implementer(IDeliveryQueue)
class MemoryQueue(QueueLifecycle):
    """A DeliveryQueue in a dict. ``clock`` decides due-ness (``get_next``) and age (``purge_expired``)."""

    _description = "the memory queue"

    def __init__(self, *, clock: IReactorTime, max_size: int = 0, spool_directory: str | None = None) -> None:
        super().__init__()
        # Nothing to open or recover: usable at once, before load() as after it.
        self._state = "open"
        self.max_size = max_size
        self._clock = clock
        self._owns_spool = spool_directory is None
        self.spool_directory = spool_directory or tempfile.mkdtemp(prefix="dcrouter-memory-queue-")
        # Insertion order is kept by the dict; it breaks ties between items created at the same instant.
        self._items: dict[str, QueueItem] = {}
        # bytes for an inline body, str for the path of a spool file the queue now owns.
        self._bodies: dict[str, bytes | str] = {}
        self._live = 0  # items in a non-final status, kept current so max_size checks are O(1)
        # Arrival numbers (list_items' order and cursors); the dict keeps insertion order, so these rise.
        self._arrival: dict[str, int] = {}
        self._next_arrival = 1

    # -- storing -----------------------------------------------------------------------------------

    def enqueue(self, item: QueueItem, message: SpooledMessage) -> Deferred:
        """Store a copy of ``item`` with ``message`` as its body. Fails with QueueFull at ``max_size`` live
        items, ValueError for a bad or duplicate id; on failure the message is discarded."""
        try:
            self._check_open()
            check_item_id(item.id)
            if item.id in self._items:
                raise DuplicateItem(f"queue id already stored: {item.id}")
            if self.max_size > 0 and self._live_count() >= self.max_size:
                raise QueueFull(f"the queue holds {self.max_size} items (maxQueueSize)")
        except Exception as e:  # noqa: BLE001 (a failure for the caller)
            message.discard()
            return fail(e)
        if message.data is not None:
            self._bodies[item.id] = message.data
        else:
            assert message.path is not None
            self._bodies[item.id] = message.path
        stored = item.copy()
        stored.status = QueueItemStatus(stored.status)
        self._items[item.id] = stored
        self._arrival[item.id] = self._next_arrival
        self._next_arrival += 1
        self._live += is_live(stored.status)
        return succeed(stored.copy())

    def update(self, item_id: str, **changes: Any) -> Deferred:
        """Apply ``changes`` (QueueItem field names, all but ``id``); fails with KeyError if unknown."""
        return self._update(item_id, None, changes)

    def update_if(self, item_id: str, expected: QueueItemStatus | str, /, **changes: Any) -> Deferred:
        """``update`` while the item is in status ``expected``; fails with StatusMismatch when it is not."""
        return self._update(item_id, expected, changes)

    def _update(
        self, item_id: str, expected: QueueItemStatus | str | None, changes: dict[str, Any]
    ) -> Deferred:
        try:
            self._check_open()
            normalised = check_changes(changes)
            wanted = None if expected is None else QueueItemStatus(expected)
            current = self._items[item_id]
            if wanted is not None and current.status is not wanted:
                raise StatusMismatch(current.copy())
        except Exception as e:  # noqa: BLE001 (a failure for the caller)
            return fail(e)
        updated = current.evolve(**normalised).copy()
        self._items[item_id] = updated
        self._live += is_live(updated.status) - is_live(current.status)
        return succeed(updated.copy())

    def dequeue(self, item_id: str) -> Deferred:
        """Remove the item and its body; fires with the removed item, or None if there was none."""
        return self._dequeue(item_id, None)

    def dequeue_if(self, item_id: str, expected: QueueItemStatus | str) -> Deferred:
        """``dequeue`` while the item is in status ``expected``; fails with StatusMismatch when it is not."""
        return self._dequeue(item_id, expected)

    def _dequeue(self, item_id: str, expected: QueueItemStatus | str | None) -> Deferred:
        try:
            self._check_open()
            wanted = None if expected is None else QueueItemStatus(expected)
            item = self._items.get(item_id)
            if item is not None and wanted is not None and item.status is not wanted:
                raise StatusMismatch(item.copy())
        except Exception as e:  # noqa: BLE001 (a failure for the caller)
            return fail(e)
        if item is not None:
            self._remove(item_id)
        return succeed(item)

    # -- claiming and reading ----------------------------------------------------------------------

    def get_next(self, count: int = 1, schedule: ClaimSchedule | None = None) -> Deferred:
        """Claim up to ``count`` due items by priority, then creation time, then arrival order; with
        ``schedule``, shared between destinations as :class:`~dcrouter.queue.contract.ClaimSchedule` says."""
        try:
            self._check_open()
        except QueueUnavailable as e:
            return fail(e)
        if self._paused or count <= 0:
            return succeed([])
        now = self._clock.seconds()
        due = [i for i in self._items.values() if i.status in READY_STATUSES and i.next_attempt_at <= now]
        # sorted() is stable, so equal keys keep the dict's insertion order.
        due.sort(key=lambda i: (i.priority, i.created_at))
        chosen = due[:count] if schedule is None else pick(((i, i.destination) for i in due), count, schedule)
        claimed = []
        for item in chosen:
            item.status = QueueItemStatus.DELIVERING
            claimed.append(item.copy())
        return succeed(claimed)

    def open_body(self, item_id: str) -> Deferred:
        """A readable binary file over the body; fails with KeyError for an unknown id."""
        try:
            self._check_open()
            body = self._bodies[item_id]
            stream: BinaryIO = io.BytesIO(body) if isinstance(body, bytes) else open(body, "rb")  # noqa: SIM115
        except Exception as e:  # noqa: BLE001 (a failure for the caller)
            return fail(e)
        return succeed(stream)

    def get(self, item_id: str) -> Deferred:
        item = self._items.get(item_id)
        return succeed(None if item is None else item.copy())

    def get_by_status(self, status: QueueItemStatus | str) -> Deferred:
        """Items in ``status``, oldest first (creation time, then arrival)."""
        try:
            wanted = QueueItemStatus(status)
        except ValueError as e:
            return fail(e)
        return succeed(self._select(lambda i: i.status == wanted))

    def get_by_destination(self, destination: str) -> Deferred:
        """Items routed to ``destination``, oldest first (creation time, then arrival)."""
        return succeed(self._select(lambda i: i.destination == destination))

    def get_item_count(self) -> Deferred:
        return succeed(self._live_count())

    def status_summary(self) -> Deferred:
        summary: dict[str, tuple[int, float | None]] = {}
        for item in self._items.values():
            count, oldest = summary.get(item.status.value, (0, None))
            summary[item.status.value] = (
                count + 1,
                item.created_at if oldest is None else min(oldest, item.created_at),
            )
        return succeed(summary)

    def list_items(self, filter: QueueFilter, limit: int, cursor: str | None = None) -> Deferred:
        """Items matching ``filter``, newest first, ``limit`` at most, after ``cursor``."""
        try:
            before = check_page(limit, cursor)
        except ValueError as e:
            return fail(e)
        found: list[QueueItem] = []
        last = 0
        for item in reversed(self._items.values()):
            arrival = self._arrival[item.id]
            if before is not None and arrival >= before:
                continue
            if filter.matches(item):
                if len(found) == limit:
                    return succeed(ItemPage(found, str(last)))
                found.append(item.copy())
                last = arrival
        return succeed(ItemPage(found, None))

    def count_by_status(self) -> Deferred:
        counts = {status.value: 0 for status in QueueItemStatus}
        for item in self._items.values():
            counts[item.status.value] += 1
        return succeed(counts)

    def count_by_destination(self) -> Deferred:
        rows = ((i.destination, i.status.value, 1) for i in self._items.values())
        return succeed(destination_counts(rows))

    # -- removing in bulk --------------------------------------------------------------------------

    def purge_expired(self, max_age: float) -> Deferred:
        """Remove final items created more than ``max_age`` seconds ago; fires with how many."""
        cutoff = self._clock.seconds() - max_age
        expired = [i.id for i in self._items.values() if i.status in FINAL_STATUSES and i.created_at < cutoff]
        for item_id in expired:
            self._remove(item_id)
        return succeed(len(expired))

    def purge_all(self) -> Deferred:
        count = len(self._items)
        for item_id in list(self._items):
            self._remove(item_id)
        return succeed(count)

    # -- life cycle --------------------------------------------------------------------------------

    def suppression_list(self) -> MemorySuppressionList:
        """The suppression list kept with this queue: in the process, like the queue."""
        return MemorySuppressionList(self._clock)

    def load(self) -> Deferred:
        """Make sure the spool directory exists and warn that nothing survives the process."""
        try:
            os.makedirs(self.spool_directory, exist_ok=True)
        except OSError as e:
            return fail(QueueUnavailable(f"cannot create {self.spool_directory}: {e}"))
        log.warn(
            "The memory queue keeps messages only in this process: everything queued is lost when it exits. "
            "Use queueStorage 'disk' to keep mail across restarts."
        )
        return succeed(new_load_counts(items=len(self._items), live=self._live_count()))

    async def _close(self) -> None:
        """``save()``: every item and body is dropped (nothing is kept) and an owned spool directory removed.
        Nothing here waits, so ``save()``'s Deferred has fired when it returns."""
        for item_id in list(self._items):
            self._remove(item_id)
        if self._owns_spool:
            shutil.rmtree(self.spool_directory, ignore_errors=True)

    # -- internals ---------------------------------------------------------------------------------

    def _select(self, wanted: Callable[[QueueItem], bool]) -> list[QueueItem]:
        # sorted() is stable, so equal creation times keep arrival order.
        found = sorted((i for i in self._items.values() if wanted(i)), key=lambda i: i.created_at)
        return [i.copy() for i in found]

    def _live_count(self) -> int:
        return self._live

    def _remove(self, item_id: str) -> None:
        item = self._items.pop(item_id)
        del self._arrival[item_id]
        self._live -= is_live(item.status)
        body = self._bodies.pop(item_id, None)
        if isinstance(body, str):
            try:
                os.unlink(body)
            except FileNotFoundError:
                pass
