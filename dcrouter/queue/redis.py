"""The ``redis`` queue backend: one queue shared by every dcrouter process that points at the same Redis.

What a caller may rely on (beyond :mod:`dcrouter.queue.contract`, which it follows like ``memory`` and
``disk``):

- ``enqueue`` fires only after Redis acknowledged the write of the whole item: one Lua script stores the
  metadata, the inline body and every index entry, so an item is visible completely or not at all, and the
  ``max_size`` check is made in the same script, across all processes. A body above ``inline_body_limit``
  is first streamed into Redis in chunks (``body_store="redis"``, :mod:`dcrouter.queue.redis_chunks`) or made
  durable as a file under ``body_directory`` (``body_store="directory"``: fsynced, linked into place,
  directory fsynced).
- How durable an acknowledged write is depends on Redis: only ``appendonly yes`` with ``appendfsync always``
  survives a Redis crash or a power cut. With Sentinel (``wait`` replicas in the URL, 1 by default) an enqueue
  fires only once that many replicas have it too (``WAIT``), so a failover does not lose it. ``load()``
  checks with ``CONFIG GET`` and logs a loud warning otherwise (or that it could not check, where CONFIG is
  disabled).
- ``get_next`` claims atomically (a Lua script): due items by priority, then age, then arrival, marked
  DELIVERING under a lease (``lease_seconds``, 30 by default; the owner is this process's consumer name;
  expiry on the Redis server's clock). While leases are valid, no two processes ever get the same item. A
  heartbeat on ``clock`` renews the leases of every item this process holds, in one script call, every
  ``lease_seconds / 3``, until ``update`` gives them another status or they are removed. A lease that
  expires (its process died or lost Redis for a whole lease) is returned to ready by the next ``get_next``,
  heartbeat or ``load()`` of any process: delivery is at-least-once across crashes.
- ``load()`` takes a consumer name, ``<hostname>/<slot>``, that no live process holds
  (:mod:`dcrouter.queue.redis_consumer`), and returns the claims still held under it to ready at once:
  they are a dead predecessor's. A restarted process gets its predecessor's name, so its claims do not
  wait for their leases.
- ``open_body`` of an item this process holds fails with :class:`ClaimLost` (and the process lets go of the
  item) unless its lease is certainly valid for another ``CLAIM_MARGIN`` of a lease: see "Lost leases"
  below.
- ``save()`` returns the claims this process still holds to ready (a clean shutdown: delivery has stopped),
  closes the connections and frees the consumer name.
- Every call fails with :class:`QueueUnavailable` within about ``command_timeout`` seconds while Redis is
  unreachable (ingress answers ``451 4.3.0``), and works again without a restart once Redis is back.
- ``load()`` recovers what applies of the disk queue's recovery: expired claims return to ready; stale spool
  files are discarded; items that do not parse or whose body is missing are set aside under
  ``damaged:<id>:<seq>`` (never deleted); body files no item names are moved to ``orphans/`` (removed after
  ``orphan_retention``). Because other processes keep working meanwhile, files younger than two hours are
  left alone.

Decisions (and why):

- **Bodies up to 1 MiB in one Redis string, bigger ones in Redis in chunks (or on a shared file system).**
  The spool hands over messages up to 256 KiB in memory; keeping them (and a little more) as one value makes
  a message one network round trip. One very big value would make every ``appendfsync always`` write tens
  of megabytes while the single-threaded server waits, and arrive in one reply held whole in our memory, so
  bigger bodies are a list of 256 KiB chunks streamed in from the spool file and out into a temporary file
  (:mod:`dcrouter.queue.redis_chunks`): Redis is then the only thing hosts share. They still cost Redis
  memory; an operator who would rather keep them on a shared file system (NFS, CephFS, mounted at the same
  path on every host) sets ``body_store="directory"`` (``smtpConfig.redisBodyStore``). The kind is recorded
  per item, so a queue holding both kinds (after a change of setting) delivers both. No object store (S3):
  there is no well-kept Twisted client for one (botocore is synchronous; aiobotocore needs asyncio).
- **The schedule is two sorted sets.** ``wait`` (by next attempt) holds ready items not yet due; a claim first
  moves the due ones to ``due``, scored ``priority * 1e10 + created_at`` so the first members are the ones to
  hand out. A claim costs O(log n) per item however many are waiting; one sorted set scored by time alone
  would have to sort every due item by priority in each claim. The price: creation times less than about
  50 microseconds apart order by arrival instead (the resolution of a double at that magnitude).
- **Status in its own hash field, the item as JSON.** Scripts change only the status (claim, lease expiry);
  every other field is written by Python, so no float goes through Lua's 14-digit number formatting.
  ``update`` is read-modify-write guarded by a version number (retried on conflict), which keeps concurrent
  updates from several processes from losing each other's changes.
- **Timeouts can leave a write applied.** A call that times out may still run in Redis. For ``enqueue`` the
  client then got ``451`` and sends the message again: a possible duplicate, never a loss. A file body is
  kept in that case (an orphan if the item never landed), never deleted under an item that might exist.
- **A claim hands out what delivery needs next.** With each claimed item come its version and, when inline and
  at most ``HANDOUT_BODY_LIMIT``, its body; while this process holds the item, ``open_body`` answers from
  memory and ``update`` writes on that version without reading the item first (a conflict reads it afresh).
  Delivering a message went from five Redis calls (enqueue, open_body's two, update's two) to two, plus a
  share of a claim: 15-20% less reactor CPU per relayed message (bench/relay, docs/performance.md).
- **Short leases, a heartbeat, and consumer names held by a lock.** A killed process's claims used to wait
  out a 5-minute lease. Now a lease is 30 s, renewed every 10 s, so another process takes them over after at
  most 30 s; and the restarted process itself takes them back at once, because it has the same name. A
  name must never be shared by two live processes (one's start-up would hand the other's deliveries in
  flight to a third: duplicates), which a name derived only from configuration cannot promise (several
  processes on one host share ``persistentPath``) and a stored one cannot either (a copy of the directory).
  An exclusive ``flock``, which the kernel drops at any death, can: whoever holds the lock file of a name is
  the only live holder of that name.
- **Lost leases.** The claim, update or renewal that last set an item's lease was sent at local time ``t``;
  Redis ran it later, so the lease lasts at least until ``t + lease`` (measured on the local clock; the
  two clocks' rates agree to far better than the margin over 30 s). A process delivers (``open_body``) only
  while a third of a lease of that certainty is left, which healthy heartbeats always leave and two missed
  ones do not. So while Redis cannot be reached for more than about two heartbeats, no new delivery starts
  on a claim another process may already have taken over. A transaction already under way when the lease
  runs out may finish and be delivered twice, as a delivery in flight at a crash may: at-least-once stays
  the contract. A heartbeat that finds a claim taken over (its lease lapsed and another process claimed it)
  marks it lost; ``open_body`` refuses it too.
- All keys share one prefix. With Redis Cluster, a prefix with a hash tag (``{dcrouter}:``) keeps them in one
  slot, which the scripts need (they name keys computed from the prefix); Cluster is not tested.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.interfaces import (
    ClaimLost,
    DuplicateItem,
    IDeliveryQueue,
    QueueFull,
    QueueUnavailable,
    StatusMismatch,
)
from dcrouter.log import logger
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.net.reactor import IRouterReactor
from dcrouter.net.redis_url import parse_redis_url
from dcrouter.queue import redis_bodies as bodies
from dcrouter.queue import redis_chunks as chunks
from dcrouter.queue import redis_consumer
from dcrouter.queue import redis_scripts as scripts
from dcrouter.queue.contract import (
    DESTINATION_COUNT_STATUSES,
    ClaimSchedule,
    DestinationCounts,
    ItemPage,
    QueueFilter,
    check_changes,
    check_item_id,
    check_page,
    destination_counts,
    new_load_counts,
    scan_window,
)
from dcrouter.queue.item import QueueItem, QueueItemStatus
from dcrouter.queue.lifecycle import QueueLifecycle
from dcrouter.queue.orphans import OrphanSweeper
from dcrouter.queue.redis_connection import RedisConnection
from dcrouter.queue.redis_consumer import ConsumerSlot
from dcrouter.queue.redis_recovery import recover, recover_start, verify_items
from dcrouter.queue.redis_store import RedisStore
from dcrouter.queue.suppression import RedisSuppressionList

log = logger(__name__)

#: Items one ``list_items`` script call looks at; a filter matching few items pages through several calls.
LIST_BUDGET = 2000
#: Script calls one page makes at most; a filter matching little returns a short page with a cursor beyond.
LIST_CALLS = 10
#: Items one ``count_by_destination`` script call looks at, and the calls it makes per status at most: past
#: them the counts are a lower bound (``complete`` False).
COUNT_BUDGET = 5000
COUNT_CALLS = 10
#: Items one script call removes, verifies or returns from expired leases; bounds how long Redis is busy.
CHUNK = 500
#: Due items one claim moves from ``wait`` to ``due`` (the rest follow in the next claims).
PROMOTE_LIMIT = 10_000
#: Attempts of an ``update`` whose item keeps changing under it (another process writing it).
UPDATE_ATTEMPTS = 5
#: Priorities are folded into the ``due`` score above creation times (seconds since the epoch).
PRIORITY_WEIGHT = 1e10
#: Inline bodies up to this size come back with the claim that hands their item out, so delivering it costs
#: no ``open_body`` round trips. Bounds the memory held for claimed items (``concurrentDeliveries`` of them,
#: 50 by default: 3.2 MiB at most); bigger bodies are read from Redis when opened.
HANDOUT_BODY_LIMIT = 64 * 1024
#: A claim starts a delivery (``open_body``) only while its lease is certainly valid for at least this share
#: of a lease more. Healthy heartbeats (every third of a lease) keep two thirds or more; missing two in a
#: row (Redis unreachable) falls below it: see the module docstring.
CLAIM_MARGIN = 1 / 3


@dataclasses.dataclass
class _Held:
    """What this process knows of an item it holds (claimed, DELIVERING): the version and JSON its last claim
    or update left in Redis, so that the next ``update`` need not read them first, and the body when the
    claim handed it out. The ``ver`` guard still applies: if the item changed meanwhile, the update reads it
    afresh."""

    version: bytes
    text: bytes
    body: bytes | None


@implementer(IDeliveryQueue)
class RedisQueue(QueueLifecycle):
    """A DeliveryQueue in the Redis at ``url`` (``redis://[:password@]host:port/db``, ``unix:///path`` or
    ``redis+sentinel://host:port,.../master-name/db``: :mod:`dcrouter.net.redis_url`).

    ``reactor`` runs the connections, the timeouts and the file work (its thread pool); ``clock`` decides
    due-ness (``get_next``) and age (``purge_expired``) like in the other backends, and runs the heartbeat
    that renews this process's leases (every ``lease_seconds / 3``) and the sweep of ``orphans/``, which
    removes body files set aside there more than ``orphan_retention`` seconds ago (0: never; see
    :mod:`dcrouter.queue.orphans`). Bad ``url``: ValueError at construction. Nothing connects before
    ``load()``.

    Bodies above ``inline_body_limit`` go to Redis in chunks (``body_store="redis"``) or to files under
    ``body_directory`` (``"directory"``). ``consumer_host`` (default: the host name) is the first part of
    this process's consumer name; processes that do not share ``body_directory`` must each have their own.

    ``background_verification``: ``load()`` fires after steps 1 to 3 of :mod:`dcrouter.queue.redis_recovery`
    (durability check, spool, claims); steps 4 and 5 (every item and body file verified) run afterwards while
    the queue takes mail, and this process claims nothing until they are done (:meth:`verified`). DcRouter
    turns it on."""

    def __init__(
        self,
        url: str,
        *,
        reactor: IRouterReactor,
        clock: IReactorTime,
        body_directory: str,
        max_size: int = 0,
        inline_body_limit: int = 1 << 20,
        body_store: str = "redis",
        consumer_host: str | None = None,
        lease_seconds: float = 30,
        command_timeout: float = 5,
        key_prefix: str = "dcrouter:",
        background_verification: bool = False,
        pool_size: int = 4,
        orphan_retention: float = 0,
    ) -> None:
        super().__init__()
        self.address = parse_redis_url(url)
        self._description = f"Redis queue {self.address.display}"
        self.max_size = max_size
        self.body_directory = os.path.abspath(body_directory)
        #: Where ingress spools big messages: next to the body files, so they can be linked in.
        self.spool_directory = bodies.spool_path(self.body_directory)
        #: This process's consumer name, the owner on its leases: ``<hostname>/<slot>``, taken by ``load()``
        #: (:mod:`dcrouter.queue.redis_consumer`).
        self.owner = ""
        self._slot: ConsumerSlot | None = None
        self.lease_seconds = lease_seconds
        self._reactor = reactor
        self._clock = clock
        self._inline_limit = inline_body_limit
        if body_store not in ("redis", "directory"):
            raise ValueError(f"body_store must be 'redis' or 'directory', not {body_store!r}")
        self._body_store = body_store
        self._consumer_host = consumer_host or socket.gethostname()
        self._timeout = command_timeout
        self._store = RedisStore(reactor=reactor, prefix=key_prefix)
        self._pool_size = pool_size
        self._renewal: LoopingCall | None = None
        #: Ids this process claimed and has not finished, each with the time (on ``clock``) until which its
        #: lease is certainly valid: the time the claim, update or renewal that last set it was *sent*, plus
        #: a lease. 0.0: the claim is lost (a renewal found it taken over), never to be delivered here.
        self._held: dict[str, float] = {}
        self._known: dict[str, _Held] = {}  # of those, the ones whose version and JSON this process wrote
        self._orphan_sweeper = OrphanSweeper(
            os.path.join(self.body_directory, "orphans"),
            orphan_retention,
            clock=clock,
            in_thread=self._store.in_thread,
        )
        self.background_verification = background_verification
        self._verifying = False
        self._verification: Deferred | None = None
        self._verified_counts: dict[str, int] | None = None
        self._verified_waiters: list[Deferred] = []

    # -- storing -----------------------------------------------------------------------------------

    def enqueue(self, item: QueueItem, message: SpooledMessage) -> Deferred:
        """Store ``item`` with ``message`` as its body; fires with the stored item once Redis acknowledged it.
        QueueFull at ``max_size`` live items (counted across every process), DuplicateItem for an id already
        queued, ValueError for a bad id, QueueUnavailable when Redis or the body directory fails. The message
        is consumed."""
        try:
            self._check_open()
            check_item_id(item.id)
            stored = item.copy()
            stored.status = QueueItemStatus(stored.status)
            fields = self._fields(stored)
        except Exception:  # noqa: BLE001 (a failure for the caller)
            failure = Failure()
            d = self._discard(message)
            d.addCallback(lambda _: failure)
            return d
        return Deferred.fromCoroutine(self._enqueue(stored, fields, message))

    async def _enqueue(self, item: QueueItem, fields: list[Any], message: SpooledMessage) -> QueueItem:
        kind, inline = "inline", b""  # for chunks, "inline" carries their number
        try:
            if message.size <= self._inline_limit:
                inline = (
                    message.data
                    if message.data is not None
                    else await self._store.in_thread(bodies.read_file, message.path)
                )
            elif self._body_store == "redis":
                kind = "chunks"
                count = await chunks.store_chunks(self._store, item.id, message)
                inline = str(count).encode()
            else:
                kind = "file"
                if message.path is not None:
                    await self._store.in_thread(bodies.store_file, self.body_directory, item.id, message.path)
                    message.path = None
                else:
                    await self._store.in_thread(bodies.write_file, self.body_directory, item.id, message.data)
        except BaseException:
            await self._discard(message)
            raise
        await self._discard(message)
        lease = repr(float(self.lease_seconds))
        sent = self._clock.seconds()
        result = await self._store.script_replicated(
            scripts.ENQUEUE, item.id, *fields, kind, inline, self.max_size, self.owner, lease
        )
        if result != b"ok":
            if kind == "file":
                await self._store.in_thread(bodies.remove_files, self.body_directory, [item.id])
            if kind == "chunks" and result != b"exists":
                # The script refused: the list is certainly no item's body (an existing item's is its own).
                await self._store.call("delete", self._store.key("body:", item.id))
            if result == b"nobody":
                raise QueueUnavailable(
                    f"Redis queue: the body of {item.id} expired before its item was stored"
                )
            if result == b"full":
                raise QueueFull(f"the queue holds {self.max_size} items (maxQueueSize)")
            raise DuplicateItem(f"queue id already stored: {item.id}")
        if item.status == QueueItemStatus.DELIVERING:
            self._held[item.id] = sent + self.lease_seconds
        return item.copy()

    def update(self, item_id: str, **changes: Any) -> Deferred:
        """Change fields of an item durably; fires with the updated item, fails with KeyError if unknown.
        An update that leaves the item DELIVERING renews this process's lease on it."""
        try:
            self._check_open()
            normalised = check_changes(changes)
        except Exception as e:  # noqa: BLE001 (a failure for the caller)
            return fail(e)
        return Deferred.fromCoroutine(self._update(item_id, normalised))

    def update_if(self, item_id: str, expected: QueueItemStatus | str, /, **changes: Any) -> Deferred:
        """``update`` while the item is in status ``expected``; fails with StatusMismatch when it is not. The
        status is read with the version the write is guarded by, so a change by any process in between is
        seen."""
        try:
            self._check_open()
            normalised = check_changes(changes)
            wanted = QueueItemStatus(expected)
        except Exception as e:  # noqa: BLE001 (a failure for the caller)
            return fail(e)
        return Deferred.fromCoroutine(self._update(item_id, normalised, wanted))

    async def _update(
        self, item_id: str, changes: dict[str, Any], expected: QueueItemStatus | None = None
    ) -> QueueItem:
        # An item this process holds is usually as its claim or last update left it: write on that version
        # without reading it first (one round trip instead of two); a conflict reads it afresh. A guarded
        # update always reads: the guard is on the status as stored.
        held = self._known.get(item_id)
        body = held.body if held is not None else None  # a body never changes
        known = held if expected is None else None
        for _attempt in range(UPDATE_ATTEMPTS):
            if known is not None:
                text, status, version = known.text, QueueItemStatus.DELIVERING.value.encode(), known.version
            else:
                text, status, version = await self._store.call(
                    "hmget", self._store.key("item:", item_id), ["item", "status", "ver"]
                )
                if text is None:
                    raise KeyError(item_id)
            old = self._parse(item_id, text, status)
            if expected is not None and old.status != expected:
                raise StatusMismatch(old)
            new = old.evolve(**changes)
            fields = self._fields(new)
            lease = repr(float(self.lease_seconds))
            sent = self._clock.seconds()
            result = await self._store.script(scripts.UPDATE, item_id, version, *fields, self.owner, lease)
            if result == b"ok":
                if new.status == QueueItemStatus.DELIVERING:
                    # UPDATE leased it to this process afresh.
                    self._held[item_id] = sent + self.lease_seconds
                    # UPDATE stored ``fields[0]`` and raised the version by one.
                    self._known[item_id] = _Held(str(int(version) + 1).encode(), fields[0], body)
                else:
                    self._forget(item_id)
                return new
            known = None
            if result == b"missing":
                self._known.pop(item_id, None)
                raise KeyError(item_id)
        raise QueueUnavailable(
            f"Redis queue: {item_id} kept changing during {UPDATE_ATTEMPTS} update attempts"
        )

    def dequeue(self, item_id: str) -> Deferred:
        """Remove the item and its body; fires with the removed item, or None if there was none."""
        return self._open_call(lambda: self._remove(scripts.REMOVE, item_id))

    def dequeue_if(self, item_id: str, expected: QueueItemStatus | str) -> Deferred:
        """``dequeue`` while the item is in status ``expected`` (checked in the removing script); fails with
        StatusMismatch when it is not."""
        try:
            wanted = QueueItemStatus(expected).value
        except ValueError as e:
            return fail(e)
        return self._open_call(lambda: self._remove_if(item_id, wanted))

    async def _remove_if(self, item_id: str, status: str) -> QueueItem | None:
        reply = await self._store.script(scripts.REMOVE_IF, item_id, status)
        if reply[0] == b"other":
            raise StatusMismatch(self._parse(item_id, reply[1], reply[2]))
        removed = await self._removed(reply[1:])
        return removed[0] if removed else None

    def purge_expired(self, max_age: float) -> Deferred:
        """Remove final items created more than ``max_age`` seconds ago; fires with how many."""
        cutoff = repr(float(self._clock.seconds() - max_age))
        return self._open_call(lambda: self._remove_all(scripts.PURGE_FINAL, cutoff, CHUNK))

    def purge_all(self) -> Deferred:
        """Remove every item (of every process sharing this Redis); fires with how many."""
        return self._open_call(lambda: self._remove_all(scripts.PURGE_SOME, CHUNK))

    # -- claiming ----------------------------------------------------------------------------------

    def get_next(self, count: int = 1, schedule: ClaimSchedule | None = None) -> Deferred:
        """Claim up to ``count`` due items (priority, then creation time, then arrival) as DELIVERING, under
        this process's lease; also returns expired leases of any process to ready. With ``schedule``, shared
        between destinations as :class:`~dcrouter.queue.contract.ClaimSchedule` says (the CLAIM script's
        ``parked`` sets: :mod:`dcrouter.queue.redis_scripts`)."""
        try:
            self._check_open()
        except QueueUnavailable as e:
            return fail(e)
        if self._paused or count <= 0 or self._verifying:
            return succeed([])
        return Deferred.fromCoroutine(self._claim(count, schedule))

    async def _claim(self, count: int, schedule: ClaimSchedule | None = None) -> list[QueueItem]:
        sent = self._clock.seconds()
        reply = await self._claim_script(count, schedule)
        claimed = []
        for n in range(1, len(reply), 5):
            raw_id, text, version, handed_out, body = reply[n : n + 5]
            item = self._parse(raw_id.decode(), text, b"delivering")
            self._held[item.id] = sent + self.lease_seconds
            self._known[item.id] = _Held(version, text, body if handed_out else None)
            claimed.append(item)
        return claimed

    async def _claim_script(self, count: int, schedule: ClaimSchedule | None = None) -> list[Any]:
        now = repr(float(self._clock.seconds()))
        lease = repr(float(self.lease_seconds))
        extra: list[Any] = []
        if schedule is not None:
            extra = ["1", schedule.unrouted, schedule.default, scan_window(count)]
            for destination, limit in sorted(schedule.limits.items()):
                extra += [destination, limit]
        reply = await self._store.script(
            scripts.CLAIM, now, count, self.owner, lease, CHUNK, PROMOTE_LIMIT, HANDOUT_BODY_LIMIT, *extra
        )
        if int(reply[0]):
            log.info("Redis queue: {n} expired claims returned to ready", n=int(reply[0]))
        return list(reply)

    # -- reading -----------------------------------------------------------------------------------

    def get(self, item_id: str) -> Deferred:
        return self._open_call(lambda: self._get(item_id))

    async def _get(self, item_id: str) -> QueueItem | None:
        text, status = await self._store.call("hmget", self._store.key("item:", item_id), ["item", "status"])
        return None if text is None else self._parse(item_id, text, status)

    def get_by_status(self, status: QueueItemStatus | str) -> Deferred:
        """Items in ``status``, oldest first (creation time, then arrival)."""
        try:
            wanted = QueueItemStatus(status).value
        except ValueError as e:
            return fail(e)
        return self._open_call(lambda: self._select("status:" + wanted))

    def get_by_destination(self, destination: str) -> Deferred:
        """Items routed to ``destination``, oldest first (creation time, then arrival)."""
        return self._open_call(lambda: self._select("dest:" + destination))

    async def _select(self, index: str) -> list[QueueItem]:
        reply = await self._store.script(scripts.SELECT, index)
        return [
            self._parse(i.decode(), text, status)
            for i, text, status in zip(reply[0::3], reply[1::3], reply[2::3], strict=True)
        ]

    def list_items(self, filter: QueueFilter, limit: int, cursor: str | None = None) -> Deferred:
        """Items matching ``filter``, newest first (by arrival: the ``items`` sorted set's seq), in script
        calls that each look at LIST_BUDGET items at most."""
        try:
            before = check_page(limit, cursor)
        except ValueError as e:
            return fail(e)
        return self._open_call(lambda: self._list(filter, before, limit))

    async def _list(self, filter: QueueFilter, before: int | None, limit: int) -> ItemPage:
        found: list[tuple[int, QueueItem]] = []
        scan_from = "" if before is None else str(before)
        status = "" if filter.status is None else QueueItemStatus(filter.status).value
        args = (
            status,
            filter.destination or "",
            (filter.sender or "").lower(),
            (filter.recipient or "").lower(),
        )
        for _call in range(LIST_CALLS):
            reply = await self._store.script(
                scripts.LIST, scan_from, limit + 1 - len(found), LIST_BUDGET, *args
            )
            for n in range(1, len(reply), 4):
                raw_id, seq, text, raw_status = reply[n : n + 4]
                found.append((int(seq), self._parse(raw_id.decode(), text, raw_status)))
            if len(found) > limit or not reply[0]:
                break
            scan_from = reply[0].decode()
        else:
            # Scanned LIST_CALLS * LIST_BUDGET items: a short page, and where to go on.
            return ItemPage([item for _, item in found], scan_from)
        more = len(found) > limit
        found = found[:limit]
        return ItemPage([item for _, item in found], str(found[-1][0]) if more else None)

    def count_by_status(self) -> Deferred:
        return self._open_call(self._count_by_status)

    async def _count_by_status(self) -> dict[str, int]:
        statuses = [status.value for status in QueueItemStatus]
        reply = await self._store.script(scripts.COUNT_BY_STATUS, *statuses)
        return {status: int(n) for status, n in zip(statuses, reply, strict=True)}

    def count_by_destination(self) -> Deferred:
        """Per destination queued and deferred items, across every process: the status sets walked in
        script calls of COUNT_BUDGET items (Redis keeps no count per destination and status), COUNT_CALLS
        per status at most, so a very large queue gives a lower bound."""
        return self._open_call(self._count_by_destination)

    async def _count_by_destination(self) -> DestinationCounts:
        rows: list[tuple[str | None, str, int]] = []
        complete = True
        for status in DESTINATION_COUNT_STATUSES:
            start = "0"
            for _call in range(COUNT_CALLS):
                reply = await self._store.script(
                    scripts.COUNT_DESTINATIONS, status.value, start, COUNT_BUDGET
                )
                for raw, n in zip(reply[1::2], reply[2::2], strict=True):
                    rows.append((raw.decode() or None, status.value, int(n)))
                if not reply[0]:
                    break
                start = reply[0].decode()
            else:
                complete = False
        return destination_counts(rows, complete)

    def get_item_count(self) -> Deferred:
        """Items not delivered, bounced or failed, across every process sharing this Redis."""
        return self._open_call(self._count_live)

    def status_summary(self) -> Deferred:
        """From the per-status sorted sets (scored by creation time), across every process."""
        return self._open_call(self._status_summary)

    async def _status_summary(self) -> dict[str, tuple[int, float | None]]:
        summary: dict[str, tuple[int, float | None]] = {}
        for status in QueueItemStatus:
            key = self._store.key("status:", status.value)
            count = int(await self._store.call("zcard", key) or 0)
            if count:
                first = await self._store.call("zrange", key, 0, 0, True)
                oldest = float(first[0][1]) if first else None
                summary[status.value] = (count, oldest)
        return summary

    async def _count_live(self) -> int:
        return int(await self._store.call("get", self._store.key("live")) or 0)

    def open_body(self, item_id: str) -> Deferred:
        """A readable binary file over the body (BytesIO when inline); fails with KeyError if unknown. A body
        its claim handed out (up to HANDOUT_BODY_LIMIT) costs no round trip while this process holds it.

        For an item this process holds, this is where a delivery starts: it fails with ClaimLost, and the
        process lets go of the item, when its lease is not certainly valid for another ``CLAIM_MARGIN`` of
        a lease (heartbeats failed: Redis unreachable) or a heartbeat found it taken over."""
        until = self._held.get(item_id)
        if until is not None and self._state == "open":
            if until <= 0:
                return fail(self._claim_lost(item_id, "a heartbeat found it taken over"))
            if until - self._clock.seconds() < self.lease_seconds * CLAIM_MARGIN:
                return fail(self._claim_lost(item_id, "Redis did not confirm its lease in time"))
        known = self._known.get(item_id)
        if known is not None and known.body is not None and self._state == "open":
            return succeed(io.BytesIO(known.body))
        return self._open_call(lambda: self._open_body(item_id))

    async def _open_body(self, item_id: str) -> Any:
        check_item_id(item_id)
        [kind] = await self._store.call("hmget", self._store.key("item:", item_id), ["body"])
        if kind is None:
            raise KeyError(item_id)
        if kind == b"file":
            return await self._store.in_thread(open, bodies.body_path(self.body_directory, item_id), "rb")
        if kind == b"chunks":
            return await chunks.open_chunks(self._store, item_id, self.spool_directory)
        data = await self._store.call("get", self._store.key("body:", item_id))
        if data is None:
            raise QueueUnavailable(f"Redis queue: the body of {item_id} is missing")
        return io.BytesIO(data)

    # -- life cycle --------------------------------------------------------------------------------

    def suppression_list(self) -> RedisSuppressionList:
        """The suppression list kept with this queue: keys under its prefix, shared by every router on this
        Redis (usable once the queue has connected)."""
        return RedisSuppressionList(self._store.call, self._store.key, clock=self._clock)

    def load(self) -> Deferred:
        """Connect, check Redis's durability settings, recover; fires with the counts of LOAD_COUNT_KEYS
        (``items`` and ``live`` count every process's items). Fails with QueueUnavailable if Redis cannot be
        reached within ``command_timeout``."""
        if self._state != "new":
            return fail(QueueUnavailable(f"Redis queue {self.address.display} was already loaded"))
        self._state = "loading"
        self._store.connection = RedisConnection(
            self.address, reactor=self._reactor, timeout=self._timeout, pool_size=self._pool_size
        )
        d = Deferred.fromCoroutine(self._load())
        d.addErrback(self._load_failed)
        return d

    async def _load(self) -> dict[str, int]:
        await self._store.call("ping")
        self._slot = await self._store.in_thread(
            redis_consumer.take_slot, self.body_directory, self._consumer_host
        )
        self.owner = self._slot.name
        run = recover_start if self.background_verification else recover
        counts = await run(self._store, self.body_directory, self.address.display, self.owner)
        self._state = "open"
        self._renewal = LoopingCall(self._renew)
        self._renewal.clock = self._clock
        self._renewal.start(self.lease_seconds / 3, now=False).addErrback(
            lambda f: log.failure("Redis queue: lease renewal stopped", f)
        )
        self._orphan_sweeper.start()
        log.info(
            "Redis queue {address} loaded as consumer {owner}: {items} items ({live} to deliver);"
            " {claims_returned} claims returned, {spool_discarded} stale spool files discarded{later}",
            address=self.address.display,
            owner=self.owner,
            later="; verifying the items in the background (no claims until done)"
            if self.background_verification
            else "",
            **counts,
        )
        if self.background_verification:
            self._verifying = True
            self._verification = Deferred.fromCoroutine(self._verify(dict(counts)))
        else:
            self._verified_counts = new_load_counts(**counts)
        return new_load_counts(**counts)

    def verifying(self) -> bool:
        """Whether the background verification started by ``load()`` is still under way."""
        return self._verifying

    def verified(self) -> Deferred:
        """Fires with the counts of LOAD_COUNT_KEYS once every item found at ``load()`` is verified (at once
        without background verification); with None when the queue closes first."""
        if self._verified_counts is not None:
            return succeed(dict(self._verified_counts))
        if not self._verifying:
            return fail(QueueUnavailable(f"{self._description} is {self._state}, not verifying"))
        waiter: Deferred = Deferred()
        self._verified_waiters.append(waiter)
        return waiter

    async def _stop_verification(self) -> None:
        """Stop a verification under way (each of its steps is atomic in Redis; the next start does it all
        again) and fire whoever waits for it with None."""
        if self._verification is not None and self._verifying:
            self._verification.cancel()
            try:
                await self._verification
            except Exception:  # noqa: BLE001 (cancelled: nothing to report)
                pass
        if self._verifying:
            self._verifying = False
            waiters, self._verified_waiters = self._verified_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    async def _verify(self, counts: dict[str, int]) -> None:
        started = time.monotonic()
        try:
            damaged, orphans = await verify_items(self._store, self.body_directory, self.address.display)
        except Exception:  # noqa: BLE001 (logged; the next start verifies again)
            if self._state == "open":
                log.failure(
                    "Redis queue {address}: verifying the items failed; this process claims nothing until"
                    " restarted",
                    address=self.address.display,
                )
            return
        counts.update(damaged=damaged, orphans=orphans)
        counts["items"] = int(await self._store.call("zcard", self._store.key("items")))
        counts["live"] = int(await self._store.call("get", self._store.key("live")) or 0)
        log.info(
            "Redis queue {address}: items verified in {seconds:.1f} s; delivery starts",
            address=self.address.display,
            seconds=time.monotonic() - started,
        )
        self._verifying = False
        self._verified_counts = new_load_counts(**counts)
        waiters, self._verified_waiters = self._verified_waiters, []
        for waiter in waiters:
            waiter.callback(dict(self._verified_counts))

    def _load_failed(self, failure: Failure) -> Deferred:
        log.failure("Redis queue {address} could not be loaded", failure, address=self.address.display)
        self._state = "closed"
        self._release_slot()
        assert self._store.connection is not None
        d = self._store.connection.disconnect()
        d.addCallback(lambda _: failure)
        return d

    async def _close(self) -> None:
        """Return the claims this process holds to ready and disconnect."""
        await self._orphan_sweeper.stop()
        await self._stop_verification()
        if self._renewal is not None and self._renewal.running:
            self._renewal.stop()
        self._known.clear()
        if self._held:
            held, self._held = sorted(self._held), {}
            try:
                n = await self._store.script(scripts.RELEASE, self.owner, *held)
                log.info("Redis queue: {n} claims returned to ready at shutdown", n=n)
            except QueueUnavailable as e:
                log.warn(
                    "Redis queue: {n} claims not returned at shutdown ({error}); they return when their"
                    " leases expire",
                    n=len(held),
                    error=str(e),
                )
        assert self._store.connection is not None
        try:
            await self._store.connection.disconnect()
        finally:
            # Only now: a successor taking the name at once must find the claims already returned.
            self._release_slot()

    def _release_slot(self) -> None:
        if self._slot is not None:
            self._slot.release()

    async def _renew(self) -> None:
        """The heartbeat: extend, in one script call, the leases of every claim this process holds, and
        return expired ones of others to ready. A failure is only logged (by the connection): the next
        beat tries again, and meanwhile ``open_body`` refuses claims whose lease may have lapsed."""
        try:
            held = sorted(i for i, until in self._held.items() if until > 0)
            if held:
                sent = self._clock.seconds()
                reply = await self._store.script(
                    scripts.RENEW, self.owner, repr(float(self.lease_seconds)), *held
                )
                lost = {raw.decode() for raw in reply}
                for item_id in held:
                    until = self._held.get(item_id)
                    if until is None or until <= 0:
                        continue  # finished (or found lost) while the renewal was on its way
                    if item_id in lost:
                        self._mark_lost(item_id)
                    else:
                        self._held[item_id] = max(until, sent + self.lease_seconds)
            await self._claim_script(0)
        except QueueUnavailable:
            pass  # the outage is logged by the connection; leases are renewed once Redis is back

    def _mark_lost(self, item_id: str) -> None:
        """A heartbeat found ``item_id`` no longer claimed by this process: its lease expired and another
        process may deliver it. It is not renewed any more, and ``open_body`` refuses it."""
        self._held[item_id] = 0.0
        self._known.pop(item_id, None)  # its version has changed: an update must read it afresh
        log.warn(
            "Redis queue: the claim on {id} was lost (its lease expired; another process may deliver it)",
            id=item_id,
        )

    def _claim_lost(self, item_id: str, why: str) -> ClaimLost:
        """Let go of ``item_id`` (its lease is not renewed any more: it returns to ready once expired, for
        any process) and say why it must not be delivered here."""
        self._forget(item_id)
        return ClaimLost(f"Redis queue: the claim on {item_id} may be lost ({why}); not delivered here")

    # -- internals ---------------------------------------------------------------------------------

    def _open_call(self, make: Callable[[], Any]) -> Deferred:
        try:
            self._check_open()
        except QueueUnavailable as e:
            return fail(e)
        return Deferred.fromCoroutine(make())

    def _forget(self, item_id: str) -> None:
        """This process no longer holds ``item_id``."""
        self._held.pop(item_id, None)
        self._known.pop(item_id, None)

    def _discard(self, message: SpooledMessage) -> Deferred:
        """Drop a message's spool file (off the reactor); a failure to unlink is logged, never raised."""
        if message.path is None:
            message.discard()
            return succeed(None)
        d = self._store.in_thread(message.discard)
        d.addErrback(lambda f: log.failure("Redis queue: could not discard a spool file", f))
        return d

    async def _remove(self, script: str, *args: Any) -> QueueItem | None:
        removed = await self._removed(await self._store.script(script, *args))
        return removed[0] if removed else None

    async def _remove_all(self, script: str, *args: Any) -> int:
        total = 0
        while True:
            removed = await self._removed(await self._store.script(script, *args))
            total += len(removed)
            if len(removed) < CHUNK:
                return total

    async def _removed(self, reply: list[Any]) -> list[QueueItem]:
        """The items a removal script returned; their body files go now (a failure leaves an orphan)."""
        items, files = [], []
        for raw_id, text, status, kind in zip(
            reply[0::4], reply[1::4], reply[2::4], reply[3::4], strict=True
        ):
            item_id = raw_id.decode()
            self._forget(item_id)
            items.append(self._parse(item_id, text, status))
            if kind == b"file":
                files.append(item_id)
        if files:
            await self._store.in_thread(bodies.remove_files, self.body_directory, files)
        return items

    def _parse(self, item_id: str, text: bytes, status: bytes) -> QueueItem:
        try:
            item = QueueItem.from_dict(json.loads(text))
            item.status = QueueItemStatus(status.decode())
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise QueueUnavailable(f"Redis queue: item {item_id} is damaged: {e!r}") from e
        return item

    @staticmethod
    def _fields(item: QueueItem) -> list[Any]:
        """The ENQUEUE/UPDATE arguments describing ``item`` (floats spelled exactly, by repr)."""
        text = json.dumps(item.to_dict(), separators=(",", ":"))
        due = float(int(item.priority)) * PRIORITY_WEIGHT + float(item.created_at)
        return [
            text.encode(),
            QueueItemStatus(item.status).value,
            repr(float(item.created_at)),
            repr(float(item.next_attempt_at)),
            repr(due),
            "1" if item.destination is not None else "0",
            item.destination or "",
            str(int(item.attempts)),
        ]
