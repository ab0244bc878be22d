"""``dcrouter quarantine``: list, show, release and delete quarantined messages beside a running router.

A scanner's ``quarantine`` action queues a message with status ``quarantined`` (its ``last_error`` says why),
where it waits for an operator. These functions reach the queue the configuration names from another
process, while the router runs:

- ``disk``: the SQLite index is opened directly (WAL, so reads never wait for the router's commits; a busy
  timeout of :data:`BUSY_TIMEOUT` seconds for writes). The queue's ``load()`` is never run here: its recovery
  returns every DELIVERING claim to ready, which beside a running router would deliver those messages twice.
  A release is one transaction guarded by ``status = 'quarantined'``; the router claims the message at its
  next look at the queue (``checkInterval``), as ``get_next`` is a query. A delete removes the row (and an
  inline body) in one transaction and the body file after the commit, as the queue's own removal does: a
  crash in between leaves an orphan, set aside at the next start, never a row without its body.
- ``redis``: a :class:`~dcrouter.queue.redis.RedisQueue` of this process's own. Its ``load()`` recovery is
  written for processes sharing one Redis (only *expired* leases return to ready, only files older than two
  hours are touched, an item is set aside only if unchanged since read), so running it beside live routers
  is what starting one more router does; it costs one scan of every item.
- ``memory``: the queue lives inside the running process; nothing outside it can reach the queue.

Text that comes from a message (sender, recipients, reason, headers) is printed with control characters
escaped: a quarantined message is likely hostile, and its headers must not drive the operator's terminal.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO
from urllib.parse import quote

from dcrouter.interfaces import QueueUnavailable
from dcrouter.queue.contract import check_item_id
from dcrouter.queue.files import message_reader
from dcrouter.queue.item import QueueItem, QueueItemStatus

if TYPE_CHECKING:
    from dcrouter.config.smtp import SmtpConfig
    from dcrouter.queue.redis import RedisQueue

#: What ``show`` reads of a message (as relayed) to find its header block.
HEAD_LIMIT = 64 * 1024
#: Seconds a write waits for the router's transaction to finish before giving up.
BUSY_TIMEOUT = 10.0

ACTIONS = ("list", "show", "release", "delete")


class QuarantineError(Exception):
    """The action cannot be done; the message says why (naming the id), ``status`` is the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _quarantined(item_id: str, item: QueueItem | None) -> QueueItem:
    if item is None:
        raise QuarantineError(f"no message {item_id} in the queue")
    if item.status is not QueueItemStatus.QUARANTINED:
        raise QuarantineError(f"message {item_id} is {item.status.value}, not quarantined")
    return item


# -- the disk queue ----------------------------------------------------------------------------------


