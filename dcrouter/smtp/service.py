"""Stopping SMTP ingress the way MTAs do: :class:`SmtpService` and the registry of open sessions it drains.

What a caller may rely on:

- ``SmtpService.stopService()`` first stops every listening port it was given (no new session starts), then
  asks every open session to stop (:meth:`OpenSessions.shut_down`): an idle session gets
  ``421 4.3.2`` at once; a session in DATA, or waiting for the queue to make its message durable, gets its
  reply (the ``250`` once the message is queued) and then ``421 4.3.2``; a session that has sent MAIL but not
  DATA gets ``421 4.3.2`` as the answer to its next command. A connection accepted while stopping gets
  ``421 4.3.2`` instead of a greeting.
- When ``grace_period`` seconds have passed, every session still open gets ``421 4.3.2`` and is closed (a
  message whose end had not arrived was never acknowledged, so nothing is lost: the client retries it). A peer
  that does not let the connection go within :data:`CLOSE_WAIT` seconds is aborted.
- The Deferred from ``stopService`` fires once no session is left, or at the latest ``grace_period + 2 *
  CLOSE_WAIT`` seconds after the ports stopped. It never fails; problems are logged.

The router stops the queue and delivery only after this Deferred has fired (see ``dcrouter.router``), so a
transaction allowed to finish finds the queue still open.
"""

from __future__ import annotations

from typing import Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime

from dcrouter.log import logger

log = logger(__name__)

#: Seconds a session told to close (after the grace period) has to let go before it is aborted, and an
#: aborted one to be reported gone.
CLOSE_WAIT = 2.0


class StoppableSession(Protocol):
    """What :class:`OpenSessions` asks of an SMTP session (``ESMTPServerProtocol`` provides it)."""

    def shut_down(self) -> None:
        """Stop as soon as no transaction is in flight (421 4.3.2 now, or after the current one)."""

    def close_for_shutdown(self) -> None:
        """Send 421 4.3.2 and close now, whatever the session is doing."""

    def abort_for_shutdown(self) -> None:
        """Drop the connection without waiting for buffered output to be written."""


class OpenSessions:
    """The SMTP sessions open on a router's listeners. A session adds itself once admitted
    (:meth:`opened`) and removes itself when its connection is lost (:meth:`closed`); ``stopping`` tells a
    session accepted during a stop to refuse its client."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._open: set[StoppableSession] = set()
        self._empty_waiters: list[Deferred[bool]] = []
        self.stopping = False

    def __len__(self) -> int:
        return len(self._open)

    def opened(self, session: StoppableSession) -> None:
        self._open.add(session)

    def closed(self, session: StoppableSession) -> None:
        self._open.discard(session)
        if not self._open:
            waiters, self._empty_waiters = self._empty_waiters, []
            for waiter in waiters:
                waiter.callback(True)

    def shut_down(self) -> None:
        """Refuse new sessions and ask each open one to stop after its transaction in flight."""
        self.stopping = True
        for session in list(self._open):
            session.shut_down()

    def close_all(self) -> None:
        for session in list(self._open):
            session.close_for_shutdown()

    def abort_all(self) -> None:
        for session in list(self._open):
            session.abort_for_shutdown()

    def until_empty(self, timeout: float) -> Deferred[bool]:
        """Fires True once no session is open, or False after ``timeout`` seconds."""
        done: Deferred[bool] = Deferred()
        if not self._open:
            done.callback(True)
            return done
        self._empty_waiters.append(done)

        def expire() -> None:
            if not done.called:
                self._empty_waiters.remove(done)
                done.callback(False)

        timer: IDelayedCall = self._clock.callLater(timeout, expire)

        def cancel_timer(empty: bool) -> bool:
            if timer.active():
                timer.cancel()
            return empty

        done.addCallback(cancel_timer)
        return done


class SmtpService(Service):
    """SMTP ingress as a service for stopping: the listening ports (bound and resumed by the router) and the
    sessions they accepted. See the module docstring for the stop."""

    name = "smtp"  # type: ignore[assignment]

    def __init__(self, *, clock: IReactorTime, grace_period: float) -> None:
        self._clock = clock
        self.grace_period = grace_period
        self.sessions = OpenSessions(clock)
        self._ports: list[IListeningPort] = []
        self._stopping: Deferred[None] | None = None

    def add_port(self, port: IListeningPort) -> None:
        """Stop ``port`` first when the service stops."""
        self._ports.append(port)

    def close_ports(self) -> None:
        """Stop listening on every port now and forget them (a failed start-up)."""
        ports, self._ports = self._ports, []
        for port in ports:
            port.stopListening()

    def startService(self) -> None:
        super().startService()
        self._stopping = None
        self.sessions.stopping = False

    def stopService(self) -> Deferred[None]:
        if self._stopping is None:
            super().stopService()
            self._stopping = Deferred.fromCoroutine(self._stop())
            self._stopping.addErrback(lambda failure: log.failure("error while stopping SMTP", failure))
        return self._stopping

    async def _stop(self) -> None:
        ports, self._ports = self._ports, []
        for port in ports:
            try:
                await maybeDeferred(port.stopListening)
            except Exception:  # noqa: BLE001 (the sessions must still be drained)
                log.failure("an SMTP listener did not stop cleanly")
        await self.drain()

    async def drain(self) -> None:
        """Stop every open session: at once when idle, after its transaction within the grace period."""
        sessions = self.sessions
        sessions.shut_down()
        if not len(sessions):
            return
        log.info(
            "SMTP: {count} session(s) open; transactions in flight have up to {grace:g} s",
            count=len(sessions),
            grace=self.grace_period,
        )
        if await sessions.until_empty(self.grace_period):
            log.info("SMTP: every session has ended")
            return
        log.warn(
            "SMTP: grace period over; closing {count} session(s) with 421 4.3.2",
            count=len(sessions),
        )
        sessions.close_all()
        if await sessions.until_empty(CLOSE_WAIT):
            return
        sessions.abort_all()
        await sessions.until_empty(CLOSE_WAIT)
