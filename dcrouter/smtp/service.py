"""SMTP ingress as a service: :class:`SmtpService` binds the listeners of ``smtpConfig``, and stops them and
drains their sessions the way MTAs do; :class:`OpenSessions` is the registry of open sessions it drains.

What a caller may rely on:

- :meth:`SmtpService.bind` (the router calls it from ``privilegedStartService``, so ports below 1024 are bound
  before twistd drops privileges) loads the TLS material, then binds every port of ``smtpConfig.ports`` on
  ``bindAddress``, paused (:mod:`dcrouter.net.listen`): no connection is accepted yet. Implicit-TLS ports
  speak TLS from the first byte. A port that cannot be bound raises
  :class:`~dcrouter.net.listen.ListenError` naming the address and port, and none of SMTP's ports stays
  bound. It binds once: later calls do nothing until the service has stopped.
- ``startService()`` (the router calls it once the queue has loaded) resumes the ports and logs ``SMTP
  listening on ADDR:PORT (ROLE)`` for each (:func:`describe_listener`).
- ``stopService()`` first stops every listening port (no new session starts), then
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

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IProtocolFactory, IReactorTime
from twisted.internet.ssl import CertificateOptions
from twisted.protocols.tls import TLSMemoryBIOFactory

from dcrouter.config.smtp import SmtpConfig
from dcrouter.log import logger
from dcrouter.net.cidr import CidrSet
from dcrouter.net.listen import ListenError, close, format_address, listen_paused, resume
from dcrouter.net.reactor import IRouterReactor
from dcrouter.smtp.proxied import ProxyHeaderFactory

if TYPE_CHECKING:
    from dcrouter.smtp.protocol import ESMTPServerFactory

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


class SessionFactoryMaker(Protocol):
    """Makes the ESMTP factory for one listening port (the router wires its collaborators in); ``sessions``
    is the service's registry, shared by every port."""

    def __call__(
        self, *, port: int, tls_options: CertificateOptions | None, sessions: OpenSessions
    ) -> ESMTPServerFactory: ...


def describe_listener(config: SmtpConfig, port: int, has_tls: bool, auth_offered: bool) -> str:
    """What a port does, for the start-up log: ``mx, STARTTLS`` or ``submission, STARTTLS, AUTH required``."""
    submission = port in config.submission_ports
    parts = ["submission" if submission else "mx"]
    if port in config.implicit_tls_ports:
        parts.append("implicit TLS")
    else:
        parts.append("STARTTLS" if has_tls else "no TLS")
    if submission or config.auth.required:
        parts.append("AUTH required")
    elif auth_offered:
        parts.append("AUTH offered")
    if config.proxy_protocol != "none":
        parts.append(f"PROXY {config.proxy_protocol} from trustedProxies")
    return ", ".join(parts)


@dataclass
class SmtpListener:
    """One configured SMTP port, its role (:func:`describe_listener`) and its listening port."""

    configured_port: int
    description: str
    listening: IListeningPort

    @property
    def actual_port(self) -> int:
        return int(self.listening.getHost().port)  # type: ignore[attr-defined]  # TCP: an IPv4/IPv6Address


@dataclass
class PendingPorts:
    """Ports a reload has bound, paused, and not yet put to use (:meth:`SmtpService.bind_more`)."""

    config: SmtpConfig
    factories: list[ESMTPServerFactory]
    bound: list[IListeningPort]
    tls_options: CertificateOptions | None

    def close(self) -> None:
        """Give the ports back (the reload did not go ahead)."""
        close(self.bound)


def _no_tls() -> CertificateOptions | None:
    return None


