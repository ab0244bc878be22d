"""``dcrouter quarantine``: list, show, release and delete quarantined messages beside a running router.

The work is :mod:`dcrouter.queue.quarantine`'s, on the queue the configuration names, opened from this
process while the router runs:

- ``disk``: :meth:`DiskQueue.attach <dcrouter.queue.disk.DiskQueue.attach>`, never ``load()``: its recovery
  returns every DELIVERING claim to ready, which beside a running router would deliver those messages twice.
  The index is opened as it is (nothing created), in WAL mode (reads never wait for the router's commits),
  and a write waits up to :data:`~dcrouter.queue.disk.BUSY_TIMEOUT` seconds for the router's transaction. A
  release is one transaction guarded by the status; the router claims the message at its next look at the
  queue (``checkInterval``), as ``get_next`` is a query. A delete removes the row (and an inline body) in one
  transaction and the body file after the commit, as every removal from the queue does: a crash in between
  leaves an orphan, set aside at the next start, never a row without its body.
- ``disk`` with workers (``persistentPath/partitions/`` exists): a
  :class:`~dcrouter.queue.partitions.PartitionedQueue` holding no partition, which attaches to each as above
  and acts on the message in whichever partition has it.
- ``redis``: a :class:`~dcrouter.queue.redis.RedisQueue` of this process's own. Its ``load()`` recovery is
  written for processes sharing one Redis (only *expired* leases return to ready, only files older than two
  hours are touched, an item is set aside only if unchanged since read), so running it beside live routers
  is what starting one more router does; it costs one scan of every item.
- ``memory``: the queue lives inside the running process; nothing outside it can reach the queue.

Text that comes from a message (sender, recipients, reason, headers) is printed with control characters
escaped: a quarantined message is likely hostile, and its headers must not drive the operator's terminal.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TextIO

from dcrouter.interfaces import QueueUnavailable
from dcrouter.net.reactor import IRouterReactor
from dcrouter.queue import quarantine
from dcrouter.queue.contract import check_item_id
from dcrouter.queue.item import QueueItem

if TYPE_CHECKING:
    from dcrouter.config.smtp import SmtpConfig
    from dcrouter.interfaces import IDeliveryQueue

#: What ``show`` reads of a message (as relayed) to find its header block.
HEAD_LIMIT = 64 * 1024

ACTIONS = ("list", "show", "release", "delete")


class QuarantineError(Exception):
    """The action cannot be done; the message says why (naming the id), ``status`` is the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# -- running an action -------------------------------------------------------------------------------


async def run(
    config: SmtpConfig, action: str, item_id: str | None, out: TextIO, err: TextIO, *, reactor: IRouterReactor
) -> int:
    """Run ``action`` on the disk or Redis queue ``config`` names, opened beside the router that holds it,
    and close it again (it holds no claims, so closing returns none). Returns the exit status; errors are
    printed to ``err``."""
    try:
        _check_id(action, item_id)
        queue = await open_queue(config, reactor)
    except QuarantineError as e:
        return _failed(err, e)
    except QueueUnavailable as e:
        return _failed(err, QuarantineError(str(e)))
    try:
        await _act(queue, action, item_id, out, now=reactor.seconds)
    except (QuarantineError, quarantine.NotQuarantined, QueueUnavailable) as e:
        return _failed(err, e if isinstance(e, QuarantineError) else QuarantineError(str(e)))
    finally:
        await queue.save()
    return 0


async def open_queue(config: SmtpConfig, reactor: IRouterReactor) -> IDeliveryQueue:
    """The queue ``config`` names, opened from this process beside the router (see the module docstring).
    QueueUnavailable when it cannot be reached."""
    if config.queue_storage == "disk":
        from dcrouter.queue.disk import DiskQueue
        from dcrouter.queue.partitions import PartitionedQueue, existing_partitions

        if existing_partitions(config.persistent_path):
            # Workers: every partition, attached beside the worker holding it (dcrouter.queue.partitions).
            partitioned = PartitionedQueue(
                config.persistent_path,
                reactor=reactor,
                clock=reactor,
                owned=[],
                observe_others=True,
                foreign_removals=True,
            )
            await partitioned.load()
            return partitioned
        disk = DiskQueue(config.persistent_path, reactor=reactor, clock=reactor)
        await disk.attach()
        return disk
    from dcrouter.queue.redis import RedisQueue

    assert config.queue_storage == "redis" and config.redis_url is not None  # as the command checked
    redis = RedisQueue(
        config.redis_url,
        reactor=reactor,
        clock=reactor,
        body_directory=config.persistent_path,
        body_store=config.redis_body_store,
        consumer_host=config.redis_consumer_name,
    )
    await redis.load()
    return redis


async def _act(
    queue: IDeliveryQueue, action: str, item_id: str | None, out: TextIO, now: Callable[[], float]
) -> None:
    if action == "list":
        print_list(await quarantine.quarantined(queue), out)
    elif action == "show":
        item = await quarantine.get_quarantined(queue, _given(item_id))
        print_show(item, await quarantine.read_head(queue, item, HEAD_LIMIT), out)
    elif action == "release":
        print_released(await quarantine.release(queue, _given(item_id), now()), out)
    else:
        print_deleted(await quarantine.delete(queue, _given(item_id)), out)


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


def print_deleted(item: QueueItem, out: TextIO) -> None:
    print(f"{item.id} deleted", file=out)
