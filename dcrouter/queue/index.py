"""The disk queue's storage: a SQLite index in WAL mode plus body files, under one directory.

Everything here blocks. It runs only on the disk queue's single writer thread (:mod:`dcrouter.queue.disk`),
which owns the connection; nothing here is called from the reactor thread.

Layout under ``path``::

    index.sqlite (+ -wal, -shm)   items, their delivery state, and small bodies inline
    spool/                        ingress writes big messages here; never acknowledged, emptied at start-up
    messages/<id[:2]>/<id>        big bodies, moved in by rename after an fsync
    damaged/                      rows that failed verification at start-up, each with its body if any
    orphans/                      body files found without a row at start-up (swept: dcrouter.queue.orphans)

Writes come in batches (:meth:`QueueIndex.run_batch`): the file work of every write first (fsync, rename,
directory fsync), then one transaction in which each write has its own savepoint, so one failing write does
not sink the others, then one COMMIT (``synchronous=FULL``: the WAL is fsynced before COMMIT returns; a batch
of claims only, which recovery undoes after any crash anyway, commits without the fsync).
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO
from urllib.parse import quote

from dcrouter.interfaces import DuplicateItem, QueueUnavailable, StatusMismatch
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.queue.contract import ClaimSchedule, QueueFilter, is_live, pick, scan_window, walk
from dcrouter.queue.files import fsync_directory, fsync_file, link_without_replacing
from dcrouter.queue.item import QueueItem, QueueItemStatus

SCHEMA_VERSION = 1

# Status sets are spelled as literals (not parameters) so that SQLite can match the partial index.
_READY_SQL = "('queued', 'deferred')"
_FINAL_SQL = "('delivered', 'bounced', 'failed')"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY,            -- arrival order: breaks ties between items created at the same time
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    destination TEXT,
    attempts INTEGER NOT NULL,
    item TEXT NOT NULL,                 -- QueueItem.to_dict() as JSON; the columns above copy it for indexes
    body_file TEXT                      -- path under messages/, or NULL when the body is in `bodies`
);
CREATE TABLE IF NOT EXISTS bodies (id TEXT PRIMARY KEY, data BLOB NOT NULL);
-- get_next walks this in ORDER BY order and reads next_attempt_at and destination from the index itself
-- (a scheduled claim skips the destinations it closes without reading a row). It replaced items_ready.
DROP INDEX IF EXISTS items_ready;
CREATE INDEX IF NOT EXISTS items_ready_dest ON items (priority, created_at, seq, next_attempt_at, destination)
    WHERE status IN {_READY_SQL};
-- A scheduled claim behind a backlog: the destinations with ready items, and each one's first due items.
CREATE INDEX IF NOT EXISTS items_dest_ready ON items (destination, priority, created_at, seq, next_attempt_at)
    WHERE status IN {_READY_SQL};
-- Finds the due items when they are few (many items waiting for a retry): see ClaimDue.
CREATE INDEX IF NOT EXISTS items_due ON items (next_attempt_at) WHERE status IN {_READY_SQL};
CREATE INDEX IF NOT EXISTS items_status ON items (status, created_at);
CREATE INDEX IF NOT EXISTS items_destination ON items (destination);
-- list_items by status, newest first (items_destination ends in the rowid, seq, already).
CREATE INDEX IF NOT EXISTS items_status_seq ON items (status, seq);
"""

# INDEXED BY: without statistics the planner prefers items_status and sorts every ready row; items_ready_dest
# yields rows already in order, so the LIMIT stops the walk early.
CLAIM_SQL = f"""
SELECT seq, item FROM items INDEXED BY items_ready_dest
WHERE status IN {_READY_SQL} AND next_attempt_at <= ?
ORDER BY priority, created_at, seq LIMIT ?
"""

DUE_SQL = f"""
SELECT seq FROM items INDEXED BY items_due WHERE status IN {_READY_SQL} AND next_attempt_at <= ? LIMIT ?
"""

