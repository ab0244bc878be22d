"""bench/proxy_http_ir: instructions per request (callgrind) of dcrouter through a terminating route, HTTP/1.1
and HTTP/2 — a figure that, unlike req/s and CPU time, does not move with the machine's load.

    python -m bench.proxy_http_ir                          # this checkout, 2000 requests per protocol
    python -m bench.proxy_http_ir --dcrouter-root DIR      # another checkout (A/B)

The setup is bench/proxy_http's (the same backend, certificate and route), with one dcrouter process
(``workers = 1``) under ``valgrind --tool=callgrind``. Per protocol: 200 requests to warm up, the counters
zeroed (``callgrind_control -z``), ``h2load -n N`` (4 clients; HTTP/2 with 10 streams each), the counters
dumped; what is printed is the dumped total over the requests that succeeded. Start-up under valgrind takes
a minute or two; each protocol a minute more.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from bench.ingress import free_port
from bench.proxy import HOST, TWISTD, Process, haproxy_binary
from bench.proxy_http import BACKEND_CONFIG, DCROUTER_CONFIG, NAME
from dcrouter.net.certfiles import generate_self_signed

_TOTAL = re.compile(r"^(?:summary|totals): (\d+)", re.MULTILINE)
_SUCCEEDED = re.compile(r"(\d+) succeeded")


def _h2load(port: int, *, http1: bool, requests: int) -> int:
    argv = ["h2load", "-n", str(requests), "-c", "4", *(["--h1"] if http1 else ["-m", "10"])]
    argv += [f"--connect-to={HOST}:{port}", f"https://{NAME}:{port}/"]
    out = subprocess.run(argv, capture_output=True, timeout=1800, check=False).stdout.decode()
    found = _SUCCEEDED.search(out)
    return int(found.group(1)) if found else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument(
        "--dcrouter-root",
        metavar="DIR",
        default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        help="The checkout whose dcrouter runs (default: this one)",
    )
    args = parser.parse_args()
    for tool in ("h2load", "valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found")
    with tempfile.TemporaryDirectory(prefix="bench-proxy-http-ir-") as workdir:
        cert_pem, key_pem = generate_self_signed(NAME)
        cert, key = os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem")
        for path, data in ((cert, cert_pem), (key, key_pem)):
            with open(path, "wb") as handle:
                handle.write(data)
        backend_port, port = free_port(), free_port()
        backend_config, config = os.path.join(workdir, "backend.cfg"), os.path.join(workdir, "dcrouter.toml")
        with open(backend_config, "w") as handle:
            handle.write(BACKEND_CONFIG.format(host=HOST, port=backend_port))
        with open(config, "w") as handle:
            handle.write(
                DCROUTER_CONFIG.format(
                    host=HOST, name=NAME, port=port, backend=backend_port, cert=cert, key=key
                )
            )
        out = os.path.join(workdir, "callgrind.out")
        backend, dcrouter = Process("backend", workdir), Process("dcrouter", workdir)
        try:
            backend.spawn([haproxy_binary(), "-f", backend_config, "-db"])
            backend.wait_listening([backend_port])
            valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p"]
            command = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "dcrouter", "--config", config]
            dcrouter.spawn(
                [*valgrind, *command],
                env=dict(os.environ, PYTHONPATH=args.dcrouter_root),
            )
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                try:
                    socket.create_connection((HOST, port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(1)
            else:
                sys.exit("dcrouter under valgrind did not listen within 15 minutes:\n" + dcrouter.log_tail())
            for protocol in ("HTTP/1.1", "HTTP/2"):
                http1 = protocol == "HTTP/1.1"
                _h2load(port, http1=http1, requests=200)
                subprocess.run(
                    ["callgrind_control", "-z", str(dcrouter.pid)], capture_output=True, check=True
                )
                done = _h2load(port, http1=http1, requests=args.requests)
                subprocess.run(
                    ["callgrind_control", "-d", str(dcrouter.pid)], capture_output=True, check=True
                )
                time.sleep(2)
                newest = max(glob.glob(out + "*"), key=os.path.getmtime)
                with open(newest) as handle:
                    total = _TOTAL.search(handle.read())
                ir = int(total.group(1)) if total else 0
                print(
                    f"{protocol:8} {done} requests, {ir} Ir, {ir / max(done, 1):.0f} Ir/request", flush=True
                )
        finally:
            dcrouter.stop()
            backend.stop()


if __name__ == "__main__":
    main()
