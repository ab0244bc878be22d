"""Integration tests: real sockets on 127.0.0.1, real TLS, real processes. Their shared helpers live here."""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

#: The checkout root: put first on PYTHONPATH so twistd finds dcrouter and twisted/plugins/dcrouter_plugin.py
#: from this source tree rather than from an installed copy.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Runs twistd's own entry point with this interpreter, wherever the venv keeps its scripts.
TWISTD = [
    sys.executable,
    "-c",
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
]


def free_ports(count: int, hosts: tuple[str, ...] = ("127.0.0.1",)) -> list[int]:
    """``count`` distinct TCP ports that were free a moment ago on every address of ``hosts`` (default
    127.0.0.1). The config refuses port 0, so tests bind port 0, note the number and close; the kernel does
    not hand a port out again this quickly. A port taken on another of ``hosts`` (say, by a benchmark's
    clients using 127.0.0.3 as their source) is passed over."""
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count * len(hosts):
            first = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            first.bind((hosts[0], 0))
            port = first.getsockname()[1]
            group = [first]
            for host in hosts[1:]:
                other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                group.append(other)
                try:
                    other.bind((host, port))
                except OSError:
                    break
            else:
                sockets.extend(group)
                continue
            for sock in group:
                sock.close()
        return [sock.getsockname()[1] for sock in sockets[:: len(hosts)]]
    finally:
        for sock in sockets:
            sock.close()


def write_self_signed(directory: str, name: str = "a.test") -> tuple[str, str]:
    """A new self-signed certificate for ``name`` and its key, written to ``<directory>/a.crt`` and ``a.key``;
    their paths."""
    from dcrouter.net.certfiles import generate_self_signed

    cert, key = generate_self_signed(name)
    paths = os.path.join(directory, "a.crt"), os.path.join(directory, "a.key")
    for path, data in zip(paths, (cert, key), strict=True):
        with open(path, "wb") as handle:
            handle.write(data)
    return paths


def twistd_environment() -> dict[str, str]:
    env = dict(os.environ)
    inherited = [path for path in env.get("PYTHONPATH", "").split(os.pathsep) if path]
    env["PYTHONPATH"] = os.pathsep.join([CHECKOUT, *inherited])
    return env


class TwistdProcess(ProcessProtocol):
    """A child twistd driven by the reactor: collects its output, fires ``seen(text)`` Deferreds when ``text``
    appears in it, and ``ended`` with the exit code (or ``-signal``) when it exits."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int] = Deferred()
        self._waiting: list[tuple[bytes, Deferred[None]]] = []
        self.exit_code: int | None = None

    @classmethod
    def spawn(cls, reactor: Any, args: list[str], cwd: str) -> TwistdProcess:
        protocol = cls()
        reactor.spawnProcess(protocol, TWISTD[0], TWISTD + args, env=twistd_environment(), path=cwd)
        return protocol

    def seen(self, text: str) -> Deferred[None]:
        """Fires once ``text`` has appeared in stdout or stderr; fails if the process exits first."""
        needle = text.encode()
        waiter: Deferred[None] = Deferred()
        if needle in self.output:
            waiter.callback(None)
        elif self.exit_code is not None:
            waiter.errback(self._gone(needle))
        else:
            self._waiting.append((needle, waiter))
        return waiter

    def _gone(self, needle: bytes) -> Exception:
        return AssertionError(
            f"twistd exited ({self.exit_code}) before printing {needle!r}; its output:\n"
            + self.output.decode("utf-8", "replace")
        )

    def outReceived(self, data: bytes) -> None:
        self._received(data)

    def errReceived(self, data: bytes) -> None:
        self._received(data)

    def _received(self, data: bytes) -> None:
        self.output += data
        still = []
        for needle, waiter in self._waiting:
            if needle in self.output:
                waiter.callback(None)
            else:
                still.append((needle, waiter))
        self._waiting = still

    def signal(self, name: str) -> None:
        if self.exit_code is None:
            self.transport.signalProcess(name)

    def processEnded(self, reason: Failure) -> None:
        if reason.check(ProcessDone):
            self.exit_code = 0
        elif reason.check(ProcessTerminated):
            value = reason.value
            self.exit_code = value.exitCode if value.exitCode is not None else -int(value.signal or 0)
        else:
            self.exit_code = -1
        waiting, self._waiting = self._waiting, []
        for needle, waiter in waiting:
            waiter.errback(self._gone(needle))
        self.ended.callback(self.exit_code)

    def kill_on_cleanup(self) -> Deferred[int] | None:
        """For addCleanup: SIGKILL a process that is still running and wait for it to be reaped."""
        if self.exit_code is not None:
            return None
        self.transport.signalProcess(signal.SIGKILL)
        return self.ended