#: How many items are due, counted up to a limit inside SQLite (no row reaches Python).
DUE_COUNT_SQL = f"SELECT count(*) FROM ({DUE_SQL})"

#: The due items, found by items_due and sorted into get_next order: for when they are few.
FEW_DUE_CLAIM_SQL = f"""
SELECT seq, item FROM items WHERE seq IN ({DUE_SQL})
ORDER BY priority, created_at, seq LIMIT ?
"""

#: A scheduled claim's candidates: (seq, destination) of due items of destinations not closed, in get_next
#: order, read from items_ready_dest alone. ``{closed}`` is one ``?`` per closed destination.
SCHEDULED_SQL = f"""
SELECT seq, destination FROM (
    SELECT seq, destination, priority, created_at FROM items INDEXED BY items_ready_dest
    WHERE status IN {_READY_SQL} AND next_attempt_at <= ? ORDER BY priority, created_at, seq LIMIT ?
) WHERE CASE WHEN destination IS NULL THEN ? ELSE destination NOT IN ({{closed}}) END
ORDER BY priority, created_at, seq LIMIT ?
"""

#: Up to how many due items a scheduled claim walks them in get_next order; with more it looks destination by
#: destination. FEW_DUE's count (which every claim makes) decides, so the choice costs nothing more.
SCHEDULED_WALK = 1000

#: The destinations with ready items, one index probe each (a skip scan of items_dest_ready).
READY_DESTINATIONS_SQL = f"""
WITH RECURSIVE d(x) AS (
    SELECT (SELECT min(destination) FROM items INDEXED BY items_dest_ready WHERE status IN {_READY_SQL})
    UNION ALL
    SELECT (SELECT min(destination) FROM items INDEXED BY items_dest_ready
            WHERE status IN {_READY_SQL} AND destination > x)
    FROM d WHERE x IS NOT NULL
) SELECT x FROM d WHERE x IS NOT NULL
"""

#: The first due items of one destination (``IS ?``: NULL for unrouted mail), in get_next order.
DESTINATION_DUE_SQL = f"""
SELECT priority, created_at, seq FROM items INDEXED BY items_dest_ready
WHERE status IN {_READY_SQL} AND destination IS ? AND next_attempt_at <= ?
ORDER BY priority, created_at, seq LIMIT ?
"""

#: The same when the due items are few (found by items_due, as FEW_DUE_CLAIM_SQL).
FEW_SCHEDULED_SQL = f"""
SELECT seq, destination FROM items WHERE seq IN ({DUE_SQL})
AND CASE WHEN destination IS NULL THEN ? ELSE destination NOT IN ({{closed}}) END
ORDER BY priority, created_at, seq LIMIT ?
"""

#: Rows a sender or recipient filter of ``list_page`` looks at per page (~100 ms on the development VM).
LIST_SCAN_BUDGET = 20_000

#: Up to this many due items, ClaimDue sorts them itself rather than walking items_ready (see there).
FEW_DUE = 1000

Outcome = tuple[bool, Any]


def _item_row(item: QueueItem) -> tuple[Any, ...]:
    return (
        QueueItemStatus(item.status).value,
        int(item.priority),
        float(item.created_at),
        float(item.next_attempt_at),
        item.destination,
        int(item.attempts),
        json.dumps(item.to_dict(), separators=(",", ":")),
    )


def parse_item(text: str) -> QueueItem:
    return QueueItem.from_dict(json.loads(text))


class Write:
    """One change in a batch. ``prepare`` does file work before the transaction and may return a directory
    to fsync; ``apply`` runs inside the transaction and returns ``(result, change in live count)``; ``undo``
    removes what ``prepare`` made when the write did not commit; ``after`` runs once it has committed.

    ``durable``: the write's caller relies on it surviving a power loss once its Deferred fires. A batch of
    writes that are all not durable commits without an fsync (the WAL frames still reach the kernel, so a
    killed process loses nothing; the next durable commit's fsync covers them)."""

    durable = True

    def prepare(self, index: QueueIndex) -> str | None:
        return None

    def apply(self, conn: sqlite3.Connection) -> tuple[Any, int]:
        raise NotImplementedError

    def undo(self, index: QueueIndex) -> None:
        pass

    def after(self, index: QueueIndex) -> None:
        pass


