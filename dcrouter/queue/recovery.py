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
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

from dcrouter.queue.contract import new_load_counts
from dcrouter.queue.files import fsync_directory, unique_path
from dcrouter.queue.index import QueueIndex, parse_item
from dcrouter.queue.item import QueueItemStatus
from dcrouter.queue.orphans import set_aside


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
    rows = index.conn.execute(
        "SELECT seq, id, status, item, body_file,"
        " body_file IS NULL AND NOT EXISTS (SELECT 1 FROM bodies WHERE bodies.id = items.id)"
        " FROM items"
    )
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


def _set_aside_damaged(index: QueueIndex, damaged: list[tuple[tuple[Any, ...], str]]) -> None:
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
