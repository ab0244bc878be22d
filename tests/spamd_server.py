"""A real SpamAssassin ``spamd`` for the scanner tests: 127.0.0.1, a free port, a temporary directory, the
Debian rules from /usr/share/spamassassin, local tests only (``--local``: no DNS, no network checks), no user
preferences. GTUBE scores 1000.

spamd takes a few seconds to compile its rules, so one server is shared by every test in the process
(:func:`shared_spamd`) and stopped when the process exits. Where ``spamd`` is not installed, the tests that
need it are skipped with :data:`SKIP_REASON`.

:class:`DaemonProcess` is the start/wait/stop life cycle the clamd and rspamd fixtures share.
"""

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

from tests.redis_server import free_port

SPAMD = shutil.which("spamd") or ("/usr/sbin/spamd" if os.access("/usr/sbin/spamd", os.X_OK) else None)

#: Why the spamd tests are skipped, or None when they can run.
SKIP_REASON: str | None = (
    None
    if SPAMD
    else "spamd is not installed: run `apt-get install spamd spamassassin` (or `make test` as root) to run"
    " the SpamAssassin scanner tests"
)


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
    start_timeout = 60.0

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
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start on port {self.port}: {self.log_tail()}")
            time.sleep(0.05)
        self.started_in = time.monotonic() - began

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log_tail(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return "(no log)"


class SpamdServer(DaemonProcess):
    name = "spamd"

    def command(self) -> list[str]:
        assert SPAMD is not None, SKIP_REASON
        args = [
            SPAMD,
            "--local",  # no DNS blocklists, no Razor/Pyzor: nothing leaves the machine
            "--nouser-config",
            "--listen", f"127.0.0.1:{self.port}",
            "--allowed-ips", "127.0.0.1",
            "--pidfile", os.path.join(self.directory, "spamd.pid"),
            "--syslog", "stderr",
            "--max-children", "2",
            "--min-children", "1",
            "--min-spare", "1",
            "--max-spare", "2",
        ]  # fmt: skip
        if os.geteuid() == 0:
            # spamd refuses to scan as root; its children switch to this user (who must reach the directory).
            os.chmod(self.directory, 0o755)
            args += ["--username", "nobody"]
        return args

    def ready(self) -> bool:
        return answers(self.port, b"PING SPAMC/1.5\r\n\r\n", b"PONG")


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


def shared_spamd() -> SpamdServer:
    """The spamd every test in this process shares."""
    daemon = shared("spamd", SpamdServer)
    assert isinstance(daemon, SpamdServer)
    return daemon