class StoreItem(Write):
    """Insert a new item. An inline body goes into bodies; a file body is fsynced and moved into messages/."""

    def __init__(self, item: QueueItem, message: SpooledMessage) -> None:
        self.item = item
        self.message = message
        self.body_file: str | None = None  # relative to the queue directory once moved in

    def prepare(self, index: QueueIndex) -> str | None:
        if self.message.path is None:
            return None
        try:
            relative, directory = index.body_location(self.item.id)
            fsync_file(self.message.path)
            index.link_into_place(self.message.path, os.path.join(index.path, relative))
            self.body_file = relative
            # Linked, not renamed, so that an existing body is never replaced; the spool name goes now.
            os.unlink(self.message.path)
        except Exception:
            self.undo(index)
            raise
        self.message.path = None
        return directory

    def apply(self, conn: sqlite3.Connection) -> tuple[Any, int]:
        try:
            conn.execute(
                "INSERT INTO items (status, priority, created_at, next_attempt_at, destination, attempts,"
                " item, body_file, id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*_item_row(self.item), self.body_file, self.item.id),
            )
            if self.message.data is not None:
                conn.execute("INSERT INTO bodies (id, data) VALUES (?, ?)", (self.item.id, self.message.data))
        except sqlite3.IntegrityError as e:
            raise DuplicateItem(f"queue id already stored: {self.item.id}") from e
        return self.item, int(is_live(self.item.status))

    def undo(self, index: QueueIndex) -> None:
        if self.body_file is not None:
            try:
                os.unlink(os.path.join(index.path, self.body_file))
            except FileNotFoundError:
                pass
        self.message.discard()

    def after(self, index: QueueIndex) -> None:
        self.message.data = None


class UpdateItem(Write):
    """Change fields of one item; with ``expected``, only while the item is in that status (else
    StatusMismatch, and nothing changes)."""

    def __init__(
        self, item_id: str, changes: dict[str, Any], expected: QueueItemStatus | None = None
    ) -> None:
        self.item_id = item_id
        self.changes = changes
        self.expected = expected

    def apply(self, conn: sqlite3.Connection) -> tuple[Any, int]:
        row = conn.execute("SELECT item FROM items WHERE id = ?", (self.item_id,)).fetchone()
        if row is None:
            raise KeyError(self.item_id)
        old = parse_item(row[0])
        if self.expected is not None and old.status != self.expected:
            raise StatusMismatch(old)
        new = old.evolve(**self.changes)
        conn.execute(
            "UPDATE items SET status = ?, priority = ?, created_at = ?, next_attempt_at = ?, destination = ?,"
            " attempts = ?, item = ? WHERE id = ?",
            (*_item_row(new), self.item_id),
        )
        return new, int(is_live(new.status)) - int(is_live(old.status))


