"""bench/http_floor: what the layers under dcrouter's proxy cost per HTTPS request, beside HAProxy.

    python -m bench.http_floor                 # 3 rounds of 10 s each way, about 2 minutes

Both servers terminate TLS on 127.0.0.1 and answer every HTTP/1.1 request themselves (200, a 2-byte body),
keep-alive, with no backend and no routing:

- HAProxy (``nbthread 1``, ``http-request return``), the same as bench/proxy_http's backend but over TLS;
- the floor: a minimal Twisted server (below, about 30 lines) over the same reactor, pyOpenSSL TLS layer and
  certificate dcrouter uses, which finds each request's end (``\\r\\n\\r\\n``) and writes a fixed response.
  No parsing, no headers looked at, no forwarding: less than any HTTP proxy can do.

h2load ``--h1 -c 20`` loads each for 10 s after a 2 s warm-up, alternating; server CPU per request from /proc.
A proxy must do at least the floor's work on the client side, and forward the request too, so the floor's
CPU per request bounds how close any proxy built on these layers can come to HAProxy's rate on the same cores
(docs/performance.md, "Proxy over HTTP").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

from bench.ingress import free_port
from bench.proxy import HOST, Process, cpu_seconds, haproxy_binary, raise_nofile_limit
from bench.proxy_http import h2load
from dcrouter.net.certfiles import generate_self_signed

HAPROXY = """\
global
    nbthread 1
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
frontend https
    bind {host}:{port} ssl crt {pem} alpn http/1.1
    http-request return status 200 content-type text/plain string "ok"
"""

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


def serve(port: int, cert: str, key: str) -> None:
    """The floor server (run in its own process by ``--serve``)."""
    from twisted.internet import reactor, ssl
    from twisted.internet.protocol import Factory, Protocol

    class Answer(Protocol):
        buffer = b""

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            count = self.buffer.count(b"\r\n\r\n")
            if count:
                self.buffer = self.buffer[self.buffer.rindex(b"\r\n\r\n") + 4 :]
                self.transport.write(RESPONSE * count)

    with open(cert, "rb") as c, open(key, "rb") as k:
        pem = c.read() + k.read()
    loaded = ssl.PrivateCertificate.loadPEM(pem)
    options = ssl.CertificateOptions(
        privateKey=loaded.privateKey.original,
        certificate=loaded.original,
        acceptableProtocols=[b"http/1.1"],  # h2load --h1 asks for it by ALPN
    )
    reactor.listenSSL(port, Factory.forProtocol(Answer), options, interface=HOST)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_floor", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--serve", nargs=3, metavar=("PORT", "CERT", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]), args.serve[1], args.serve[2])
        return 0
    raise_nofile_limit()
    workdir = tempfile.mkdtemp(prefix="dcrouter-bench-floor-")
    cert_pem, key_pem = generate_self_signed("bench.example")
    cert, key, pem = (os.path.join(workdir, n) for n in ("cert.pem", "key.pem", "both.pem"))
    for path, data in ((cert, cert_pem), (key, key_pem), (pem, cert_pem + key_pem)):
        with open(path, "wb") as f:
            f.write(data)
    ports = {"HAProxy": free_port(), "Twisted floor": free_port()}
    config = os.path.join(workdir, "haproxy.cfg")
    with open(config, "w") as f:
        f.write(HAPROXY.format(host=HOST, port=ports["HAProxy"], pem=pem))
    processes = {name: Process(name.replace(" ", "-"), workdir) for name in ports}
    processes["HAProxy"].spawn([haproxy_binary(), "-f", config])
    processes["Twisted floor"].spawn(
        [sys.executable, "-m", "bench.http_floor", "--serve", str(ports["Twisted floor"]), cert, key],
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in ports}
    try:
        for name, process in processes.items():
            process.wait_listening([ports[name]])
        print("bench/http_floor: HTTPS requests answered by the server itself, h2load --h1 -c 20")
        print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
        order = list(ports)
        for round_ in range(args.rounds):
            for name in order if round_ % 2 == 0 else reversed(order):
                cpu0 = cpu_seconds(processes[name].pid)
                rate, done, note = h2load(
                    ports[name], http1=True, clients=20, streams=1, seconds=args.seconds, warm_up=2
                )
                cpu = cpu_seconds(processes[name].pid) - cpu0
                per = cpu / done * 1e6 if done else float("nan")
                results[name].append((rate, per))
                print(
                    f"round {round_ + 1} {name:14} {rate:9.0f} req/s {per:6.1f} us CPU/req {note}", flush=True
                )
    finally:
        for process in processes.values():
            process.stop()
    print()
    print("| server | req/s (median) | CPU µs per request (median) |")
    print("|---|---:|---:|")
    for name, runs in results.items():
        rate, per = statistics.median(r for r, _ in runs), statistics.median(p for _, p in runs)
        print(f"| {name} | {rate:.0f} | {per:.1f} |")
    print(f"\nload average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
