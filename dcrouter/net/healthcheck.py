"""Active health checks of targets, as HAProxy's `check inter rise fall`: the proxy's ``action.healthCheck``.

A :class:`TargetCheck` probes one target every ``interval`` seconds on the reactor's timers. A probe is a TCP
connect, a TLS handshake, or an HTTP ``GET`` whose status must be among the expected ones, each within
``timeout`` seconds. ``fall`` failures in a row take an up target down; ``rise`` successes in a row bring a
down target back. A target starts up (as HAProxy's servers do) and is probed at once, so a target that is
down at start-up is out after ``fall`` probes: ``fall * interval`` seconds at most, plus a timeout.

The state lives in :class:`~dcrouter.net.targets.TargetHealth` (``check_failed``/``check_passed``), which
the order of targets reads: a target an active check holds down gets no new connection until it recovers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.log import logger
from dcrouter.net.targets import Target

log = logger(__name__)

Kind = Literal["tcp", "tls", "http"]


@dataclass(frozen=True)
class HealthCheckRule:
    """``action.healthCheck`` as the proxy uses it. Times in seconds; ``port`` None: the target's port;
    ``host`` None: the target's host (HTTP ``Host`` header)."""

    kind: Kind = "tcp"
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    path: str = "/"
    expect: tuple[int, ...] = (200,)
    host: str | None = None
    port: int | None = None


#: Opens a connection: ``connect(target, protocol_factory, tls) -> Deferred[protocol]`` (``tls``: whether
#: to speak TLS, as the route does towards its backends).
Connect = Callable[[Target, Callable[[], Protocol], bool], "Deferred[Any]"]

#: A probe: fires when the target passed, fails (with a reason) when it did not.
Probe = Callable[[Target], "Deferred[None]"]


class ProbeFailed(Exception):
    """The target answered, but not as a healthy one does (an unexpected HTTP status, a closed connection)."""


class TargetCheck:
    """Probes ``target`` every ``rule.interval`` seconds; calls ``on_change(target, up, reason)`` when its
    state flips. :meth:`start` and :meth:`stop` bound its timers."""

    def __init__(
        self,
        target: Target,
        rule: HealthCheckRule,
        probe: Probe,
        clock: IReactorTime,
        on_change: Callable[[Target, bool, str], None],
    ) -> None:
        self.target = target
        self.rule = rule
        self.up = True
        self.last_error = ""
        self._probe = probe
        self._clock = clock
        self._on_change = on_change
        self._passes = 0
        self._failures = 0
        self._next: IDelayedCall | None = None
        self._running: Deferred[None] | None = None
        self._stopped = True

    def start(self) -> None:
        """Probe now, then every ``interval`` seconds after each probe ends."""
        self._stopped = False
        self._run()

    def stop(self) -> None:
        self._stopped = True
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        if self._running is not None:
            self._running.cancel()

    def _run(self) -> None:
        self._next = None
        probing = self._probe(self.target)
        timer = self._clock.callLater(self.rule.timeout, probing.cancel)
        self._running = probing

        def passed(_: object) -> None:
            self._result(None)

        def failed(failure: Failure) -> None:
            if self._stopped:
                return
            if failure.check(CancelledError):
                reason = f"no answer within {self.rule.timeout:g}s"
            else:
                reason = failure.getErrorMessage() or failure.type.__name__
            self._result(reason)

        def done(_: object) -> None:
            self._running = None
            if timer.active():
                timer.cancel()
            if not self._stopped:
                self._next = self._clock.callLater(self.rule.interval, self._run)

        probing.addCallbacks(passed, failed).addErrback(
            lambda f: log.failure("health check of {t} crashed", f, t=str(self.target))
        ).addBoth(done)

    def _result(self, error: str | None) -> None:
        if error is None:
            self._failures = 0
            self._passes += 1
            if not self.up and self._passes >= self.rule.rise:
                self.up = True
                self._on_change(self.target, True, f"{self._passes} checks passed")
            return
        self._passes = 0
        self._failures += 1
        self.last_error = error
        if self.up and self._failures >= self.rule.fall:
            self.up = False
            self._on_change(self.target, False, error)


# -- probes ----------------------------------------------------------------------------------------------


def make_probe(rule: HealthCheckRule, connect: Connect, *, tls: bool) -> Probe:
    """The probe ``rule.kind`` names, opening connections with ``connect`` (over TLS when ``tls``: the
    route re-encrypts, or the kind is ``tls``)."""

    def probe(target: Target) -> Deferred[None]:
        if rule.kind == "http":
            host = rule.host or target.host
            if ":" in host:
                host = f"[{host}]"  # an IPv6 literal (RFC 9110 §7.2)
            request = (
                f"GET {rule.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: dcrouter-health-check\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            return _opened(connect(target, lambda: _HttpProbe(request, rule.expect), tls))
        if rule.kind == "tls":
            return _opened(connect(target, _HandshakeProbe, True))
        return _opened(connect(target, _ConnectProbe, tls))

    return probe


def _opened(connecting: Deferred[Any]) -> Deferred[None]:
    """Fires when the probe protocol connecting has reached its verdict. Cancelling it (the timeout) drops
    the connection or the attempt."""
    protocol: list[Any] = []

    def cancel(_: Deferred[None]) -> None:
        if protocol:
            protocol[0].transport.abortConnection()
        else:
            connecting.cancel()

    verdict: Deferred[None] = Deferred(cancel)

    def settle(result: object) -> None:
        if verdict.called:
            return  # cancelled by the timeout meanwhile
        if isinstance(result, Failure):
            verdict.errback(result)
        else:
            verdict.callback(None)

    def connected(p: Any) -> None:
        protocol.append(p)
        p.verdict.addBoth(settle)

    def failed(failure: Failure) -> None:
        if not verdict.called:
            verdict.errback(failure)

    connecting.addCallbacks(connected, failed)
    return verdict


class _ConnectProbe(Protocol):
    transport: Any

    def __init__(self) -> None:
        self.verdict: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.verdict.callback(None)
        self.transport.loseConnection()


@implementer(IHandshakeListener)
class _HandshakeProbe(Protocol):
    transport: Any

    def __init__(self) -> None:
        self.verdict: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        if not self.verdict.called:
            self.verdict.callback(None)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.verdict.called:
            self.verdict.errback(ProbeFailed(f"TLS handshake failed: {reason.getErrorMessage()}"))


class _HttpProbe(Protocol):
    """Sends ``request``; passes when the status line's code is in ``expect``."""

    transport: Any

    def __init__(self, request: bytes, expect: tuple[int, ...]) -> None:
        self.verdict: Deferred[None] = Deferred()
        self._request = request
        self._expect = expect
        self._received = b""

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self.verdict.called:
            return
        self._received += data
        if b"\r\n" not in self._received:
            if len(self._received) > 1024:
                self._fail("no HTTP status line")
            return
        line = self._received.split(b"\r\n", 1)[0]
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            self._fail("no HTTP status line")
            return
        status = int(parts[1])
        if status in self._expect:
            self.verdict.callback(None)
        else:
            self._fail(f"HTTP status {status}")
        self.transport.loseConnection()

    def _fail(self, reason: str) -> None:
        self.verdict.errback(ProbeFailed(reason))
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.verdict.called:
            self.verdict.errback(ProbeFailed("connection closed before a status line"))