class ClaimDue(Write):
    """Mark up to ``count`` due items DELIVERING, in get_next order.

    Not durable: after any crash, recovery returns every claim to ready whether or not it was on disk, so an
    fsync here would buy nothing (and it was one of four per delivered message)."""

    durable = False

    def __init__(self, now: float, count: int, schedule: ClaimSchedule | None = None) -> None:
        self.now = now
        self.count = count
        self.schedule = schedule

    def apply(self, conn: sqlite3.Connection) -> tuple[Any, int]:
        claimed = []
        rows = self._due_rows(conn) if self.schedule is None else self._scheduled_rows(conn, self.schedule)
        for seq, text in rows:
            item = parse_item(text)
            item.status = QueueItemStatus.DELIVERING
            conn.execute(
                "UPDATE items SET status = 'delivering', item = ? WHERE seq = ?",
                (json.dumps(item.to_dict(), separators=(",", ":")), seq),
            )
            claimed.append(item)
        return claimed, 0

    def _due_rows(self, conn: sqlite3.Connection) -> list[tuple[int, str]]:
        # Walking items_ready_dest in order is fast when due items are near its front, but walks every waiting
        # item when they are not (a destination down for hours). items_due finds the due ones directly; when
        # they are few, sorting them costs less than that walk.
        # Both the count and the sort stay inside SQLite: fetching up to FEW_DUE seqs into Python first cost
        # ~5 ms per claim with a backlog (bench/relay).
        (due,) = conn.execute(DUE_COUNT_SQL, (self.now, FEW_DUE + 1)).fetchone()
        if due > FEW_DUE:
            return conn.execute(CLAIM_SQL, (self.now, self.count)).fetchall()
        if not due:
            return []
        return conn.execute(FEW_DUE_CLAIM_SQL, (self.now, FEW_DUE + 1, self.count)).fetchall()

    def _scheduled_rows(self, conn: sqlite3.Connection, schedule: ClaimSchedule) -> list[tuple[int, str]]:
        # Up to SCHEDULED_WALK due items, a walk in get_next order, the closed destinations skipped inside
        # SQLite from the index alone. Beyond, walking past a backlog would cost ~0.5 us per item at every
        # claim (~10 ms behind 20,000), so the claim looks destination by destination instead: the
        # destinations with ready items (one index probe each), then each open one's first due items.
        (due,) = conn.execute(DUE_COUNT_SQL, (self.now, max(FEW_DUE, SCHEDULED_WALK) + 1)).fetchone()
        if not due:
            return []
        window = scan_window(self.count)
        walked_all = due <= SCHEDULED_WALK

        def fetch(closed: list[str], unrouted: bool) -> list[tuple[int, str | None]]:
            marks = ",".join("?" * len(closed))
            if due > FEW_DUE:
                query, params = SCHEDULED_SQL, (self.now, SCHEDULED_WALK, int(unrouted), *closed, window)
            else:
                query, params = FEW_SCHEDULED_SQL, (self.now, FEW_DUE + 1, int(unrouted), *closed, window)
            return conn.execute(query.format(closed=marks), params).fetchall()

        seqs = walk(fetch, self.count, schedule) if walked_all else self._by_destination(conn, schedule)
        rows = []
        for seq in seqs:
            rows.append(conn.execute("SELECT seq, item FROM items WHERE seq = ?", (seq,)).fetchone())
        return rows

    def _by_destination(self, conn: sqlite3.Connection, schedule: ClaimSchedule) -> list[int]:
        destinations: list[str | None] = [row[0] for row in conn.execute(READY_DESTINATIONS_SQL)]
        destinations.append(None)
        found: list[tuple[int, float, int, str | None]] = []
        for destination in destinations:
            limit = min(schedule.limit(destination), self.count)
            if limit <= 0:
                continue
            due = conn.execute(DESTINATION_DUE_SQL, (destination, self.now, limit))
            found.extend((priority, created_at, seq, destination) for priority, created_at, seq in due)
        found.sort()
        return pick(((seq, destination) for _p, _c, seq, destination in found), self.count, schedule)


class CountLive(Write):
    """Count the live items (not in a final status) inside the batch's transaction, so the result is exact at
    that point of the batch. ``sets_live``: the caller's in-memory count takes the result as it is (not as a
    change): another process (an operator's tool, worker 0 of several) may have removed items meanwhile. Not
    durable: it changes nothing."""

    durable = False
    sets_live = True

    def apply(self, conn: sqlite3.Connection) -> tuple[Any, int]:
        final = {s.value for s in QueueItemStatus if not is_live(s)}
        rows = conn.execute("SELECT status, COUNT(*) FROM items INDEXED BY items_status GROUP BY status")
        return sum(count for status, count in rows if status not in final), 0