class DiskQuarantine:
    """The quarantined items of the disk queue in directory ``path``, through a connection of its own to the
    index: safe while a router has the queue open. ``now`` stamps a release's next attempt."""

    def __init__(
        self, path: str, *, now: Callable[[], float] = time.time, busy_timeout: float = BUSY_TIMEOUT
    ) -> None:
        self.path = os.path.abspath(path)
        self._now = now
        index = os.path.join(self.path, "index.sqlite")
        if not os.path.isfile(index):
            raise QuarantineError(f"no disk queue in {self.path} ({index} does not exist)")
        try:
            # mode=rw: never create an empty database where the router's should be.
            conn = sqlite3.connect(
                f"file:{quote(index)}?mode=rw", uri=True, isolation_level=None, timeout=busy_timeout
            )
        except sqlite3.Error as e:
            raise QuarantineError(f"cannot open {index}: {e}") from None
        self._conn = conn
        try:
            # Already WAL (the router set it, and it persists): a no-op that confirms it.
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise QuarantineError(f"{index} is not in WAL mode; is it a dcrouter disk queue?")
            conn.execute("PRAGMA synchronous = FULL")  # a release or delete is durable once printed
            if (
                conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'items'").fetchone()
                is None
            ):
                raise QuarantineError(f"{index} holds no queue items table; is it a dcrouter disk queue?")
        except sqlite3.Error as e:
            conn.close()
            raise QuarantineError(f"cannot read {index}: {e}") from None
        except QuarantineError:
            conn.close()
            raise

    def close(self) -> None:
        self._conn.close()

    def items(self) -> list[QueueItem]:
        """Quarantined items, oldest first."""
        with self._transaction("BEGIN") as conn:
            rows = conn.execute(
                "SELECT item FROM items WHERE status = 'quarantined' ORDER BY created_at, seq"
            ).fetchall()
        return [_parse(text) for (text,) in rows]

    def show(self, item_id: str) -> tuple[QueueItem, bytes]:
        """The quarantined item and up to HEAD_LIMIT bytes of its message as it would be relayed."""
        inline = None
        with self._transaction("BEGIN") as conn:  # the row and an inline body from one snapshot
            row = conn.execute("SELECT item, body_file FROM items WHERE id = ?", (item_id,)).fetchone()
            item = _quarantined(item_id, None if row is None else _parse(row[0]))
            body_file = row[1]
            if body_file is None:
                inline = conn.execute("SELECT data FROM bodies WHERE id = ?", (item_id,)).fetchone()
                if inline is None:
                    raise QuarantineError(f"the body of {item_id} is missing from the index")
        if inline is not None:
            return item, _read_head(item, io.BytesIO(inline[0]))
        # Only a delete removes a quarantined item's file (the router leaves it alone), so it is still there.
        try:
            stream = open(os.path.join(self.path, body_file), "rb")  # noqa: SIM115 (_read_head closes it)
        except OSError as e:
            raise QuarantineError(f"cannot read the body of {item_id}: {e.strerror or e}") from None
        return item, _read_head(item, stream)

    def release(self, item_id: str) -> QueueItem:
        """Make the quarantined item due now, as ``EmailProcessor.release`` does; returns it as stored."""
        with self._transaction("BEGIN IMMEDIATE") as conn:
            row = conn.execute("SELECT item FROM items WHERE id = ?", (item_id,)).fetchone()
            item = _quarantined(item_id, None if row is None else _parse(row[0]))
            released = item.evolve(
                status=QueueItemStatus.QUEUED, next_attempt_at=self._now(), last_error=None
            )
            updated = conn.execute(
                "UPDATE items SET status = 'queued', next_attempt_at = ?, item = ?"
                " WHERE id = ? AND status = 'quarantined'",
                (released.next_attempt_at, _dump(released), item_id),
            ).rowcount
            if updated != 1:  # cannot happen under BEGIN IMMEDIATE; the guard is in the statement anyway
                raise QuarantineError(f"message {item_id} changed while being released; nothing done")
        return released

    def delete(self, item_id: str) -> tuple[QueueItem, str | None]:
        """Remove the quarantined item and its body. Returns it, and a warning when its body file could not
        be unlinked after the commit (left for the next start to set aside as an orphan)."""
        with self._transaction("BEGIN IMMEDIATE") as conn:
            row = conn.execute("SELECT item, body_file FROM items WHERE id = ?", (item_id,)).fetchone()
            item = _quarantined(item_id, None if row is None else _parse(row[0]))
            body_file = row[1]
            conn.execute("DELETE FROM items WHERE id = ? AND status = 'quarantined'", (item_id,))
            conn.execute("DELETE FROM bodies WHERE id = ?", (item_id,))
        # After the commit, as the queue's RemoveItems does: a crash before this leaves an orphan, never a row
        # whose body is gone.
        if body_file is not None:
            path = os.path.join(self.path, body_file)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                return (
                    item,
                    f"{path} not removed ({e.strerror or e}); the next start sets it aside in orphans/",
                )
        return item, None

    @contextlib.contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        try:
            conn.execute(begin)
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise QuarantineError(f"disk queue {self.path}: {e}") from None


