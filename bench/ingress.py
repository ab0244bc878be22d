"""bench/ingress: dcrouter's SMTP ingress side by side with a durable aiosmtpd peer, in one run.

    python -m bench.ingress            # full run (a few minutes)
    python -m bench.ingress --quick    # short run, smaller counts

Both servers run as real subprocesses on 127.0.0.1 with their store in a fresh temporary directory:
dcrouter as ``twistd -n dcrouter --config <generated toml>`` with a disk queue, the peer as
``python -m bench.aiosmtpd_peer`` (aiosmtpd, one fsynced file per message, directory fsynced, then 250).
Each measurement starts each server fresh.

1. Throughput: messages per second that got a 2xx after DATA (10 KB messages; 1, 10 and 100 concurrent
   senders, each one connection with EHLO once, then MAIL/RCPT/DATA repeatedly; a fixed number of messages
   per run; both servers up at once and their runs interleaved; the median of the repeats is shown).
2. Memory: growth of the server's RSS (VmRSS sampled every few ms from /proc) while it receives one 50 MB
   message.
3. Idle connections: 10,000 connections opened and greeted, held idle, then probed with NOOP; a fresh session
   is timed while they are held.

The load generator (bench/smtpload.py) is one asyncio process on the same machine, so it takes CPU from the
server under test; its CPU time is printed with each row. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import hashlib
import http.client
import http.server
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

from bench import smtpload

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
RECIPIENT_DOMAIN = "bench.example"
START_TIMEOUT = 30.0
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


#: Open files the run needs per process (set by main from --idle); None: as many as the hard limit allows.
NOFILE_WANTED: int | None = None


def raise_nofile_limit() -> None:
    """The open-files limit raised as dcrouter raises its own (dcrouter.net.fdlimit: the soft limit to what
    the run needs and, as root, the hard one too), in this process and, as preexec_fn, in each server."""
    from dcrouter.net.fdlimit import raise_nofile

    outcome = raise_nofile(NOFILE_WANTED)
    if not outcome.enough:
        print(f"bench/ingress: open files limit {outcome.after} short of {NOFILE_WANTED}: {outcome.error}",
              file=sys.stderr)


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 10 s: every benchmark's servers end the same way."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def log_tail(path: str, lines: int = 25) -> str:
    """The last ``lines`` lines of a server's log, indented, for failure messages."""
    try:
        with open(path, "rb") as f:
            text = f.read()[-8000:].decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its live children (dcrouter's supervisor and its workers; a process without
    children: its own), from /proc."""
    total = cpu_seconds(pid)
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    for child in children:
        try:
            total += tree_cpu_seconds(child)
        except OSError:
            pass
    return total


def rss_kb(pid: int) -> int:
    return smtpload.read_status_kb(pid, "VmRSS")["VmRSS"]


class ServerUnderTest:
    """A server run as a subprocess in its own temporary directory; stopped with SIGTERM, then SIGKILL."""

    name = ""
    label = ""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = ""
        self.starts = 0

    def command(self, directory: str) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        self.starts += 1
        directory = os.path.join(self.workdir, f"{self.name}-{self.starts}")
        os.makedirs(directory)
        self.port = free_port()
        argv, env = self.command(directory)
        self.log_path = os.path.join(directory, "server.log")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=raise_nofile_limit,  # noqa: PLW1509 (setrlimit only; the bench starts no threads first)
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.process.returncode} at start-up:\n"
                                   + self.log_tail())
            try:
                with socket.create_connection((HOST, self.port), timeout=1) as s:
                    s.settimeout(5)
                    if s.recv(4)[:3] == b"220":
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.label} did not greet on {HOST}:{self.port} within {START_TIMEOUT:.0f} s:\n"
                           + self.log_tail())

    def stop(self) -> None:
        stop_process(self.process)

    def log_tail(self, lines: int = 25) -> str:
        return log_tail(self.log_path, lines)


class AiosmtpdPeer(ServerUnderTest):
    name = "peer"
    label = "aiosmtpd+fsync"

    def command(self, directory: str) -> tuple[list[str], dict[str, str]]:
        store = os.path.join(directory, "messages")
        os.makedirs(store)
        argv = [sys.executable, "-m", "bench.aiosmtpd_peer", "--host", HOST, "--port", str(self.port),
                "--directory", store, "--max-size", str(64 << 20)]
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        return argv, env


DCROUTER_CONFIG = """\
# Generated by bench/ingress.py for one run; see docs/performance.md.
[smtpConfig]
ports = [{port}]
bindAddress = "{host}"
hostname = "dcrouter.bench.invalid"
implicitTlsPorts = []
submissionPorts = []
maxMessageSize = {max_size}
maxConnections = {max_connections}
maxConnectionsPerIP = {max_connections}
maxQueueSize = 0
queueStorage = "disk"
persistentPath = "{queue}"
# This benchmark measures receiving and durably queueing (as the peer does); delivery is bench/relay's.
[smtpConfig.delivery]
paused = {paused}

