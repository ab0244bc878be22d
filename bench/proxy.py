"""bench/proxy: dcrouter's TCP/TLS proxy side by side with HAProxy (TCP mode) to one backend, in one run.

    python -m bench.proxy            # full run (about 5 minutes)
    python -m bench.proxy --quick    # short run, smaller counts, one repeat

Everything runs as real subprocesses on loopback, started fresh in a temporary directory:

- the backend, ``python -m bench.proxy_backend`` (threads, blocking sockets): a plain TCP port and a
  TLS port with a self-signed certificate for ``bench.example``
  (from ``dcrouter.net.certfiles.generate_self_signed``);
- HAProxy, ``haproxy -f <generated cfg> -db`` (foreground, not the system service), ``mode tcp``: one
  frontend forwarding everything to the plain port, one routing by SNI (``tcp-request inspect-delay``,
  ``req_ssl_sni``) to the TLS port;
- dcrouter, ``twistd -n --pidfile= dcrouter --config <generated toml>`` with only ``smartProxyConfig``: one
  route for any name to the plain port (nothing peeked), one route for ``bench.example`` to the TLS port
  (passthrough, routed by the SNI of the ClientHello).

And "direct": the client straight to the backend, the ceiling the client and backend allow on this machine.

1. Throughput: 1 and 4 long connections over the plain route, each streaming N MB (MiB) each way at once
   (default 256); MB/s each way, summed over the connections.
2. Connection rate: 10 and 50 concurrent clients, each in a loop: connect, send a 64-byte request, read the
   512-byte reply, close (the client closes first; the backend then closes too); for plain TCP and for TLS
   through the SNI route (a full
   TLS 1.3 handshake with the backend each time, no resumption).
3. CPU: each proxy's CPU time (all threads, from /proc/<pid>/stat) per MB and per connection, and the
   backend's and the client's, since all share the machine's cores.

Runs are interleaved (direct, HAProxy, dcrouter, then the reverse order, ...) and the median of the repeats
is shown. The client is this process (blocking sockets in threads: 2 per long connection, 1 per
concurrent client) on the same machine: it competes with the proxy and the backend for CPU.
See docs/performance.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from bench.ingress import free_port, log_tail, stop_process, tree_cpu_seconds, version

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
SNI_NAME = "bench.example"
START_TIMEOUT = 30.0
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
CHUNK = 256 * 1024
REQUEST_SIZE = 64
REPLY_SIZE = 512
MB = 1 << 20


# -- processes -----------------------------------------------------------------------------------


def raise_nofile_limit() -> None:
    """Soft open-files limit up to the hard one (here and, as preexec_fn, in each server)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def clock_ticks(fields: list[bytes]) -> float:
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return clock_ticks(f.read().rsplit(b")", 1)[1].split())


def machine_busy() -> float:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def socket_count(pid: int) -> int:
    """Open sockets of ``pid`` (listeners included), from /proc/<pid>/fd."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of ``pid``, keyed ``name/tid``, from /proc/<pid>/task/*/stat."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                head, tail = f.read().rsplit(b")", 1)
        except OSError:
            continue
        name = head.split(b"(", 1)[1].decode("utf-8", "replace")
        out[f"{name}/{tid}"] = clock_ticks(tail.split())
    return out


class Process:
    """A subprocess with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, label: str, workdir: str) -> None:
        self.label = label
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(workdir, f"{label.lower()}.log")

    def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=raise_nofile_limit,  # noqa: PLW1509 - spawned before any client thread runs
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_listening(self, ports: list[int]) -> None:
        """Until every port accepts a TCP connection (closed at once), or raise with the log's tail."""
        deadline = time.monotonic() + START_TIMEOUT
        pending = list(ports)
        while pending and time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.label} exited at start-up:\n{self.log_tail()}")
            try:
                with socket.create_connection((HOST, pending[0]), timeout=1):
                    pass
                pending.pop(0)
                continue
            except OSError:
                time.sleep(0.1)
        if pending:
            self.stop()
            raise RuntimeError(
                f"{self.label} did not listen on {HOST}:{pending[0]} within "
                f"{START_TIMEOUT:.0f} s:\n{self.log_tail()}"
            )

    def stop(self) -> None:
        stop_process(self.process)

    def log_tail(self, lines: int = 25) -> str:
        return log_tail(self.log_path, lines)


@dataclasses.dataclass
class Target:
    """Where the client connects for one path (direct, HAProxy, dcrouter)."""

    name: str
    label: str
    plain_port: int
    tls_port: int
    process: Process | None  # None: direct to the backend


