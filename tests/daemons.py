"""Real daemons for tests, started on 127.0.0.1 at a free port in a temporary directory: the life cycle the
spamd, clamd and rspamd fixtures share (:class:`DaemonProcess`, :func:`shared`), and the stop every fixture
process gets (:func:`end_process`)."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def end_process(process: subprocess.Popen[bytes] | None, sig: int | None = signal.SIGTERM) -> None:
    """Send ``sig`` (None: none) if ``process`` still runs, wait up to 10 s for it, then SIGKILL it."""
    if process is None:
        return
    if sig is not None and process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def answers(port: int, request: bytes, expect: bytes) -> bool:
    """Whether the server on 127.0.0.1:``port`` answers ``request`` with something starting ``expect``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(request)
            reply = b""
            while len(reply) < 256:
                data = s.recv(256)
                if not data:
                    break
                reply += data
                if expect in reply:
                    return True
            return expect in reply
    except OSError:
        return False


class DaemonProcess:
    """One daemon process logging to ``log`` in ``directory``. ``start()`` returns once ``ready()`` holds
    (polled every 50 ms, for at most ``start_timeout`` seconds); ``stop()`` is SIGTERM, then SIGKILL."""

    name = "daemon"
    #: Seconds a daemon may take to become ready. rspamd loads its Lua rules in ~5 s on a quiet machine and
    #: took over 60 s with the machine's load at 15; a daemon that exits is reported at once anyway.
    start_timeout = 240.0

    def __init__(self, directory: str | None = None) -> None:
        self.directory = os.path.abspath(directory or tempfile.mkdtemp(prefix=f"dcrouter-{self.name}-"))
        os.makedirs(self.directory, exist_ok=True)
        self.port = free_port()
        self.log = os.path.join(self.directory, f"{self.name}.log")
        self.process: subprocess.Popen[bytes] | None = None
        self.started_in = 0.0

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        assert self.process is None, "already running"
        began = time.monotonic()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        deadline = began + self.start_timeout
        while not self.ready():
            code = self.process.poll()
            if code is not None or time.monotonic() > deadline:
                self.stop()
                limit = f"not ready in {self.start_timeout:.0f} s"
                why = f"exited with {code}" if code is not None else limit
                tail = self.log_tail()
                raise RuntimeError(f"{self.name} did not start on port {self.port} ({why}): {tail}")
            time.sleep(0.05)
        self.started_in = time.monotonic() - began

    def stop(self) -> None:
        end_process(self.process)
        self.process = None

    def log_tail(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return "(no log)"


def shared(key: str, make: Callable[[], DaemonProcess]) -> DaemonProcess:
    """The process-wide instance of a daemon, started on first use and stopped at exit. A start that failed
    is not retried: every later test gets the same error."""
    found = _shared.get(key)
    if isinstance(found, Exception):
        raise found
    if found is None:
        daemon = make()
        try:
            daemon.start()
        except Exception as e:
            _shared[key] = e
            raise
        _shared[key] = daemon
        atexit.register(_stop_and_remove, daemon)
        return daemon
    return found


def _stop_and_remove(daemon: DaemonProcess) -> None:
    daemon.stop()
    shutil.rmtree(daemon.directory, ignore_errors=True)


_shared: dict[str, DaemonProcess | Exception] = {}
