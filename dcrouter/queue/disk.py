"""The ``disk`` queue backend (the default): durable, embedded, one directory (``persistentPath``).

What a caller may rely on:

- ``enqueue`` fires only once the item and its body are durable: for a body given as ``.data`` the row and
  the body are in one SQLite transaction committed with ``synchronous=FULL`` in WAL mode (the WAL is fsynced
  before the commit returns); for a body given as ``.path`` (a file, normally in :attr:`spool_directory`) the
  file is fsynced, linked to ``messages/<id[:2]>/<id>``, that directory fsynced, and then the row committed.
  After ``kill -9`` at any instant, every item whose ``enqueue`` fired is there on the next ``load()``.
- On failure nothing half-stored stays visible: the row is not committed and a moved-in body file is removed;
  the SpooledMessage is discarded either way (it is consumed). I/O and SQLite errors (ENOSPC, EIO, ...) come
  back as :class:`QueueUnavailable`, ``max_size`` as :class:`QueueFull`, a bad or duplicate id as ValueError.
- Group commit: writes (enqueue, update, dequeue, claims by ``get_next``, purges) issued while a commit runs
  wait and all go into the next transaction, so N concurrent senders cost about one fsync per batch instead of
  N. A write's Deferred fires after the commit that contains it; reads (``get``, ``get_by_*``, ``open_body``)
  see every write whose Deferred has fired.
- A small body read back for the delivery that follows its enqueue costs no disk read: the inline bodies of
  recent enqueues stay in memory (the bytes ingress handed over, not a copy) until ``open_body`` takes them,
  one use each, up to :data:`BODY_CACHE_LIMIT` octets (oldest dropped first); ``dequeue`` and the purges
  forget them. Later reads (a retry) go to the index.
- The reactor never waits on the disk: SQLite and every fsync run on one writer thread (a ThreadPool of one
  thread, which owns the connection); this module only keeps the batch and the counts.
- ``get_item_count`` and the ``max_size`` check use a count kept in memory (taken from the index at
  ``load()``), so they cost no I/O. Enqueues not yet committed count towards ``max_size``.
- ``load()`` recovers after a crash (see :mod:`dcrouter.queue.recovery`) and fires with counts, also logged
  under the namespace ``dcrouter.queue``. ``save()`` drains pending writes, checkpoints and closes; unless
  constructed with ``close_on_shutdown=False`` (DcRouter does, and saves it after its listeners stop), it also
  runs before reactor shutdown.

Why inline small bodies: the spool hands over messages up to 256 KiB as bytes. Putting them in the index makes
a batch of any size cost one fsync (the WAL) instead of two per message (file and directory). Measured on the
development VM with ``python -m bench.queue_startup`` (10 KB inline bodies): about 1,900 enqueues/s one at a
time (one commit each), 3,000-6,000/s with 10 in flight (10 writes per commit) and 6,700/s with 100 in flight
(98 per commit) -- the queue is not what limits ingress. With 100,000 items, ``load()`` (which verifies every
row) takes about 0.9 s and ``get_next`` about 1 ms.
"""

from __future__ import annotations

import functools
import io
import os
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from dcrouter.interfaces import IDeliveryQueue, QueueFull, QueueUnavailable
from dcrouter.log import logger
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.net.reactor import IRouterReactor
from dcrouter.queue.contract import (
    ClaimSchedule,
    ItemPage,
    QueueFilter,
    check_changes,
    check_item_id,
    check_page,
    destination_counts,
    is_live,
)
from dcrouter.queue.index import (
    ClaimDue,
    CountLive,
    Outcome,
    QueueIndex,
    RemoveItems,
    StoreItem,
    UpdateItem,
    Write,
)
from dcrouter.queue.item import QueueItem, QueueItemStatus
from dcrouter.queue.lifecycle import QueueLifecycle
from dcrouter.queue.orphans import OrphanSweeper
from dcrouter.queue.recovery import (
    SetAsideDamaged,
    SetAsideOrphans,
    orphan_candidates,
    recover,
    recover_start,
    verify_chunk,
)
from dcrouter.queue.suppression import SqliteSuppressionList

log = logger(__name__)

_FINAL_SQL = "('delivered', 'bounced', 'failed')"