HAPROXY_CONFIG = """\
# Generated by bench/proxy.py for one run; see docs/performance.md.
global
    maxconn 4000
{nbthread}
defaults
    mode tcp
{splice}    timeout connect 10s
    timeout client 120s
    timeout server 120s

# Plain TCP: everything to the backend's plain port, nothing inspected.
frontend plain
    bind {host}:{plain_port}
    default_backend plain_backend

# TLS passthrough routed by SNI: wait for the ClientHello, route by its server name; no match: closed.
frontend tls
    bind {host}:{tls_port}
    tcp-request inspect-delay 10s
    tcp-request content accept if {{ req_ssl_hello_type 1 }}
    use_backend tls_backend if {{ req_ssl_sni -i {sni} }}

backend plain_backend
    server backend {host}:{backend_plain}

backend tls_backend
    server backend {host}:{backend_tls}
"""

DCROUTER_CONFIG = """\
# Generated by bench/proxy.py for one run; see docs/performance.md. Only the proxy runs (no smtpConfig).
[smartProxyConfig]
bindAddress = "{host}"
maxConnectionsPerIP = 100000

# Plain TCP: any name, so nothing is peeked; forwarded to the backend's plain port.
[[smartProxyConfig.routes]]
name = "plain"
match = {{ ports = {plain_port} }}
action = {{ type = "forward", target = {{ host = "{host}", port = {backend_plain} }} }}

# TLS passthrough routed by the SNI of the ClientHello; another name has no route and is closed.
[[smartProxyConfig.routes]]
name = "tls"
match = {{ ports = {tls_port}, domains = ["{sni}"] }}
action = {{ type = "forward", target = {{ host = "{host}", port = {backend_tls} }} }}
"""


def haproxy_binary() -> str:
    path = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if os.path.exists(p)), None)
    if path is None:
        raise RuntimeError("haproxy not found (Debian: apt-get install haproxy; the service need not run)")
    return path


def start_backend(workdir: str, cert: str, key: str) -> tuple[Process, int, int]:
    plain, tls = free_port(), free_port()
    backend = Process("backend", workdir)
    backend.spawn(
        [
            sys.executable,
            "-m",
            "bench.proxy_backend",
            "--host",
            HOST,
            "--port",
            str(plain),
            "--tls-port",
            str(tls),
            "--cert",
            cert,
            "--key",
            key,
        ],
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
    )
    backend.wait_listening([plain, tls])
    return backend, plain, tls


def start_haproxy(
    workdir: str, backend_plain: int, backend_tls: int, nbthread: int | None, splice: bool
) -> Target:
    plain, tls = free_port(), free_port()
    config = os.path.join(workdir, "haproxy.cfg")
    with open(config, "w") as f:
        f.write(
            HAPROXY_CONFIG.format(
                host=HOST,
                plain_port=plain,
                tls_port=tls,
                backend_plain=backend_plain,
                backend_tls=backend_tls,
                sni=SNI_NAME,
                nbthread=f"    nbthread {nbthread}" if nbthread else "    # nbthread: HAProxy's default",
                splice="    option splice-auto\n" if splice else "    # no splicing (HAProxy's default)\n",
            )
        )
    process = Process("HAProxy", workdir)
    process.spawn([haproxy_binary(), "-f", config, "-db"])
    process.wait_listening([plain, tls])
    return Target("haproxy", "HAProxy", plain, tls, process)


def start_forwarder(workdir: str, backend_plain: int, backend_tls: int, processes: int = 1) -> Target:
    """bench/proxy_forwarder.py: the minimal Twisted forwarder, plain port to plain, TLS port to TLS, in
    ``processes`` processes sharing the ports."""
    plain, tls = free_port(), free_port()
    argv = [sys.executable, "-m", "bench.proxy_forwarder", "--host", HOST, "--processes", str(processes)]
    argv += ["--forward", f"{plain}:{backend_plain}", "--forward", f"{tls}:{backend_tls}"]
    pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    process = Process("forwarder", workdir)
    process.spawn(argv, env=dict(os.environ, PYTHONPATH=pythonpath))
    process.wait_listening([plain, tls])
    return Target("forwarder", "forwarder", plain, tls, process)