[[smtpConfig.domainConfigs]]
domains = ["{domain}"]
targetIPs = ["127.0.0.1"]
port = {relay_port}
"""


class Dcrouter(ServerUnderTest):
    name = "dcrouter"
    label = "dcrouter"
    #: Where delivery goes, and whether it runs (only dcrouter-dkim-relay delivers).
    relay_port: int | None = None
    paused = True
    #: Seconds the large test keeps sampling RSS after the reply (delivery included, for a relay).
    settle = 0.5

    def command(self, directory: str) -> tuple[list[str], dict[str, str]]:
        config = os.path.join(directory, "dcrouter.toml")
        with open(config, "w") as f:
            f.write(DCROUTER_CONFIG.format(
                port=self.port, host=HOST, max_size=64 << 20, queue=os.path.join(directory, "queue"),
                domain=RECIPIENT_DOMAIN, relay_port=self.relay_port or free_port(),
                paused=str(self.paused).lower(),
                max_connections=max(20_000, (NOFILE_WANTED or 0) - 10_000),
            ))
        argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "dcrouter", "--config", config]
        pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, PYTHONPATH=pythonpath)
        return argv, env


#: Limits on every counted thing that the benchmark's load never reaches: what checking them costs.
LIMITS_NOT_HIT = """
[smtpConfig.rateLimits.anonymous]
connectionRate = [{ count = 10000000, window = 1000 }]
messages = [{ count = 10000000, window = 60000 }, { count = 10000000, window = 60000, per = "ipPrefix" }]
recipients = [{ count = 10000000, window = 60000, per = "recipientDomain" }]
bytes = [{ count = 2000000000, window = 1000 }]
"""


class DcrouterLimits(Dcrouter):
    """dcrouter with rate limits configured on connections, messages, recipients and bytes, none reached."""

    name = "dcrouter-limits"
    label = "dcrouter+limits"

    def command(self, directory: str) -> tuple[list[str], dict[str, str]]:
        argv, env = super().command(directory)
        with open(os.path.join(directory, "dcrouter.toml"), "a") as f:
            f.write(LIMITS_NOT_HIT)
        return argv, env


#: The management API, the metrics listener and a webhook on; see DcrouterObserved.
OBSERVED = """
[apiConfig]
enabled = true
bindAddress = "{host}"
port = {api_port}
tokens = [{{ name = "bench", tokenHash = "sha256${token_hash}", scope = "read" }}]

[metricsConfig]
enabled = true
bindAddress = "{host}"
port = {metrics_port}

