"""Workers on every core: one supervisor process and ``workers`` worker processes (docs/deployment.md,
"Workers"; the choices in docs/decisions.md, "Workers").

twistd runs the :class:`Supervisor` when the configuration asks for more than one worker. It

- opens every SMTP and proxy listening socket once, in ``privilegedStartService`` (before twistd drops
  privileges, so ports below 1024 work), and passes them to each worker at the same descriptor numbers
  (``spawnProcess``'s ``childFDs``); a worker adopts them (:func:`dcrouter.net.listen.inherit`) instead of
  binding, so the kernel hands each accepted connection to whichever worker accepts first and a worker that
  exits loses nothing queued on the socket (the others go on accepting from it);
- starts each worker as ``twistd -n dcrouter --config FILE`` with its index and the sockets in its
  environment (:data:`WORKER_ENV`, :data:`SOCKETS_ENV`); worker 0 also runs the services that must run
  once (the API, the metrics listener, the DNS server; :class:`~dcrouter.router.DcRouter`'s ``worker``);
- relays each worker's output lines into its own log, prefixed ``worker N:``;
- restarts a worker that ended while the supervisor runs, after a back-off that doubles with each quick
  death in a row (:data:`RESTART_DELAY` up to :data:`RESTART_DELAY_MAX`; a worker that lived
  :data:`STABLE_AFTER` seconds resets it);
- forwards SIGHUP (reload) to every worker; on stop (SIGTERM, SIGINT) sends SIGTERM to every worker, which
  drains as a single dcrouter does (listeners closed, sessions in flight finish, queue saved), and ends once
  all have exited (a worker still alive after :data:`STOP_TIMEOUT` seconds is killed);
- is watched by its workers: a worker whose supervisor dies (``kill -9``) gets SIGTERM from the kernel
  (``PR_SET_PDEATHSIG``, :func:`die_with_parent`) and drains, so no orphan keeps serving.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.python.failure import Failure

from dcrouter.log import logger
from dcrouter.net.listen import LISTEN_BACKLOG, ListenError, format_address

log = logger(__name__)

#: Environment of a worker: its index, and its inherited sockets (JSON ``[[interface, port, fd], ...]``).
WORKER_ENV = "DCROUTER_WORKER"
SOCKETS_ENV = "DCROUTER_WORKER_SOCKETS"

RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
STABLE_AFTER = 30.0
STOP_TIMEOUT = 120.0

Address = tuple[str, int]


def listen_addresses(options: Any) -> list[Address]:
    """Every ``(interface, port)`` SMTP and the proxy of ``options`` (DcRouterOptions) listen on, in order."""
    from dcrouter.proxy.service import listening_ports_of

    addresses: list[Address] = []
    smtp = options.smtp_config
    if smtp is not None:
        addresses += [(smtp.bind_address, port) for port in smtp.ports]
    proxied = listening_ports_of(options)
    if proxied is not None:
        interface, ports = proxied
        addresses += [(interface, port) for port in ports if (interface, port) not in addresses]
    return addresses


def open_socket(interface: str, port: int) -> socket.socket:
    """A listening TCP socket on ``interface:port``, inheritable, non-blocking; ListenError if it cannot."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((interface, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as error:
        sock.close()
        raise ListenError("a worker port", interface, port, error.strerror or error) from error
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def worker_sockets(environ: Mapping[str, str]) -> tuple[int, dict[Address, int]] | None:
    """This process's worker index and inherited sockets, or None when it is no supervisor's worker."""
    index = environ.get(WORKER_ENV)
    if index is None:
        return None
    sockets = json.loads(environ.get(SOCKETS_ENV, "[]"))
    return int(index), {(str(interface), int(port)): int(fd) for interface, port, fd in sockets}


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the supervisor dies (Linux ``PR_SET_PDEATHSIG``; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the supervisor died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def worker_command(config_path: str) -> list[str]:
    """The command line of a worker: twistd in the foreground on ``config_path``, no pid file."""
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "--nodaemon",
        "--pidfile=",
        "dcrouter",
        "--config",
        config_path,
    ]


#: spawn(protocol, argv, env, childFDs) → the process transport (reactor.spawnProcess in production).
Spawn = Callable[[protocol.ProcessProtocol, list[str], dict[str, str], dict[int, Any]], IProcessTransport]


