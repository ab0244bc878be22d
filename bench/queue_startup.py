"""Disk queue figures: enqueue throughput with group commit, and start-up and ``get_next`` with 100,000 items.

Run: ``python -m bench.queue_startup [--items 100000] [--directory DIR]``. Prints one line per figure.
``--big 100000,1000000`` instead measures start-up with a big queue (section 3 below) and nothing else.

1. Enqueue rate for 10 KB inline messages with 1, 10 and 100 enqueues in flight (the shape of 1, 10 and 100
   concurrent senders), and how many writes each commit carried.
2. Two queues of ``--items`` small items, filled, closed, then timed: ``load()`` (which verifies every row),
   then ``get_next``. Queue "due" has every item due; queue "waiting" is the worst case for the index walk:
   every item waits for a retry except the 100 newest, which come last in priority-then-age order.
3. ``--big N[,N...]``: a queue of N items (1 KB inline bodies, all waiting for a retry a day away, so that
   nothing is delivered during the run) is filled by writing the index directly -- one SQLite transaction
   of plain INSERTs, not N enqueues: the fill is not what is measured. Then, in this process: ``load()`` the
   old way (every row verified before it fires) and with ``background_verification``: time to ``load()``,
   to ``verified()``, ``get_next(10)`` latency after it, and the RSS this process grew by. Then dcrouter
   itself (``twistd -n dcrouter``, disk queue, ``maxConnections`` 1000): time from spawning it to the first
   ``220`` on its SMTP port, to the log line "items verified", its RSS then, and how long a management API
   queue page (``GET /api/v1/queue?limit=100``, first page and the one after) takes. The same start with an
   empty queue comes first: the difference is what the queue costs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from twisted.internet import defer, task
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from bench.ingress import REPO_ROOT, TWISTD, free_port, rss_kb, stop_process
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.queue.disk import DiskQueue
from dcrouter.queue.index import QueueIndex, _item_row
from dcrouter.queue.item import Priority, QueueItem, QueueItemStatus

NOW = 1_700_000_000.0
API_TOKEN = "bench-queue-startup-token"


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


def fill_directly(path: str, count: int) -> float:
    """Write ``count`` waiting items straight into a new queue's index in one transaction; returns seconds."""
    started = time.perf_counter()
    index = QueueIndex(path)
    index.open()
    now = time.time()
    body = b"x" * 1024
    conn = index.conn

    def rows(start: int, end: int) -> Any:
        for n in range(start, end):
            queued = item(
                f"B{n:09d}",
                len(body),
                created_at=now - count + n,
                next_attempt_at=now + 86400,
                status=QueueItemStatus.DEFERRED,
                attempts=1,
                destination="waiting.example",
            )
            yield (*_item_row(queued), None, queued.id)

    conn.execute("BEGIN")
    step = 50_000
    for start in range(0, count, step):
        end = min(count, start + step)
        conn.executemany(
            "INSERT INTO items (status, priority, created_at, next_attempt_at, destination, attempts,"
            " item, body_file, id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows(start, end),
        )
        conn.executemany(
            "INSERT INTO bodies (id, data) VALUES (?, ?)", ((f"B{n:09d}", body) for n in range(start, end))
        )
    conn.execute("COMMIT")
    index.close()
    return time.perf_counter() - started


def own_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def big_in_process(reactor: Any, path: str, count: int) -> None:
    for background in (False, True):
        label = "background" if background else "old way  "
        rss = own_rss_kb()
        queue = DiskQueue(path, reactor=reactor, clock=reactor, background_verification=background)
        started = time.perf_counter()
        await queue.load()
        loaded = time.perf_counter() - started
        probe = time.perf_counter()
        await queue.get_next(10)  # finds nothing while verifying, and must not wait for it
        probe_ms = 1000 * (time.perf_counter() - probe)
        await queue.verified()
        verified = time.perf_counter() - started
        claims = []
        for _ in range(20):
            one = time.perf_counter()
            await queue.get_next(10)
            claims.append(1000 * (time.perf_counter() - one))
        grown = (own_rss_kb() - rss) / 1024
        print(
            f"[{count} items, in process, {label}] load(): {loaded:.2f} s, verified: {verified:.2f} s,"
            f" get_next(10) during: {probe_ms:.1f} ms, after: {sorted(claims)[10]:.1f} ms median,"
            f" RSS grew {grown:.0f} MiB"
        )
        await queue.save()