[[events.webhooks]]
url = "http://{host}:{hook_port}/hook"
types = [{hook_types}]
secret = "bench-secret"
"""
OBSERVED_TOKEN = "bench-read-token"


class _HookReceiver(http.server.BaseHTTPRequestHandler):
    """A webhook receiver: reads the body, answers 204, counts (HTTP/1.1, keeping the connection)."""

    protocol_version = "HTTP/1.1"
    received = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).received += 1
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class DcrouterObserved(Dcrouter):
    """dcrouter operated as issue 15 means: the management API and the metrics listener on, a scraper
    fetching /metrics every second, one Server-Sent Events client subscribed to every event, and a signed
    webhook to a receiver in the bench process for what an operator is alerted about (bounces, deferrals,
    security events: none in this load, so the webhook costs its subscription only). Their client side runs
    in threads of the bench process (its CPU is the client's, not the server's)."""

    name = "dcrouter-observed"
    label = "dcrouter+observed"
    hook_types = '"message.bounced", "message.deferred", "security.*"'

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._hooks: http.server.ThreadingHTTPServer | None = None
        self._receiver: type[_HookReceiver] = _HookReceiver
        self.scrapes = 0
        self.stream_events = 0

    def command(self, directory: str) -> tuple[list[str], dict[str, str]]:
        argv, env = super().command(directory)
        self.api_port, metrics_port = free_port(), free_port()
        # A receiver class per server, so each counts its own posts.
        self._receiver = type("HookReceiver", (_HookReceiver,), {"received": 0})
        self._hooks = http.server.ThreadingHTTPServer((HOST, 0), self._receiver)
        self._hooks.daemon_threads = True
        with open(os.path.join(directory, "dcrouter.toml"), "a") as f:
            f.write(OBSERVED.format(
                host=HOST, api_port=self.api_port, metrics_port=metrics_port,
                token_hash=hashlib.sha256(OBSERVED_TOKEN.encode()).hexdigest(),
                hook_port=self._hooks.server_address[1], hook_types=self.hook_types,
            ))
        return argv, env

    def start(self) -> None:
        super().start()
        self._stop.clear()
        assert self._hooks is not None
        hooks = self._hooks
        self._threads = [
            threading.Thread(target=hooks.serve_forever, daemon=True),
            threading.Thread(target=self._scrape, daemon=True),
            threading.Thread(target=self._stream, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.process is not None and self.process.poll() is None:
            print(f"  {self.label}: {self.scrapes} scrapes, {self.stream_events} events streamed, "
                  f"{self._receiver.received} webhook posts so far", flush=True)
        if self._hooks is not None:
            self._hooks.shutdown()
            self._hooks.server_close()
            self._hooks = None
        super().stop()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def _get(self, path: str, timeout: float) -> http.client.HTTPResponse:
        connection = http.client.HTTPConnection(HOST, self.api_port, timeout=timeout)
        connection.request("GET", path, headers={"Authorization": f"Bearer {OBSERVED_TOKEN}"})
        return connection.getresponse()

    def _scrape(self) -> None:
        while not self._stop.wait(1.0):
            try:
                response = self._get("/metrics", 5)
                response.read()
                self.scrapes += response.status == 200
            except OSError:
                pass

    def _stream(self) -> None:
        while not self._stop.is_set():
            try:
                response = self._get("/api/v1/events", 2)
                while not self._stop.is_set():
                    line = response.readline()
                    if not line:
                        break
                    self.stream_events += line.startswith(b"event:")
            except OSError:  # a read timeout while idle, or the server stopping: connect again
                self._stop.wait(0.2)


class DcrouterObservedHooks(DcrouterObserved):
    """As DcrouterObserved, with the webhook also sent every queued message: one signed HTTP POST per
    message (what a per-message webhook costs)."""

    name = "dcrouter-observed-hooks"
    label = "dcrouter+observed+hook/msg"
    hook_types = '"message.queued", "message.bounced", "message.deferred", "security.*"'


class DcrouterDkim(Dcrouter):
    """dcrouter DKIM-signing what it receives (the load generator's From domain, an RSA 2048 key): for the
    memory of a large message signed on its way through (issue 14: < 8 MiB of RSS growth at 50 MB)."""

    name = "dcrouter-dkim"
    label = "dcrouter+dkim"

    def command(self, directory: str) -> tuple[list[str], dict[str, str]]:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        argv, env = super().command(directory)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_path = os.path.join(directory, "dkim.pem")
        with open(key_path, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        with open(os.path.join(directory, "dcrouter.toml"), "a") as f:
            f.write(f"""
[[smtpConfig.domainConfigs]]
domains = ["bench.invalid"]
targetIPs = ["127.0.0.1"]
signDkim = true
dkimOptions = {{ domainName = "bench.invalid", keySelector = "bench", privateKey = "{key_path}" }}
""")
        return argv, env


class DcrouterDkimRelay(DcrouterDkim):
    """dcrouter+dkim relaying to an aiosmtpd sink (bench.aiosmtpd_peer): the large test then samples RSS
    through signing, queueing and the delivery of the message."""

    name = "dcrouter-dkim-relay"
    label = "dcrouter+dkim relay"
    paused = False
    settle = 20.0

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.sink = AiosmtpdPeer(workdir)
        self.sink.name = "sink"

    def start(self) -> None:
        self.sink.start()
        self.relay_port = self.sink.port
        super().start()

    def stop(self) -> None:
        super().stop()
        self.sink.stop()


# -- measurements --------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    messages: int
    senders: list[int]
    message_size: int
    large_size: int
    idle: int
    hold: float
    idle_parallel: int
    time_limit: float
    repeat: int
    pipelining: bool


def one_throughput_run(server: ServerUnderTest, plan: Plan, senders: int) -> dict[str, Any]:
    cpu_before = cpu_seconds(server.pid)
    result = asyncio.run(smtpload.run_senders(
        HOST, server.port, senders, plan.messages, plan.message_size,
        recipient=f"user@{RECIPIENT_DOMAIN}", time_limit=plan.time_limit, pipelining=plan.pipelining,
    ))
    run = {
        "rate": result.rate, "ok": result.ok, "errors": result.errors, "elapsed": result.elapsed,
        "timed_out": result.timed_out, "connect_failures": result.connect_failures,
        "p50_ms": result.percentile(50) * 1000, "p99_ms": result.percentile(99) * 1000,
        "server_cpu": cpu_seconds(server.pid) - cpu_before, "client_cpu": result.client_cpu,
        "error_kinds": dict(result.error_kinds.most_common(5)),
    }
    print(f"  {server.label:15} {senders:4} senders: {result.rate:8.1f} msg/s  ok {result.ok}"
          f"  errors {result.errors}  p99 {run['p99_ms']:.1f} ms", flush=True)
    return run


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats; errors and failures summed (an error in any run is an error)."""
    kinds: dict[str, int] = {}
    for run in runs:
        for kind, n in run["error_kinds"].items():
            kinds[kind] = kinds.get(kind, 0) + n
    summary: dict[str, Any] = {key: median([r[key] for r in runs])
                               for key in ("rate", "p50_ms", "p99_ms", "server_cpu", "client_cpu")}
    summary.update({
        "rates": [r["rate"] for r in runs], "ok": sum(r["ok"] for r in runs),
        "errors": sum(r["errors"] for r in runs), "timed_out": any(r["timed_out"] for r in runs),
        "connect_failures": sum(r["connect_failures"] for r in runs), "error_kinds": kinds, "runs": runs,
    })
    return summary


def measure_throughput(servers: list[ServerUnderTest], plan: Plan) -> dict[str, dict[str, Any]]:
    """Every server up at once; runs interleaved (peer, dcrouter, dcrouter, peer, ...) so drift in the disk's
    fsync latency hits both alike. Each server gets a short uncounted warm-up first."""
    out: dict[str, dict[str, Any]] = {}
    running = []
    for server in servers:
        try:
            server.start()
        except RuntimeError as e:
            print(f"  {server.label}: not measured: {e}", flush=True)
            out[server.name] = {"error": str(e).splitlines()[0]}
            continue
        asyncio.run(smtpload.run_senders(HOST, server.port, 10, 50, plan.message_size,
                                         recipient=f"user@{RECIPIENT_DOMAIN}", time_limit=30))
        running.append(server)
        out[server.name] = {}
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for senders in plan.senders:
        for repeat in range(plan.repeat):
            order = running if repeat % 2 == 0 else running[::-1]
            for server in order:
                if server.process is None or server.process.poll() is not None:
                    continue
                try:
                    run = one_throughput_run(server, plan, senders)
                except Exception as e:  # noqa: BLE001 - recorded, the other server still gets measured
                    print(f"  {server.label}: run failed: {type(e).__name__}: {e}", flush=True)
                    continue
                runs.setdefault((server.name, senders), []).append(run)
    for server in running:
        if server.process is not None and server.process.poll() is not None:
            print(f"  {server.label} exited during the throughput runs:\n{server.log_tail()}", flush=True)
        server.stop()
        for senders in plan.senders:
            if (server.name, senders) in runs:
                out[server.name][str(senders)] = summarise(runs[(server.name, senders)])
    return out


def measure_large(server: ServerUnderTest, plan: Plan) -> dict[str, Any]:
    result = asyncio.run(smtpload.send_large(HOST, server.port, server.pid, plan.large_size,
                                             recipient=f"user@{RECIPIENT_DOMAIN}",
                                             settle=getattr(server, "settle", 0.5)))
    out = dataclasses.asdict(result)
    out["rss_growth_kb"] = result.rss_growth_kb
    out["hwm_growth_kb"] = result.hwm_growth_kb
    print(f"  {server.label:15} {plan.large_size / 2**20:.0f} MB message: {result.reply}; RSS growth "
          f"{result.rss_growth_kb / 1024:.1f} MB ({result.samples} samples)", flush=True)
    return out


def measure_idle(server: ServerUnderTest, plan: Plan) -> dict[str, Any]:
    sources = [f"127.0.0.{i}" for i in range(2, 2 + max(1, math.ceil(plan.idle / 1000)))]
    pid = server.pid
    result = asyncio.run(smtpload.hold_idle(HOST, server.port, plan.idle, sources, hold=plan.hold,
                                            parallel=plan.idle_parallel, server_rss=lambda: rss_kb(pid)))
    out = dataclasses.asdict(result)
    out["failures"] = dict(result.failures.most_common(5))
    print(f"  {server.label:15} {plan.idle} idle: greeted {result.greeted}, alive after {plan.hold:.0f} s "
          f"{result.alive}, fresh session {'ok' if result.fresh_ok else 'FAILED'} "
          f"{result.fresh_ms:.1f} ms", flush=True)
    return out


MEASUREMENTS: dict[str, Callable[[ServerUnderTest, Plan], dict[str, Any]]] = {
    "large": measure_large,
    "idle": measure_idle,
}


# -- report --------------------------------------------------------------------------------


def ratio(dcrouter: float | None, peer: float | None) -> str:
    if dcrouter is None or peer is None or not peer or math.isnan(dcrouter) or math.isnan(peer):
        return "n/a"
    value = dcrouter / peer
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.3f}x"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=False)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) + " |" for row in rows
    ]
    return "\n".join(lines)