def start_dcrouter(
    workdir: str, backend_plain: int, backend_tls: int, profile: str | None, root: str = "", workers: int = 1
) -> Target:
    plain, tls = free_port(), free_port()
    config = os.path.join(workdir, "dcrouter.toml")
    with open(config, "w") as f:
        if workers > 1:
            f.write(f"workers = {workers}\n")  # a top-level key, before the first table
        f.write(
            DCROUTER_CONFIG.format(
                host=HOST,
                plain_port=plain,
                tls_port=tls,
                backend_plain=backend_plain,
                backend_tls=backend_tls,
                sni=SNI_NAME,
            )
        )
    argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile="]
    if profile:
        argv += [f"--profile={os.path.abspath(profile)}", "--profiler=cprofile", "--savestats"]
    argv += ["dcrouter", "--config", config]
    pythonpath = os.pathsep.join(p for p in (root, REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    process = Process("dcrouter", workdir)
    process.spawn(argv, env=dict(os.environ, PYTHONPATH=pythonpath))
    process.wait_listening([plain, tls])
    # With workers the supervisor listens first: wait until every worker serves.
    deadline = time.monotonic() + START_TIMEOUT
    while workers > 1 and time.monotonic() < deadline:
        with open(process.log_path, "rb") as log:
            if log.read().count(b"dcrouter ready") >= workers:
                break
        time.sleep(0.1)
    return Target("dcrouter", "dcrouter", plain, tls, process)


# -- the client ----------------------------------------------------------------------------------


PAYLOAD = memoryview(bytes(range(256)) * (CHUNK // 256))
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def one_stream(port: int, size: int, time_limit: float) -> str | None:
    """One long connection: ``S <size>``, then ``size`` bytes sent (then EOF) by one thread while this one
    reads ``size`` bytes and the backend's ``OK <count>`` trailer. None, or what went wrong."""
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(time_limit)
    failure: list[str] = []

    def sender() -> None:
        try:
            sock.sendall(b"S %d\n" % size)
            left = size
            while left > 0:
                piece = min(left, CHUNK)
                sock.sendall(PAYLOAD[:piece])
                left -= piece
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            failure.append(f"send: {e!r}")

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    buffer = memoryview(bytearray(CHUNK))
    received = 0
    trailer = bytearray()
    try:
        while True:
            got = sock.recv_into(buffer)
            if not got:
                break
            if received + got > size:
                trailer += buffer[max(0, size - received) : got]
            received += got
    except OSError as e:
        failure.append(f"receive: {e!r}")
    finally:
        sock.close()  # also ends a sender still blocked
        thread.join(10)
    if failure:
        return "; ".join(failure)
    if received - len(trailer) != size or bytes(trailer) != b"OK %d\n" % size:
        return (
            f"stream ended after {received - len(trailer)} of {size} bytes, trailer {bytes(trailer[:40])!r}"
        )
    return None


def run_streams(port: int, connections: int, size: int, time_limit: float) -> dict[str, Any]:
    """``connections`` long connections at once; MB/s each way, summed over them."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    results: list[str | None] = [None] * connections

    def run(i: int) -> None:
        try:
            results[i] = one_stream(port, size, time_limit)
        except OSError as e:
            results[i] = f"connect: {e!r}"

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(time_limit + 30)
    elapsed = time.perf_counter() - t0
    errors = [r for r in results if r] + ["not done in time" for t in threads if t.is_alive()]
    ok = connections - len(errors)
    return {
        "ok": ok,
        "errors": errors,
        "elapsed": elapsed,
        "client_cpu": time.process_time() - cpu0,
        "rate": connections * size / MB / elapsed if not errors else float("nan"),
    }


def one_short(port: int, source: str, request: bytes, tls: ssl.SSLContext | None) -> int:
    """One short connection from ``source``: the request, the whole reply read, then closed by us first
    (for TLS without close_notify). Returns the reply's length."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(10)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)  # the port is picked at connect
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((source, 0))
        sock.connect((HOST, port))
        conn: socket.socket = tls.wrap_socket(sock, server_hostname=SNI_NAME) if tls else sock
        conn.sendall(request)
        received = 0
        while received < REPLY_SIZE:
            data = conn.recv(REPLY_SIZE - received)
            if not data:
                break
            received += len(data)
        return received
    finally:
        sock.close()


def run_short(
    port: int, clients: int, duration: float, tls: ssl.SSLContext | None, sources: list[str]
) -> dict[str, Any]:
    """``clients`` threads, each in a loop of short connections for ``duration`` seconds; a connection
    counts when the whole reply arrived (each has a 10 s socket timeout)."""
    request = b"R %d " % REPLY_SIZE
    request += b"x" * (REQUEST_SIZE - len(request) - 1) + b"\n"
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[dict[str, int]] = [{} for _ in range(clients)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    stop_at = t0 + duration

    def client(index: int) -> None:
        mine, failed = latencies[index], errors[index]
        n = 0
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                received = one_short(port, sources[(index + n) % len(sources)], request, tls)
            except (OSError, ValueError) as e:  # ssl.SSLError and timeouts are OSErrors
                kind = type(e).__name__
                failed[kind] = failed.get(kind, 0) + 1
            else:
                if received == REPLY_SIZE:
                    mine.append(time.perf_counter() - start)
                else:
                    kind = f"reply of {received} bytes"
                    failed[kind] = failed.get(kind, 0) + 1
            n += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration + 30)
    elapsed = time.perf_counter() - t0
    all_latencies = sorted(x for mine in latencies for x in mine)
    kinds: dict[str, int] = {}
    for failed in errors:
        for kind, n in failed.items():
            kinds[kind] = kinds.get(kind, 0) + n
    ok = len(all_latencies)
    p99 = all_latencies[min(ok - 1, int(ok * 0.99))] if ok else float("nan")
    return {
        "ok": ok,
        "errors": sum(kinds.values()),
        "error_kinds": kinds,
        "elapsed": elapsed,
        "rate": ok / elapsed,
        "p99_ms": p99 * 1000,
        "max_ms": (all_latencies[-1] if ok else 0) * 1000,
        "slow": sum(1 for x in all_latencies if x > 0.5),
        "client_cpu": time.process_time() - cpu0,
    }


# -- measurements --------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    stream_mb: int
    stream_connections: list[int]
    clients: list[int]
    routes: list[str]
    duration: float
    repeat: int
    time_limit: float
    sources: int


def median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def measured(target: Target, backend: Process, run: Any) -> dict[str, Any]:
    """Run ``run()`` (a coroutine factory) and add the proxy's and the backend's CPU seconds to its result."""
    proxy_pid = target.process.pid if target.process else None
    proxy0 = tree_cpu_seconds(proxy_pid) if proxy_pid else 0.0
    backend0 = cpu_seconds(backend.pid)
    busy0 = machine_busy()
    result = run()
    busy = machine_busy() - busy0
    result["proxy_cpu"] = tree_cpu_seconds(proxy_pid) - proxy0 if proxy_pid else float("nan")
    result["backend_cpu"] = cpu_seconds(backend.pid) - backend0
    ours = result["backend_cpu"] + result["client_cpu"] + (result["proxy_cpu"] if proxy_pid else 0.0)
    # Everything else the machine did meanwhile (other processes, and kernel work not charged to ours),
    # in % of one core: high values mean the run shared the machine.
    result["other_cpu_pct"] = max(0.0, busy - ours) / result["elapsed"] * 100
    return result


def interleaved(targets: list[Target], repeat: int) -> list[list[Target]]:
    return [targets if i % 2 == 0 else targets[::-1] for i in range(repeat)]


def alive(target: Target) -> bool:
    return target.process is None or target.process.alive()


def measure_throughput(targets: list[Target], backend: Process, plan: Plan) -> dict[str, Any]:
    size = plan.stream_mb * MB
    out: dict[str, Any] = {}
    if any(t.name == "forwarder" for t in targets):
        # The stream ends with the client's half-close and the backend's trailer after it: the forwarder
        # closes both sides on the first EOF (no half-close), so it cannot carry this test.
        print("  forwarder: not in the throughput test (no half-close; the stream's trailer needs it)")
    for connections in plan.stream_connections:
        for order in interleaved(targets, plan.repeat):
            for target in order:
                if not alive(target) or target.name == "forwarder":
                    continue
                run = measured(
                    target,
                    backend,
                    lambda t=target, c=connections: run_streams(t.plain_port, c, size, plan.time_limit),
                )
                run["proxy_cpu_ms_per_mb"] = run["proxy_cpu"] * 1000 / (2 * connections * plan.stream_mb)
                out.setdefault(target.name, {}).setdefault(str(connections), []).append(run)
                errors = f"  errors: {run['errors'][:3]}" if run["errors"] else ""
                print(
                    f"  {target.label:9} {connections} x {plan.stream_mb} MB each way: "
                    f"{run['rate']:8.1f} MB/s each way  proxy CPU {run['proxy_cpu']:.2f} s  "
                    f"other {run['other_cpu_pct']:.0f}%{errors}",
                    flush=True,
                )
    return out


def measure_rate(
    targets: list[Target], backend: Process, plan: Plan, tls_client: ssl.SSLContext
) -> dict[str, Any]:
    sources = [f"127.0.0.{i}" for i in range(2, 2 + plan.sources)]
    out: dict[str, Any] = {}
    for route in plan.routes:
        tls = tls_client if route == "tls" else None
        for target in targets:  # uncounted warm-up
            if alive(target):
                port = target.tls_port if tls else target.plain_port
                run_short(port, 10, min(1.0, plan.duration / 2), tls, sources)
        for clients in plan.clients:
            for order in interleaved(targets, plan.repeat):
                for target in order:
                    if not alive(target):
                        continue
                    port = target.tls_port if tls else target.plain_port
                    run = measured(
                        target,
                        backend,
                        lambda p=port, c=clients, t=tls: run_short(p, c, plan.duration, t, sources),
                    )
                    out.setdefault(target.name, {}).setdefault(f"{route}/{clients}", []).append(run)
                    errors = f"  errors: {run['error_kinds']}" if run["errors"] else ""
                    print(
                        f"  {target.label:9} {route:5} {clients:3} clients: {run['rate']:8.0f} conn/s  "
                        f"p99 {run['p99_ms']:.1f} ms  max {run['max_ms']:.0f} ms  over 0.5 s {run['slow']}  "
                        f"proxy CPU {run['proxy_cpu']:.2f} s  other {run['other_cpu_pct']:.0f}%{errors}",
                        flush=True,
                    )
    return out


# -- report --------------------------------------------------------------------------------------


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or reference is None or not reference or math.isnan(value) or math.isnan(reference):
        return "n/a"
    r = value / reference
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows
    ]
    return "\n".join(lines)


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


def med(runs: list[dict[str, Any]] | None, key: str) -> float | None:
    return median([r[key] for r in runs]) if runs else None


def spread(runs: list[dict[str, Any]] | None, spec: str) -> str:
    if not runs:
        return "n/a"
    rates = [r["rate"] for r in runs]
    return f"{fmt(min(rates), spec)}-{fmt(max(rates), spec)}"


def report_throughput(results: dict[str, Any], plan: Plan, names: list[str]) -> str:
    rows = []
    for connections in plan.stream_connections:
        runs = {n: results.get(n, {}).get(str(connections)) for n in names}
        hap, dcr, direct = runs.get("haproxy"), runs.get("dcrouter"), runs.get("direct")
        fwd = runs.get("forwarder")
        total_mb = 2 * connections * plan.stream_mb

        def per_mb(r: list[dict[str, Any]] | None, key: str, total_mb: int = total_mb) -> str:
            value = med(r, key)
            return fmt(value * 1000 / total_mb if value is not None else None, ".2f")

        def errors(r: list[dict[str, Any]] | None) -> str:
            return str(sum(len(x["errors"]) for x in r)) if r else "n/a"

        def utilisation(r: list[dict[str, Any]] | None) -> str:
            return fmt(median([x["proxy_cpu"] / x["elapsed"] * 100 for x in r]) if r else None, ".0f")

        rows.append(
            [
                str(connections),
                fmt(med(direct, "rate"), ".0f"),
                fmt(med(hap, "rate"), ".0f"),
                fmt(med(fwd, "rate"), ".0f"),
                fmt(med(dcr, "rate"), ".0f"),
                ratio(med(dcr, "rate"), med(hap, "rate")),
                " / ".join(spread(r, ".0f") for r in (hap, fwd, dcr)),
                " / ".join(errors(r) for r in (hap, fwd, dcr)),
                " / ".join(per_mb(r, "proxy_cpu") for r in (hap, fwd, dcr)),
                " / ".join(utilisation(r) for r in (hap, fwd, dcr)),
                " / ".join(per_mb(r, "backend_cpu") for r in (hap, fwd, dcr)),
                " / ".join(per_mb(r, "client_cpu") for r in (hap, fwd, dcr)),
                " / ".join(fmt(med(r, "other_cpu_pct"), ".0f") for r in (hap, fwd, dcr)),
            ]
        )
    title = (
        f"Throughput: plain TCP route, each connection {plan.stream_mb} MB each way at once; MB/s each way "
        f"(summed over the connections), median of {plan.repeat} run(s); CPU ms per MB forwarded "
        f"(both directions counted)"
    )
    header = [
        "connections",
        "direct MB/s",
        "HAProxy MB/s",
        "forwarder MB/s",
        "dcrouter MB/s",
        "dcrouter/HAProxy",
        "range hap / fwd / dcr",
        "errors hap / fwd / dcr",
        "proxy CPU ms/MB hap / fwd / dcr",
        "proxy CPU % hap / fwd / dcr",
        "backend CPU ms/MB hap / fwd / dcr",
        "client CPU ms/MB hap / fwd / dcr",
        "other CPU % hap / fwd / dcr",
    ]
    return "\n".join([title, "", table(header, rows)])


def cpu_ratio(dcr: list[dict[str, Any]] | None, fwd: list[dict[str, Any]] | None) -> str:
    """dcrouter's median CPU per connection over the forwarder's (issue 14's aim: at most 1.1x)."""
    if not dcr or not fwd:
        return "n/a"
    per = [median([x["proxy_cpu"] / x["ok"] if x["ok"] else float("nan") for x in r]) for r in (dcr, fwd)]
    return ratio(per[0], per[1])


def report_rate(results: dict[str, Any], plan: Plan, names: list[str]) -> str:
    rows = []
    for route in plan.routes:
        for clients in plan.clients:
            key = f"{route}/{clients}"
            runs = {n: results.get(n, {}).get(key) for n in names}
            hap, dcr, direct = runs.get("haproxy"), runs.get("dcrouter"), runs.get("direct")
            fwd = runs.get("forwarder")

            def per_conn(r: list[dict[str, Any]] | None, what: str) -> str:
                if not r:
                    return "n/a"
                return fmt(median([x[what] / x["ok"] * 1e6 if x["ok"] else float("nan") for x in r]), ".0f")

            def errors(r: list[dict[str, Any]] | None) -> str:
                return str(sum(x["errors"] for x in r)) if r else "n/a"

            def utilisation(r: list[dict[str, Any]] | None) -> str:
                return fmt(median([x["proxy_cpu"] / x["elapsed"] * 100 for x in r]) if r else None, ".0f")

            rows.append(
                [
                    "TLS by SNI" if route == "tls" else "plain TCP",
                    str(clients),
                    fmt(med(direct, "rate"), ".0f"),
                    fmt(med(hap, "rate"), ".0f"),
                    fmt(med(fwd, "rate"), ".0f"),
                    fmt(med(dcr, "rate"), ".0f"),
                    ratio(med(dcr, "rate"), med(hap, "rate")),
                    " / ".join(spread(r, ".0f") for r in (hap, fwd, dcr)),
                    " / ".join(errors(r) for r in (hap, fwd, dcr)),
                    " / ".join(fmt(med(r, "p99_ms"), ".1f") for r in (hap, fwd, dcr)),
                    " / ".join(per_conn(r, "proxy_cpu") for r in (hap, fwd, dcr)),
                    cpu_ratio(dcr, fwd),
                    " / ".join(utilisation(r) for r in (hap, fwd, dcr)),
                    " / ".join(per_conn(r, "backend_cpu") for r in (hap, fwd, dcr)),
                    " / ".join(per_conn(r, "client_cpu") for r in (hap, fwd, dcr)),
                    " / ".join(fmt(med(r, "other_cpu_pct"), ".0f") for r in (hap, fwd, dcr)),
                ]
            )
    title = (
        f"Connection rate: each client loops connect, {REQUEST_SIZE}-byte request, {REPLY_SIZE}-byte reply, "
        f"close; {plan.duration:.0f} s per run, median of {plan.repeat} run(s); CPU in µs per connection"
    )
    header = [
        "route",
        "clients",
        "direct conn/s",
        "HAProxy conn/s",
        "forwarder conn/s",
        "dcrouter conn/s",
        "dcrouter/HAProxy",
        "range hap / fwd / dcr",
        "errors hap / fwd / dcr",
        "p99 ms hap / fwd / dcr",
        "proxy CPU µs/conn hap / fwd / dcr",
        "dcrouter/forwarder CPU",
        "proxy CPU % hap / fwd / dcr",
        "backend CPU µs/conn hap / fwd / dcr",
        "client CPU µs/conn hap / fwd / dcr",
        "other CPU % hap / fwd / dcr",
    ]
    notes = []
    for name in names:
        for key, runs in results.get(name, {}).items():
            kinds: dict[str, int] = {}
            for run in runs:
                for kind, n in run.get("error_kinds", {}).items():
                    kinds[kind] = kinds.get(kind, 0) + n
            if kinds:
                notes.append(f"  {name} {key}: errors {kinds}")
            slow = sum(run.get("slow", 0) for run in runs)
            if slow:
                notes.append(
                    f"  {name} {key}: {slow} connection(s) took over 0.5 s (longest "
                    f"{max(run['max_ms'] for run in runs):.0f} ms)"
                )
    return "\n".join([title, "", table(header, rows), *notes])


def report_threads(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> str:
    """CPU per process over the run, by thread name; each thread's own figure where there are few."""
    lines = ["CPU seconds per thread over the whole run, warm-ups included (from /proc/<pid>/task/*/stat)"]
    for label, threads in after.items():
        groups: dict[str, list[float]] = {}
        for key, cpu in threads.items():
            groups.setdefault(key.rsplit("/", 1)[0], []).append(cpu - before.get(label, {}).get(key, 0.0))
        parts = []
        for name, used in sorted(groups.items(), key=lambda x: -sum(x[1])):
            each = ", ".join(f"{c:.1f}" for c in sorted(used, reverse=True)) if 1 < len(used) <= 8 else ""
            parts.append(f"{name} x{len(used)} {sum(used):.1f}" + (f" ({each})" if each else ""))
        lines.append(f"  {label:9} " + "; ".join(parts))
    return "\n".join(lines)


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", REPO_ROOT, "status", "--porcelain", "--", "dcrouter", "twisted"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{' (with uncommitted changes)' if dirty else ''}" if rev else "unknown"


def haproxy_version() -> str:
    try:
        out = subprocess.run(
            [haproxy_binary(), "-v"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return "not installed"
    first = out.splitlines()[0] if out else ""
    return first.replace("HAProxy version ", "").split(" - ")[0].strip() or "unknown"


def load_line() -> str:
    with open("/proc/loadavg") as f:
        return "load        " + " ".join(f.read().split()[:3]) + " (1, 5, 15 min load average)"


def machine_lines(root: str = "") -> list[str]:
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
        (
            f"machine     {os.cpu_count()} cores ({model}), {memory} MB RAM, "
            f"{platform.system()} {platform.release()}"
        ),
        (
            f"python      {platform.python_implementation()} {platform.python_version()} "
            "(client, backend, dcrouter)"
        ),
        (
            f"versions    HAProxy {haproxy_version()}, Twisted {version('twisted')}, OpenSSL "
            f"{ssl.OPENSSL_VERSION.split()[1]}, dcrouter {version('dcrouter')} at {git_revision()}"
            + (f" (dcrouter's code from {os.path.abspath(root)})" if root else "")
        ),
        f"open files  {resource.getrlimit(resource.RLIMIT_NOFILE)[0]} (bench and servers)",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="Short run: 64 MB streams, 2 s runs, one repeat."
    )
    parser.add_argument(
        "--proxies",
        default="direct,haproxy,forwarder,dcrouter",
        help="Comma-separated: direct (no proxy), haproxy, forwarder (bench/proxy_forwarder.py), dcrouter.",
    )
    parser.add_argument("--tests", default="throughput,rate", help="Comma-separated: throughput, rate.")
    parser.add_argument(
        "--stream-mb", type=int, help="MB (MiB) each way per long connection (default 256, quick 64)."
    )
    parser.add_argument("--connections", default="1,4", help="Long connections per throughput run.")
    parser.add_argument("--clients", default="10,50", help="Concurrent clients per connection-rate run.")
    parser.add_argument("--routes", default="plain,tls", help="Connection-rate routes: plain, tls.")
    parser.add_argument(
        "--duration", type=float, help="Seconds per connection-rate run (default 5, quick 2)."
    )
    parser.add_argument(
        "--repeat", type=int, help="Runs per proxy and level, median shown (default 3, quick 1)."
    )
    parser.add_argument(
        "--sources",
        type=int,
        default=4,
        help="Client source addresses 127.0.0.2... used round robin for short connections.",
    )
    parser.add_argument(
        "--haproxy-nbthread", type=int, help="HAProxy's nbthread (default: its own, one per core)."
    )
    parser.add_argument(
        "--haproxy-splice",
        action="store_true",
        help="Add 'option splice-auto' (kernel splice) to HAProxy's defaults (default: off, as shipped).",
    )
    parser.add_argument(
        "--dcrouter-workers",
        type=int,
        default=1,
        help="dcrouter's workers (sharing the ports; compare with --haproxy-nbthread N); default 1.",
    )
    parser.add_argument(
        "--forwarder-processes",
        type=int,
        default=1,
        help="The forwarder's processes (sharing the ports, as dcrouter's workers); default 1.",
    )
    parser.add_argument(
        "--dcrouter-profile",
        metavar="FILE",
        help="Run dcrouter under cProfile (twistd --profiler=cprofile --savestats) into FILE.",
    )
    parser.add_argument(
        "--dcrouter-root",
        metavar="DIR",
        help="Run dcrouter's code from this checkout (a git archive of the commit to compare with).",
    )
    parser.add_argument("--json", metavar="FILE", help="Also write the raw results as JSON.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary directory (configs, logs).")
    args = parser.parse_args(argv)

    plan = Plan(
        stream_mb=args.stream_mb or (64 if args.quick else 256),
        stream_connections=[int(c) for c in args.connections.split(",")],
        clients=[int(c) for c in args.clients.split(",")],
        routes=[r.strip() for r in args.routes.split(",")],
        duration=args.duration or (2.0 if args.quick else 5.0),
        repeat=args.repeat or (1 if args.quick else 3),
        time_limit=60.0 if args.quick else 180.0,
        sources=args.sources,
    )
    names = [n.strip() for n in args.proxies.split(",")]
    tests = [t.strip() for t in args.tests.split(",")]
    raise_nofile_limit()
    workdir = tempfile.mkdtemp(prefix="dcrouter-bench-proxy-")
    command = "python -m bench.proxy" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    print(
        "bench/proxy: dcrouter's proxy vs HAProxy (mode tcp) and a minimal Twisted forwarder, same backend, "
        "same machine, same run"
    )
    print(f"command     {command}")
    for line in machine_lines(args.dcrouter_root or ""):
        print(line)
    print(
        f"client      one process (threads, blocking sockets) on this machine (it shares the "
        f"{os.cpu_count()} cores with "
        "the proxy and the backend)"
    )
    print(
        f"haproxy     mode tcp, nbthread {args.haproxy_nbthread or 'default (one per core)'}, "
        f"{'option splice-auto' if args.haproxy_splice else 'no splicing (default)'}, no logging"
    )
    print(f"dcrouter    workers = {args.dcrouter_workers} (CPU summed over the supervisor and its workers)")
    print(f"forwarder   processes = {args.forwarder_processes} (CPU summed likewise)")
    print(load_line())
    print(f"workdir     {workdir}", flush=True)

    from dcrouter.net.certfiles import generate_self_signed  # after the header: the import takes a moment

    cert_pem, key_pem = generate_self_signed(SNI_NAME)
    cert, key = os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem")
    with open(cert, "wb") as f:
        f.write(cert_pem)
    with open(key, "wb") as f:
        f.write(key_pem)
    tls_client = ssl.create_default_context(cafile=cert)
    tls_client.minimum_version = ssl.TLSVersion.TLSv1_3

    processes: list[Process] = []
    results: dict[str, dict[str, Any]] = {}
    threads_before: dict[str, dict[str, float]] = {}
    threads_after: dict[str, dict[str, float]] = {}
    failures: list[str] = []
    backend_total: float | None = None
    sockets_before: dict[str, int] = {}
    sockets_after: dict[str, int] = {}
    try:
        backend, backend_plain, backend_tls = start_backend(workdir, cert, key)
        processes.append(backend)
        targets: list[Target] = []
        for name in names:
            try:
                if name == "direct":
                    targets.append(Target("direct", "direct", backend_plain, backend_tls, None))
                elif name == "haproxy":
                    targets.append(
                        start_haproxy(
                            workdir, backend_plain, backend_tls, args.haproxy_nbthread, args.haproxy_splice
                        )
                    )
                elif name == "forwarder":
                    targets.append(
                        start_forwarder(workdir, backend_plain, backend_tls, args.forwarder_processes)
                    )
                elif name == "dcrouter":
                    root = os.path.abspath(args.dcrouter_root) if args.dcrouter_root else ""
                    targets.append(
                        start_dcrouter(
                            workdir,
                            backend_plain,
                            backend_tls,
                            args.dcrouter_profile,
                            root,
                            args.dcrouter_workers,
                        )
                    )
                else:
                    raise RuntimeError(f"unknown proxy {name!r}")
            except RuntimeError as e:
                print(f"  {name}: not measured: {e}", flush=True)
                failures.append(f"{name}: not measured: {str(e).splitlines()[0]}")
                continue
            if targets[-1].process is not None:
                processes.append(targets[-1].process)
        for target in targets:
            if target.process:
                threads_before[target.label] = thread_cpu(target.process.pid)
                sockets_before[target.label] = socket_count(target.process.pid)
                print(
                    f"{target.label:11} pid {target.process.pid}, plain :{target.plain_port}, "
                    f"TLS :{target.tls_port}"
                )
        print(f"{'backend':11} pid {backend.pid}, plain :{backend_plain}, TLS :{backend_tls}", flush=True)
        for test in tests:
            print(f"\n== {test}", flush=True)
            if test == "throughput":
                results[test] = measure_throughput(targets, backend, plan)
            elif test == "rate":
                results[test] = measure_rate(targets, backend, plan, tls_client)
        for target in targets:
            if target.process:
                if target.process.alive():
                    threads_after[target.label] = thread_cpu(target.process.pid)
                    time.sleep(1.0)  # let the last connections close
                    sockets_after[target.label] = socket_count(target.process.pid)
                else:
                    failures.append(f"{target.label} exited during the run:\n{target.process.log_tail()}")
        backend_total = cpu_seconds(backend.pid)
    finally:
        for process in reversed(processes):
            process.stop()
        if args.keep:
            print(f"\nkept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print("at the end: " + load_line())
    print(
        "other CPU %: the machine's busy time during a run minus the proxy's, the backend's and the "
        "client's, "
        "in % of one core (other processes; kernel work charged to no one): high values mean the run shared "
        "the machine\n"
    )
    if "throughput" in results:
        print(report_throughput(results["throughput"], plan, names))
        print()
    if "rate" in results:
        print(report_rate(results["rate"], plan, names))
        print()
    print(report_threads(threads_before, threads_after))
    if backend_total is not None:
        print(f"  {'backend':9} {backend_total:.1f} (all of its threads, /proc/<pid>/stat)")
    for label, after in sockets_after.items():
        print(
            f"open sockets of {label}: {sockets_before[label]} after start-up, {after} 1 s after the last run"
            + ("" if after == sockets_before[label] else "  <- connections left open")
        )
    for failure in failures:
        print(failure)
    if args.dcrouter_profile:
        print(f"dcrouter profile (cProfile, all of its run): {os.path.abspath(args.dcrouter_profile)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "plan": dataclasses.asdict(plan), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
