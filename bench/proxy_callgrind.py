"""bench/proxy_callgrind: a proxy's instructions per short connection, by callgrind (load-independent).

    python -m bench.proxy_callgrind                      # dcrouter and the forwarder, plain and TLS routes
    python -m bench.proxy_callgrind --proxies dcrouter --dcrouter-root /tmp/before --connections 300

The proxy (dcrouter as bench/proxy runs it, or bench/proxy_forwarder.py) runs under ``valgrind
--tool=callgrind --instr-atstart=no``: nothing is counted while it starts. After ``--warm-up`` connections
(uncounted), ``callgrind_control -i on`` starts the count, one client makes ``--connections`` short
connections one after the other (the bench/proxy request: connect, 64 bytes, the 512-byte reply, close), and
``callgrind_control --dump`` ends it. The figure is the dump's instruction count (Ir) over the connections:
all of the proxy's work for them (reactor loop, Python, the C library and the kernel-call wrappers; not
the kernel itself), whatever else the machine is doing. Sequential connections make the same loop
iterations every run, so repeated runs agree to well under 1%.

Routes: ``plain`` (TCP, no peek), ``tls`` (TLS passthrough routed by the ClientHello's SNI: dcrouter reads
and parses the ClientHello, the forwarder does not) and ``tls-any`` (TLS passthrough on a port whose one
route takes any name: neither proxy reads the ClientHello, so both do the same job). ``tls`` less
``tls-any`` is what routing by SNI costs.

``--dcrouter-root`` runs dcrouter's code from another checkout (a ``git archive`` of the commit to compare
with), with this checkout's bench.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time

from bench.ingress import free_port
from bench.proxy import (
    DCROUTER_CONFIG,
    HOST,
    REPLY_SIZE,
    REPO_ROOT,
    REQUEST_SIZE,
    SNI_NAME,
    TWISTD,
    Process,
    one_short,
    start_backend,
)


def valgrind(out: str) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


#: A third port for ``tls-any``: TLS passed through without looking at the name.
ANY_NAME_ROUTE = """
[[smartProxyConfig.routes]]
name = "tls-any"
match = {{ ports = {port} }}
action = {{ type = "forward", target = {{ host = "{host}", port = {backend_tls} }} }}
"""


def start(name: str, workdir: str, backend: tuple[int, int], root: str) -> tuple[Process, dict[str, int]]:
    plain, tls, any_tls = free_port(), free_port(), free_port()
    out = os.path.join(workdir, f"callgrind.{name}.out")
    pythonpath = os.pathsep.join(p for p in (root, REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    if name == "dcrouter":
        config = os.path.join(workdir, "dcrouter.toml")
        with open(config, "w") as f:
            f.write(
                DCROUTER_CONFIG.format(
                    host=HOST,
                    plain_port=plain,
                    tls_port=tls,
                    backend_plain=backend[0],
                    backend_tls=backend[1],
                    sni=SNI_NAME,
                )
                + ANY_NAME_ROUTE.format(port=any_tls, host=HOST, backend_tls=backend[1])
            )
        argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "dcrouter", "--config", config]
    else:
        argv = [sys.executable, "-m", "bench.proxy_forwarder", "--host", HOST]
        argv += ["--forward", f"{plain}:{backend[0]}", "--forward", f"{tls}:{backend[1]}"]
        argv += ["--forward", f"{any_tls}:{backend[1]}"]
    process = Process(name, workdir)
    process.spawn(valgrind(out) + argv, env=dict(os.environ, PYTHONPATH=pythonpath))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # valgrind starts slowly: wait_listening's 30 s are too short
        try:
            for port in (plain, tls, any_tls):
                socket.create_connection((HOST, port), timeout=1).close()
            break
        except OSError:
            if not process.alive():
                raise RuntimeError(f"{name} exited:\n{process.log_tail()}") from None
            time.sleep(0.5)
    return process, {"plain": plain, "tls": tls, "tls-any": any_tls}


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def total_ir(path: str) -> int:
    """The instruction count of a callgrind dump: its ``summary:`` (or ``totals:``) line."""
    total = 0
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total


def measure(name: str, route: str, workdir: str, backend: tuple[int, int], args: argparse.Namespace) -> float:
    root = args.dcrouter_root if name == "dcrouter" else ""
    process, ports = start(name, workdir, backend, os.path.abspath(root) if root else "")
    try:
        tls = None
        if route != "plain":
            tls = ssl.create_default_context(cafile=os.path.join(workdir, "cert.pem"))
            tls.minimum_version = ssl.TLSVersion.TLSv1_3
        port = ports[route]
        request = b"R %d " % REPLY_SIZE
        request += b"x" * (REQUEST_SIZE - len(request) - 1) + b"\n"
        for _ in range(args.warm_up):
            one_short(port, "127.0.0.2", request, tls)
        time.sleep(0.5)
        control(process.pid, "--instr=on")
        for i in range(args.connections):
            got = one_short(port, f"127.0.0.{2 + i % 4}", request, tls)
            if got != REPLY_SIZE:
                raise RuntimeError(f"{name}: reply of {got} bytes")
        time.sleep(0.5)  # the last connection's close, both sides
        control(process.pid, "--dump")
        control(process.pid, "--instr=off")
        prefix = f"callgrind.{name}.out."
        dumps = [f for f in os.listdir(workdir) if f.startswith(prefix) and not f.endswith(".done")]
        ir = max(total_ir(os.path.join(workdir, f)) for f in dumps)
        for f in dumps:
            os.rename(os.path.join(workdir, f), os.path.join(workdir, f"{f}.{route}.done"))
        return ir / args.connections
    finally:
        process.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.proxy_callgrind", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--proxies", default="forwarder,dcrouter", help="Comma-separated: forwarder, dcrouter."
    )
    parser.add_argument(
        "--routes", default="plain,tls,tls-any", help="Comma-separated: plain, tls, tls-any."
    )
    parser.add_argument("--repeat", type=int, default=1, help="Runs per proxy and route (all printed).")
    parser.add_argument("--connections", type=int, default=300, help="Counted connections (sequential).")
    parser.add_argument("--warm-up", type=int, default=50, help="Uncounted connections first.")
    parser.add_argument("--dcrouter-root", default="", help="Run dcrouter's code from this checkout.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary directory (the dumps).")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind not found (Debian: apt-get install valgrind)")
        return 1
    workdir = tempfile.mkdtemp(prefix="dcrouter-bench-callgrind-")
    from dcrouter.net.certfiles import generate_self_signed

    cert_pem, key_pem = generate_self_signed(SNI_NAME)
    cert, key = os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem")
    with open(cert, "wb") as f:
        f.write(cert_pem)
    with open(key, "wb") as f:
        f.write(key_pem)
    backend, backend_plain, backend_tls = start_backend(workdir, cert, key)
    print(f"command  python -m bench.proxy_callgrind {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"dcrouter code from {os.path.abspath(args.dcrouter_root) if args.dcrouter_root else REPO_ROOT}")
    try:
        for route in args.routes.split(","):
            for name in args.proxies.split(","):
                backends = (backend_plain, backend_tls)
                runs = [measure(name, route, workdir, backends, args) for _ in range(args.repeat)]
                per = sorted(runs)[len(runs) // 2]
                each = ", ".join(f"{r:,.0f}" for r in runs) if len(runs) > 1 else ""
                print(
                    f"{name:10} {route:7} {per:12,.0f} instructions per connection"
                    + (f" (median of {each})" if each else ""),
                    flush=True,
                )
    finally:
        backend.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
