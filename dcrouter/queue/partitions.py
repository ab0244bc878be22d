"""The disk queue with several workers: one partition per worker (docs/queue.md, "Several workers";
the choice in docs/decisions.md, "Workers").

Each partition is an ordinary :class:`~dcrouter.queue.disk.DiskQueue` (its own SQLite index, body files,
spool, writer thread and crash recovery), held by one process at a time. Layout under ``persistentPath``::

    index.sqlite, messages/, spool/, ...   partition 0: the single-worker queue, where it always was
    partitions/<p>/index.sqlite, ...       partition p >= 1
    suppression.sqlite                     the suppression list, one for every worker

What a caller may rely on:

- Worker ``i`` of ``n`` holds partition ``i`` (where it accepts and delivers) and *adopts* every existing
  partition ``p >= n`` with ``p % n == i`` (it delivers their mail, accepts none into them):
  :func:`owned_partitions`. So ``workers = 1`` keeps today's layout, going from 1 to ``n`` leaves the old
  queue with worker 0, and going down from ``n`` leaves no partition without a holder.
- A partition is held by one process at a time: :class:`PartitionedQueue` takes an exclusive ``flock`` on
  ``<partition>/owner.lock`` before loading it, waiting while a previous holder (a worker still draining, say)
  has it, and the kernel drops it when the holder dies (``kill -9`` included). Recovery (claims back to ready,
  the spool emptied, orphans set aside) therefore never runs beside another process writing that partition.
- ``enqueue`` goes to this worker's own partition; ``get_next`` claims from one held partition per call
  (rotating), so a claim's :class:`~dcrouter.queue.contract.ClaimSchedule` holds as it does for one queue.
- Reads (``get``, ``list_items``, counts, ``status_summary``) cover every partition when ``observe_others``
  (worker 0, which runs the management API and the metrics): the partitions other workers hold are opened
  with :meth:`DiskQueue.attach <dcrouter.queue.disk.DiskQueue.attach>` (WAL: reads never wait for the
  holder's commits), on first use and again when a new one appears.
- Writes to an item of a partition another process holds are done there, each one transaction guarded by
  the status (as ``dcrouter quarantine`` does beside a single router): an ``update_if`` that keeps the item
  waiting (hold, release, retry, a quarantine release), which the holder claims at its next look (claims are
  queries), and removals (delete; a message being delivered is refused by the guard), after which the
  holder's count of live items (``maxQueueSize``) is high until its next recount (every
  :data:`RECOUNT_INTERVAL` seconds, ``DiskQueue.recount``). A change that would claim the item or make it
  final (a bounce) fails with :class:`~dcrouter.interfaces.HeldByOtherWorker` unless ``foreign_removals``:
  a claim by a process that is not the holder would not be returned to ready by the holder's recovery.
"""

from __future__ import annotations

import fcntl
import heapq
import os
import re
from collections.abc import Callable, Iterable
from typing import Any, cast

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from dcrouter.interfaces import HeldByOtherWorker, IDeliveryQueue, QueueUnavailable
from dcrouter.log import logger
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.net.reactor import IRouterReactor
from dcrouter.queue.contract import (
    LOAD_COUNT_KEYS,
    ClaimSchedule,
    ItemPage,
    QueueFilter,
    check_page,
    destination_counts,
    is_live,
)
from dcrouter.queue.disk import DiskQueue
from dcrouter.queue.item import QueueItem, QueueItemStatus
from dcrouter.queue.lifecycle import QueueLifecycle
from dcrouter.queue.suppression import SqliteSuppressionList

log = logger(__name__)

#: Where partitions 1 and up live, under ``persistentPath``.
PARTITIONS = "partitions"
#: The file each partition's holder locks (``flock``) while it holds the partition.
LOCK_FILE = "owner.lock"
#: Seconds between two tries for a partition another process still holds.
LOCK_RETRY = 0.2
#: Seconds between two recounts of the live items of each held partition (another process may have removed
#: some: worker 0's API, ``dcrouter quarantine``), which keep ``maxQueueSize`` exact within this time.
RECOUNT_INTERVAL = 60.0

