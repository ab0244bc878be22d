"""DcRouter: the MultiService that builds dcrouter's services from its options and wires them together.

``DcRouter(options)`` mirrors the seed's ``new DcRouter({...})``: ``options`` is a mapping in the
configuration file's shape (validated, raising :class:`dcrouter.config.ConfigError`), a loaded
``ConfigResult`` or a ``DcRouterOptions``. It can be the root service of ``twistd dcrouter`` or a child of
another program's service.

Lifecycle, and why in this order:

- ``privilegedStartService`` binds every SMTP port (twistd drops privileges right after it, so ports below
  1024 must be bound here) and loads the TLS material (keys are often readable by root only), through
  :meth:`SmtpService.bind <dcrouter.smtp.service.SmtpService.bind>`. The listening sockets are paused: the
  kernel may complete handshakes, but no connection is accepted and no session starts yet.
- ``startService`` starts the thread pool, loads the queue (crash recovery), starts child services, and only
  then resumes the listening sockets, so no message can be acknowledged before the queue has recovered.
- ``stopService`` stops SMTP ingress first (:class:`~dcrouter.smtp.service.SmtpService`): the listeners
  stop, idle sessions get ``421 4.3.2``, transactions in flight get up to ``shutdownGracePeriod`` to end (a
  message whose DATA is under way is queued and answered ``250``). The proxy and ACME stop meanwhile. Only
  once ingress has drained do delivery, the outbound pool and the queue (``save()``) stop, then the thread
  pool: a transaction allowed to finish must find the queue open.

A port that cannot be bound raises :class:`StartupError` naming the address and port. A failure while starting
asynchronously (the queue cannot load) is logged as critical and fails the Deferreds from :meth:`when_ready`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.ssl import CertificateOptions
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from dcrouter import __version__
from dcrouter.acme.challenges import ChallengeResponder
from dcrouter.acme.service import AcmeService
from dcrouter.api.service import ApiService, build_root
from dcrouter.api.view import RouterView
from dcrouter.config import ConfigResult, load_options
from dcrouter.config.options import DcRouterOptions
from dcrouter.config.smtp import SmtpConfig, generated_certificate_paths, smtp_tls_needs
from dcrouter.config.tls import TlsConfig
from dcrouter.delivery.callout import CalloutProber
from dcrouter.delivery.manager import DeliveryManager
from dcrouter.delivery.mx import MxResolver, make_resolver
from dcrouter.delivery.pool import ConnectionPool
from dcrouter.delivery.routing import RecipientRouter
from dcrouter.delivery.transport import ESMTPTransport
from dcrouter.interfaces import IDeliveryQueue
from dcrouter.limits.ingress import IngressLimits, build_ingress_limits, limits_configured
from dcrouter.log import logger, set_level
from dcrouter.net.certfiles import TlsMaterialError, generate_self_signed, load_certified_key
from dcrouter.net.certstore import CertificateStore, CertifiedKey
from dcrouter.net.listen import ListenError
from dcrouter.net.reactor import IRouterReactor
from dcrouter.net.targets import TargetHealth
from dcrouter.net.tls import TlsPolicy
from dcrouter.processing.build import build_chain
from dcrouter.processing.processor import EmailProcessor
from dcrouter.proxy.service import ProxyBindError, ProxyService
from dcrouter.smtp.auth import Authenticator
from dcrouter.smtp.policy import SessionPolicy
from dcrouter.smtp.protocol import ESMTPServerFactory
from dcrouter.smtp.service import SmtpService
from dcrouter.smtp.verify import RecipientVerifier

if TYPE_CHECKING:
    from dcrouter.queue.redis_connection import RedisConnection

log = logger(__name__)

#: Threads for blocking work the router owns (scrypt password checks). Each check holds ~32 MiB, so the bound
#: is also a memory bound.
THREADPOOL_MAX = 4


class StartupError(Exception):
    """dcrouter cannot start; the message says what and where (address and port, file, key path)."""


def coerce_options(options: Any) -> tuple[DcRouterOptions, list[str]]:
    """``(options, warnings)`` from a mapping (validated; raises ConfigError), a ConfigResult or options."""
    if isinstance(options, DcRouterOptions):
        return options, []
    if isinstance(options, ConfigResult):
        return options.options, list(options.warnings)
    if isinstance(options, Mapping):
        result = load_options(options)
        return result.options, list(result.warnings)
    raise TypeError(
        f"DcRouter options must be a mapping, ConfigResult or DcRouterOptions, not {type(options)!r}"
    )


def smtp_tls_config(options: DcRouterOptions) -> TlsConfig | None:
    """The TLS settings for SMTP: ``smtpConfig.tls``, with the top-level ``tls`` certificate as a fallback for
    the files (``smtpConfig.tls`` may then carry only tlsProfile/minVersion/ciphers). When neither names a
    certificate but SMTP needs one (implicit TLS or submission ports are listened on): a self-signed
    certificate kept under ``persistentPath`` (:func:`generated_certificate_paths`; with a memory queue the
    paths are None and it is generated in memory). None when no certificate is named nor needed."""
    smtp = options.smtp_config
    own = smtp.tls if smtp is not None else None
    if own is not None and own.cert_path and own.key_path:
        return own
    shared = options.tls
    if shared is not None and shared.cert_path and shared.key_path:
        return dataclasses.replace(own or TlsConfig(), cert_path=shared.cert_path, key_path=shared.key_path)
    if smtp is not None and smtp_tls_needs(smtp):
        cert_path: str | None = None
        key_path: str | None = None
        if smtp.queue_storage != "memory":
            cert_path, key_path = generated_certificate_paths(smtp.persistent_path)
        return dataclasses.replace(
            own or TlsConfig(), cert_path=cert_path, key_path=key_path, self_signed=True
        )
    return None


def _generated_in_memory(hostname: str, bind_address: str) -> CertifiedKey:
    cert_pem, key_pem = generate_self_signed(hostname, addresses=(bind_address,))
    return CertifiedKey.from_pem(cert_pem, key_pem)


def build_queue(config: SmtpConfig, reactor: IRouterReactor) -> IDeliveryQueue:
    """The queue backend ``queueStorage`` names."""
    if config.queue_storage == "memory":
        from dcrouter.queue.memory import MemoryQueue

        return MemoryQueue(clock=reactor, max_size=config.max_queue_size)
    if config.queue_storage == "disk":
        from dcrouter.queue.disk import DiskQueue

        return DiskQueue(
            config.persistent_path,
            reactor=reactor,
            clock=reactor,
            max_size=config.max_queue_size,
            close_on_shutdown=False,  # stopService saves it, after the listeners
            orphan_retention=config.orphan_retention / 1000.0,
        )
    if config.queue_storage == "redis":
        from dcrouter.queue.redis import RedisQueue

        assert config.redis_url is not None  # the configuration check requires it
        return RedisQueue(
            config.redis_url,
            reactor=reactor,
            clock=reactor,
            body_directory=config.persistent_path,
            max_size=config.max_queue_size,
            orphan_retention=config.orphan_retention / 1000.0,
        )
    raise StartupError(f"smtpConfig.queueStorage: {config.queue_storage!r} is not supported yet")


async def _settle_all(deferreds: list[Deferred[Any]], what: str) -> None:
    """Wait for every Deferred; log each failure (shutdown goes on regardless: the queue must be saved)."""
    for deferred in deferreds:
        try:
            await deferred
        except Exception:  # noqa: BLE001 (shutdown must go on to save the queue; the failure is logged)
            log.failure(what)


class DcRouter(MultiService):
    """dcrouter as a Twisted service. See the module docstring for the lifecycle.

    ``queue`` replaces the backend ``queueStorage`` names (an embedding program's own, or a test's).

    Attributes tests and embedding programs may rely on: ``options``, ``warnings`` (from validation),
    ``queue``, ``processor``, ``policy``, ``authenticator`` (None without users), ``verifier`` (recipient
    verification; None when no domainConfigs entry asks for it), ``threadpool``,
    ``smtp`` (the SmtpService: listening ports and open sessions, for a graceful stop),
    ``smtp_ports`` (configured port → actual port, filled once bound; useful with port 0), ``challenges``
    (the ACME HTTP-01 responder the proxy serves), ``acme`` (the AcmeService, None without ACME orders),
    ``api`` (the management API's ApiService, None unless ``apiConfig.enabled``; ``api.port`` is its bound
    port and ``api.root`` its resource, where ``/metrics`` and ``/api/v1/events`` can be mounted), and
    ``certificates``: the router's one :class:`CertificateStore`, whose default is SMTP's certificate once
    bound; SMTP, the proxy and ACME all serve from it, so a certificate put there is offered by SNI to the
    next handshake on any of them.
    """

    def __init__(
        self, options: Any, *, reactor: IRouterReactor | None = None, queue: IDeliveryQueue | None = None
    ) -> None:
        super().__init__()
        self.setName("dcrouter")
        if reactor is None:
            # Only for embedding without passing a reactor in; twistd's makeService passes it.
            from twisted.internet import reactor as global_reactor

            reactor = cast(IRouterReactor, global_reactor)  # the one twistd runs provides every part of it
        self._reactor: IRouterReactor = reactor
        self.options, self.warnings = coerce_options(options)
        set_level(self.options.log_level)
        self.smtp_config: SmtpConfig | None = self.options.smtp_config
        self.threadpool = ThreadPool(minthreads=0, maxthreads=THREADPOOL_MAX, name="dcrouter")
        self._starting: Deferred[None] | None = None
        self._stopping: Deferred[None] | None = None
        self._ready_result: Failure | bool | None = None
        self._ready_waiters: list[Deferred[None]] = []
        self.queue: IDeliveryQueue | None = None
        self.processor: EmailProcessor | None = None
        self.policy: SessionPolicy | None = None
        self.verifier: RecipientVerifier | None = None
        #: SMTP rate limits (None when none is configured) and their own Redis connection, if any.
        self.limits: IngressLimits | None = None
        self._limits_redis: RedisConnection | None = None
        self.authenticator: Authenticator | None = None
        self.routes: RecipientRouter | None = None
        self.delivery: DeliveryManager | None = None
        self.delivery_pool: ConnectionPool | None = None
        self.smtp: SmtpService | None = None
        self.certificates = CertificateStore(clock=reactor)
        # HTTP-01 answers: written by ACME, read by the proxy's port-80 listener.
        self.challenges = ChallengeResponder()
        # A child service: binds in privilegedStartService, resumes in startService (after the queue has
        # loaded, as SMTP), stops its listeners and then drains its connections in stopService.
        # Terminating routes present certificates from the store and answer HTTP-01 from the responder.
        self.proxy: ProxyService | None = ProxyService.from_options(
            self.options, reactor=reactor, certificates=self.certificates, challenges=self.challenges
        )
        if self.proxy is not None:
            self.proxy.setServiceParent(self)
        # After the proxy, as children start in order: port 80 answers before the first order is placed.
        self.acme: AcmeService | None = AcmeService.from_options(
            self.options, store=self.certificates, responder=self.challenges, reactor=reactor
        )
        if self.acme is not None:
            self.acme.setServiceParent(self)
        if self.smtp_config is not None:
            self._build_smtp(self.smtp_config, queue)
        # Not a child service: it answers from startService on, before the queue has loaded (``/ready`` says
        # 503 meanwhile), and stops with the services that do not hold the queue.
        self.api: ApiService | None = self._build_api() if self.options.api_config.enabled else None

    def _build_api(self) -> ApiService:
        reactor = self._reactor
        threadpool = self.threadpool
        processor, smtp, proxy = self.processor, self.smtp, self.proxy
        view = RouterView(
            clock=reactor,
            version=__version__,
            queue=self.queue,
            delivery=self.delivery,
            ready=lambda: self._ready_result is True,
            processing_stats=(lambda: dict(processor.stats)) if processor is not None else dict,
            processing_in_flight=(lambda: processor.active) if processor is not None else (lambda: 0),
            smtp_sessions=(lambda: len(smtp.sessions)) if smtp is not None else (lambda: 0),
            proxy_connections=(
                (lambda: sum(c.active for c in proxy.counters.values())) if proxy is not None else (lambda: 0)
            ),
            started_at=reactor.seconds(),
        )
        root = build_root(
            self.options.api_config,
            view,
            defer_to_thread=lambda work: deferToThreadPool(reactor, threadpool, work),
        )
        return ApiService(self.options.api_config, root, reactor=reactor)

    def _verification_resolver(self, config: SmtpConfig) -> Any:
        """The resolver inbound verification asks (mtaConfig's servers), when it is enabled."""
        if not config.verification.enabled:
            return None
        return make_resolver(self.options.mta_config, self._reactor)

    def _build_smtp(self, config: SmtpConfig, queue: IDeliveryQueue | None) -> None:
        reactor = self._reactor
        self.queue = queue if queue is not None else build_queue(config, reactor)
        self.routes = RecipientRouter(config)
        self.processor = EmailProcessor(
            self.queue,
            reactor.seconds,
            reactor=reactor,
            threadpool=self.threadpool,
            **build_chain(config, reactor, self._verification_resolver(config)).options(),
        )
        self._build_delivery(config)
        self.verifier = self._build_verifier(config)
        self.limits = self._build_limits(config)
        self.policy = SessionPolicy(config, verifier=self.verifier, limits=self.limits)
        if config.auth.users:
            self.authenticator = Authenticator(
                config.auth, clock=reactor, reactor=reactor, threadpool=self.threadpool
            )
        # Not a child service: it binds in privilegedStartService, starts once the queue has loaded and stops
        # before everything else (_stop).
        self.smtp = SmtpService(
            config,
            reactor=reactor,
            factory_for=partial(
                ESMTPServerFactory,
                config=config,
                policy=self.policy,
                authenticator=self.authenticator,
                acceptor=self.processor,
                spool_directory=self.queue.spool_directory,
                clock=reactor,
            ),
            load_tls=partial(self._load_tls, config),
        )

    def _build_delivery(self, config: SmtpConfig) -> None:
        """Routing, the outbound pool and transport, and the DeliveryManager (a child service, so it starts
        only once the queue has loaded and stops before the queue is saved)."""
        assert self.queue is not None and self.processor is not None
        reactor = self._reactor
        delivery = config.delivery
        assert self.routes is not None
        self.delivery_pool = ConnectionPool(
            reactor=reactor, clock=reactor, config=delivery, helo_name=delivery.helo_name or config.hostname
        )
        # Shared with recipient callouts: probes meet the servers delivery would, and the same down marks.
        self._resolver = MxResolver(make_resolver(self.options.mta_config, reactor))
        self._health = TargetHealth(reactor, delivery.target_down_time / 1000)
        transport = ESMTPTransport(
            resolver=self._resolver, health=self._health, pool=self.delivery_pool, clock=reactor
        )
        self.delivery = DeliveryManager(
            queue=self.queue,
            routes=self.routes,
            transport=transport,
            submit_dsn=self.processor.submit_local,
            config=config,
            clock=reactor,
        )
        if delivery.paused:
            self.delivery.pause_deliveries()
        self.delivery.setServiceParent(self)
        # Delivery starts on a message as soon as it is durable, not at the next periodic look.
        manager = self.delivery
        self.processor.on_queued = lambda item: manager.wake()
        # Queued with its destination, so claims share delivery between destinations from the first attempt.
        self.processor.destination_of = manager.destination_of

    def _build_limits(self, config: SmtpConfig) -> IngressLimits | None:
        """SMTP rate limits when any is configured; with the Redis queue their counters are in the same
        Redis (a connection pool of their own, with a short deadline: a check waits at most a second before
        it falls back to counting in this process)."""
        redis_call = None
        if limits_configured(config) and config.queue_storage == "redis":
            from dcrouter.net.redis_url import parse_redis_url
            from dcrouter.queue.redis_connection import RedisConnection

            assert config.redis_url is not None  # the configuration check requires it
            self._limits_redis = RedisConnection(
                parse_redis_url(config.redis_url), reactor=self._reactor, timeout=1.0, pool_size=2
            )
            redis_call = self._limits_redis.call
        return build_ingress_limits(config, self._reactor, redis_call)

    def _build_verifier(self, config: SmtpConfig) -> RecipientVerifier | None:
        """Recipient verification when some domainConfigs entry asks for it; callouts get a connection pool
        of their own, with the callout timeout as every wait's bound."""
        modes = {entry.verify_recipients for entry in config.domain_configs}
        if modes <= {"off"}:
            return None
        reactor = self._reactor
        prober = None
        if "callout" in modes:
            delivery = config.delivery
            timeout = config.callout.timeout
            pool = ConnectionPool(
                reactor=reactor,
                clock=reactor,
                config=dataclasses.replace(
                    delivery,
                    socket_timeout=timeout,
                    send_timeout=timeout,
                    connect_timeout=min(delivery.connect_timeout, timeout),
                ),
                helo_name=delivery.helo_name or config.hostname,
            )
            prober = CalloutProber(resolver=self._resolver, health=self._health, pool=pool, clock=reactor)
        threadpool = self.threadpool
        try:
            return RecipientVerifier(
                config,
                clock=reactor,
                defer_to_thread=lambda work: deferToThreadPool(reactor, threadpool, work),
                prober=prober,
                route_for=self.routes.route if self.routes is not None else None,
            )
        except (OSError, ValueError) as error:
            # The configuration check read the files already; one that broke since is a start-up error.
            raise StartupError(f"smtpConfig.domainConfigs: recipient verification: {error}") from error

    @property
    def smtp_ports(self) -> dict[int, int]:
        """Configured SMTP port → actual port, filled once bound (empty without smtpConfig)."""
        return self.smtp.ports if self.smtp is not None else {}

    # -- readiness ---------------------------------------------------------------------------------------

    def when_ready(self) -> Deferred[None]:
        """A Deferred firing once the queue is loaded and the SMTP ports accept connections, or failing with
        the reason start-up failed. Each call returns a new Deferred."""
        if isinstance(self._ready_result, Failure):
            return fail(self._ready_result)
        if self._ready_result:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._ready_waiters.append(waiter)
        return waiter

    def _settle_ready(self, result: Failure | bool) -> None:
        self._ready_result = result
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    # -- TLS material ------------------------------------------------------------------------------------

    def _load_tls(self, config: SmtpConfig) -> CertificateOptions | None:
        tls_config = smtp_tls_config(self.options)
        if tls_config is None:
            return None  # nothing needs TLS (smtp_tls_config generates a certificate for what does)
        generated = tls_config.self_signed and not (
            tls_config.cert_path and os.path.exists(tls_config.cert_path)
        )
        try:
            if tls_config.cert_path is None:
                key = _generated_in_memory(config.hostname, config.bind_address)
            else:
                key = load_certified_key(tls_config, config.hostname, addresses=(config.bind_address,))
        except (TlsMaterialError, OSError) as error:
            raise StartupError(f"smtpConfig.tls: {error}") from error
        if generated:
            # Loud: a self-signed certificate is for trials, and clients that verify refuse it.
            log.warn(
                "smtpConfig.tls: generated a self-signed certificate for {hostname} {where}; clients that "
                "verify certificates will refuse it",
                hostname=config.hostname,
                where=f"at {tls_config.cert_path}" if tls_config.cert_path else "in memory",
            )
        # SMTP's certificate answers every name the store has no certificate for (most MX clients send no
        # SNI, or the MX host name); names put by the proxy or ACME get their own certificate on SMTP too.
        self.certificates.set_default(key)
        try:
            policy = TlsPolicy(tls_config.tls_profile, tls_config.min_version, tls_config.ciphers)
            return self.certificates.server_options(policy=policy)
        except ValueError as error:
            raise StartupError(f"smtpConfig.tls: {error}") from error

    # -- service lifecycle -------------------------------------------------------------------------------

    def _bind_proxy(self) -> None:
        if self.proxy is not None:
            try:
                self.proxy.bind()
            except ProxyBindError as error:
                raise StartupError(str(error)) from error

    def _bind_smtp(self) -> None:
        """SMTP's ports, paused (once: SmtpService.bind); a port that cannot be bound releases the proxy's."""
        if self.smtp is None:
            return
        try:
            self.smtp.bind()
        except ListenError as error:
            if self.proxy is not None:
                self.proxy.unbind()
            if self.api is not None:
                self.api.unbind()
            raise StartupError(str(error)) from error

    def _bind_api(self) -> None:
        """The API's port, paused (once); a port that cannot be bound releases the others'."""
        if self.api is None:
            return
        try:
            self.api.bind()
        except ListenError as error:
            if self.proxy is not None:
                self.proxy.unbind()
            raise StartupError(str(error)) from error

    def privilegedStartService(self) -> None:
        self._bind_proxy()
        self._bind_api()
        super().privilegedStartService()
        self._bind_smtp()

    def startService(self) -> None:
        # Embedded use may call startService alone; bind now then.
        self._bind_proxy()
        self._bind_api()
        self._bind_smtp()
        # Children start only after the queue has loaded (in _start): Service's startService, not Multi...'s.
        Service.startService(self)
        self._stopping = None
        self.threadpool.start()
        if self.api is not None:
            self.api.startService()
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._start_failed)

    async def _start(self) -> None:
        for warning in self.warnings:
            # Not "warning=": a log event with that key is taken for a Python warning by trial's observer.
            log.warn("configuration: {problem}", problem=warning)
        if self.queue is not None:
            # The backend logs what recovery found.
            await self.queue.load()
            if self.delivery is not None and self.delivery.get_delivery_stats()["paused"]:
                log.warn("delivery is paused (smtpConfig.delivery.paused): mail is queued, not delivered")
        for child in self:
            child.startService()
        if not self.running:
            return  # stopped while loading: stay closed
        if self.smtp is not None:
            self.smtp.startService()  # resumes the listeners
        log.info("dcrouter ready")
        self._settle_ready(True)

    def _start_failed(self, failure: Failure) -> None:
        log.failure("dcrouter could not start", failure)
        self._settle_ready(failure)

    def stopService(self) -> Deferred[None]:
        if self._stopping is None:
            self._stopping = Deferred.fromCoroutine(self._stop())
            self._stopping.addErrback(lambda failure: log.failure("error while stopping dcrouter", failure))
        return self._stopping

    async def _stop(self) -> None:
        Service.stopService(self)
        if self._starting is not None:
            await self._starting  # never fails: _start_failed consumed any failure
        # Ingress first (listeners, then the sessions, within shutdownGracePeriod); services that do not
        # hold the queue stop meanwhile. Delivery waits: a transaction allowed to finish needs the queue, and
        # mail it queues may as well start on its way.
        children = [child for child in reversed(list(self)) if child is not self.delivery]
        independent = [maybeDeferred(child.stopService) for child in children]
        if self.api is not None and self.api.running:
            independent.append(maybeDeferred(self.api.stopService))
        if self.smtp is not None:
            await _settle_all([self.smtp.stopService()], "SMTP ingress did not stop cleanly")
        if self.delivery is not None:
            await _settle_all([maybeDeferred(self.delivery.stopService)], "delivery did not stop cleanly")
        await _settle_all(independent, "a service did not stop cleanly")
        if self.delivery_pool is not None:
            # After the DeliveryManager: its attempts in flight have finished or been given up.
            await _settle_all(
                [Deferred.fromCoroutine(self.delivery_pool.close())], "outbound connections did not close"
            )
        if self.verifier is not None:
            await _settle_all(
                [Deferred.fromCoroutine(self.verifier.close())], "recipient callout connections did not close"
            )
        if self._limits_redis is not None:
            await _settle_all([self._limits_redis.disconnect()], "rate limit counters: Redis did not close")
        if self.queue is not None and self._starting is not None:
            try:
                await self.queue.save()
            except Exception:  # noqa: BLE001 (logged; the thread pool must still be stopped)
                log.failure("the queue could not be saved")
        if self.threadpool.started:
            self.threadpool.stop()
        if self._ready_result is None:
            self._settle_ready(Failure(StartupError("dcrouter was stopped before it became ready")))
        log.info("dcrouter stopped")