def get(results: dict[str, Any], server: str, test: str) -> dict[str, Any] | None:
    entry = results.get(server, {}).get(test)
    return entry if isinstance(entry, dict) and "error" not in entry else None


def report_throughput(results: dict[str, Any], plan: Plan) -> str:
    peer, dcr = get(results, "peer", "throughput"), get(results, "dcrouter", "throughput")
    rows = []
    for senders in plan.senders:
        p = peer.get(str(senders)) if peer else None
        d = dcr.get(str(senders)) if dcr else None

        def cell(r: dict[str, Any] | None, key: str, fmt: str) -> str:
            return format(r[key], fmt) if r else "n/a"

        def spread(r: dict[str, Any] | None) -> str:
            return f"{min(r['rates']):.0f}-{max(r['rates']):.0f}" if r else "n/a"

        def per_message_ms(r: dict[str, Any] | None, key: str) -> str:
            return f"{r[key] / plan.messages * 1000:.2f}" if r else "n/a"

        rows.append([
            str(senders), cell(p, "rate", ".0f"), cell(d, "rate", ".0f"),
            ratio(d["rate"] if d else None, p["rate"] if p else None),
            f"{spread(p)} / {spread(d)}",
            f"{cell(p, 'errors', 'd')} / {cell(d, 'errors', 'd')}",
            f"{cell(p, 'p99_ms', '.1f')} / {cell(d, 'p99_ms', '.1f')}",
            f"{per_message_ms(p, 'server_cpu')} / {per_message_ms(d, 'server_cpu')}",
            f"{per_message_ms(p, 'client_cpu')} / {per_message_ms(d, 'client_cpu')}",
        ])
    title = (f"Throughput: {plan.message_size // 1024} KB messages, {plan.messages} per run, median of "
             f"{plan.repeat} run(s); msg/s acknowledged with 2xx after DATA")
    header = ["senders", "aiosmtpd+fsync msg/s", "dcrouter msg/s", "dcrouter/peer", "range peer / dcr",
              "errors peer / dcr", "p99 ms peer / dcr", "server CPU ms/msg", "client CPU ms/msg"]
    notes = []
    for name, entry in (("aiosmtpd+fsync", peer), ("dcrouter", dcr)):
        for senders, r in (entry or {}).items():
            if r["errors"] or r["timed_out"] or r["connect_failures"]:
                notes.append(f"  {name} at {senders} senders: {r['errors']} errors, "
                             f"{r['connect_failures']} connect failures, timed out: {r['timed_out']}, "
                             f"kinds: {r['error_kinds']}")
    report = "\n".join([title, "", table(header, rows), *notes])
    limited = get(results, "dcrouter-limits", "throughput")
    if limited is not None:
        report += "\n\n" + report_limits_cost(dcr, limited, plan)
    observed = get(results, "dcrouter-observed", "throughput")
    if observed is not None:
        title = ("API, metrics listener and events on (bench/ingress.py OBSERVED: /metrics scraped every "
                 "second, one SSE client of every event, a webhook for bounces, deferrals and security), "
                 "same run")
        report += "\n\n" + report_cost(dcr, observed, plan, "dcrouter+observed", title)
    hooks = get(results, "dcrouter-observed-hooks", "throughput")
    if hooks is not None:
        title = "As above, and the webhook also sent every queued message (one POST per message), same run"
        report += "\n\n" + report_cost(dcr, hooks, plan, "dcrouter+observed+hook/msg", title)
    return report