_PARTITION_NAME = re.compile(r"[0-9]{1,6}\Z")


def partition_path(base: str, partition: int) -> str:
    """The directory of ``partition`` under ``base`` (``persistentPath``): ``base`` itself for 0."""
    if partition == 0:
        return base
    return os.path.join(base, PARTITIONS, str(partition))


def existing_partitions(base: str) -> list[int]:
    """The partitions numbered 1 and up that have a directory under ``base``, in order (blocks: a listdir)."""
    try:
        names = os.listdir(os.path.join(base, PARTITIONS))
    except FileNotFoundError:
        return []
    return sorted(int(name) for name in names if _PARTITION_NAME.match(name) and int(name) > 0)


def owned_partitions(worker: int, workers: int, existing: Iterable[int]) -> list[int]:
    """The partitions worker ``worker`` of ``workers`` holds: its own first, then the ones it adopts
    (``p >= workers`` and ``p % workers == worker``), in order."""
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} of {workers}")
    adopted = sorted({p for p in existing if p >= workers and p % workers == worker})
    return [worker, *adopted]


class PartitionLock:
    """An exclusive ``flock`` on ``path``, tried without blocking (the kernel drops it when its process
    ends)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if free (blocks on nothing but opening the file); True when held."""
        if self._fd is not None:
            return True
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


