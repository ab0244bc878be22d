"""ProxyService: the proxy's listening ports and its open connections, as a Twisted service.

Lifecycle (the same as DcRouter's SMTP listeners, for the same reasons):

- :meth:`ProxyService.bind` (called from ``privilegedStartService``, before twistd drops privileges) first
  loads the certificate files of terminating routes into the certificate store (under the route's domains,
  or the certificate's own names for a route for any name; a file that cannot be loaded raises
  :class:`ProxyCertificateError` naming the key path), then binds every port of
  :func:`~dcrouter.proxy.routes.listening_ports` on ``bindAddress``, paused: no connection is accepted yet.
  A port that cannot be bound raises :class:`ProxyBindError` naming the address and port, and nothing stays
  bound.
- ``startService`` resumes the ports and logs ``proxy listening on ADDR:PORT (N routes)`` for each.
- ``stopService`` stops the listeners first, then waits up to ``drain_timeout`` seconds for open connections
  to end on their own, then aborts the rest; its Deferred fires once every connection is gone.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IListeningPort

from dcrouter.events import NO_EVENTS, EventBus
from dcrouter.log import logger
from dcrouter.net.listen import ListenError, close, format_address, listen_paused, resume
from dcrouter.net.reactor import IRouterReactor
from dcrouter.proxy.forward import RouteCounters
from dcrouter.proxy.handlers import SocketHandlerError
from dcrouter.proxy.http import ChallengeSource
from dcrouter.proxy.jwtauth import JwtAuth
from dcrouter.proxy.routes import CertificateFiles, ProxyRoute, RouteTable, build_routes, listening_ports
from dcrouter.proxy.session import ProxyContext, ProxySessionFactory, ProxySettings

log = logger(__name__)


class ProxyBindError(Exception):
    """A proxy port could not be bound; the message names the address and port."""


class ProxyCertificateError(ProxyBindError):
    """A terminating route's certificate files could not be loaded; the message names the key path."""


def listening_ports_of(options: Any) -> tuple[str, list[int]] | None:
    """The address and ports the proxy of ``options`` (DcRouterOptions) listens on, or None without a
    proxy (a supervisor opens them for its workers: dcrouter.supervisor)."""
    config = options.smart_proxy_config
    http_routes = options.http_domain_routes
    if config is None and not http_routes:
        return None
    routes = build_routes(config, http_routes)
    return (config.bind_address if config is not None else "0.0.0.0", list(listening_ports(routes, config)))