def report_cost(
    plain: dict[str, Any] | None, other: dict[str, Any], plan: Plan, label: str, title: str
) -> str:
    """dcrouter with something on (``label``) against plain dcrouter, same run: msg/s and server CPU per
    message, and the cost of each (CPU per message is the steadier figure on a shared machine)."""
    rows = []
    for senders in plan.senders:
        p = plain.get(str(senders)) if plain else None
        q = other.get(str(senders))
        cost = f"{(1 - q['rate'] / p['rate']) * 100:+.1f}%" if p and q and p["rate"] else "n/a"
        cpu_cost = (f"{(q['server_cpu'] / p['server_cpu'] - 1) * 100:+.1f}%"
                    if p and q and p["server_cpu"] else "n/a")
        # Runs i of both servers are next to each other in time (interleaved): the median of their ratios
        # cancels much of the machine's drift that the ratio of the two medians keeps.
        paired = "n/a"
        if p and q:
            ratios = [b["server_cpu"] / a["server_cpu"] for a, b in zip(p["runs"], q["runs"], strict=False)
                      if a["server_cpu"]]
            paired = f"{(median(ratios) - 1) * 100:+.1f}%" if ratios else "n/a"

        def cpu(r: dict[str, Any] | None) -> str:
            return f"{r['server_cpu'] / plan.messages * 1000:.3f}" if r else "n/a"

        rows.append([
            str(senders), f"{p['rate']:.0f}" if p else "n/a", f"{q['rate']:.0f}" if q else "n/a", cost,
            f"{cpu(p)} / {cpu(q)}", cpu_cost, paired, f"{q['errors']}" if q else "n/a",
        ])
    header = ["senders", "dcrouter msg/s", f"{label} msg/s", "throughput cost",
              "server CPU ms/msg without / with", "CPU cost", "CPU cost, paired runs", f"errors ({label})"]
    return "\n".join([title, "", table(header, rows)])