@implementer(IDeliveryQueue)
class PartitionedQueue(QueueLifecycle):
    """The queue of worker ``worker`` of ``workers`` on the disk partitions under ``base``; see the module
    docstring. ``owned`` (default: :func:`owned_partitions` of what exists now) are loaded and held;
    ``observe_others`` opens the rest for reads when asked. ``max_size`` applies to this worker's own
    partition (``maxQueueSize`` divided between the workers by the caller). ``disk_options`` go to every
    held partition's DiskQueue."""

    _description = "partitioned disk queue"

    def __init__(
        self,
        base: str,
        *,
        reactor: IRouterReactor,
        clock: IReactorTime,
        worker: int = 0,
        workers: int = 1,
        owned: list[int] | None = None,
        observe_others: bool = False,
        foreign_removals: bool = False,
        max_size: int = 0,
        **disk_options: Any,
    ) -> None:
        super().__init__()
        self.base = os.path.abspath(base)
        self._reactor = reactor
        self._clock = clock
        self.worker = worker
        self.workers = workers
        self.observe_others = observe_others
        self.foreign_removals = foreign_removals
        numbers = owned if owned is not None else owned_partitions(worker, workers, existing_partitions(base))
        #: partition → its queue, held by this process (the first is this worker's own, where mail goes in;
        #: none for a tool that only opens them beside the workers: ``owned=[]`` with ``observe_others``).
        self.held: dict[int, DiskQueue] = {
            p: DiskQueue(
                partition_path(self.base, p),
                reactor=reactor,
                clock=clock,
                max_size=max_size if p == numbers[0] else 0,
                **disk_options,
            )
            for p in numbers
        }
        #: partition → its queue opened beside the process holding it (attach), for reads.
        self.others: dict[int, DiskQueue] = {}
        self._locks = {
            p: PartitionLock(os.path.join(partition_path(self.base, p), LOCK_FILE)) for p in numbers
        }
        #: id → partition of the items this process claimed and has not finished (routing without a probe).
        self._claimed: dict[str, int] = {}
        self._next_claim = 0
        self._recounts = LoopingCall(self._recount)
        self._recounts.clock = clock

    # -- what ingress and the router read ----------------------------------------------------------

    @property
    def own(self) -> DiskQueue:
        """This worker's own partition, where mail goes in (QueueUnavailable for a tool holding none)."""
        if not self.held:
            raise QueueUnavailable(f"{self._description} {self.base}: this process holds no partition")
        return self.held[next(iter(self.held))]

    @property
    def max_size(self) -> int:
        return self.own.max_size if self.held else 0

    @property
    def spool_directory(self) -> str:
        return self.own.spool_directory

    @property
    def commits(self) -> int:
        return sum(q.commits for q in self.held.values())

    @property
    def committed_writes(self) -> int:
        return sum(q.committed_writes for q in self.held.values())

    def suppression_list(self) -> SqliteSuppressionList:
        """One suppression list for every worker: ``suppression.sqlite`` under ``persistentPath`` (WAL; each
        write is one statement, and SQLite waits up to 5 s for another worker's)."""
        return SqliteSuppressionList(
            os.path.join(self.base, "suppression.sqlite"), reactor=self._reactor, clock=self._clock
        )

    # -- life cycle ----------------------------------------------------------------------------------

    def load(self) -> Deferred:
        if self._state != "new":
            return Deferred.fromCoroutine(self._refuse("was already loaded"))
        self._state = "loading"
        return Deferred.fromCoroutine(self._load())

    async def _refuse(self, why: str) -> None:
        raise QueueUnavailable(f"{self._description} {self.base} {why}")

    async def _load(self) -> dict[str, int]:
        totals = dict.fromkeys(LOAD_COUNT_KEYS, 0)
        try:
            for partition, queue in self.held.items():
                await self._lock(partition)
                counts = await queue.load()
                for key in LOAD_COUNT_KEYS:
                    totals[key] += counts.get(key, 0)
        except BaseException:
            await self._close()
            self._state = "closed"
            raise
        self._state = "open"
        if self.held:
            self._recounts.start(RECOUNT_INTERVAL, now=False).addErrback(
                lambda f: log.failure("queue partitions: the recounts stopped", f)
            )
        log.info(
            "worker {worker}: holding queue partitions {partitions} under {base}",
            worker=self.worker,
            partitions=list(self.held),
            base=self.base,
        )
        return totals

    async def _lock(self, partition: int) -> None:
        lock = self._locks[partition]
        waited = False
        while not await self._in_thread(lock.try_acquire):
            if not waited:
                log.warn(
                    "queue partition {partition} ({path}) is held by another process (a worker still "
                    "draining?); waiting for it",
                    partition=partition,
                    path=lock.path,
                )
                waited = True
            await deferLater(cast(IReactorTime, self._reactor), LOCK_RETRY, lambda: None)

    def verifying(self) -> bool:
        return any(q.verifying() for q in self.held.values())

    def verified(self) -> Deferred:
        d = gatherResults([q.verified() for q in self.held.values()], consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure)  # type: ignore[union-attr]
        return d.addCallback(_sum_counts)

    def _recount(self) -> Deferred:
        """Every held partition's count of live items, from its index again (``DiskQueue.recount``)."""
        d = gatherResults([q.recount() for q in self.held.values()], consumeErrors=True)
        d.addErrback(
            lambda f: log.debug("queue partitions: a recount failed: {error}", error=f.getErrorMessage())
        )
        return d

    async def _close(self) -> None:
        if self._recounts.running:
            self._recounts.stop()
        queues = [*self.held.values(), *self.others.values()]
        try:
            for queue in queues:
                try:
                    await queue.save()
                except Exception:  # noqa: BLE001 (every partition must be closed; logged)
                    log.failure("queue partition {path} could not be saved", path=queue.path)
        finally:
            for lock in self._locks.values():
                lock.release()

    def pause(self) -> None:
        super().pause()
        for queue in self.held.values():
            queue.pause()

    def resume(self) -> None:
        super().resume()
        for queue in self.held.values():
            queue.resume()

    # -- storing and claiming ----------------------------------------------------------------------

    def enqueue(self, item: QueueItem, message: SpooledMessage) -> Deferred:
        try:
            own = self.own
        except QueueUnavailable as e:
            message.discard()
            return fail(e)
        return own.enqueue(item, message)

    def get_next(self, count: int = 1, schedule: ClaimSchedule | None = None) -> Deferred:
        if not self.held:
            return succeed([])
        if self._state != "open" or len(self.held) == 1:
            d = self.own.get_next(count, schedule)
            first = next(iter(self.held))
            return d.addCallback(self._note_claims, first)
        return Deferred.fromCoroutine(self._claim_rotating(count, schedule))

    async def _claim_rotating(self, count: int, schedule: ClaimSchedule | None) -> list[QueueItem]:
        """The first held partition with due mail, starting one further each call (adopted partitions drain
        beside the own one); one partition per claim, so the schedule's limits hold as for one queue."""
        numbers = list(self.held)
        start = self._next_claim % len(numbers)
        self._next_claim += 1
        for partition in numbers[start:] + numbers[:start]:
            items: list[QueueItem] = await self.held[partition].get_next(count, schedule)
            if items:
                return self._note_claims(items, partition)
        return []

    def _note_claims(self, items: list[QueueItem], partition: int) -> list[QueueItem]:
        for item in items:
            self._claimed[item.id] = partition
        return items

    def update(self, item_id: str, **changes: Any) -> Deferred:
        return Deferred.fromCoroutine(self._write(item_id, "update", None, changes))

    def update_if(self, item_id: str, expected: QueueItemStatus | str, /, **changes: Any) -> Deferred:
        return Deferred.fromCoroutine(self._write(item_id, "update", expected, changes))

    def dequeue(self, item_id: str) -> Deferred:
        return Deferred.fromCoroutine(self._write(item_id, "dequeue", None, {}))

    def dequeue_if(self, item_id: str, expected: QueueItemStatus | str) -> Deferred:
        return Deferred.fromCoroutine(self._write(item_id, "dequeue", expected, {}))

    async def _write(
        self, item_id: str, kind: str, expected: QueueItemStatus | str | None, changes: dict[str, Any]
    ) -> Any:
        self._check_open()
        partition = await self._locate(item_id)
        if partition is None:
            if kind == "dequeue":
                return None
            raise KeyError(item_id)
        queue = self.held.get(partition)
        if queue is None:
            queue = self.others[partition]
            self._check_foreign(item_id, partition, kind, changes)
        if kind == "dequeue":
            d = queue.dequeue(item_id) if expected is None else queue.dequeue_if(item_id, expected)
            result = await d
            self._claimed.pop(item_id, None)
            return result
        d = (
            queue.update(item_id, **changes)
            if expected is None
            else queue.update_if(item_id, expected, **changes)
        )
        updated: QueueItem = await d
        if updated.status is not QueueItemStatus.DELIVERING:
            self._claimed.pop(item_id, None)
        return updated

    def _check_foreign(self, item_id: str, partition: int, kind: str, changes: dict[str, Any]) -> None:
        """Refuse a claim or a final status in ``partition`` (module docstring), unless foreign_removals."""
        if self.foreign_removals or kind == "dequeue":
            # A removal is one guarded transaction there (a message being delivered is refused); the holder's
            # count of live items catches up at its next recount (RECOUNT_INTERVAL).
            return
        status = changes.get("status")
        if status is not None:
            status = QueueItemStatus(status)
            if status is QueueItemStatus.DELIVERING or not is_live(status):
                raise HeldByOtherWorker(item_id, partition, f"making it {status.value}")

    async def _locate(self, item_id: str) -> int | None:
        """The partition holding ``item_id``: known for this process's claims, else asked of each."""
        known = self._claimed.get(item_id)
        if known is not None:
            return known
        if len(self.held) == 1 and not self.observe_others:
            return next(iter(self.held))
        for partition, queue in await self._all():
            if await queue.get(item_id) is not None:
                return partition
        return None

    def purge_expired(self, max_age: float) -> Deferred:
        return self._sum_held(lambda q: q.purge_expired(max_age))

    def purge_all(self) -> Deferred:
        return self._sum_held(lambda q: q.purge_all())

    def _sum_held(self, each: Callable[[DiskQueue], Deferred]) -> Deferred:
        d = gatherResults([each(q) for q in self.held.values()], consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure)  # type: ignore[union-attr]
        return d.addCallback(sum)

    # -- reading ---------------------------------------------------------------------------------------

    def get(self, item_id: str) -> Deferred:
        return Deferred.fromCoroutine(self._get(item_id))

    async def _get(self, item_id: str) -> QueueItem | None:
        partition = await self._locate(item_id)
        if partition is None:
            return None
        queue = self.held.get(partition) or self.others[partition]
        item: QueueItem | None = await queue.get(item_id)
        return item

    def open_body(self, item_id: str) -> Deferred:
        return Deferred.fromCoroutine(self._open_body(item_id))

    async def _open_body(self, item_id: str) -> Any:
        partition = await self._locate(item_id)
        if partition is None:
            raise KeyError(item_id)
        queue = self.held.get(partition) or self.others[partition]
        return await queue.open_body(item_id)

    def get_by_status(self, status: QueueItemStatus | str) -> Deferred:
        return Deferred.fromCoroutine(self._merged(lambda q: q.get_by_status(status)))

    def get_by_destination(self, destination: str) -> Deferred:
        return Deferred.fromCoroutine(self._merged(lambda q: q.get_by_destination(destination)))

    async def _merged(self, each: Callable[[DiskQueue], Deferred]) -> list[QueueItem]:
        items: list[QueueItem] = []
        for _partition, queue in await self._all():
            items += await each(queue)
        return sorted(items, key=lambda i: i.created_at)

    def list_items(self, filter: QueueFilter, limit: int, cursor: str | None = None) -> Deferred:
        return Deferred.fromCoroutine(self._list(filter, limit, cursor))

    async def _list(self, filter: QueueFilter, limit: int, cursor: str | None) -> ItemPage:
        """Every partition's page from its own cursor, merged newest first (by creation time); the cursor is
        ``<partition>:<its cursor>`` per partition still to go, comma-separated (see :func:`parse_cursor`)."""
        check_page(limit, None)
        positions = parse_cursor(cursor)
        partitions = await self._all()
        pages: dict[int, ItemPage] = {}
        for partition, queue in partitions:
            if positions is not None and partition not in positions:
                continue  # done, or new since the first page: stable paging leaves it out
            pages[partition] = await queue.list_items(
                filter, limit, None if positions is None else positions[partition]
            )
        merged = heapq.merge(
            *[
                [(-item.created_at, p, n, item) for n, item in enumerate(page.items)]
                for p, page in pages.items()
            ]
        )
        taken: dict[int, int] = dict.fromkeys(pages, 0)
        items: list[QueueItem] = []
        for _key, partition, _n, item in merged:
            if len(items) == limit:
                break
            items.append(item)
            taken[partition] += 1
        queues = dict(partitions)
        following: dict[int, str] = {}
        for partition, page in pages.items():
            if taken[partition] == len(page.items):
                if page.next_cursor is not None:
                    following[partition] = page.next_cursor
                continue
            start = None if positions is None else positions[partition]
            if taken[partition] == 0:
                following[partition] = start if start is not None else _FROM_TOP
                continue
            # Where this partition's page stops after the items taken: the cursor of a page of that many.
            short: ItemPage = await queues[partition].list_items(filter, taken[partition], start)
            if short.next_cursor is not None:
                following[partition] = short.next_cursor
        return ItemPage(items, format_cursor(following) if following else None)

    def count_by_status(self) -> Deferred:
        return Deferred.fromCoroutine(self._count_by_status())

    async def _count_by_status(self) -> dict[str, int]:
        counts = {status.value: 0 for status in QueueItemStatus}
        for _partition, queue in await self._all():
            for status, n in (await queue.count_by_status()).items():
                counts[status] = counts.get(status, 0) + n
        return counts

    def count_by_destination(self) -> Deferred:
        return Deferred.fromCoroutine(self._count_by_destination())

    async def _count_by_destination(self) -> Any:
        rows: list[tuple[str | None, str, int]] = []
        for _partition, queue in await self._all():
            rows += await queue.destination_rows()
        return destination_counts(rows)

    def get_item_count(self) -> Deferred:
        """The live items of the partitions this process holds (kept in memory, no I/O)."""
        return succeed(sum(q._live for q in self.held.values()))

    def status_summary(self) -> Deferred:
        return Deferred.fromCoroutine(self._status_summary())

    async def _status_summary(self) -> dict[str, tuple[int, float | None]]:
        summary: dict[str, tuple[int, float | None]] = {}
        for _partition, queue in await self._all():
            for status, (count, oldest) in (await queue.status_summary()).items():
                before, earliest = summary.get(status, (0, None))
                if earliest is None or (oldest is not None and oldest < earliest):
                    earliest = oldest
                summary[status] = (before + count, earliest)
        return summary

    # -- the partitions other processes hold ---------------------------------------------------------

    async def _all(self) -> list[tuple[int, DiskQueue]]:
        """Every partition to read: the held ones, and with ``observe_others`` the rest (opened on first use;
        one not created yet by its worker is left out until it is)."""
        self._check_open()
        if self.observe_others:
            await self._observe()
        return sorted([*self.held.items(), *self.others.items()], key=lambda pq: pq[0])

    async def _observe(self) -> None:
        found = await self._in_thread(existing_partitions, self.base)
        wanted = sorted({0, *range(self.workers), *found} - set(self.held) - set(self.others))
        for partition in wanted:
            path = partition_path(self.base, partition)
            if not await self._in_thread(os.path.isfile, os.path.join(path, "index.sqlite")):
                continue
            queue = DiskQueue(path, reactor=self._reactor, clock=self._clock, close_on_shutdown=False)
            try:
                await queue.attach()
            except QueueUnavailable as e:
                log.warn("queue partition {path} not readable yet: {error}", path=path, error=str(e))
                continue
            if self._state != "open":  # closed meanwhile
                await queue.save()
                return
            self.others[partition] = queue

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)


