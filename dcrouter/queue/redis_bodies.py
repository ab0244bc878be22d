"""The Redis queue's body files: messages above ``inline_body_limit`` live on a file system, not in Redis.

Everything here blocks; the Redis queue runs it in the reactor's thread pool, never on the reactor thread.

Layout under ``body_directory`` (on a file system every dcrouter process sharing the Redis can reach)::

    spool/                   ingress writes big messages here while they arrive (never acknowledged yet)
    messages/<id[:2]>/<id>   bodies of queued items, moved in (fsynced, linked, directory fsynced) before the
                             item is written to Redis
    orphans/                 body files that no item names, set aside by load(); removed after orphanRetention
    consumers/               one lock file per consumer name (:mod:`dcrouter.queue.redis_consumer`)

The path of a body is derived from the item id (which :func:`check_item_id` restricts to file-name-safe
characters), never read from Redis: whoever can write to Redis cannot make dcrouter open another file.

Several processes share these directories, so load() only touches files older than a grace period: a spool
file or a body file younger than that may belong to a message another process is receiving or storing now.
"""

from __future__ import annotations

import contextlib
import os
import time

from dcrouter.interfaces import DuplicateItem
from dcrouter.queue.files import fsync_directory, fsync_file, link_without_replacing, write_new_file
from dcrouter.queue.orphans import set_aside

#: Files younger than this (seconds since their last change) are left alone by load(). Longer than any SMTP
#: session may last (connectionTimeout defaults to 30 minutes) and than any enqueue may take.
GRACE_SECONDS = 2 * 3600.0


def spool_path(body_directory: str) -> str:
    return os.path.join(body_directory, "spool")


def body_path(body_directory: str, item_id: str) -> str:
    """Where the body file of ``item_id`` lives (whether or not it exists)."""
    return os.path.join(body_directory, "messages", item_id[:2], item_id)


def prepare(body_directory: str) -> None:
    """Create the directories (idempotent; other processes may do the same at the same time)."""
    for sub in ("spool", "messages", "orphans"):
        os.makedirs(os.path.join(body_directory, sub), exist_ok=True)


def _place_directory(body_directory: str, item_id: str) -> str:
    directory = os.path.dirname(body_path(body_directory, item_id))
    if not os.path.isdir(directory):
        os.makedirs(directory, exist_ok=True)
        fsync_directory(os.path.dirname(directory))
    return directory


def store_file(body_directory: str, item_id: str, source: str) -> None:
    """Make the spool file ``source`` the durable body of ``item_id``: fsync it, link it into place (never
    replacing an existing file: DuplicateItem), fsync the directory, then drop the spool name. Copies (and
    fsyncs the copy) when the spool is on another file system."""
    directory = _place_directory(body_directory, item_id)
    target = body_path(body_directory, item_id)
    fsync_file(source)
    try:
        link_without_replacing(source, target)
    except FileExistsError as e:
        raise DuplicateItem(f"a body file already exists for {item_id}") from e
    _fsync_placed(directory, target)
    os.unlink(source)


def write_file(body_directory: str, item_id: str, data: bytes) -> None:
    """Write ``data`` as the durable body of ``item_id`` (an in-memory body above the inline limit). On a
    failure (ENOSPC, EIO) nothing is left under the body's name."""
    directory = _place_directory(body_directory, item_id)
    target = body_path(body_directory, item_id)
    try:
        write_new_file(target, lambda f: f.write(data))
    except FileExistsError as e:
        raise DuplicateItem(f"a body file already exists for {item_id}") from e
    _fsync_placed(directory, target)


def _fsync_placed(directory: str, target: str) -> None:
    """Make the new name ``target`` durable; if that fails, take the file away again (no item names it)."""
    try:
        fsync_directory(directory)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def remove_files(body_directory: str, item_ids: list[str]) -> None:
    """Unlink the body files of items already removed from Redis. A failure leaves an orphan for the next
    load() to set aside, never a lost body, so errors are ignored."""
    for item_id in item_ids:
        with contextlib.suppress(OSError):
            os.unlink(body_path(body_directory, item_id))


def body_exists(body_directory: str, item_id: str) -> bool:
    return os.path.isfile(body_path(body_directory, item_id))


def discard_stale_spool(body_directory: str, now: float | None = None) -> int:
    """Delete spool files older than GRACE_SECONDS: messages whose receiving process died before queueing
    them (no 250 was sent). Returns how many."""
    cutoff = (time.time() if now is None else now) - GRACE_SECONDS
    spool = spool_path(body_directory)
    count = 0
    with os.scandir(spool) as entries:
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    count += 1
            except FileNotFoundError:
                pass  # another process cleaned it up first
    return count


def set_aside_orphans(body_directory: str, referenced: set[str], now: float | None = None) -> int:
    """Move body files older than GRACE_SECONDS that no item in ``referenced`` (ids) names to orphans/.
    Returns how many. They were never acknowledged (a crash between storing the body and writing the item)
    or already removed (a crash between removing the item and unlinking the file)."""
    cutoff = (time.time() if now is None else now) - GRACE_SECONDS
    orphans = os.path.join(body_directory, "orphans")
    moved = 0
    for dirpath, _dirnames, filenames in os.walk(os.path.join(body_directory, "messages")):
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                if name in referenced or os.stat(full).st_mtime >= cutoff:
                    continue
                set_aside(full, orphans)
            except FileNotFoundError:
                continue  # removed meanwhile by its item's dequeue
            moved += 1
    if moved:
        fsync_directory(orphans)
    return moved