def report_limits_cost(plain: dict[str, Any] | None, limited: dict[str, Any], plan: Plan) -> str:
    """dcrouter with rate limits configured but not reached against dcrouter without (docs/limits.md)."""
    title = "Rate limits configured but not reached (bench/ingress.py LIMITS_NOT_HIT), same run"
    return report_cost(plain, limited, plan, "dcrouter+limits", title)


def report_large(results: dict[str, Any], plan: Plan) -> str:
    peer, dcr = get(results, "peer", "large"), get(results, "dcrouter", "large")

    def mb(r: dict[str, Any] | None, key: str) -> float | None:
        return r[key] / 1024 if r and r.get(key) is not None else None

    def fmt(value: float | None, spec: str = ".1f") -> str:
        return "n/a" if value is None else format(value, spec)

    rows = []
    for label, key in (("RSS before (MB)", "rss_before_kb"), ("peak RSS growth (MB)", "rss_growth_kb"),
                       ("VmHWM growth (MB, cross-check)", "hwm_growth_kb")):
        rows.append([label, fmt(mb(peer, key)), fmt(mb(dcr, key)), ratio(mb(dcr, key), mb(peer, key))])
    peer_s, dcr_s = (peer["elapsed"] if peer else None), (dcr["elapsed"] if dcr else None)
    rows.append(["transfer + reply (s)", fmt(peer_s, ".2f"), fmt(dcr_s, ".2f"), ratio(dcr_s, peer_s)])
    rows.append(["RSS samples", fmt(peer and peer["samples"], "d"), fmt(dcr and dcr["samples"], "d"), ""])
    rows.append(["reply", peer["reply"][:40] if peer else "n/a", dcr["reply"][:40] if dcr else "n/a", ""])
    title = (f"Memory: one {plan.large_size / 2**20:.0f} MB message "
             "(VmRSS sampled every 3 ms; aim: dcrouter < 32 MB)")
    return "\n".join([title, "", table(["metric", "aiosmtpd+fsync", "dcrouter", "dcrouter/peer"], rows)])