def first_220(port: int, deadline: float) -> float:
    """Seconds until a connection to ``port`` reads a 220 greeting (retrying until ``deadline``)."""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                if s.recv(512).startswith(b"220"):
                    return time.monotonic()
        except OSError:
            time.sleep(0.01)
    raise RuntimeError("no 220 before the deadline")


def big_twistd(directory: str, path: str, count: int) -> None:
    port, api_port = free_port(), free_port()
    config = os.path.join(directory, "dcrouter.toml")
    with open(config, "w") as f:
        f.write(
            f"""# Generated by bench/queue_startup.py --big.
[smtpConfig]
ports = [{port}]
bindAddress = "127.0.0.1"
hostname = "dcrouter.bench.invalid"
implicitTlsPorts = []
submissionPorts = []
maxConnections = 1000
queueStorage = "disk"
persistentPath = "{path}"

[apiConfig]
enabled = true
port = {api_port}
bindAddress = "127.0.0.1"
tokens = [{{ name = "bench", tokenHash = "sha256${hashlib.sha256(API_TOKEN.encode()).hexdigest()}" }}]
"""
        )
    log_path = os.path.join(directory, f"dcrouter-{count}.log")  # one per run: twistd appends
    pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "--logfile", log_path, "dcrouter"]
    started = time.monotonic()
    process = subprocess.Popen(
        [*argv, "--config", config], env=dict(os.environ, PYTHONPATH=pythonpath), cwd=directory
    )
    try:
        greeted = first_220(port, started + 120) - started
        verified = None
        while time.monotonic() < started + 300:
            with open(log_path, errors="replace") as f:
                if "items verified" in f.read():
                    verified = time.monotonic() - started
                    break
            time.sleep(0.05)
        rss = rss_kb(process.pid) / 1024
        pages = []
        cursor = ""
        for _ in range(2):
            one = time.monotonic()
            url = f"http://127.0.0.1:{api_port}/api/v1/queue?limit=100{cursor}"
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {API_TOKEN}"})
            with urllib.request.urlopen(request, timeout=30) as response:
                page = json.loads(response.read())
            pages.append(1000 * (time.monotonic() - one))
            cursor = f"&cursor={page.get('cursor')}" if page.get("cursor") else ""
        print(
            f"[{count} items, twistd] first 220: {greeted:.2f} s, items verified: "
            f"{'-' if verified is None else f'{verified:.2f}'} s, RSS {rss:.0f} MiB, API queue page: "
            + ", ".join(f"{ms:.0f} ms" for ms in pages)
        )
    finally:
        stop_process(process)


async def big(reactor: Any, directory: str, sizes: list[int], twistd: bool, in_process: bool = True) -> None:
    if twistd:
        # The baseline: the same start with an empty queue (imports, configuration, listeners).
        await deferToThread(big_twistd, directory, os.path.join(directory, "empty"), 0)
    for count in sizes:
        path = os.path.join(directory, f"big-{count}")
        seconds = fill_directly(path, count)
        size = os.path.getsize(os.path.join(path, "index.sqlite")) >> 20
        print(f"[{count} items] filled by direct index writes in {seconds:.1f} s ({size} MiB index)")
        if in_process:
            await big_in_process(reactor, path, count)
        if twistd:
            await deferToThread(big_twistd, directory, path, count)
        shutil.rmtree(path)


async def main(reactor: Any, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--directory", help="where to build the queues (default: a temporary directory here)")
    parser.add_argument("--big", help="queue sizes for the start-up figures, comma-separated (section 3)")
    parser.add_argument("--no-twistd", action="store_true", help="with --big: in-process figures only")
    parser.add_argument("--twistd-only", action="store_true", help="with --big: dcrouter's figures only")
    options = parser.parse_args(argv)
    directory = options.directory or tempfile.mkdtemp(prefix="bench-queue-", dir=".")
    os.makedirs(directory, exist_ok=True)
    try:
        if options.big:
            sizes = [int(n.replace("_", "")) for n in options.big.split(",")]
            await big(
                reactor, os.path.abspath(directory), sizes, not options.no_twistd, not options.twistd_only
            )
            return
        await enqueue_rates(reactor, directory)
        await startup(reactor, directory, options.items, waiting=False)
        await startup(reactor, directory, options.items, waiting=True)
    finally:
        if not options.directory:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