class RemoveItems(Write):
    """Delete the rows matching ``where`` (SQL over `items`); bodies files go once the deletion committed.
    The result is the removed item (``single``: None when there was none) or the number removed. With
    ``expected`` (``single`` only), a row in another status is not removed: StatusMismatch."""

    def __init__(
        self,
        where: str,
        params: tuple[Any, ...],
        single: bool = False,
        expected: QueueItemStatus | None = None,
    ) -> None:
        self.where = where
        self.params = params
        self.single = single
        self.expected = expected
        self.files: list[str] = []

    def apply(self, conn: sqlite3.Connection) -> tuple[Any, int]:
        rows = conn.execute(
            f"SELECT seq, id, status, body_file, item FROM items WHERE {self.where}", self.params
        ).fetchall()
        if self.expected is not None and rows and rows[0][2] != self.expected.value:
            raise StatusMismatch(parse_item(rows[0][4]))
        conn.executemany("DELETE FROM items WHERE seq = ?", [(r[0],) for r in rows])
        conn.executemany("DELETE FROM bodies WHERE id = ?", [(r[1],) for r in rows])
        self.files = [r[3] for r in rows if r[3] is not None]
        delta = -sum(1 for r in rows if is_live(QueueItemStatus(r[2])))
        if self.single:
            return (parse_item(rows[0][4]) if rows else None), delta
        return len(rows), delta

    def after(self, index: QueueIndex) -> None:
        # A crash before this leaves the file as an orphan, set aside at the next start: never a lost body.
        for relative in self.files:
            try:
                os.unlink(os.path.join(index.path, relative))
            except OSError:
                pass


def _as_unavailable(error: BaseException) -> BaseException:
    if isinstance(error, (OSError, sqlite3.Error)):
        unavailable = QueueUnavailable(f"disk queue: {error}")
        unavailable.__cause__ = error
        return unavailable
    return error