def report_idle(results: dict[str, Any], plan: Plan) -> str:
    peer, dcr = get(results, "peer", "idle"), get(results, "dcrouter", "idle")

    def val(r: dict[str, Any] | None, key: str) -> Any:
        return r[key] if r else None

    def fmt(value: Any, spec: str = "d") -> str:
        return "n/a" if value is None else format(value, spec)

    def rss_growth(r: dict[str, Any] | None) -> float | None:
        return (r["server_rss_kb"] - r["server_rss_before_kb"]) / 1024 if r else None

    rows = [
        ["connections attempted", fmt(val(peer, "attempted")), fmt(val(dcr, "attempted")), ""],
        ["greeted with 220", fmt(val(peer, "greeted")), fmt(val(dcr, "greeted")),
         ratio(val(dcr, "greeted"), val(peer, "greeted"))],
        [f"answer NOOP after {plan.hold:.0f} s idle", fmt(val(peer, "alive")), fmt(val(dcr, "alive")),
         ratio(val(dcr, "alive"), val(peer, "alive"))],
        ["seconds to open all", fmt(val(peer, "open_seconds"), ".1f"), fmt(val(dcr, "open_seconds"), ".1f"),
         ratio(val(dcr, "open_seconds"), val(peer, "open_seconds"))],
        ["fresh session while held (ms)",
         fmt(val(peer, "fresh_ms"), ".1f") if peer and peer["fresh_ok"] else "failed" if peer else "n/a",
         fmt(val(dcr, "fresh_ms"), ".1f") if dcr and dcr["fresh_ok"] else "failed" if dcr else "n/a", ""],
        ["server RSS growth while held (MB)", fmt(rss_growth(peer), ".1f"), fmt(rss_growth(dcr), ".1f"),
         ratio(rss_growth(dcr), rss_growth(peer))],
    ]
    notes = [f"  {name}: {r['failures']}" for name, r in (("aiosmtpd+fsync", peer), ("dcrouter", dcr))
             if r and r["failures"]]
    sources = max(1, math.ceil(plan.idle / 1000))
    title = (f"Idle connections: {plan.idle} opened ({plan.idle_parallel} at a time) from {sources} "
             f"source addresses, held {plan.hold:.0f} s")
    header = ["metric", "aiosmtpd+fsync", "dcrouter", "dcrouter/peer"]
    return "\n".join([title, "", table(header, rows), *notes])


REPORTS = {"throughput": report_throughput, "large": report_large, "idle": report_idle}


def version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"], check=False,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--", "dcrouter", "twisted"],
                               check=False, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{' (with uncommitted changes)' if dirty else ''}" if rev else "unknown"


def filesystem_of(path: str) -> str:
    best, kind = "", "unknown"
    with open("/proc/mounts") as f:
        for line in f:
            device, mountpoint, fstype = line.split()[:3]
            inside = path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")
            if inside and len(mountpoint) >= len(best):
                best, kind = mountpoint, f"{fstype} on {device}"
    return kind


