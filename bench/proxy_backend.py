"""bench/proxy_backend: the backend behind both proxies in bench/proxy (one process, standard library only).

    python -m bench.proxy_backend --host 127.0.0.1 --port P --tls-port Q --cert C --key K

It listens on a plain TCP port and on a TLS port (the bench's self-signed certificate; TLS 1.3 only, no
session tickets, so every connection is a full handshake that nobody resumes). Each connection starts with
one command line from the client:

- ``R <n> [padding]\\n`` (request/reply): the backend answers ``n`` bytes, then reads until the client's
  EOF and closes. The client closes first (for TLS without close_notify, as many HTTP clients do): so the
  TIME_WAIT sockets are the clients' (here: the proxy's towards the backend), whose ports the kernel's
  connect() reuses safely; a backend closing first left TIME_WAIT sockets on the backend side that a proxy's
  reused source port then hit, and about one SYN in 200 waited for its 1 s retransmission.
- ``S <n>\\n`` (stream): the backend sends ``n`` bytes while reading and discarding everything the client
  sends; once both are done (the client's EOF read) it writes ``OK <bytes read after the line>\\n`` and
  closes.

It prints ``ready <port> <tls-port>`` once both ports listen and stops on SIGTERM or SIGINT.

Kept cheap, because it shares the machine's cores with the proxy and the client: blocking sockets in a fixed
pool of threads per port (each blocked in ``accept``; a blocking call releases the GIL, and the TLS
handshake runs in OpenSSL without it), TCP_NODELAY, the payload built once, 1 MiB reads and writes, no
per-connection logging. A stream's sending half gets a thread of its own while the accepting thread reads.
"""

from __future__ import annotations

import argparse
import signal
import socket
import ssl
import sys
import threading

CHUNK = 1 << 20
PAYLOAD = memoryview(bytes(range(256)) * (CHUNK // 256))
MAX_LINE = 1024
WORKERS = 64
TIMEOUT = 120.0


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    context.num_tickets = 0
    return context


def read_line(conn: socket.socket) -> tuple[bytes, bytes]:
    """The command line and whatever followed it in the same reads."""
    head = b""
    while b"\n" not in head:
        data = conn.recv(MAX_LINE)
        if not data or len(head) > MAX_LINE:
            raise ConnectionError("no command line")
        head += data
    line, rest = head.split(b"\n", 1)
    return line, rest


def send_all(conn: socket.socket, n: int) -> None:
    while n > 0:
        piece = min(n, CHUNK)
        conn.sendall(PAYLOAD[:piece])
        n -= piece


def stream(conn: socket.socket, n: int, already: int) -> None:
    sender_error: list[BaseException] = []

    def sender() -> None:
        try:
            send_all(conn, n)
        except OSError as e:
            sender_error.append(e)

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    buffer = memoryview(bytearray(CHUNK))
    received = already
    while True:
        got = conn.recv_into(buffer)
        if not got:
            break
        received += got
    thread.join(TIMEOUT)
    if not sender_error and not thread.is_alive():
        conn.sendall(b"OK %d\n" % received)


def handle(conn: socket.socket, context: ssl.SSLContext | None) -> None:
    conn.settimeout(TIMEOUT)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if context is not None:
        conn = context.wrap_socket(conn, server_side=True)
    line, rest = read_line(conn)
    fields = line.split()
    command, size = fields[0], int(fields[1])
    if command == b"R":
        send_all(conn, size)
        while conn.recv(MAX_LINE):  # until the client's EOF (TLS: a ragged EOF reads as b"")
            pass
    elif command == b"S":
        stream(conn, size, len(rest))
    else:
        raise ValueError(f"unknown command {command!r}")


def worker(listener: socket.socket, context: ssl.SSLContext | None) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # the listener was closed
        try:
            handle(conn, context)
        except (OSError, ValueError, IndexError):
            pass  # a client that went away or sent nonsense: just close
        finally:
            conn.close()


def listen(host: str, port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(4096)
    return listener


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.proxy_backend", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="Plain TCP port.")
    parser.add_argument("--tls-port", type=int, required=True, help="TLS port.")
    parser.add_argument("--cert", required=True, help="Certificate (PEM).")
    parser.add_argument("--key", required=True, help="Private key (PEM).")
    parser.add_argument("--workers", type=int, default=WORKERS, help="Threads per port (default 64).")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    context = tls_context(args.cert, args.key)
    for port, ctx in ((args.port, None), (args.tls_port, context)):
        listener = listen(args.host, port)
        for _ in range(args.workers):
            threading.Thread(target=worker, args=(listener, ctx), daemon=True).start()
    print(f"ready {args.port} {args.tls_port}", flush=True)
    while not stop.wait(1.0):
        pass
    return 0  # daemon threads end with the process


if __name__ == "__main__":
    sys.exit(main())