class WorkerProtocol(protocol.ProcessProtocol):
    """One worker's pipes: its output lines into the supervisor's log, its end to the supervisor."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        for line in lines:
            if line:
                # Not "message=": see dcrouter.smtp.service.
                log.info("worker {index}: {line}", index=self.index, line=line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.worker_ended(self.index, reason)


class Supervisor(Service):
    """Runs ``count`` workers of ``config_path`` on the sockets of ``addresses``; see the module docstring.
    ``spawn`` starts a process (``reactor.spawnProcess`` unless given); ``clock`` times restarts."""

    name = "supervisor"  # type: ignore[assignment]

    def __init__(
        self,
        config_path: str,
        count: int,
        addresses: Sequence[Address],
        *,
        reactor: Any,
        spawn: Spawn | None = None,
        environ: Mapping[str, str] | None = None,
        install_signals: bool = True,
    ) -> None:
        self.config_path = config_path
        self.count = count
        self.addresses = list(addresses)
        self._reactor = reactor
        self._spawn: Spawn = spawn or self._spawn_process
        self._environ = dict(os.environ if environ is None else environ)
        self._install_signals = install_signals
        self.sockets: dict[Address, socket.socket] = {}
        #: index → the running worker's transport; absent while it is dead and waiting for its restart.
        self.workers: dict[int, IProcessTransport] = {}
        self.started_at: dict[int, float] = {}
        #: index → quick deaths in a row (the back-off's exponent).
        self.failures: dict[int, int] = {}
        self.restarts: dict[int, IDelayedCall] = {}
        self.stopping = False
        self._stopped: Deferred[None] | None = None
        self._stop_timer: IDelayedCall | None = None

    # -- start -----------------------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.open_sockets()
        if self._install_signals and hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, self._sighup)

    def open_sockets(self) -> None:
        """Open every listening socket (once); ListenError closes those opened."""
        if self.sockets:
            return
        try:
            for interface, port in self.addresses:
                self.sockets[(interface, port)] = open_socket(interface, port)
        except ListenError as error:
            log.critical("{problem}", problem=str(error))
            self.close_sockets()
            raise
        for (interface, _port), sock in self.sockets.items():
            actual = sock.getsockname()[1]
            log.info(
                "supervisor: listening on {address} for {count} workers",
                address=format_address(interface, actual),
                count=self.count,
                port=actual,
            )

    def close_sockets(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()

    def startService(self) -> None:
        super().startService()
        self.open_sockets()
        self.stopping = False
        for index in range(self.count):
            self.start_worker(index)

    def start_worker(self, index: int) -> None:
        self.restarts.pop(index, None)
        env = dict(self._environ)
        env[WORKER_ENV] = str(index)
        env[SOCKETS_ENV] = json.dumps(
            [[interface, port, sock.fileno()] for (interface, port), sock in self.sockets.items()]
        )
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for sock in self.sockets.values():
            child_fds[sock.fileno()] = sock.fileno()
        transport = self._spawn(WorkerProtocol(self, index), worker_command(self.config_path), env, child_fds)
        self.workers[index] = transport
        self.started_at[index] = self._reactor.seconds()
        log.info("supervisor: worker {index} started (pid {pid})", index=index, pid=transport.pid)

    def _spawn_process(
        self, proto: protocol.ProcessProtocol, argv: list[str], env: dict[str, str], child_fds: dict[int, Any]
    ) -> IProcessTransport:
        return self._reactor.spawnProcess(proto, argv[0], argv, env=env, childFDs=child_fds)  # type: ignore[no-any-return]

    # -- a worker ended --------------------------------------------------------------------------------

    def restart_delay(self, index: int) -> float:
        """The back-off before restarting worker ``index`` after its latest (quick) death."""
        return min(RESTART_DELAY * 2 ** max(0, self.failures.get(index, 0) - 1), RESTART_DELAY_MAX)

    def worker_ended(self, index: int, reason: Failure) -> None:
        self.workers.pop(index, None)
        lived = self._reactor.seconds() - self.started_at.pop(index, self._reactor.seconds())
        status = getattr(reason.value, "exitCode", None)
        signalled = getattr(reason.value, "signal", None)
        if self.stopping:
            log.info("supervisor: worker {index} stopped (exit {status})", index=index, status=status)
            if not self.workers and self._stopped is not None:
                self._finish_stop()
            return
        self.failures[index] = 1 if lived >= STABLE_AFTER else self.failures.get(index, 0) + 1
        delay = self.restart_delay(index)
        log.warn(
            "supervisor: worker {index} ended (exit {status}, signal {signalled}) after {lived:.1f} s; "
            "restarting in {delay:.1f} s",
            index=index,
            status=status,
            signalled=signalled,
            lived=lived,
            delay=delay,
        )
        self.restarts[index] = self._reactor.callLater(delay, self.start_worker, index)

    # -- signals ---------------------------------------------------------------------------------------

    def _sighup(self, signum: int, frame: Any) -> None:
        # A signal handler may run between any two bytecodes: do the work in the reactor thread.
        self._reactor.callFromThread(self.forward, "HUP")

    def forward(self, signame: str) -> None:
        """Send ``signame`` (``"HUP"``, ``"TERM"``, ``"KILL"``) to every running worker."""
        if signame == "HUP":
            log.info("supervisor: SIGHUP received, forwarded to {count} workers", count=len(self.workers))
        for transport in list(self.workers.values()):
            try:
                transport.signalProcess(signame)
            except OSError:
                pass  # it has just ended; worker_ended sees to it

    # -- stop ------------------------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        if self._stopped is not None:
            return self._stopped
        super().stopService()
        self.stopping = True
        for pending in self.restarts.values():
            pending.cancel()
        self.restarts.clear()
        self._stopped = Deferred()
        if not self.workers:
            self._finish_stop()
            return self._stopped
        log.info("supervisor: stopping {count} workers (they drain first)", count=len(self.workers))
        self.forward("TERM")
        self._stop_timer = self._reactor.callLater(STOP_TIMEOUT, self.forward, "KILL")
        return self._stopped

    def _finish_stop(self) -> None:
        if self._stop_timer is not None and self._stop_timer.active():
            self._stop_timer.cancel()
        self.close_sockets()
        log.info("supervisor: every worker has stopped")
        stopped, self._stopped = self._stopped, None
        if stopped is not None:
            stopped.callback(None)