#: A partition's cursor above its newest item: none of it listed yet (the arrival number is below 10**18).
_FROM_TOP = "9" * 18

_CURSOR_PART = re.compile(r"([0-9]{1,6}):([0-9]{1,18})\Z")


def format_cursor(positions: dict[int, str]) -> str:
    """``{partition: its cursor}`` as one cursor: ``p:c,p:c`` (partitions without one are done)."""
    return ",".join(f"{p}:{c}" for p, c in sorted(positions.items()))


def parse_cursor(cursor: str | None) -> dict[int, str | None] | None:
    """The positions a cursor of :func:`format_cursor` stands for (None: the first page); ValueError if it is
    not one."""
    if cursor is None:
        return None
    positions: dict[int, str | None] = {}
    for part in cursor.split(","):
        match = _CURSOR_PART.match(part)
        if match is None:
            raise ValueError(f"not a queue cursor: {cursor!r}")
        positions[int(match.group(1))] = match.group(2)
    return positions


def _sum_counts(results: list[dict[str, int] | None]) -> dict[str, int] | None:
    if any(r is None for r in results):
        return None
    totals = dict.fromkeys(LOAD_COUNT_KEYS, 0)
    for counts in results:
        assert counts is not None
        for key in LOAD_COUNT_KEYS:
            totals[key] += counts.get(key, 0)
    return totals
