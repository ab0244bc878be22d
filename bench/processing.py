"""bench/processing: what the processing chain costs per message, and what it does to the receive rate.

    python -m bench.processing            # full run (a couple of minutes)
    python -m bench.processing --quick    # short run

1. Per-message processing time (p50/p99 wall, CPU) of dcrouter's chain, in process with the real reactor and
   thread pool: metadata (header block + streaming MIME walk), the attachment scanner, the built-in spam
   heuristics (action tag), an addHeader transformation and RSA-2048 DKIM signing, for a 10 KB message and
   a 10 MB message (text plus a 10 MB base64 attachment, spooled to a file as ingress would). Side by side, in
   the same run, the conventional way of doing the same inspection and signing in Python: ``email``
   parsing the whole message and dkimpy signing it (the library dcrouter's DKIM replaced for streaming); its
   peak memory is printed next to dcrouter's.
2. Receive rate with processing on versus off: ``twistd dcrouter`` twice (disk queue, delivery paused, as in
   bench/ingress), 10 KB messages from 10 concurrent senders; the chain of (1) on one, nothing on the other.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import email
import email.policy
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import dkim
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.threadpool import ThreadPool

from bench import smtpload
from bench.ingress import HOST, RECIPIENT_DOMAIN, Dcrouter, machine_lines, raise_nofile_limit
from bench.ingress import cpu_seconds as process_cpu_seconds

KEY_PATH = "dkim.pem"
PROCESSING_CONFIG = """
contentScanning = true
scanners = [
  {{ type = "attachment", blockedExtensions = [".exe", ".bat", ".scr"], action = "reject" }},
  {{ type = "spam", threshold = 5.0, action = "tag" }},
]
transformations = [
  {{ type = "addHeader", header = "X-Gateway", value = "bench {{queueId}}" }},
  {{ type = "dkimSign", domains = ["bench.invalid"], domainName = "bench.invalid", keySelector = "s1",\
 privateKey = "{key}" }},
]
"""


def make_message(size: int) -> bytes:
    """A From/To/Subject/Date/Message-ID message of about ``size`` bytes: text, plus a base64 PDF-named
    attachment carrying the bulk when ``size`` is over 64 KiB."""
    head = (
        b"From: Sender <loadgen@bench.invalid>\r\nTo: user@bench.example\r\nSubject: benchmark message\r\n"
        b"Date: Wed, 25 Nov 2026 12:00:00 +0000\r\nMessage-ID: <bench@bench.invalid>\r\nMIME-Version: 1.0\r\n"
    )
    text = b"".join(b"line %05d of ordinary text that a scanner reads through\r\n" % i for i in range(100))
    if size <= 64 * 1024:
        body = text * max(1, size // len(text))
        content_type = b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        return head + content_type + body[: max(0, size - len(head) - len(content_type))]
    raw = os.urandom(size * 3 // 4)
    encoded = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    return (
        head + b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text + b"\r\n"
        b'--b1\r\nContent-Type: application/pdf; name="report.pdf"\r\nContent-Transfer-Encoding: base64\r\n'
        b'Content-Disposition: attachment; filename="report.pdf"\r\n\r\n' + encoded + b"--b1--\r\n"
    )


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def run_on_reactor(work: Callable[[Any], Deferred]) -> Any:
    """Run ``work(reactor)`` on a fresh reactor in this process and return its result."""
    from twisted.internet import reactor

    box: dict[str, Any] = {}

    def start() -> None:
        d = work(reactor)

        def done(result: Any) -> None:
            box["result"] = result
            reactor.stop()

        def failed(failure: Any) -> None:
            box["error"] = failure
            reactor.stop()

        d.addCallbacks(done, failed)

    reactor.callWhenRunning(start)
    reactor.run()
    if "error" in box:
        box["error"].raiseException()
    return box["result"]


def measure_dcrouter(reactor: Any, workdir: str, key_path: str, samples: dict[int, int]) -> Deferred:
    import tomllib

    from dcrouter.config.load import load_options
    from dcrouter.mail.envelope import Envelope
    from dcrouter.mail.spooled import SpooledMessage
    from dcrouter.processing.build import build_chain
    from dcrouter.processing.processor import EmailProcessor
    from dcrouter.queue.memory import MemoryQueue

    raw = tomllib.loads(
        "[smtpConfig]\nports = [2525]\nhostname = 'bench.invalid'\nqueueStorage = 'memory'\n"
        "implicitTlsPorts = []\nsubmissionPorts = []\ndefaultServer = '127.0.0.1'\n"
        + PROCESSING_CONFIG.format(key=key_path)
    )
    config = load_options(raw).options.smtp_config
    assert config is not None
    pool = ThreadPool(minthreads=0, maxthreads=4, name="bench")
    pool.start()

    async def run() -> dict[int, dict[str, float]]:
        queue = MemoryQueue(clock=reactor)
        await queue.load()
        processor = EmailProcessor(
            queue, reactor.seconds, reactor=reactor, threadpool=pool, **build_chain(config, reactor).options()
        )
        results: dict[int, dict[str, float]] = {}
        for size, count in samples.items():
            data = make_message(size)
            path = os.path.join(workdir, "spool-template")
            with open(path, "wb") as f:
                f.write(data)
            times: list[float] = []
            cpu_before = time.process_time()
            peak = 0
            # The last message runs under tracemalloc for the peak (it slows allocation: not timed).
            for n in range(count + 1):
                if n == count:
                    cpu = time.process_time() - cpu_before
                    tracemalloc.start()
                if len(data) > 256 * 1024:
                    spooled_path = os.path.join(workdir, f"spool-{n}")
                    shutil.copyfile(path, spooled_path)
                    message = SpooledMessage(len(data), path=spooled_path)
                else:
                    message = SpooledMessage(len(data), data=data)
                envelope = Envelope("loadgen@bench.invalid", [f"user@{RECIPIENT_DOMAIN}"])
                started = time.perf_counter()
                item = await processor.process(envelope, message)
                if n < count:
                    times.append(time.perf_counter() - started)
                await queue.dequeue(item.id)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            results[size] = summary(times, cpu, count, peak)
        return results

    def finish(result: Any) -> Any:
        pool.stop()
        return result

    return ensureDeferred(run()).addBoth(finish)


def measure_conventional(key_pem: bytes, samples: dict[int, int]) -> dict[int, dict[str, float]]:
    """``email`` parsing the whole message, walking its parts, then dkimpy signing it: per message."""
    results = {}
    for size, count in samples.items():
        data = make_message(size)
        times = []
        cpu_before = time.process_time()
        for n in range(count + 1):
            if n == count:
                cpu = time.process_time() - cpu_before
                tracemalloc.start()
            started = time.perf_counter()
            parsed = email.message_from_bytes(data, policy=email.policy.default)
            for part in parsed.walk():
                part.get_filename()
                if part.get_content_maintype() == "text":
                    part.get_content()
            dkim.sign(data, b"s1", b"bench.invalid", key_pem, include_headers=[b"from", b"to", b"subject"])
            if n < count:
                times.append(time.perf_counter() - started)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        results[size] = summary(times, cpu, count, peak)
    return results


def summary(times: list[float], cpu: float, count: int, peak: int) -> dict[str, float]:
    return {
        "p50_ms": percentile(times, 50) * 1000,
        "p99_ms": percentile(times, 99) * 1000,
        "mean_ms": statistics.fmean(times) * 1000,
        "cpu_ms": cpu / count * 1000,
        "peak_mb": peak / 1e6,
    }


class ProcessingDcrouter(Dcrouter):
    name = "dcrouter-processing"
    label = "processing on"

    def __init__(self, workdir: str, key_path: str) -> None:
        super().__init__(workdir)
        self.key_path = key_path

    def command(self, directory: str) -> tuple[list[str], dict[str, str]]:
        argv, env = super().command(directory)
        config = argv[argv.index("--config") + 1]
        with open(config) as f:
            text = f.read()
        head, sep, rest = text.partition("# This benchmark measures")
        with open(config, "w") as f:
            f.write(head + PROCESSING_CONFIG.format(key=self.key_path) + sep + rest)
        return argv, env


def receive_rate(server: Dcrouter, messages: int, senders: int) -> dict[str, float]:
    server.start()
    try:
        before = process_cpu_seconds(server.pid)
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
        cpu = process_cpu_seconds(server.pid) - before
    finally:
        server.stop()
    print(f"  {server.label:15} {result.rate:8.1f} msg/s  ok {result.ok} errors {result.errors}", flush=True)
    return {
        "rate": result.rate,
        "errors": result.errors,
        "p99_ms": result.percentile(99) * 1000,
        "cpu_ms": cpu / max(1, result.ok) * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.processing", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Short run.")
    parser.add_argument("--small", type=int, help="10 KB messages processed (default 500, quick 100).")
    parser.add_argument("--large", type=int, help="10 MB messages processed (default 10, quick 3).")
    parser.add_argument("--messages", type=int, help="Messages per receive-rate run (2000; quick 400).")
    parser.add_argument("--repeat", type=int, help="Receive-rate runs per side, median shown (default 3).")
    args = parser.parse_args(argv)
    small = args.small or (100 if args.quick else 500)
    large = args.large or (3 if args.quick else 10)
    messages = args.messages or (400 if args.quick else 2000)
    repeat = args.repeat or (1 if args.quick else 3)
    raise_nofile_limit()
    workdir = tempfile.mkdtemp(prefix="dcrouter-bench-processing-")
    arguments = sys.argv[1:] if argv is None else argv
    command = "python -m bench.processing" + "".join(f" {a}" for a in arguments)
    print("bench/processing: dcrouter's processing chain per message; the receive rate with it on and off")
    print(f"command     {command}")
    for line in machine_lines(workdir):
        print(line)
    from dcrouter.mail.dkimkeys import generate_private_key, private_key_pem

    key_pem = private_key_pem(generate_private_key("rsa", 2048))
    key_path = os.path.join(workdir, KEY_PATH)
    with open(key_path, "wb") as f:
        f.write(key_pem)
    samples = {10 * 1024: small, 10 * 1024 * 1024: large}
    try:
        print("\n== per message (in process)", flush=True)
        ours = run_on_reactor(lambda reactor: measure_dcrouter(reactor, workdir, key_path, samples))
        peer = measure_conventional(key_pem, samples)
        rows = []
        for size in samples:
            a, b = ours[size], peer[size]
            rows.append(
                f"| {size // 1024 if size < 1 << 20 else size >> 20} {'KB' if size < 1 << 20 else 'MB'} "
                f"| {samples[size]} | {a['p50_ms']:.2f} / {a['p99_ms']:.2f} "
                f"| {b['p50_ms']:.2f} / {b['p99_ms']:.2f} "
                f"| {a['cpu_ms']:.2f} / {b['cpu_ms']:.2f} | {a['peak_mb']:.1f} / {b['peak_mb']:.1f} |"
            )
        print()
        print(
            "| message | messages | dcrouter chain p50 / p99 ms | email+dkimpy p50 / p99 ms "
            "| CPU ms/msg dcr / peer | peak traced MB dcr / peer |"
        )
        print("|---|---|---|---|---|---|")
        for row in rows:
            print(row)
        print("\n== receive rate, 10 KB, 10 senders (twistd, disk queue, delivery paused)", flush=True)
        off = Dcrouter(workdir)
        off.label = "processing off"
        on = ProcessingDcrouter(workdir, key_path)
        runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
        for _ in range(repeat):
            runs["off"].append(receive_rate(off, messages, 10))
            runs["on"].append(receive_rate(on, messages, 10))
        med = {k: sorted(v, key=lambda r: r["rate"])[len(v) // 2] for k, v in runs.items()}
        print()
        print("| processing | msg/s | p99 ms | server CPU ms/msg |")
        print("|---|---|---|---|")
        for k in ("off", "on"):
            r = med[k]
            print(f"| {k} | {r['rate']:.0f} | {r['p99_ms']:.1f} | {r['cpu_ms']:.2f} |")
        print(f"\non/off: {med['on']['rate'] / med['off']['rate']:.2f}x")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