class SmtpService(Service):
    """SMTP ingress as a service: the listeners of ``config`` (each port's factory from ``factory_for``, with
    the TLS options ``load_tls`` returns when binding) and the sessions they accepted. ``reactor`` binds and
    drives the stop's timers. See the module docstring for binding, starting and stopping.

    Attributes callers may rely on: ``sessions`` (the :class:`OpenSessions` every port's sessions join),
    ``listeners`` (the :class:`SmtpListener` of each bound port), ``ports`` (configured port → actual port,
    filled once bound; port 0 binds an ephemeral port) and ``grace_period`` (seconds, from
    ``shutdownGracePeriod``).
    """

    name = "smtp"  # type: ignore[assignment]

    def __init__(
        self,
        config: SmtpConfig,
        *,
        reactor: IRouterReactor,
        factory_for: SessionFactoryMaker,
        load_tls: Callable[[], CertificateOptions | None] = _no_tls,
    ) -> None:
        self.config = config
        self._reactor = reactor
        self._factory_for = factory_for
        self._load_tls = load_tls
        self.grace_period = config.shutdown_grace_period / 1000
        self.sessions = OpenSessions(reactor)
        self.listeners: list[SmtpListener] = []
        self.ports: dict[int, int] = {}
        #: The session factory of each bound port (configured port → factory), for a reload to reconfigure.
        self.factories: dict[int, ESMTPServerFactory] = {}
        self._ports: list[IListeningPort] = []
        self._bound = False
        self._stopping: Deferred[None] | None = None
        self._tls_options: CertificateOptions | None = None
        self._handed_over: dict[int, ESMTPServerFactory] = {}
        #: What the last reload did to every factory, for handed-over ports first used after it.
        self._reconfigured: Callable[[ESMTPServerFactory], None] | None = None

    def add_port(self, port: IListeningPort) -> None:
        """Stop ``port`` first when the service stops."""
        self._ports.append(port)

    def bind(self) -> None:
        """Load the TLS material and bind every port, paused; see the module docstring."""
        if self._bound:
            return
        self._bound = True
        config = self.config
        tls_options = self._tls_options = self._load_tls()
        factories = [
            self._factory_for(port=port, tls_options=tls_options, sessions=self.sessions)
            for port in config.ports
        ]
        try:
            bound = self._listen(config, factories, tls_options)
        except ListenError as error:
            # Not "message=": a legacy log observer (trial's) replaces a "message" that is not a tuple.
            log.critical("{problem}", problem=str(error))
            raise
        self._add_listeners(config, factories, bound, tls_options)

    def _listen(
        self,
        config: SmtpConfig,
        factories: list[ESMTPServerFactory],
        tls_options: CertificateOptions | None,
    ) -> list[IListeningPort]:
        return listen_paused(
            self._reactor,
            [(factory.port, self._serving(config, factory, tls_options)) for factory in factories],
            interface=config.bind_address,
            what="SMTP",
            spread=True,  # long sessions: spread over the workers as they connect
        )

    def _add_listeners(
        self,
        config: SmtpConfig,
        factories: list[ESMTPServerFactory],
        bound: list[IListeningPort],
        tls_options: CertificateOptions | None,
    ) -> list[SmtpListener]:
        added = []
        for factory, listening in zip(factories, bound, strict=True):
            port = factory.port
            has_tls, auth_offered = tls_options is not None, factory.authenticator is not None
            listener = SmtpListener(port, describe_listener(config, port, has_tls, auth_offered), listening)
            self.add_port(listening)
            self.listeners.append(listener)
            self.factories[port] = factory
            self.ports[port] = listener.actual_port
            added.append(listener)
        return added

    # -- reload ----------------------------------------------------------------------------------------

    def bind_more(
        self,
        config: SmtpConfig,
        factories: list[ESMTPServerFactory],
        tls_options: CertificateOptions | None,
    ) -> PendingPorts:
        """Bind, paused, the ports of ``factories`` (new ports of a reload's ``config``), without using them
        yet: :meth:`reconfigure` takes them in, :meth:`PendingPorts.close` gives them back. Raises ListenError
        (nothing stays bound)."""
        return PendingPorts(config, factories, self._listen(config, factories, tls_options), tls_options)

    def reconfigure(
        self,
        config: SmtpConfig,
        added: PendingPorts,
        update: Callable[[ESMTPServerFactory], None],
    ) -> Deferred[None]:
        """Switch to ``config`` at once: every kept port's factory is passed to ``update`` (sessions accepted
        from now on get the new settings; open ones keep theirs), the ports in ``added`` start accepting,
        and the ports ``config`` no longer lists stop listening (their open sessions go on to their end).
        The Deferred fires once the removed ports have stopped."""
        self.config = config
        self.grace_period = config.shutdown_grace_period / 1000
        for port, factory in self.factories.items():
            if port in config.ports:
                update(factory)
        for factory in self._handed_over.values():
            update(factory)
        self._reconfigured = update
        for listener in self._add_listeners(config, added.factories, added.bound, added.tls_options):
            if self.running:
                resume(listener.listening)
            log.info(
                "SMTP listening on {address} ({description})",
                address=format_address(config.bind_address, listener.actual_port),
                description=listener.description,
                port=listener.actual_port,
            )
        stopping = []
        for listener in [kept for kept in self.listeners if kept.configured_port not in config.ports]:
            self.listeners.remove(listener)
            self._ports.remove(listener.listening)
            del self.factories[listener.configured_port]
            del self.ports[listener.configured_port]
            log.info(
                "SMTP stopped listening on {address}",
                address=format_address(config.bind_address, listener.actual_port),
            )
            stopping.append(maybeDeferred(listener.listening.stopListening))
        done: Deferred[None] = DeferredList(stopping, consumeErrors=True).addCallback(lambda _: None)
        return done

    def handover_factory(self, port: int) -> ESMTPServerFactory:
        """The factory of sessions whose connections were accepted elsewhere on ``port`` and handed over
        (the proxy's ``smtp`` socket handler): STARTTLS with the certificate loaded by :meth:`bind`, the
        role that ``port`` has in ``submissionPorts`` (else MX), drained with the listeners' sessions."""
        factory = self._handed_over.get(port)
        if factory is None:
            factory = self._factory_for(port=port, tls_options=self._tls_options, sessions=self.sessions)
            if self._reconfigured is not None:
                self._reconfigured(factory)  # the settings of the last reload, not those of the start
            self._handed_over[port] = factory
        return factory

    def _serving(
        self, config: SmtpConfig, factory: ESMTPServerFactory, tls_options: CertificateOptions | None
    ) -> IProtocolFactory:
        """What listens on ``factory``'s port: on an implicit-TLS port, TLS from the first byte (the protocol
        knows from its port never to offer STARTTLS there); with ``proxyProtocol``, the PROXY header is read
        before anything else (:mod:`dcrouter.smtp.proxied`)."""
        serving: IProtocolFactory = factory
        if factory.port in config.implicit_tls_ports:
            assert tls_options is not None  # the configuration generates a certificate when none is named
            serving = TLSMemoryBIOFactory(tls_options, False, factory)
        if config.proxy_protocol != "none":
            serving = ProxyHeaderFactory(
                serving,
                trusted=CidrSet(config.trusted_proxies),
                version=config.proxy_protocol,
                timeout=config.proxy_header_timeout / 1000,
                clock=self._reactor,
            )
        return serving

    def startService(self) -> None:
        super().startService()
        self._stopping = None
        self.sessions.stopping = False
        for listener in self.listeners:
            resume(listener.listening)
            log.info(
                "SMTP listening on {address} ({description})",
                address=format_address(self.config.bind_address, listener.actual_port),
                description=listener.description,
                port=listener.actual_port,
            )

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
        # A later start binds again (an embedding program may restart the router).
        self.listeners = []
        self.factories = {}
        self._bound = False

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