def _parse(text: str) -> QueueItem:
    try:
        return QueueItem.from_dict(json.loads(text))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        # The router's next start sets such a row aside in damaged/; until then, an error, not a traceback.
        raise QuarantineError(f"a queue row does not parse: {e!r}") from None


def _dump(item: QueueItem) -> str:
    # As the disk queue writes it (index._item_row), so its readers see the same JSON either way.
    return json.dumps(item.to_dict(), separators=(",", ":"))


def _read_head(item: QueueItem, stream: BinaryIO) -> bytes:
    reader = message_reader(item.head, stream, item.body_offset)
    try:
        return reader.read(HEAD_LIMIT)
    finally:
        reader.close()


# -- the Redis queue ---------------------------------------------------------------------------------


class RedisQuarantine:
    """The quarantined items of a loaded RedisQueue (this process's own); ``now`` stamps a release."""

    def __init__(self, queue: RedisQueue, now: Callable[[], float]) -> None:
        self._queue = queue
        self._now = now

    async def items(self) -> list[QueueItem]:
        items: list[QueueItem] = await self._queue.get_by_status(QueueItemStatus.QUARANTINED)
        return items

    async def show(self, item_id: str) -> tuple[QueueItem, bytes]:
        item = _quarantined(item_id, await self._queue.get(item_id))
        try:
            stream = await self._queue.open_body(item_id)
        except KeyError:
            raise QuarantineError(f"message {item_id} was removed meanwhile") from None
        return item, _read_head(item, stream)

    async def release(self, item_id: str) -> QueueItem:
        _quarantined(item_id, await self._queue.get(item_id))
        try:
            released: QueueItem = await self._queue.update(
                item_id, status=QueueItemStatus.QUEUED, next_attempt_at=self._now(), last_error=None
            )
        except KeyError:
            raise QuarantineError(f"message {item_id} was removed meanwhile; nothing released") from None
        return released

    async def delete(self, item_id: str) -> tuple[QueueItem, str | None]:
        _quarantined(item_id, await self._queue.get(item_id))
        removed: QueueItem | None = await self._queue.dequeue(item_id)
        if removed is None:
            raise QuarantineError(f"message {item_id} was removed meanwhile")
        return removed, None


# -- running an action -------------------------------------------------------------------------------


def run_disk(path: str, action: str, item_id: str | None, out: TextIO, err: TextIO) -> int:
    """Run ``action`` on the disk queue in ``path``; returns the exit status (errors printed to ``err``)."""
    try:
        _check_id(action, item_id)
        store = DiskQuarantine(path)
    except QuarantineError as e:
        return _failed(err, e)
    try:
        if action == "list":
            print_list(store.items(), out)
        elif action == "show":
            print_show(*store.show(_given(item_id)), out)
        elif action == "release":
            print_released(store.release(_given(item_id)), out)
        else:
            print_deleted(*store.delete(_given(item_id)), out, err)
    except QuarantineError as e:
        return _failed(err, e)
    finally:
        store.close()
    return 0


async def run_redis(
    config: SmtpConfig, action: str, item_id: str | None, out: TextIO, err: TextIO, *, reactor: Any
) -> int:
    """Run ``action`` on the Redis queue ``config`` names, with a RedisQueue of this process's own (loaded,
    then saved: it holds no claims, so saving returns none). Returns the exit status."""
    from dcrouter.queue.redis import RedisQueue

    try:
        _check_id(action, item_id)
    except QuarantineError as e:
        return _failed(err, e)
    assert config.redis_url is not None  # the configuration check requires it
    queue = RedisQueue(
        config.redis_url, reactor=reactor, clock=reactor, body_directory=config.persistent_path
    )
    try:
        await queue.load()
    except QueueUnavailable as e:
        return _failed(err, QuarantineError(str(e)))
    store = RedisQuarantine(queue, reactor.seconds)
    try:
        if action == "list":
            print_list(await store.items(), out)
        elif action == "show":
            print_show(*await store.show(_given(item_id)), out)
        elif action == "release":
            print_released(await store.release(_given(item_id)), out)
        else:
            print_deleted(*await store.delete(_given(item_id)), out, err)
    except QueueUnavailable as e:
        return _failed(err, QuarantineError(str(e)))
    except QuarantineError as e:
        return _failed(err, e)
    finally:
        await queue.save()
    return 0


