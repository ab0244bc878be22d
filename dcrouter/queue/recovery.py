"""What the disk queue does at start-up to return to a consistent state after a crash (or ``kill -9``).

Runs on the writer thread, after :meth:`QueueIndex.open`, before any other operation. In order:

1. Files in ``spool/`` are deleted: ingress wrote them, but no 250 was ever sent for them (a message is
   acknowledged only once its row committed, and by then its body has left the spool).
2. Claims in flight (DELIVERING) return to QUEUED, or DEFERRED when they had attempts before: a delivery
   interrupted by the crash is retried (at-least-once).
3. Every row is verified: its JSON must parse into a QueueItem with the row's id, and its body must exist
   (the body file readable, or the inline body present). A row that fails is moved to ``damaged/`` -- a
   ``<id>-<seq>.json`` describing the row and why, plus ``<id>-<seq>.body`` when a body was found -- fsynced,
   and only then removed from the index. Nothing is ever deleted.
4. Body files under ``messages/`` that no row names are moved to ``orphans/``. They were either never
   acknowledged (crash between moving the body in and the commit) or already dequeued (crash between the
   commit and the unlink). They are kept ``orphanRetention`` (see :mod:`dcrouter.queue.orphans`).

:func:`recover` does all four before returning. With a big queue, steps 3 and 4 are what takes time (about
14 µs a row), so the disk queue can run them in the background instead (``background_verification``):
:func:`recover_start` does steps 1 and 2 -- cheap, and what must precede any new write, since new mail goes
through the spool and a claim returned late would be delivered twice -- and the queue opens. Then
:func:`verify_chunk` reads the rows that existed at start, a range of ``seq`` at a time, on a connection of
its own (WAL: it never holds up the writer); a row found damaged is set aside by a :class:`SetAsideDamaged`
write, which checks the row again on the writer thread (so a row changed meanwhile is judged as it is now).
Last, :func:`orphan_candidates` walks ``messages/`` and asks the index about each file; the few it finds
without a row go to :class:`SetAsideOrphans`, which asks again on the writer thread, between two batches:
there no enqueue is half done, so a body file linked in for mail accepted meanwhile always has its row. Rows
added after start need no verification: they were written by this process. Until the rows are verified the
queue hands out no claims (``get_next`` finds nothing): an unverified row is never delivered.
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

from dcrouter.queue.contract import is_live, new_load_counts
from dcrouter.queue.files import fsync_directory, unique_path
from dcrouter.queue.index import QueueIndex, Write, parse_item
from dcrouter.queue.item import QueueItemStatus
from dcrouter.queue.orphans import set_aside

#: The row columns verification reads; the last is true when an inline body is missing.
_ROW_SQL = (
    "SELECT seq, id, status, item, body_file,"
    " body_file IS NULL AND NOT EXISTS (SELECT 1 FROM bodies WHERE bodies.id = items.id)"
    " FROM items"
)

Row = tuple[Any, ...]


def recover(index: QueueIndex) -> dict[str, int]:
    """Bring ``index`` (open) back to a consistent state; returns the counts of what was done."""
    spool_discarded = _discard_spool(index)
    claims_returned = _return_claims(index.conn)
    damaged, referenced = _verify_rows(index)
    orphans = _set_aside_orphans(index, referenced)
    items, live = index.counts()
    return new_load_counts(
        items=items,
        live=live,
        claims_returned=claims_returned,
        spool_discarded=spool_discarded,
        damaged=damaged,
        orphans=orphans,
    )


def recover_start(index: QueueIndex) -> dict[str, int]:
    """Steps 1 and 2 only (what must be done before the queue takes any write); returns the counts of
    LOAD_COUNT_KEYS (``damaged`` and ``orphans`` 0: the background verification counts them) and
    ``max_seq``, the last row that verification must look at."""
    spool_discarded = _discard_spool(index)
    claims_returned = _return_claims(index.conn)
    items, live = index.counts()
    (max_seq,) = index.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM items").fetchone()
    counts = new_load_counts(
        items=items, live=live, claims_returned=claims_returned, spool_discarded=spool_discarded
    )
    counts["max_seq"] = max_seq
    return counts


def verify_chunk(
    conn: sqlite3.Connection, index: QueueIndex, after: int, upto: int, limit: int
) -> tuple[int | None, list[tuple[Row, str]]]:
    """Verify up to ``limit`` rows with ``after < seq <= upto`` through ``conn`` (read only). Returns the
    last seq looked at (None when there was none) and the rows that failed, with why."""
    rows = conn.execute(f"{_ROW_SQL} WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?", (after, upto, limit))
    last = None
    damaged = []
    for row in rows:
        last = row[0]
        reason = _row_problem(index, row[1], row[3], row[4], bool(row[5]))
        if reason is not None:
            damaged.append((row, reason))
    return last, damaged


class SetAsideDamaged(Write):
    """Set aside rows verification found damaged: each row is read and verified again here (on the writer
    thread, so as it is now), copied to ``damaged/`` durably, then deleted. The result is how many."""

    def __init__(self, seqs: list[int]) -> None:
        self.seqs = seqs
        self.rows: list[tuple[Row, str]] = []

    def prepare(self, index: QueueIndex) -> str | None:
        for seq in self.seqs:
            row = index.conn.execute(f"{_ROW_SQL} WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                continue  # removed meanwhile
            reason = _row_problem(index, row[1], row[3], row[4], bool(row[5]))
            if reason is not None:
                self.rows.append((row, reason))
        if not self.rows:
            return None
        _copy_damaged(index, self.rows)
        return index.damaged

    def apply(self, conn: sqlite3.Connection) -> tuple[Any, int]:
        live = 0
        for (seq, item_id, status, *_rest), _reason in self.rows:
            conn.execute("DELETE FROM items WHERE seq = ?", (seq,))
            conn.execute("DELETE FROM bodies WHERE id = ?", (item_id,))
            try:
                live += int(is_live(QueueItemStatus(status)))
            except ValueError:
                pass
        return len(self.rows), -live


def orphan_candidates(conn: sqlite3.Connection, index: QueueIndex) -> list[str]:
    """Body files under ``messages/`` that no row names, asking the index through ``conn`` (read only) file
    by file: memory stays bounded whatever the queue holds. :class:`SetAsideOrphans` asks again."""
    found = []
    for dirpath, _dirnames, filenames in os.walk(index.messages):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not _names(conn, index, full):
                found.append(full)
    return found


class SetAsideOrphans(Write):
    """Move the ``candidates`` still without a row into ``orphans/``. Runs between two batches of the writer,
    where every body file linked in belongs to a committed row or has been removed again. Not durable (no
    row changes); the move is made durable by the fsync of ``orphans/``. The result is how many."""

    durable = False

    def __init__(self, candidates: list[str]) -> None:
        self.candidates = candidates
        self.moved = 0

    def prepare(self, index: QueueIndex) -> str | None:
        for full in self.candidates:
            if _names(index.conn, index, full):
                continue
            try:
                set_aside(full, index.orphans)
            except FileNotFoundError:
                continue  # dequeued meanwhile
            self.moved += 1
        return index.orphans if self.moved else None

    def apply(self, conn: sqlite3.Connection) -> tuple[Any, int]:
        return self.moved, 0


def _names(conn: sqlite3.Connection, index: QueueIndex, full: str) -> bool:
    """Whether a row names the body file ``full`` (its file name is the item's id)."""
    row = conn.execute("SELECT body_file FROM items WHERE id = ?", (os.path.basename(full),)).fetchone()
    relative = os.path.normpath(os.path.relpath(full, index.path))
    return row is not None and row[0] is not None and os.path.normpath(row[0]) == relative


def _discard_spool(index: QueueIndex) -> int:
    count = 0
    with os.scandir(index.spool) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                continue
            os.unlink(entry.path)
            count += 1
    if count:
        fsync_directory(index.spool)
    return count


def _return_claims(conn: sqlite3.Connection) -> int:
    rows = conn.execute("SELECT seq, item FROM items WHERE status = 'delivering'").fetchall()
    returned = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        for seq, text in rows:
            try:
                item = parse_item(text)
            except (ValueError, TypeError, KeyError):
                continue  # step 3 sets the row aside as damaged
            item.status = QueueItemStatus.DEFERRED if item.attempts else QueueItemStatus.QUEUED
            conn.execute(
                "UPDATE items SET status = ?, item = ? WHERE seq = ?",
                (item.status.value, json.dumps(item.to_dict(), separators=(",", ":")), seq),
            )
            returned += 1
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return returned


def _verify_rows(index: QueueIndex) -> tuple[int, set[str]]:
    """Set aside every row that fails verification. Returns how many, and the body files still referenced."""
    referenced: set[str] = set()
    damaged: list[tuple[tuple[Any, ...], str]] = []
    rows = index.conn.execute(_ROW_SQL)
    for row in rows:
        _seq, item_id, _status, text, body_file, inline_missing = row
        reason = _row_problem(index, item_id, text, body_file, bool(inline_missing))
        if reason is None:
            if body_file is not None:
                referenced.add(os.path.normpath(body_file))
        else:
            damaged.append((row, reason))
    if damaged:
        _set_aside_damaged(index, damaged)
    return len(damaged), referenced


def _row_problem(
    index: QueueIndex, item_id: str, text: str, body_file: str | None, inline_missing: bool
) -> str | None:
    try:
        item = parse_item(text)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        return f"item does not parse: {e!r}"
    if item.id != item_id:
        return f"item id {item.id!r} differs from the row's id"
    if inline_missing:
        return "inline body missing"
    if body_file is not None:
        try:
            fd = os.open(os.path.join(index.path, body_file), os.O_RDONLY)
        except OSError as e:
            return f"body file unreadable: {e.strerror}"
        os.close(fd)
    return None


def _set_aside_damaged(index: QueueIndex, damaged: list[tuple[Row, str]]) -> None:
    conn = index.conn
    _copy_damaged(index, damaged)
    fsync_directory(index.damaged)
    # Only now that the copies are durable may the rows go.
    conn.execute("BEGIN IMMEDIATE")
    try:
        for (seq, item_id, *_rest), _reason in damaged:
            conn.execute("DELETE FROM items WHERE seq = ?", (seq,))
            conn.execute("DELETE FROM bodies WHERE id = ?", (item_id,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _copy_damaged(index: QueueIndex, damaged: list[tuple[Row, str]]) -> None:
    """Write each row's record and body into ``damaged/``, every file fsynced; the caller fsyncs the
    directory and only then deletes the rows."""
    conn = index.conn
    for (seq, item_id, status, text, body_file, _inline_missing), reason in damaged:
        base = f"{_file_safe(item_id)}-{seq}"
        record = {
            "id": item_id,
            "seq": seq,
            "status": status,
            "reason": reason,
            "item": text,
            "body_file": body_file,
        }
        body_target = unique_path(index.damaged, base + ".body")
        if body_file is not None and os.path.lexists(os.path.join(index.path, body_file)):
            os.rename(os.path.join(index.path, body_file), body_target)
            record["body"] = os.path.basename(body_target)
        else:
            inline = conn.execute("SELECT data FROM bodies WHERE id = ?", (item_id,)).fetchone()
            if inline is not None:
                _write_durably(body_target, inline[0])
                record["body"] = os.path.basename(body_target)
        _write_durably(unique_path(index.damaged, base + ".json"), json.dumps(record, indent=1).encode())


def _set_aside_orphans(index: QueueIndex, referenced: set[str]) -> int:
    moved = 0
    for dirpath, _dirnames, filenames in os.walk(index.messages):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.normpath(os.path.relpath(full, index.path)) in referenced:
                continue
            set_aside(full, index.orphans)
            moved += 1
    if moved:
        fsync_directory(index.orphans)
    return moved


def _write_durably(path: str, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _file_safe(text: Any) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(text))[:64]
    return cleaned or "row"
