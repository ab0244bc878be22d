"""Disk queue figures: enqueue throughput with group commit, and start-up and ``get_next`` with 100,000 items.

Run: ``python -m bench.queue_startup [--items 100000] [--directory DIR]``. Prints one line per figure.

1. Enqueue rate for 10 KB inline messages with 1, 10 and 100 enqueues in flight (the shape of 1, 10 and 100
   concurrent senders), and how many writes each commit carried.
2. Two queues of ``--items`` small items, filled, closed, then timed: ``load()`` (which verifies every row),
   then ``get_next``. Queue "due" has every item due; queue "waiting" is the worst case for the index walk:
   every item waits for a retry except the 100 newest, which come last in priority-then-age order.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Any

from twisted.internet import defer, task
from twisted.internet.task import Clock

from dcrouter.mail.envelope import Envelope
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.queue.disk import DiskQueue
from dcrouter.queue.item import Priority, QueueItem, QueueItemStatus

NOW = 1_700_000_000.0


def item(item_id: str, size: int, **fields: Any) -> QueueItem:
    envelope = Envelope(
        mail_from="sender@example.org",
        recipients=["rcpt@example.com"],
        helo="bench",
        peer_host="127.0.0.1",
        peer_port=40000,
        received_at=NOW,
    )
    return QueueItem(id=item_id, envelope=envelope, size=size, **fields)


async def fill(queue: DiskQueue, count: int, in_flight: int, body: bytes, make: Any) -> float:
    """Enqueue ``count`` items keeping ``in_flight`` outstanding; returns items per second."""
    started = time.perf_counter()
    issued = 0

    async def sender() -> None:
        nonlocal issued
        while issued < count:
            n = issued
            issued += 1
            await queue.enqueue(make(n), SpooledMessage(len(body), data=body))

    await defer.gatherResults([defer.Deferred.fromCoroutine(sender()) for _ in range(in_flight)])
    return count / (time.perf_counter() - started)


async def enqueue_rates(reactor: Any, directory: str) -> None:
    body = os.urandom(10 * 1024)
    for in_flight in (1, 10, 100):
        path = os.path.join(directory, f"rate-{in_flight}")
        queue = DiskQueue(path, reactor=reactor, clock=Clock())
        await queue.load()
        count = 1000 if in_flight == 1 else 5000
        rate = await fill(
            queue,
            count,
            in_flight,
            body,
            lambda n: item(f"R{n:09d}", len(body), created_at=NOW, next_attempt_at=NOW),
        )
        print(
            f"enqueue 10KB, {in_flight:3d} in flight: {rate:8.0f} msg/s, "
            f"{queue.committed_writes / queue.commits:6.1f} writes per commit"
        )
        await queue.save()
        shutil.rmtree(path)


async def startup(reactor: Any, directory: str, items: int, waiting: bool) -> None:
    name = "waiting" if waiting else "due"
    path = os.path.join(directory, f"startup-{name}")
    clock = Clock()
    clock.advance(NOW)
    body = b"x" * 1024

    def make(n: int) -> QueueItem:
        if waiting and n < items - 100:
            return item(
                f"S{n:09d}",
                len(body),
                created_at=NOW - items + n,
                next_attempt_at=NOW + 3600,
                status=QueueItemStatus.DEFERRED,
                attempts=1,
                priority=Priority.RETRY,
            )
        return item(
            f"S{n:09d}", len(body), created_at=NOW - items + n, next_attempt_at=NOW, priority=Priority.RETRY
        )

    queue = DiskQueue(path, reactor=reactor, clock=clock)
    await queue.load()
    rate = await fill(queue, items, 500, body, make)
    await queue.save()
    print(f"[{name}] filled {items} items of 1 KB at {rate:.0f} items/s")

    queue = DiskQueue(path, reactor=reactor, clock=clock)
    started = time.perf_counter()
    counts = await queue.load()
    print(f"[{name}] load(): {time.perf_counter() - started:.2f} s for {counts['items']} items")
    for count in (1, 100):
        started = time.perf_counter()
        claimed = await queue.get_next(count)
        print(
            f"[{name}] get_next({count}): {1000 * (time.perf_counter() - started):.1f} ms,"
            f" {len(claimed)} items"
        )
    started = time.perf_counter()
    rounds = 20
    for _ in range(rounds):
        await queue.get_next(10)
    print(
        f"[{name}] get_next(10) mean over {rounds}: {1000 * (time.perf_counter() - started) / rounds:.1f} ms"
    )
    await queue.save()
    shutil.rmtree(path)


async def main(reactor: Any, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--directory", help="where to build the queues (default: a temporary directory here)")
    options = parser.parse_args(argv)
    directory = options.directory or tempfile.mkdtemp(prefix="bench-queue-", dir=".")
    os.makedirs(directory, exist_ok=True)
    try:
        await enqueue_rates(reactor, directory)
        await startup(reactor, directory, options.items, waiting=False)
        await startup(reactor, directory, options.items, waiting=True)
    finally:
        if not options.directory:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