def _check_id(action: str, item_id: str | None) -> None:
    if action not in ACTIONS:
        raise QuarantineError(f"unknown action {action!r}", status=2)
    if action == "list":
        return
    try:
        check_item_id(_given(item_id))
    except ValueError:
        raise QuarantineError(f"{printable(str(item_id))!r} is not a queue id") from None


def _given(item_id: str | None) -> str:
    if item_id is None:
        raise QuarantineError("a queue id is required", status=2)
    return item_id


def _failed(err: TextIO, error: QuarantineError) -> int:
    print(f"dcrouter quarantine: {error}", file=err)
    return error.status


# -- output ------------------------------------------------------------------------------------------


def printable(text: str) -> str:
    """``text`` with control characters (a hostile message's terminal escapes) shown as Python escapes."""
    return "".join(
        ch if ch.isprintable() or ch == "\t" else ch.encode("unicode_escape").decode() for ch in text
    )


def utc(timestamp: float) -> str:
    """``2025-01-31T12:00:00Z``."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def summary(item: QueueItem) -> str:
    """One tab-separated line: id, queued (UTC), size, sender (``<>`` for the null sender), number of
    recipients, reason."""
    return "\t".join(
        [
            item.id,
            utc(item.created_at),
            str(item.size),
            printable(item.envelope.mail_from) or "<>",
            str(len(item.envelope.recipients)),
            printable(item.last_error or ""),
        ]
    )


def header_block(message: bytes) -> tuple[list[str], bool]:
    """The header lines of ``message`` (without line ends, up to the blank line ending the block), and
    whether the block goes on past what was read (HEAD_LIMIT)."""
    lines: list[str] = []
    for line in message.splitlines(keepends=True):
        if line in (b"\r\n", b"\n", b"\r"):
            return lines, False
        lines.append(printable(line.rstrip(b"\r\n").decode("utf-8", errors="replace")))
    return lines, len(message) >= HEAD_LIMIT


def print_list(items: list[QueueItem], out: TextIO) -> None:
    for item in items:
        print(summary(item), file=out)


def print_show(item: QueueItem, message: bytes, out: TextIO) -> None:
    env = item.envelope
    fields = [
        ("id", item.id),
        ("status", item.status.value),
        ("reason", printable(item.last_error or "")),
        ("queued", utc(item.created_at)),
        ("size", str(item.size)),
        ("sender", printable(env.mail_from) or "<>"),
        *[("recipient", printable(r)) for r in env.recipients],
        ("received from", printable(f"{env.helo} [{env.peer_host}]:{env.peer_port}")),
        ("tls", printable(env.tls or "no")),
        ("auth user", printable(env.auth_user or "-")),
        ("attempts", str(item.attempts)),
        ("destination", printable(item.destination or "-")),
    ]
    for name, value in fields:
        print(f"{name + ':':<15}{value}", file=out)
    lines, cut = header_block(message)
    print("", file=out)
    print("headers as they will be relayed:", file=out)
    for line in lines:
        print(line, file=out)
    if cut:
        print(f"(the header block goes on past the first {HEAD_LIMIT // 1024} KiB)", file=out)


def print_released(item: QueueItem, out: TextIO) -> None:
    print(f"{item.id} released: the router delivers it at its next look at the queue", file=out)


def print_deleted(item: QueueItem, warning: str | None, out: TextIO, err: TextIO) -> None:
    print(f"{item.id} deleted", file=out)
    if warning is not None:
        print(f"dcrouter quarantine: warning: {warning}", file=err)
