"""bench/workers: the receive rate with processing on, ``workers = 2`` against ``workers = 1``, in one run.

    python -m bench.workers                 # 3 alternating runs per side, 2000 messages each
    python -m bench.workers --quick         # one run per side, 400 messages
    python -m bench.workers --queue disk    # the disk queue (a partition per worker) instead of Redis

Both sides are ``twistd dcrouter`` with the processing chain of bench/processing (metadata, attachment
scanner, spam heuristics, a header, RSA-2048 DKIM signing), the Redis queue (each side its own redis-server
with ``appendfsync always``) or with ``--queue disk`` the disk queue (each worker its own partition, in the
work directory), and delivery paused; 10 KB messages from 20 concurrent
senders. Redis's append-only file is on tmpfs (``/dev/shm``) unless ``--redis-on-disk``: on this shared VM
an fsync per write caps both sides at the same ~60 msg/s, which would measure the disk, not the cores.
Printed per side: msg/s (median run), p99, and the server's CPU per message, summed over the
supervisor and every worker (and over the one process with ``workers = 1``). The load generator runs on
the same machine and takes CPU from the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any

from bench import smtpload
from bench.ingress import (
    HOST,
    RECIPIENT_DOMAIN,
    REPO_ROOT,
    cpu_seconds,
    machine_lines,
    raise_nofile_limit,
    tree_cpu_seconds,
)
from bench.processing import KEY_PATH, ProcessingDcrouter


class WorkersDcrouter(ProcessingDcrouter):
    def __init__(self, workdir: str, key_path: str, workers: int, queue: str = "redis") -> None:
        super().__init__(workdir, key_path)
        self.workers = workers
        self.queue = queue
        self.name = f"dcrouter-workers-{workers}-{queue}"
        self.label = f"workers = {workers}"
        self.redis: Any = None
        self.redis_dir = workdir

    def command(self, directory: str) -> tuple[list[str], dict[str, str]]:
        argv, env = super().command(directory)
        config = argv[argv.index("--config") + 1]
        with open(config) as f:
            text = f.read()
        if self.queue == "redis":
            text = re.sub(
                r'queueStorage = "disk"\n',
                f'queueStorage = "redis"\nredisUrl = "{self.redis.url}"\n',
                text,
            )
        with open(config, "w") as f:
            f.write(f"workers = {self.workers}\n" + text)
        return argv, env

    def start(self) -> None:
        if self.redis is None and self.queue == "redis":
            sys.path.insert(0, REPO_ROOT)
            from tests.redis_server import SKIP_REASON, RedisServer  # the test suite's private redis-server

            if SKIP_REASON:
                raise RuntimeError(SKIP_REASON)
            self.redis = RedisServer(os.path.join(self.redis_dir, f"{self.name}-redis-{self.starts}"))
            self.redis.start()
        super().start()
        # The first worker greets before the others are ready: wait for every one.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as f:
                if f.read().count(b"dcrouter ready") >= self.workers:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.label}: not every worker became ready:\n" + self.log_tail())

    def stop(self) -> None:
        super().stop()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


def one_run(server: WorkersDcrouter, messages: int, senders: int) -> dict[str, float]:
    server.start()
    try:
        asyncio.run(
            smtpload.run_senders(
                HOST, server.port, senders, 50, 10 * 1024, recipient=f"user@{RECIPIENT_DOMAIN}", time_limit=60
            )
        )  # warm-up
        before = tree_cpu_seconds(server.pid)
        # With workers > 1 the process twistd started is the supervisor: its own share, apart.
        own_before = cpu_seconds(server.pid)
        result = asyncio.run(
            smtpload.run_senders(
                HOST,
                server.port,
                senders,
                messages,
                10 * 1024,
                recipient=f"user@{RECIPIENT_DOMAIN}",
                sender="loadgen@bench.invalid",
            )
        )
        cpu = tree_cpu_seconds(server.pid) - before
        own = cpu_seconds(server.pid) - own_before
    finally:
        server.stop()
    print(
        f"  {server.label:12} {result.rate:8.1f} msg/s  ok {result.ok} errors {result.errors}"
        f"  CPU {cpu / max(1, result.ok) * 1000:.2f} ms/msg"
        f"  client CPU {result.client_cpu / max(1, result.ok) * 1000:.2f} ms/msg"
        + (f"  (supervisor {own / max(1, result.ok) * 1000:.2f} ms/msg)" if server.workers > 1 else ""),
        flush=True,
    )
    return {
        "rate": result.rate,
        "errors": result.errors,
        "p99_ms": result.percentile(99) * 1000,
        "cpu_ms": cpu / max(1, result.ok) * 1000,
        "client_cpu_ms": result.client_cpu / max(1, result.ok) * 1000,
        "supervisor_cpu_ms": own / max(1, result.ok) * 1000 if server.workers > 1 else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Short run.")
    parser.add_argument("--messages", type=int, help="Messages per run (default 2000; quick 400).")
    parser.add_argument("--repeat", type=int, help="Runs per side, alternating, median shown (default 3).")
    parser.add_argument("--senders", type=int, default=20, help="Concurrent senders (default 20).")
    parser.add_argument("--redis-on-disk", action="store_true", help="Redis's AOF in the work directory.")
    parser.add_argument(
        "--queue", choices=("redis", "disk"), default="redis", help="The queue of both sides (default redis)."
    )
    args = parser.parse_args(argv)
    messages = args.messages or (400 if args.quick else 2000)
    repeat = args.repeat or (1 if args.quick else 3)
    raise_nofile_limit()
    workdir = tempfile.mkdtemp(prefix="dcrouter-bench-workers-")
    arguments = sys.argv[1:] if argv is None else argv
    print("bench/workers: receive rate with processing on, workers = 2 against workers = 1")
    print("command     python -m bench.workers" + "".join(f" {a}" for a in arguments))
    for line in machine_lines(workdir):
        print(line)
    from dcrouter.mail.dkimkeys import generate_private_key, private_key_pem

    key_path = os.path.join(workdir, KEY_PATH)
    with open(key_path, "wb") as f:
        f.write(private_key_pem(generate_private_key("rsa", 2048)))
    try:
        sides = {n: WorkersDcrouter(workdir, key_path, n, args.queue) for n in (1, 2)}
        if args.queue == "disk":
            print(f"queue       disk, in {workdir} (a partition per worker)")
        elif not args.redis_on_disk and os.path.isdir("/dev/shm"):
            redis_dir = tempfile.mkdtemp(prefix="dcrouter-bench-workers-redis-", dir="/dev/shm")
            for side in sides.values():
                side.redis_dir = redis_dir
            print(f"redis       AOF (appendfsync always) on tmpfs {redis_dir}")
        runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
        print(f"\n== 10 KB, {args.senders} senders, {messages} messages per run", flush=True)
        for n in range(repeat):
            for count in (1, 2) if n % 2 == 0 else (2, 1):
                one, five, fifteen = os.getloadavg()
                print(f"  load average {one:.2f} {five:.2f} {fifteen:.2f}", flush=True)
                runs[count].append(one_run(sides[count], messages, args.senders))
        med = {k: sorted(v, key=lambda r: r["rate"])[len(v) // 2] for k, v in runs.items()}
        print()
        print(
            "| workers | msg/s (median) | runs msg/s | p99 ms | server CPU ms/msg | runs server CPU ms/msg "
            "| of which supervisor | client CPU ms/msg | errors |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for k in (1, 2):
            r = med[k]
            rates = ", ".join(f"{x['rate']:.0f}" for x in runs[k])
            errors = sum(int(x["errors"]) for x in runs[k])
            cpus = ", ".join(f"{x['cpu_ms']:.2f}" for x in runs[k])
            supervisor = sorted(x["supervisor_cpu_ms"] for x in runs[k])[len(runs[k]) // 2]
            print(
                f"| {k} | {r['rate']:.0f} | {rates} | {r['p99_ms']:.1f} | {r['cpu_ms']:.2f} | {cpus} "
                f"| {supervisor:.2f} | {r['client_cpu_ms']:.2f} | {errors} |"
            )
        print(f"\n2 workers / 1 worker: {med[2]['rate'] / med[1]['rate']:.2f}x")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if not args.redis_on_disk:
            for side in sides.values():
                if side.redis_dir != workdir:
                    shutil.rmtree(side.redis_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