def machine_lines(workdir: str) -> list[str]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        memory = int(f.readline().split()[1]) // 1024
    return [
        f"date        {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        (f"machine     {os.cpu_count()} cores ({model}), {memory} MB RAM, "
         f"{platform.system()} {platform.release()}"),
        f"python      {platform.python_implementation()} {platform.python_version()}",
        (f"versions    Twisted {version('twisted')}, aiosmtpd {version('aiosmtpd')}, "
         f"dcrouter {version('dcrouter')} at {git_revision()}"),
        f"store       {workdir} ({filesystem_of(workdir)})",
        f"open files  {resource.getrlimit(resource.RLIMIT_NOFILE)[0]} (bench and servers)",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingress", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Short run: fewer messages and connections.")
    parser.add_argument("--servers", default="peer,dcrouter",
                        help="Comma-separated: peer, dcrouter, dcrouter-limits (limits set, not reached),"
                        " dcrouter-dkim (DKIM-signs what it receives), dcrouter-dkim-relay (and relays it"
                        " to a sink).")
    parser.add_argument("--tests", default="throughput,large,idle",
                        help="Comma-separated: throughput, large, idle.")
    parser.add_argument("--messages", type=int, help="Messages per throughput run (default 2000, quick 300).")
    parser.add_argument("--senders", default="1,10,100", help="Concurrent senders per run.")
    parser.add_argument("--repeat", type=int,
                        help="Runs per server and level, median shown (default 5; quick 1).")
    parser.add_argument("--no-pipelining", action="store_true",
                        help="Never pipeline, even where PIPELINING is offered (aiosmtpd does not offer it).")
    parser.add_argument("--idle", type=int, help="Idle connections (default 10000, quick 1000).")
    parser.add_argument("--idle-parallel", type=int, default=100,
                        help="Idle connections being opened at once (default 100).")
    parser.add_argument("--large-mb", type=int, default=50, help="Size of the large message in MB (MiB).")
    parser.add_argument("--json", metavar="FILE", help="Also write the raw results as JSON.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary directory (queues, logs).")
    args = parser.parse_args(argv)

    plan = Plan(
        messages=args.messages or (300 if args.quick else 2000),
        senders=[int(s) for s in args.senders.split(",")],
        message_size=10 * 1024,
        large_size=args.large_mb << 20,
        idle=args.idle or (1000 if args.quick else 10_000),
        hold=2.0 if args.quick else 5.0,
        idle_parallel=args.idle_parallel,
        time_limit=30.0 if args.quick else 120.0,
        repeat=args.repeat or (1 if args.quick else 5),
        pipelining=not args.no_pipelining,
    )
    global NOFILE_WANTED  # noqa: PLW0603 (read by preexec_fn in the servers' processes)
    NOFILE_WANTED = plan.idle + 11_000  # each idle session, plus the throughput tests' and some headroom
    raise_nofile_limit()
    workdir = tempfile.mkdtemp(prefix="dcrouter-bench-")
    command = "python -m bench.ingress" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    print("bench/ingress: dcrouter SMTP ingress vs aiosmtpd with fsync, same machine, same run")
    print(f"command     {command}")
    for line in machine_lines(workdir):
        print(line)
    pipelining = "PIPELINING used where offered" if plan.pipelining else "no pipelining (--no-pipelining)"
    print(f"load        one asyncio client process on this machine (shares the CPU with the server); "
          f"{pipelining}", flush=True)

    servers: list[ServerUnderTest] = []
    for name in args.servers.split(","):
        kinds = {"peer": AiosmtpdPeer, "dcrouter": Dcrouter, "dcrouter-limits": DcrouterLimits,
                 "dcrouter-observed": DcrouterObserved, "dcrouter-observed-hooks": DcrouterObservedHooks,
                 "dcrouter-dkim": DcrouterDkim,
                 "dcrouter-dkim-relay": DcrouterDkimRelay}
        servers.append(kinds[name.strip()](workdir))
    tests = [t.strip() for t in args.tests.split(",")]
    results: dict[str, Any] = {s.name: {} for s in servers}
    try:
        for test in tests:
            print(f"\n== {test}", flush=True)
            if test == "throughput":
                for name, entry in measure_throughput(servers, plan).items():
                    results[name][test] = entry
                continue
            for server in servers:
                try:
                    server.start()
                except RuntimeError as e:
                    print(f"  {server.label}: not measured: {e}", flush=True)
                    results[server.name][test] = {"error": str(e).splitlines()[0]}
                    continue
                try:
                    results[server.name][test] = MEASUREMENTS[test](server, plan)
                except Exception as e:  # noqa: BLE001 (one failed measurement must not lose the others)
                    print(f"  {server.label}: {test} failed: {type(e).__name__}: {e}\n{server.log_tail()}",
                          flush=True)
                    results[server.name][test] = {"error": f"{type(e).__name__}: {e}"}
                finally:
                    alive = server.process is not None and server.process.poll() is None
                    server.stop()
                    if not alive:
                        print(f"  {server.label} had exited during {test}:\n{server.log_tail()}", flush=True)
    finally:
        for server in servers:
            server.stop()
        if args.keep:
            print(f"\nkept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    for test in tests:
        print(REPORTS[test](results, plan))
        print()
    for server in servers:
        for test in tests:
            entry = results[server.name].get(test)
            if isinstance(entry, dict) and "error" in entry:
                print(f"{server.label} {test}: not measured ({entry['error']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "plan": dataclasses.asdict(plan), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
