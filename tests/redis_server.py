"""A real ``redis-server`` per test: its own free port on 127.0.0.1 and directory, stopped at cleanup.

Never the machine's shared Redis (6379), never a mock. Where ``redis-server`` is not installed, test cases
that use it are skipped with :data:`SKIP_REASON` (``make test`` installs it on Debian when run as root).

The server starts with ``appendonly yes`` and ``appendfsync always`` (what dcrouter asks of production), and
nothing else persisted (``save ""``), so a SIGKILL and a restart show exactly what Redis acknowledged.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Any

from tests.daemons import end_process, free_port

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
)

#: Why the Redis tests are skipped, or None when they can run.
SKIP_REASON: str | None = (
    None
    if REDIS_SERVER
    else "redis-server is not installed: run `apt-get install redis-server` (or `make test` as root) to run"
    " the Redis queue tests"
)

#: Seconds a start may take before the fixture gives up.
START_TIMEOUT = 10.0


class RedisServer:
    """One redis-server process. ``start()`` returns once it answers PING; ``kill()`` is a crash (SIGKILL),
    ``stop()`` a clean shutdown; ``start()`` again reuses the port and the directory (the AOF)."""

    def __init__(self, directory: str, extra: list[str] | None = None) -> None:
        assert REDIS_SERVER is not None, SKIP_REASON
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.port = free_port()
        self.extra = list(extra or [])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None, "already running"
        args = [
            REDIS_SERVER or "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--dir", self.directory,
            "--logfile", os.path.join(self.directory, "redis.log"),
            "--protected-mode", "no",
            *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._signal(None)
                raise RuntimeError(f"redis-server did not start on port {self.port}: {self.log_tail()}")
            time.sleep(0.01)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Run one command synchronously (for test set-up and inspection); returns the raw reply."""
        request = b"".join(
            [f"*{len(args)}\r\n".encode()] + [f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args]
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(request)
            return s.recv(1 << 20)

    def kill(self) -> None:
        """SIGKILL: what Redis acknowledged survives only through its append-only file."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int | None) -> None:
        end_process(self.process, sig)
        self.process = None

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.directory, "redis.log"), errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return "(no log)"


def start_redis(test: Any, extra: list[str] | None = None) -> RedisServer:
    """A running server for ``test`` (a trial TestCase), stopped in its cleanup."""
    server = RedisServer(test.mktemp(), extra)
    server.start()
    test.addCleanup(server.stop)
    return server