class ProxyService(Service):
    """Listens on ``ports`` (default: every port the routes and ``config`` claim) on ``bind_address`` and
    proxies each connection by ``routes``.

    Attributes callers may rely on: ``context`` (the shared :class:`ProxyContext`), ``counters`` (route name
    → :class:`RouteCounters`), ``ports`` (configured port → actual port, filled once bound; port 0 binds an
    ephemeral port, whose connections route as port 0).
    """

    name = "proxy"  # type: ignore[assignment]

    def __init__(
        self,
        routes: Sequence[ProxyRoute],
        settings: ProxySettings,
        *,
        reactor: IRouterReactor,
        bind_address: str = "0.0.0.0",
        ports: Sequence[int] | None = None,
        drain_timeout: float = 5.0,
        certificates: Any = None,
        challenges: ChallengeSource | None = None,
        events: EventBus = NO_EVENTS,
        workers: int = 1,
    ) -> None:
        self._reactor = reactor
        self.bind_address = bind_address
        self.certificates = certificates
        self.context = ProxyContext(
            RouteTable(routes),
            settings,
            reactor,
            certificates=certificates,
            challenges=challenges,
            events=events,
            workers=workers,
        )
        self.counters: dict[str, RouteCounters] = self.context.counters
        self._configured_ports = list(ports) if ports is not None else listening_ports(routes)
        self.drain_timeout = drain_timeout
        self.ports: dict[int, int] = {}
        self._listening: list[tuple[int, IListeningPort]] = []
        self._stopping: Deferred[None] | None = None

    @classmethod
    def from_options(
        cls,
        options: Any,
        *,
        reactor: IRouterReactor,
        certificates: Any = None,
        challenges: ChallengeSource | None = None,
        events: EventBus = NO_EVENTS,
        workers: int = 1,
    ) -> ProxyService | None:
        """The proxy a DcRouterOptions configures (``smartProxyConfig``, ``httpDomainRoutes``), or None.
        ``certificates`` (a CertificateStore) and ``challenges`` (a ChallengeResponder) serve terminating
        routes; ``workers``: the processes serving the same ports, which share the connection rates."""
        config = options.smart_proxy_config
        http_routes = options.http_domain_routes
        if config is None and not http_routes:
            return None
        routes = build_routes(config, http_routes)
        return cls(
            routes,
            ProxySettings.from_config(config),
            reactor=reactor,
            bind_address=config.bind_address if config is not None else "0.0.0.0",
            ports=listening_ports(routes, config),
            certificates=certificates,
            challenges=challenges,
            events=events,
            workers=workers,
        )

    @property
    def bound(self) -> bool:
        return bool(self._listening)

    @property
    def route_count(self) -> int:
        return len(self.context.table.routes)

    # -- binding ---------------------------------------------------------------------------------------

    def load_certificates(self) -> None:
        """Put the certificate files of terminating routes into the store (see the module docstring)."""
        self.put_certificates(self.read_certificates(self.context.table.routes))

    def read_certificates(self, routes: Sequence[ProxyRoute]) -> list[tuple[ProxyRoute, Any]]:
        """The key of each terminating route of ``routes`` that names certificate files, read now; raises
        ProxyCertificateError naming the route's key path."""
        from dcrouter.net.certstore import CertifiedKey  # late: only configs that terminate need it

        found = []
        for route in routes:
            files = route.certificate
            if not isinstance(files, CertificateFiles):
                continue
            if self.certificates is None:
                raise ProxyCertificateError(f"{route.source}: no certificate store to terminate TLS with")
            try:
                key = CertifiedKey.from_files(files.cert_path, files.key_path)
            except (OSError, ValueError) as error:
                raise ProxyCertificateError(f"{route.source}: certificate: {error}") from error
            found.append((route, key))
        return found

    def put_certificates(self, keys: list[tuple[ProxyRoute, Any]]) -> None:
        for route, key in keys:
            for name in route.domains or key.names:
                self.certificates.put(name, key)
            assert isinstance(route.certificate, CertificateFiles)
            log.info(
                "proxy: {route} terminates TLS with {cert} ({names})",
                route=route.name,
                cert=route.certificate.cert_path,
                names=", ".join(key.names),
            )

    def check_handlers(self) -> None:
        """Every ``socket-handler`` route's handler must be found before a port is bound: a plugin that
        cannot be imported stops start-up naming the route, rather than refusing each connection."""
        for route in self.context.table.routes:
            if route.action.handler is None:
                continue
            try:
                self.context.handlers.get(route.action.handler)
            except SocketHandlerError as error:
                raise ProxyBindError(f"{route.source}.action.socketHandler: {error}") from error

    def bind(self) -> None:
        """Bind every port, paused (see the module docstring). Does nothing when already bound."""
        if self._listening:
            return
        self.check_handlers()
        self.load_certificates()
        ports = self._configured_ports
        try:
            bound = listen_paused(
                self._reactor,
                [(port, ProxySessionFactory(self.context, port)) for port in ports],
                interface=self.bind_address,
                what="the proxy",
            )
        except ListenError as error:
            # Not "message=": a legacy log observer (trial's) replaces a "message" that is not a tuple.
            log.critical("{problem}", problem=str(error))
            raise ProxyBindError(str(error)) from error
        for port, listening in zip(ports, bound, strict=True):
            self._listening.append((port, listening))
            address = cast(IPv4Address | IPv6Address, listening.getHost())  # a TCP port's own address
            self.ports[port] = int(address.port)
        self._tune_listeners()

    def _tune_listeners(self) -> None:
        """TCP_NODELAY (always) and SO_KEEPALIVE (as ``keepAlive`` says) on the listening sockets, which
        the accepted sockets inherit (Linux and the BSDs do): two system calls fewer per connection. When
        a listener has no socket to set them on, the sessions set them per connection."""
        keep_alive = int(self.context.settings.keep_alive)
        try:
            for _, listening in self._listening:
                sock = listening.socket  # type: ignore[attr-defined]
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, keep_alive)
        except (AttributeError, OSError):
            self.context.listeners_tuned = False
        else:
            self.context.listeners_tuned = bool(self._listening)

    # -- reload --------------------------------------------------------------------------------------

    def bind_more(self, ports: Sequence[int]) -> list[tuple[int, IListeningPort]]:
        """Bind ``ports`` (new ports of a reload), paused and unused until :meth:`reconfigure`; raises
        ProxyBindError (nothing stays bound)."""
        try:
            bound = listen_paused(
                self._reactor,
                [(port, ProxySessionFactory(self.context, port)) for port in ports],
                interface=self.bind_address,
                what="the proxy",
            )
        except ListenError as error:
            raise ProxyBindError(str(error)) from error
        return list(zip(ports, bound, strict=True))

    def reconfigure(
        self,
        routes: Sequence[ProxyRoute],
        settings: ProxySettings,
        ports: Sequence[int],
        added: list[tuple[int, IListeningPort]],
    ) -> Deferred[None]:
        """Switch to ``routes`` and ``settings`` at once (connections accepted from now on route by them;
        open ones go on), start the ports in ``added`` and stop listening on those not in ``ports``. Fires
        once the removed ports have stopped."""
        self.context.replace(RouteTable(routes), settings)
        self._configured_ports = list(ports)
        for port, listening in added:
            self._listening.append((port, listening))
            address = cast(IPv4Address | IPv6Address, listening.getHost())
            self.ports[port] = int(address.port)
        self._tune_listeners()  # keepAlive may have changed; the added ports get both options
        for port, listening in added:
            if self.running:
                resume(listening)
            log.info(
                "proxy listening on {address}", address=format_address(self.bind_address, self.ports[port])
            )
        stopping = []
        for port, listening in [entry for entry in self._listening if entry[0] not in ports]:
            self._listening.remove((port, listening))
            log.info(
                "proxy stopped listening on {address}",
                address=format_address(self.bind_address, self.ports[port]),
            )
            del self.ports[port]
            stopping.append(maybeDeferred(listening.stopListening))
        done: Deferred[None] = DeferredList(stopping, consumeErrors=True).addCallback(lambda _: None)
        return done

    def unbind(self) -> None:
        """Close every bound port (a failed start-up)."""
        close([listening for _, listening in self._listening])
        self._listening = []
        self.ports = {}

    # -- service ---------------------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.bind()

    def startService(self) -> None:
        self.bind()
        super().startService()
        for route in self.context.table.routes:
            checker = self.context.auth_for(route)
            if isinstance(checker, JwtAuth):
                checker.start()  # a jwksUrl is fetched now and kept fresh
        self.context.monitor.start()
        self._stopping = None
        for port, listening in self._listening:
            resume(listening)
            log.info(
                "proxy listening on {address} ({routes} routes)",
                address=format_address(self.bind_address, self.ports[port]),
                routes=sum(1 for r in self.context.table.routes if r.listens_on(port)),
                port=self.ports[port],
            )

    def stopService(self) -> Deferred[None]:
        if self._stopping is None:
            super().stopService()
            for route in self.context.table.routes:
                checker = self.context.auth_for(route)
                if isinstance(checker, JwtAuth):
                    checker.stop()
            self.context.monitor.stop()
            self._stopping = Deferred.fromCoroutine(self._stop())
            self._stopping.addErrback(lambda failure: log.failure("error while stopping the proxy", failure))
        return self._stopping

    async def _stop(self) -> None:
        listening, self._listening = self._listening, []
        results = await DeferredList(
            [maybeDeferred(port.stopListening) for _, port in listening], consumeErrors=True
        )
        for ok, failure in results:
            if not ok:
                log.failure("a proxy listener did not stop cleanly", failure)  # type: ignore[arg-type]
        self.ports = {}
        await self.drain(self.drain_timeout)
        # Idle keep-alive backend connections: closed, and awaited as the sessions were.
        pool = self.context.backend_pool
        pool.close()
        if pool.closing:
            await self._until(lambda: not pool.closing, self.drain_timeout)
        h2c = self.context.h2c_pool
        h2c.close()
        if h2c.closing:
            await self._until(lambda: not h2c.closing, self.drain_timeout)

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for open connections to end, then abort what is left and wait
        for those to go too."""
        sessions = self.context.sessions
        if sessions:
            log.info(
                "proxy: {count} connections open; waiting up to {timeout}s",
                count=len(sessions),
                timeout=timeout,
            )
            await self._until_empty(timeout)
        for session in list(sessions):
            session.abort("dcrouter is stopping")
        # An abort is reported in the next reactor iteration; bounded by the same timeout again.
        await self._until_empty(timeout)

    def _until_empty(self, timeout: float) -> Deferred[None]:
        """Fires when no session is left, or after ``timeout`` seconds; polls (a shutdown-only path)."""
        return self._until(lambda: not self.context.sessions, timeout)

    def _until(self, done_yet: Callable[[], bool], timeout: float) -> Deferred[None]:
        """Fires when ``done_yet()``, or after ``timeout`` seconds; polls (a shutdown-only path)."""
        done: Deferred[None] = Deferred()
        deadline = self._reactor.seconds() + timeout

        def check() -> None:
            if done_yet() or self._reactor.seconds() >= deadline:
                done.callback(None)
            else:
                self._reactor.callLater(0.05, check)

        check()
        return done