class QueueIndex:
    """The files and the SQLite connection of one disk queue. Not thread-safe: one thread uses it."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.spool = os.path.join(self.path, "spool")
        self.messages = os.path.join(self.path, "messages")
        self.damaged = os.path.join(self.path, "damaged")
        self.orphans = os.path.join(self.path, "orphans")
        self._conn: sqlite3.Connection | None = None
        #: The reader thread's own connection (WAL: readers never wait for the writer's commits).
        self._reader: sqlite3.Connection | None = None
        #: The background verification's connection, on its own thread (see recovery.verify_chunk).
        self._verifier: sqlite3.Connection | None = None
        self._known_dirs: set[str] = set()
        self._synchronous_full = True
        self._attached = False  # opened by attach(): another process holds the queue

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise QueueUnavailable("disk queue is not open")
        return self._conn

    # -- opening and recovery ----------------------------------------------------------------------

    def open(self) -> None:
        """Create the directories and the schema, or reopen them (recovery is :func:`recovery.recover`)."""
        try:
            for directory in (self.path, self.spool, self.messages, self.damaged, self.orphans):
                os.makedirs(directory, exist_ok=True)
            fsync_directory(self.path)
            conn = sqlite3.connect(
                os.path.join(self.path, "index.sqlite"), isolation_level=None, check_same_thread=False
            )
            self._conn = conn
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise QueueUnavailable("disk queue: SQLite refused WAL mode")
            conn.execute("PRAGMA synchronous = FULL")
            self._synchronous_full = True
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except Exception as e:
            self.close()
            raise _as_unavailable(e) from e

    def attach(self, busy_timeout: float) -> None:
        """Open the index of a queue another process (a running router) holds: nothing is created, and a
        write waits up to ``busy_timeout`` seconds for that process's transaction to end. Raises
        QueueUnavailable naming what is missing or wrong."""
        index = os.path.join(self.path, "index.sqlite")
        if not os.path.isfile(index):
            raise QueueUnavailable(f"no disk queue in {self.path} ({index} does not exist)")
        try:
            # mode=rw: never create an empty database where the router's should be.
            conn = sqlite3.connect(
                f"file:{quote(index)}?mode=rw",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                timeout=busy_timeout,
            )
        except sqlite3.Error as e:
            raise QueueUnavailable(f"cannot open {index}: {e}") from None
        try:
            # The router set WAL, and it persists. Only read here: never convert a database that is not ours.
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                raise QueueUnavailable(f"{index} is not in WAL mode; is it a dcrouter disk queue?")
            conn.execute("PRAGMA synchronous = FULL")
            items = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'items'"
            if conn.execute(items).fetchone() is None:
                raise QueueUnavailable(f"{index} holds no queue items table; is it a dcrouter disk queue?")
        except sqlite3.Error as e:
            conn.close()
            raise QueueUnavailable(f"cannot read {index}: {e}") from None
        except QueueUnavailable:
            conn.close()
            raise
        self._conn = conn
        self._synchronous_full = True
        self._attached = True

    def counts(self) -> tuple[int, int]:
        """How many items are stored, and how many of them are live (not in a final status). Counted from
        the ``items_status`` index, not the table: the index holds a few bytes a row where the table holds
        each item's JSON, and start-up waits for this count (docs/performance.md, big queue)."""
        items = live = 0
        final = {s.value for s in QueueItemStatus if not is_live(s)}
        rows = self.conn.execute("SELECT status, COUNT(*) FROM items INDEXED BY items_status GROUP BY status")
        for status, count in rows:
            items += count
            live += 0 if status in final else count
        return items, live

    def close(self) -> None:
        """Checkpoint the WAL into the database and close. Safe to call twice. An attached index is closed
        without the checkpoint: that is the work of the process that holds the queue."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if not self._attached:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass  # the WAL is still valid; the next open replays it
        finally:
            conn.close()

    # -- body files --------------------------------------------------------------------------------

    def body_location(self, item_id: str) -> tuple[str, str]:
        """The body file of ``item_id`` relative to the queue directory, and its directory (created, and
        made durable in its parent, if new)."""
        fanout = item_id[:2]
        directory = os.path.join(self.messages, fanout)
        if directory not in self._known_dirs:
            if not os.path.isdir(directory):
                os.mkdir(directory)
                fsync_directory(self.messages)
            self._known_dirs.add(directory)
        return os.path.join("messages", fanout, item_id), directory

    def link_into_place(self, source: str, target: str) -> None:
        """Give ``source`` the name ``target`` without ever replacing an existing file (FileExistsError).
        Copies (and fsyncs the copy) when ``source`` is on another file system."""
        try:
            link_without_replacing(source, target)
        except FileExistsError as e:
            raise ValueError(f"a body file already exists at {target}") from e

    # -- writes ------------------------------------------------------------------------------------

    def run_batch(self, writes: list[Write]) -> list[Outcome]:
        """Apply ``writes`` in one transaction. Returns, per write, ``(True, (result, live delta))`` once
        committed, or ``(False, exception)``; I/O and SQLite errors come back as QueueUnavailable."""
        outcomes: list[Outcome | None] = [None] * len(writes)
        by_directory: dict[str, list[int]] = {}
        for n, write in enumerate(writes):
            try:
                directory = write.prepare(self)
            except Exception as e:  # noqa: BLE001 (a failure for the caller)
                outcomes[n] = (False, _as_unavailable(e))
                continue
            if directory is not None:
                by_directory.setdefault(directory, []).append(n)
        for directory, members in by_directory.items():
            try:
                fsync_directory(directory)
            except OSError as e:
                self._fail(writes, outcomes, members, _as_unavailable(e))
        applied = [n for n in range(len(writes)) if outcomes[n] is None]
        if applied:
            self._transact(writes, outcomes, applied)
        for n, write in enumerate(writes):
            result = outcomes[n]
            if result is not None and result[0]:
                write.after(self)
        # Every path above decides each write; the fallback only keeps the batch aligned with its callers.
        return [o if o is not None else (False, QueueUnavailable("write not applied")) for o in outcomes]

    def _transact(self, writes: list[Write], outcomes: list[Outcome | None], members: list[int]) -> None:
        conn = self._conn
        try:
            if conn is None:
                raise QueueUnavailable("disk queue is not open")
            self._set_synchronous(any(writes[n].durable for n in members))
            conn.execute("BEGIN IMMEDIATE")
            for n in members:
                conn.execute("SAVEPOINT w")
                try:
                    outcomes[n] = (True, writes[n].apply(conn))
                except Exception as e:  # a failure for the caller
                    if not conn.in_transaction:
                        # SQLite rolled the whole transaction back itself, as it may on SQLITE_FULL (ENOSPC)
                        # or an I/O error: no write of the batch is stored, and this is why.
                        raise
                    conn.execute("ROLLBACK TO w")
                    self._fail(writes, outcomes, [n], _as_unavailable(e))
                conn.execute("RELEASE w")
            conn.execute("COMMIT")
        except Exception as e:  # noqa: BLE001 (a failure for the caller)
            if conn is not None and conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the connection is broken; SQLite discards the transaction anyway
            # Nothing of this transaction is stored: every write not already failed fails now.
            pending = [n for n in members if outcomes[n] is None or outcomes[n][0]]  # type: ignore[index]
            self._fail(writes, outcomes, pending, _as_unavailable(e))

    def _set_synchronous(self, durable: bool) -> None:
        """FULL (the WAL is fsynced at COMMIT) for a batch with a durable write, OFF otherwise. Set between
        transactions, where SQLite takes the change."""
        if durable != self._synchronous_full:
            self.conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'OFF'}")
            self._synchronous_full = durable

    def _fail(
        self,
        writes: list[Write],
        outcomes: list[Outcome | None],
        members: Iterable[int],
        error: BaseException,
    ) -> None:
        for n in members:
            outcomes[n] = (False, error)
            try:
                writes[n].undo(self)
            except OSError:
                pass  # what is left is unreferenced and will be set aside at the next start

    # -- reads -------------------------------------------------------------------------------------

    def read(self, query: Callable[[], Any]) -> Any:
        """Run ``query``, reporting I/O and SQLite errors as QueueUnavailable."""
        try:
            return query()
        except Exception as e:
            raise _as_unavailable(e) from e

    def reader(self) -> sqlite3.Connection:
        """The connection for reads, opened on first use. Only the disk queue's reader thread calls the read
        methods, so it is that thread's; in WAL mode it sees every committed write and never waits for a
        commit in progress (reads used to queue behind the writer's commits: bench/relay)."""
        if self._reader is None:
            if self._conn is None:
                raise QueueUnavailable("disk queue is not open")
            self._reader = sqlite3.connect(
                os.path.join(self.path, "index.sqlite"), isolation_level=None, check_same_thread=False
            )
        return self._reader

    def verifier(self) -> sqlite3.Connection:
        """A read-only connection for the background verification's thread (opened on first use there)."""
        if self._verifier is None:
            if self._conn is None:
                raise QueueUnavailable("disk queue is not open")
            self._verifier = sqlite3.connect(
                f"file:{quote(os.path.join(self.path, 'index.sqlite'))}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
            )
        return self._verifier

    def close_verifier(self) -> None:
        verifier, self._verifier = self._verifier, None
        if verifier is not None:
            verifier.close()

    def close_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def get(self, item_id: str) -> QueueItem | None:
        row = self.reader().execute("SELECT item FROM items WHERE id = ?", (item_id,)).fetchone()
        return None if row is None else parse_item(row[0])

    def status_summary(self) -> dict[str, tuple[int, float | None]]:
        """``{status: (count, oldest created_at)}`` from the ``items_status`` index."""
        rows = self.reader().execute("SELECT status, COUNT(*), MIN(created_at) FROM items GROUP BY status")
        return {status: (count, oldest) for status, count, oldest in rows}

    def select(self, where: str, params: tuple[Any, ...]) -> list[QueueItem]:
        rows = self.reader().execute(f"SELECT item FROM items WHERE {where} ORDER BY created_at, seq", params)
        return [parse_item(r[0]) for r in rows]

    def list_page(
        self, filter: QueueFilter, before: int | None, limit: int
    ) -> tuple[list[QueueItem], int | None]:
        """Up to ``limit`` items matching ``filter`` with ``seq`` below ``before``, newest first, and the seq
        to continue below when more may follow. Status and destination are matched by index; a sender or
        recipient filter looks at LIST_SCAN_BUDGET candidates at most, so a page may come back short (even
        empty) with a cursor to go on from."""
        where: list[str] = ["1"]
        params: list[Any] = []
        if before is not None:
            where.append("seq < ?")
            params.append(before)
        if filter.status is not None:
            where.append("status = ?")
            params.append(QueueItemStatus(filter.status).value)
        if filter.destination is not None:
            where.append("destination = ?")
            params.append(filter.destination)
        text: list[str] = []
        text_params: list[Any] = []
        for needle, check in (
            (filter.sender, "instr(lower(json_extract(item, '$.envelope.mail_from')), ?) > 0"),
            (
                filter.recipient,
                (
                    "EXISTS (SELECT 1 FROM json_each(item, '$.envelope.recipients')"
                    " WHERE instr(lower(value), ?) > 0)"
                ),
            ),
        ):
            if needle is not None:
                # A plain search of the stored JSON is a cheap first pass; the JSON one decides.
                text += ["instr(lower(item), ?) > 0", check]
                text_params += [needle.lower(), needle.lower()]
        conn = self.reader()
        candidates = f"SELECT seq FROM items WHERE {' AND '.join(where)} ORDER BY seq DESC"
        if not text:
            rows = conn.execute(
                f"SELECT seq, item FROM items WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
                (*params, limit + 1),
            ).fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            return [parse_item(r[1]) for r in rows], (rows[-1][0] if more else None)
        window = f"{candidates} LIMIT {LIST_SCAN_BUDGET}"
        rows = conn.execute(
            f"SELECT seq, item FROM items WHERE seq IN ({window}) AND {' AND '.join(text)}"
            " ORDER BY seq DESC LIMIT ?",
            (*params, *text_params, limit + 1),
        ).fetchall()
        if len(rows) > limit:
            rows = rows[:limit]
            return [parse_item(r[1]) for r in rows], rows[-1][0]
        scanned, lowest = conn.execute(f"SELECT count(*), min(seq) FROM ({window})", params).fetchone()
        found = [parse_item(r[1]) for r in rows]
        return found, (lowest if scanned == LIST_SCAN_BUDGET else None)

    def count_by_status(self) -> dict[str, int]:
        counts = {status.value: 0 for status in QueueItemStatus}
        for status, count in self.reader().execute("SELECT status, COUNT(*) FROM items GROUP BY status"):
            counts[status] = count
        return counts

    def count_by_destination(self) -> list[tuple[str | None, str, int]]:
        """``(destination, status, count)`` of the queued and deferred items: items_dest_ready holds exactly
        them, in destination order, so the grouping walks it once."""
        return (
            self.reader()
            .execute(
                "SELECT destination, status, COUNT(*) FROM items INDEXED BY items_dest_ready"
                f" WHERE status IN {_READY_SQL} GROUP BY destination, status"
            )
            .fetchall()
        )

    def open_body(self, item_id: str) -> BinaryIO:
        row = self.reader().execute("SELECT body_file FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise KeyError(item_id)
        if row[0] is not None:
            return open(os.path.join(self.path, row[0]), "rb")
        body = self.reader().execute("SELECT data FROM bodies WHERE id = ?", (item_id,)).fetchone()
        if body is None:
            raise QueueUnavailable(f"disk queue: the body of {item_id} is missing")
        return io.BytesIO(body[0])