#: Most writes one transaction takes; the rest wait for the next. Bounds the latency of a huge burst.
BATCH_LIMIT = 2000
#: Octets of inline bodies kept in memory after their enqueue for the first ``open_body`` (module docstring):
#: that read, normally the delivery attempt right after, then needs no trip to the reader thread.
BODY_CACHE_LIMIT = 8 * 1024 * 1024
#: Rows the background verification reads per step (~0.1 s of its thread).
VERIFY_CHUNK = 10_000
#: Seconds a write of a queue opened by ``attach()`` waits for the holding process's transaction to end.
BUSY_TIMEOUT = 10.0


@implementer(IDeliveryQueue)
class DiskQueue(QueueLifecycle):
    """A DeliveryQueue in directory ``path``. ``reactor`` (IReactorCore and IReactorFromThreads) receives the
    writer thread's results; ``clock`` decides due-ness (``get_next``) and age (``purge_expired``).

    ``close_on_shutdown``: run ``save()`` before reactor shutdown, so a standalone queue's writer thread never
    keeps the process alive. A service that owns the queue passes False and calls ``save()`` itself, after
    its listeners have stopped (a shutdown trigger of the queue's own would close it while sessions still
    run).

    ``orphan_retention``: seconds a body file set aside in ``orphans/`` is kept before a sweep (hourly, on
    ``clock``, in ``reactor``'s thread pool) removes it; 0 keeps them (see :mod:`dcrouter.queue.orphans`).

    ``background_verification``: ``load()`` fires once the spool is emptied and claims returned (steps 1 and
    2 of :mod:`dcrouter.queue.recovery`, fast at any size) instead of after verifying every row, so the
    queue takes new mail at once; the rows and body files are verified on a thread of their own meanwhile,
    and no claim is handed out until that is done. ``load()``'s ``damaged`` and ``orphans`` are then 0 and
    :meth:`verified` fires with the final counts. DcRouter turns it on."""

    def __init__(
        self,
        path: str,
        *,
        reactor: IRouterReactor,
        clock: IReactorTime,
        max_size: int = 0,
        close_on_shutdown: bool = True,
        orphan_retention: float = 0,
        background_verification: bool = False,
    ) -> None:
        super().__init__()
        self.background_verification = background_verification
        self.max_size = max_size
        self._close_on_shutdown = close_on_shutdown
        self._reactor = reactor
        self._clock = clock
        self._index = QueueIndex(path)
        self.path = self._index.path
        self._description = f"disk queue {self.path}"
        #: Where ingress spools big messages: on the queue's file system, so they can be linked in.
        self.spool_directory = self._index.spool
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=f"dcrouter-queue-writer:{self.path}")
        # Reads (get, queries, open_body for delivery) have a thread and a connection of their own, so they do
        # not wait behind the writer's commits.
        self._reader_pool = ThreadPool(minthreads=1, maxthreads=1, name=f"dcrouter-queue-reader:{self.path}")
        self._pending: list[tuple[Write, Deferred]] = []
        self._committing = False
        self._idle_waiters: list[Deferred] = []
        self._live = 0  # committed items in a non-final status
        #: Inline bodies of committed enqueues not yet opened, oldest first, and their octets.
        self._bodies: dict[str, bytes] = {}
        self._bodies_octets = 0
        self._reserved = 0  # enqueues accepted but not yet committed (they count towards max_size)
        self._shutdown_trigger: Any = None
        self._orphan_sweeper = OrphanSweeper(
            self._index.orphans,
            orphan_retention,
            clock=clock,
            in_thread=self._in_reactor_thread,
        )
        # Background verification: its thread and connection, whether it runs, who waits for its end.
        self._verify_pool = ThreadPool(minthreads=1, maxthreads=1, name=f"dcrouter-queue-verify:{self.path}")
        self._verifying = False
        self._verify_stop = False
        self._verification: Deferred | None = None
        self._verified_counts: dict[str, int] | None = None
        self._verified_waiters: list[Deferred] = []
        #: Transactions committed and writes they carried, for benchmarks and metrics.
        self.commits = 0
        self.committed_writes = 0

    # -- storing -----------------------------------------------------------------------------------

    def enqueue(self, item: QueueItem, message: SpooledMessage) -> Deferred:
        """Store ``item`` with ``message`` as its body; fires with the stored item once durable."""
        try:
            self._check_open()
            check_item_id(item.id)
            if self.max_size > 0 and self._live + self._reserved >= self.max_size:
                raise QueueFull(f"the queue holds {self.max_size} items (maxQueueSize)")
            stored = item.copy()
            stored.status = QueueItemStatus(stored.status)
        except Exception as e:  # noqa: BLE001 (a failure for the caller)
            return self._discard(message, Failure(e))
        reserved = int(is_live(stored.status))
        self._reserved += reserved
        data = message.data
        d = self._submit(StoreItem(stored, message))
        d.addBoth(self._release, reserved)
        if data is not None:
            d.addCallback(self._keep_body, stored.id, data)
        return d

    def _keep_body(self, result: Any, item_id: str, data: bytes) -> Any:
        """The enqueue of ``item_id`` committed: keep its inline body for the first ``open_body``."""
        self._bodies[item_id] = data
        self._bodies_octets += len(data)
        while self._bodies_octets > BODY_CACHE_LIMIT:
            self._bodies_octets -= len(self._bodies.pop(next(iter(self._bodies))))
        return result

    def _forget_bodies(self, item_id: str | None = None) -> None:
        """Drop the kept body of ``item_id`` (of every item when None): it is being removed."""
        if item_id is None:
            self._bodies.clear()
            self._bodies_octets = 0
        elif (data := self._bodies.pop(item_id, None)) is not None:
            self._bodies_octets -= len(data)

    def update(self, item_id: str, **changes: Any) -> Deferred:
        """Change fields of an item durably; fires with the updated item, fails with KeyError if unknown."""
        return self._update(item_id, None, changes)

    def update_if(self, item_id: str, expected: QueueItemStatus | str, /, **changes: Any) -> Deferred:
        """``update`` while the item is in status ``expected`` (checked in the write's transaction); fails
        with StatusMismatch when it is not."""
        return self._update(item_id, expected, changes)

    def _update(
        self, item_id: str, expected: QueueItemStatus | str | None, changes: dict[str, Any]
    ) -> Deferred:
        try:
            self._check_open()
            normalised = check_changes(changes)
            wanted = None if expected is None else QueueItemStatus(expected)
        except Exception as e:  # noqa: BLE001 (a failure for the caller)
            return fail(e)
        return self._submit(UpdateItem(item_id, normalised, wanted))

    def dequeue(self, item_id: str) -> Deferred:
        """Remove the item and its body; fires with the removed item, or None."""
        self._forget_bodies(item_id)
        return self._submit_open(lambda: RemoveItems("id = ?", (item_id,), single=True))

    def dequeue_if(self, item_id: str, expected: QueueItemStatus | str) -> Deferred:
        """``dequeue`` while the item is in status ``expected`` (checked in the write's transaction); fails
        with StatusMismatch when it is not."""
        try:
            wanted = QueueItemStatus(expected)
        except ValueError as e:
            return fail(e)
        self._forget_bodies(item_id)
        return self._submit_open(lambda: RemoveItems("id = ?", (item_id,), single=True, expected=wanted))

    def get_next(self, count: int = 1, schedule: ClaimSchedule | None = None) -> Deferred:
        """Claim up to ``count`` due items (priority, then creation time, then arrival) as DELIVERING; with
        ``schedule``, shared between destinations as :class:`~dcrouter.queue.contract.ClaimSchedule` says."""
        if self._state == "open" and (self._paused or count <= 0 or self._verifying):
            return succeed([])
        return self._submit_open(lambda: ClaimDue(self._clock.seconds(), count, schedule))

    def purge_expired(self, max_age: float) -> Deferred:
        """Remove final items created more than ``max_age`` seconds ago; fires with how many."""
        cutoff = self._clock.seconds() - max_age
        self._forget_bodies()
        return self._submit_open(lambda: RemoveItems(f"status IN {_FINAL_SQL} AND created_at < ?", (cutoff,)))

    def purge_all(self) -> Deferred:
        self._forget_bodies()
        return self._submit_open(lambda: RemoveItems("1", ()))

    # -- reading -----------------------------------------------------------------------------------

    def get(self, item_id: str) -> Deferred:
        return self._read(functools.partial(self._index.get, item_id))

    def get_by_status(self, status: QueueItemStatus | str) -> Deferred:
        try:
            wanted = QueueItemStatus(status).value
        except ValueError as e:
            return fail(e)
        return self._read(functools.partial(self._index.select, "status = ?", (wanted,)))

    def get_by_destination(self, destination: str) -> Deferred:
        return self._read(functools.partial(self._index.select, "destination = ?", (destination,)))

    def list_items(self, filter: QueueFilter, limit: int, cursor: str | None = None) -> Deferred:
        """Items matching ``filter``, newest first (by arrival: the index's ``seq``), on the reader thread."""
        try:
            before = check_page(limit, cursor)
        except ValueError as e:
            return fail(e)
        d = self._read(functools.partial(self._index.list_page, filter, before, limit))
        d.addCallback(lambda page: ItemPage(page[0], None if page[1] is None else str(page[1])))
        return d

    def count_by_status(self) -> Deferred:
        return self._read(self._index.count_by_status)

    def count_by_destination(self) -> Deferred:
        """One GROUP BY over the ready items' index, on the reader thread."""
        d = self._read(self._index.count_by_destination)
        d.addCallback(destination_counts)
        return d

    def destination_rows(self) -> Deferred:
        """``(destination, status, count)`` of the queued and deferred items, not yet ranked (for a caller
        that sums several queues before :func:`~dcrouter.queue.contract.destination_counts`)."""
        return self._read(self._index.count_by_destination)

    def open_body(self, item_id: str) -> Deferred:
        """A readable binary file over the body (BytesIO when inline); fails with KeyError if unknown."""
        if self._state == "open" and (data := self._bodies.pop(item_id, None)) is not None:
            self._bodies_octets -= len(data)
            return succeed(io.BytesIO(data))
        return self._read(functools.partial(self._index.open_body, item_id))

    def get_item_count(self) -> Deferred:
        return succeed(self._live)

    def recount(self) -> Deferred:
        """Take the count of live items (``get_item_count``, the ``max_size`` check) from the index again, in
        the writer's next batch: after another process removed items (:mod:`dcrouter.queue.partitions`).
        Fires with the count."""
        return self._submit_open(CountLive)

    def status_summary(self) -> Deferred:
        """From the status index, in the reader pool."""
        return self._read(self._index.status_summary)

    # -- life cycle --------------------------------------------------------------------------------

    def suppression_list(self) -> SqliteSuppressionList:
        """The suppression list kept with this queue: ``suppression.sqlite`` in its directory, on a thread
        of its own."""
        return SqliteSuppressionList(
            os.path.join(self.path, "suppression.sqlite"), reactor=self._reactor, clock=self._clock
        )

    def load(self) -> Deferred:
        """Open (creating if needed) and recover; fires with the counts of :data:`LOAD_COUNT_KEYS`."""
        if self._state != "new":
            return fail(QueueUnavailable(f"disk queue {self.path} was already loaded"))
        self._state = "loading"
        self._pool.start()
        self._reader_pool.start()
        if self._close_on_shutdown:
            self._shutdown_trigger = self._reactor.addSystemEventTrigger("before", "shutdown", self.save)
        d = deferToThreadPool(self._reactor, self._pool, self._open_and_recover)
        d.addCallbacks(self._loaded, self._load_failed)
        return d

    def verifying(self) -> bool:
        """Whether the background verification of the rows found at ``load()`` is still under way."""
        return self._verifying

    def verified(self) -> Deferred:
        """Fires with the counts of :data:`LOAD_COUNT_KEYS` once every row and body file found at ``load()``
        has been verified (at once after a ``load()`` without background verification). Fires with None when
        the queue is closed first, and fails with QueueUnavailable before ``load()`` has succeeded."""
        if self._verified_counts is not None:
            return succeed(dict(self._verified_counts))
        if self._state in ("new", "loading") or (self._state != "open" and not self._verifying):
            return fail(QueueUnavailable(f"{self._description} is {self._state}, not verifying"))
        waiter: Deferred = Deferred()
        self._verified_waiters.append(waiter)
        return waiter

    def attach(self, busy_timeout: float = BUSY_TIMEOUT) -> Deferred:
        """Open the queue while another process, a running router, holds it: for an operator's tool
        (``dcrouter quarantine``) beside the router. Unlike ``load()``, nothing is created (QueueUnavailable
        when there is no queue in ``path``), no recovery runs (it would return the router's claims in flight
        to ready: a second delivery), no orphan is swept, and a write waits up to ``busy_timeout`` seconds
        for the router's commit. What this process makes due, the router claims at its next look at the
        queue (``get_next`` is a query). ``get_item_count`` starts from the count at attach time. ``save()``
        closes without checkpointing the WAL, which is the router's to do. Fires with None."""
        if self._state != "new":
            return fail(QueueUnavailable(f"disk queue {self.path} was already opened"))
        self._state = "loading"
        self._pool.start()
        self._reader_pool.start()
        if self._close_on_shutdown:
            self._shutdown_trigger = self._reactor.addSystemEventTrigger("before", "shutdown", self.save)
        d = deferToThreadPool(self._reactor, self._pool, self._attach, busy_timeout)
        d.addCallbacks(self._attached, self._attach_failed)
        return d

    # -- internals: life cycle ---------------------------------------------------------------------

    def _attach(self, busy_timeout: float) -> int:
        self._index.attach(busy_timeout)
        try:
            return self._index.read(lambda: self._index.counts()[1])
        except BaseException:
            self._index.close()
            raise

    def _attached(self, live: int) -> None:
        self._state = "open"
        self._live = live

    def _attach_failed(self, failure: Failure) -> Failure:
        self._state = "closed"
        self._stop_pool()
        return failure

    def _open_and_recover(self) -> dict[str, int]:
        self._index.open()
        run = recover_start if self.background_verification else recover
        try:
            return self._index.read(lambda: run(self._index))
        except BaseException:
            self._index.close()
            raise

    def _loaded(self, counts: dict[str, int]) -> dict[str, int]:
        self._state = "open"
        self._live = counts["live"]
        if self.background_verification:
            upto = counts.pop("max_seq")
            log.info(
                "disk queue {path} loaded: {items} items ({live} to deliver); {claims_returned} claims"
                " returned, {spool_discarded} unacknowledged spool files discarded; verifying the items"
                " in the background (delivery starts when done)",
                path=self.path,
                **counts,
            )
            self._verifying = True
            self._verification = Deferred.fromCoroutine(self._verify(dict(counts), upto))
            return counts
        self._verification_done(counts)
        return counts

    async def _verify(self, counts: dict[str, int], upto: int) -> None:
        """Steps 3 and 4 of recovery for the rows up to seq ``upto``, a chunk at a time on the verify thread;
        set-asides go through the writer like any write. Stops early (without counts) when the queue closes;
        a failure is logged, and the rows stay unverified until the next start (no claims until then)."""
        self._verify_pool.start()
        started = time.monotonic()
        try:
            after = 0
            while not self._verify_stop:
                last, damaged = await self._in_verifier(verify_chunk, after, upto, VERIFY_CHUNK)
                if damaged:
                    counts["damaged"] += await self._submit(SetAsideDamaged([row[0] for row, _ in damaged]))
                if last is None:
                    break
                after = last
            if self._verify_stop:
                return
            candidates = await self._in_verifier(orphan_candidates)
            if candidates and not self._verify_stop:
                counts["orphans"] = await self._submit(SetAsideOrphans(candidates))
            if self._verify_stop:
                return
        except Exception:  # noqa: BLE001 (logged; the next start verifies again)
            log.failure(
                "disk queue {path}: verifying the items failed; no delivery until restarted", path=self.path
            )
            return
        finally:
            await deferToThreadPool(self._reactor, self._verify_pool, self._index.close_verifier)
            self._verify_pool.stop()
        counts["items"], counts["live"] = counts["items"] - counts["damaged"], self._live
        log.info(
            "disk queue {path}: items verified in {seconds:.1f} s; delivery starts",
            path=self.path,
            seconds=time.monotonic() - started,
        )
        self._verification_done(counts)

    def _in_verifier(self, f: Callable[..., Any], *args: Any) -> Deferred:
        def run() -> Any:
            return self._index.read(lambda: f(self._index.verifier(), self._index, *args))

        return deferToThreadPool(self._reactor, self._verify_pool, run)

    def _verification_done(self, counts: dict[str, int]) -> None:
        self._verifying = False
        self._verified_counts = counts
        waiters, self._verified_waiters = self._verified_waiters, []
        for waiter in waiters:
            waiter.callback(dict(counts))
        self._orphan_sweeper.start()
        if self.background_verification:
            if counts["damaged"] or counts["orphans"]:
                self._warn_set_aside(counts)
            return
        log.info(
            "disk queue {path} loaded: {items} items ({live} to deliver); {claims_returned} claims returned,"
            " {spool_discarded} unacknowledged spool files discarded",
            path=self.path,
            **counts,
        )
        if counts["damaged"] or counts["orphans"]:
            self._warn_set_aside(counts)

    def _warn_set_aside(self, counts: dict[str, int]) -> None:
        log.warn(
            "disk queue {path}: {damaged} damaged items set aside in damaged/, {orphans} body files"
            " without an item set aside in orphans/ (kept for inspection: damaged/ for good, orphans/"
            " for orphanRetention)",
            path=self.path,
            damaged=counts["damaged"],
            orphans=counts["orphans"],
        )

    def _load_failed(self, failure: Failure) -> Failure:
        log.failure("disk queue {path} could not be loaded", failure, path=self.path)
        self._state = "closed"
        self._stop_pool()
        return failure

    async def _close(self) -> None:
        """Stop the verification, let pending writes commit, close the reader, checkpoint the WAL, close the
        index and threads."""
        self._verify_stop = True
        if self._verification is not None:
            await self._verification
        if self._verifying:
            self._verifying = False
            waiters, self._verified_waiters = self._verified_waiters, []
            for verified in waiters:
                verified.callback(None)
        await self._orphan_sweeper.stop()
        while self._committing or self._pending:
            waiter: Deferred = Deferred()
            self._idle_waiters.append(waiter)
            await waiter
        try:
            await deferToThreadPool(self._reactor, self._reader_pool, self._index.close_reader)
            await deferToThreadPool(self._reactor, self._pool, self._index.close)
        finally:
            self._stop_pool()

    def _stop_pool(self) -> None:
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        # The writer thread is idle here, so joining it is immediate; the reader's connection was closed on
        # its own thread by _close (or never opened, when loading failed).
        self._pool.stop()
        self._reader_pool.stop()

    def _discard(self, message: SpooledMessage, failure: Failure) -> Deferred:
        """Drop a refused message (off the reactor when it is a file), then fail with ``failure``."""
        if message.path is not None and self._pool.started:
            d = deferToThreadPool(self._reactor, self._pool, message.discard)
        else:
            message.discard()
            d = succeed(None)
        # Even if the unlink failed (logged here), the caller needs the original reason.
        d.addErrback(lambda f: log.failure("disk queue: could not discard a refused message", f))
        d.addCallback(lambda _: failure)
        return d

    def _release(self, result: Any, reserved: int) -> Any:
        self._reserved -= reserved
        return result

    # -- internals: group commit -------------------------------------------------------------------

    def _submit_open(self, make_write: Callable[[], Write]) -> Deferred:
        try:
            self._check_open()
        except QueueUnavailable as e:
            return fail(e)
        return self._submit(make_write())

    def _submit(self, write: Write) -> Deferred:
        d: Deferred = Deferred()
        self._pending.append((write, d))
        self._commit_pending()
        return d

    def _commit_pending(self) -> None:
        if self._committing or not self._pending:
            return
        batch, self._pending = self._pending[:BATCH_LIMIT], self._pending[BATCH_LIMIT:]
        self._committing = True
        d = deferToThreadPool(self._reactor, self._pool, self._index.run_batch, [w for w, _ in batch])
        d.addCallbacks(self._committed, self._batch_crashed, callbackArgs=(batch,), errbackArgs=(batch,))

    def _committed(self, outcomes: list[Outcome], batch: list[tuple[Write, Deferred]]) -> None:
        self.commits += 1
        failed = 0
        # Writes issued by the callbacks below wait (self._committing is still set) and go out together.
        # run_batch returns one outcome per write, in order.
        for (write, d), (ok, value) in zip(batch, outcomes, strict=True):
            if ok:
                result, delta = value
                self._live = result if getattr(write, "sets_live", False) else self._live + delta
                self.committed_writes += 1
                d.callback(result)
            else:
                failed += isinstance(value, QueueUnavailable)
                d.errback(Failure(value))
        if failed:
            log.error(
                "disk queue {path}: {failed} writes failed: {error}",
                path=self.path,
                failed=failed,
                error=next(str(v) for ok, v in outcomes if not ok and isinstance(v, QueueUnavailable)),
            )
        self._batch_finished()

    def _batch_crashed(self, failure: Failure, batch: list[tuple[Write, Deferred]]) -> None:
        log.failure("disk queue {path}: a batch of {n} writes failed", failure, path=self.path, n=len(batch))
        for _write, d in batch:
            d.errback(Failure(QueueUnavailable(f"disk queue: {failure.getErrorMessage()}")))
        self._batch_finished()

    def _batch_finished(self) -> None:
        self._committing = False
        self._commit_pending()
        if not self._committing:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _in_reactor_thread(self, f: Callable[..., Any], *args: Any) -> Deferred:
        """The reactor's thread pool, for file work that would hold up the writer's commits or the reads."""
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    def _read(self, query: Callable[[], Any]) -> Deferred:
        try:
            self._check_open()
        except QueueUnavailable as e:
            return fail(e)
        return deferToThreadPool(self._reactor, self._reader_pool, self._index.read, query)
