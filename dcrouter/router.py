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

import copy
import dataclasses
import os
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredLock, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IProtocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from dcrouter import __version__
from dcrouter.acme.challenges import ChallengeResponder, Dns01Responder
from dcrouter.acme.service import AcmeFollower, AcmeService
from dcrouter.api.ratelimits import RateLimitControl
from dcrouter.api.service import ApiService, build_root
from dcrouter.api.view import RouterView
from dcrouter.auth.build import build_providers
from dcrouter.config import ConfigError, ConfigResult, load_options
from dcrouter.config.edit import (
    hidden_passwords,
    routing_of,
    unapplied_changes,
    with_rate_limits,
    with_routing,
    write_rate_limits,
    write_routing,
)
from dcrouter.config.options import DcRouterOptions, resolve_workers
from dcrouter.config.smtp import SmtpConfig, generated_certificate_paths, smtp_tls_needs
from dcrouter.config.tls import TlsConfig
from dcrouter.delivery.callout import CalloutProber
from dcrouter.delivery.manager import DeliveryManager
from dcrouter.delivery.mx import MxResolver, make_resolver
from dcrouter.delivery.pool import ConnectionPool
from dcrouter.delivery.routing import RecipientRouter
from dcrouter.delivery.transport import ESMTPTransport
from dcrouter.dns.service import DnsBindError, DnsService
from dcrouter.dns.zone import build_zones
from dcrouter.events import EventBus
from dcrouter.interfaces import IDeliveryQueue, ISuppressionList
from dcrouter.limits.alerts import Alerts, LimitAlert
from dcrouter.limits.ingress import (
    IngressLimits,
    build_ingress_limits,
    limits_configured,
    rebuild_ingress_limits,
)
from dcrouter.log import logger, set_level
from dcrouter.net.certfiles import TlsMaterialError, generate_self_signed, load_certified_key
from dcrouter.net.certstore import CertificateStore, CertifiedKey
from dcrouter.net.listen import ListenError
from dcrouter.net.reactor import IRouterReactor
from dcrouter.net.targets import TargetHealth
from dcrouter.net.tls import TlsPolicy
from dcrouter.observe.metrics import MetricsResource, RouterMetrics
from dcrouter.observe.service import ObserveService
from dcrouter.processing.build import build_chain
from dcrouter.processing.processor import EmailProcessor
from dcrouter.proxy.handlers import RouteContext
from dcrouter.proxy.service import ProxyBindError, ProxyService
from dcrouter.routetest import dry_run
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
    # With tls.acme, a stand-in until ACME's certificate arrives: STARTTLS is offered from the start.
    if smtp is not None and (smtp_tls_needs(smtp) or (own is not None and own.acme)):
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


def build_queue(
    config: SmtpConfig, reactor: IRouterReactor, worker: int = 0, workers: int = 1
) -> IDeliveryQueue:
    """The queue backend ``queueStorage`` names, for worker ``worker`` of ``workers``. The disk queue with
    several workers, or with partitions left by more workers before, is partitioned
    (:mod:`dcrouter.queue.partitions`); the listing of ``persistentPath/partitions`` happens here, before
    the reactor runs."""
    if config.queue_storage == "memory":
        from dcrouter.queue.memory import MemoryQueue

        return MemoryQueue(clock=reactor, max_size=config.max_queue_size)
    if config.queue_storage == "disk":
        from dcrouter.queue.disk import DiskQueue
        from dcrouter.queue.partitions import PartitionedQueue, existing_partitions

        options: dict[str, Any] = {
            "close_on_shutdown": False,  # stopService saves it, after the listeners
            "orphan_retention": config.orphan_retention / 1000.0,
            # Take mail at once, however big the queue; rows are verified meanwhile (docs/queue.md).
            "background_verification": True,
        }
        if workers > 1 or existing_partitions(config.persistent_path):
            return PartitionedQueue(
                config.persistent_path,
                reactor=reactor,
                clock=reactor,
                worker=worker,
                workers=workers,
                # Worker 0 runs the API and the metrics: they see every partition.
                observe_others=worker == 0,
                # Divided between the workers, so the machine holds at most maxQueueSize.
                max_size=-(-config.max_queue_size // workers),
                **options,
            )
        return DiskQueue(
            config.persistent_path, reactor=reactor, clock=reactor, max_size=config.max_queue_size, **options
        )
    if config.queue_storage == "redis":
        from dcrouter.queue.redis import RedisQueue

        assert config.redis_url is not None  # the configuration check requires it
        return RedisQueue(
            config.redis_url,
            reactor=reactor,
            clock=reactor,
            body_directory=config.persistent_path,
            background_verification=True,  # as the disk queue's (docs/queue.md)
            max_size=config.max_queue_size,
            body_store=config.redis_body_store,
            consumer_host=config.redis_consumer_name,
            orphan_retention=config.orphan_retention / 1000.0,
        )
    raise StartupError(f"smtpConfig.queueStorage: {config.queue_storage!r} is not supported yet")


def report_limit_alerts(alerts: Alerts, bus: EventBus, protocol: str) -> None:
    """Rate limit alerts (dcrouter.limits) also become ``security.rate_limit`` events."""

    def emit(alert: LimitAlert) -> None:
        bus.emit(
            "security.rate_limit",
            protocol=protocol,
            kind=alert.kind,
            limit=alert.limit,
            key=alert.key,
            count=alert.count,
            window=alert.window,
        )

    alerts.observers.append(emit)


def certificate_expiry(store: CertificateStore) -> list[tuple[str, float]]:
    """``(name, not_after)`` of every certificate the store serves, the default as ``(default)``."""
    found = []
    if store.default is not None:
        found.append(("(default)", store.default.not_after.timestamp()))
    for name in store.names():
        key = store.lookup(name)
        if key is not None:
            found.append((name, key.not_after.timestamp()))
    return found


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
    ``queue``, ``processor``, ``policy``, ``authenticator`` (None without users or providers), ``verifier``
    (recipient verification; None when no domainConfigs entry asks for it), ``threadpool``,
    ``smtp`` (the SmtpService: listening ports and open sessions, for a graceful stop),
    ``smtp_ports`` (configured port → actual port, filled once bound; useful with port 0), ``challenges``
    (the ACME HTTP-01 responder the proxy serves), ``dns_challenges`` (the DNS-01 TXT values the DNS server
    publishes), ``dns`` (the DnsService, None without dnsServerConfig), ``acme`` (the AcmeService, None
    without ACME orders), ``api`` (the management API's ApiService, None unless ``apiConfig.enabled``;
    ``api.port`` is its bound port and ``api.root`` its resource, where ``/metrics`` and
    ``/api/v1/events`` can be mounted), and
    ``certificates``: the router's one :class:`CertificateStore`, whose default is SMTP's certificate once
    bound; SMTP, the proxy and ACME all serve from it, so a certificate put there is offered by SNI to the
    next handshake on any of them. ``events`` is the router's :class:`~dcrouter.events.EventBus` (subscribe
    an :class:`~dcrouter.events.IEventSink` to it), ``metrics`` its
    :class:`~dcrouter.observe.metrics.RouterMetrics` (``metrics.registry``), ``observe`` the service with
    the webhooks and the metrics listener (``observe.port`` once bound).
    """

    def __init__(
        self,
        options: Any,
        *,
        reactor: IRouterReactor | None = None,
        queue: IDeliveryQueue | None = None,
        worker: int = 0,
    ) -> None:
        super().__init__()
        #: This process's worker index under a supervisor (``workers`` > 1; dcrouter.supervisor). The services
        #: that must run once (the management API, the metrics listener, the DNS server) run in worker 0
        #: only; every worker serves SMTP and the proxy and delivers (claims from the shared Redis queue).
        self.worker = worker
        self.setName("dcrouter")
        #: An ILogObserver this router asks the twistd Application it is put in to log through
        #: (``logFormat = "json"``; set by dcrouter.tap). None: the application's own choice.
        self.log_observer: Any = None
        #: Reloads the configuration file (dcrouter.reload.Reloader); set by dcrouter.tap, None otherwise.
        self.reloader: Any = None
        if reactor is None:
            # Only for embedding without passing a reactor in; twistd's makeService passes it.
            from twisted.internet import reactor as global_reactor

            reactor = cast(IRouterReactor, global_reactor)  # the one twistd runs provides every part of it
        self._reactor: IRouterReactor = reactor
        self.options, self.warnings = coerce_options(options)
        #: The configuration as written (its own keys; None when given DcRouterOptions) and its file (None
        #: unless loaded from one): what ``GET /api/v1/routing`` shows and ``apiConfig.persist`` writes to.
        self.raw_config: Mapping[str, Any] | None = None
        self.config_path: str | None = None
        if isinstance(options, ConfigResult):
            self.raw_config, self.config_path = options.raw, options.path
        elif isinstance(options, Mapping):
            self.raw_config = copy.deepcopy(dict(options))
        self._routing_lock = DeferredLock()
        set_level(self.options.log_level)
        # One bus per router, handed down to every part that reports (dcrouter.events); the metrics are
        # always kept (the management API serves them too), in a registry of this router's own.
        self.events = EventBus(reactor.seconds)
        self.metrics = RouterMetrics()
        self.metrics.subscribe(self.events)
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
        #: The last limits built, kept while a change at run time turns every limit off (their counters and
        #: alert observers serve again when limits come back).
        self._limits_built: IngressLimits | None = None
        self._limits_redis: RedisConnection | None = None
        self.authenticator: Authenticator | None = None
        self.routes: RecipientRouter | None = None
        self.suppressions: ISuppressionList | None = None
        self.delivery: DeliveryManager | None = None
        self.delivery_pool: ConnectionPool | None = None
        self.smtp: SmtpService | None = None
        self.certificates = CertificateStore(clock=reactor)
        self.metrics.watch_certificates(partial(certificate_expiry, self.certificates))
        # HTTP-01 answers: written by ACME, read by the proxy's port-80 listener; with workers, shared
        # through files, since worker 0 orders but any worker may accept the CA's request.
        self.challenges = ChallengeResponder(self._shared_challenges())
        if self.worker == 0:
            self.challenges.clear_shared()
        # DNS-01 answers: written by ACME, published by the DNS server.
        self.dns_challenges = Dns01Responder()
        # First: it binds in privilegedStartService with the others and answers as soon as it starts.
        self.dns: DnsService | None = self._build_dns()
        # A child service: binds in privilegedStartService, resumes in startService (after the queue has
        # loaded, as SMTP), stops its listeners and then drains its connections in stopService.
        # Terminating routes present certificates from the store and answer HTTP-01 from the responder.
        self.proxy: ProxyService | None = ProxyService.from_options(
            self.options,
            reactor=reactor,
            certificates=self.certificates,
            challenges=self.challenges,
            events=self.events,
            workers=resolve_workers(self.options.workers),
        )
        if self.proxy is not None:
            self.proxy.setServiceParent(self)
            self.metrics.watch_proxy(self.proxy.counters)
            context = self.proxy.context
            sessions = context.sessions  # the same set for the proxy's life (a reload keeps its context)
            self.metrics.watch_proxy_clients(lambda: len(sessions))

            def target_states() -> Mapping[tuple[str, str], bool]:
                return context.monitor.states()  # through the context: a reload replaces its monitor

            self.metrics.watch_proxy_targets(target_states)
            report_limit_alerts(self.proxy.context.limiter.alerts, self.events, "proxy")
            self.metrics.watch_limits("proxy", self.proxy.context.limiter.stats)
        # After the proxy, as children start in order: port 80 answers before the first order is placed.
        # With workers, worker 0 orders and renews; the others follow its state directory.
        self.acme: AcmeService | None = (AcmeFollower if self.worker > 0 else AcmeService).from_options(
            self.options,
            store=self.certificates,
            responder=self.challenges,
            dns_responder=self.dns_challenges,
            reactor=reactor,
            events=self.events,
        )
        if self.acme is not None:
            self.acme.setServiceParent(self)
        if self.smtp_config is not None:
            self._build_smtp(self.smtp_config, queue)
            if self.proxy is not None:
                # The proxy imports no mail code: dcrouter's ESMTP server is given to it from here.
                self.proxy.context.handlers.register("smtp", self._smtp_handover)
        self.observe = self._build_observe()
        self.observe.setServiceParent(self)
        # Not a child service: it answers from startService on, before the queue has loaded (``/ready`` says
        # 503 meanwhile), and stops with the services that do not hold the queue.
        self.api: ApiService | None = (
            self._build_api() if self.options.api_config.enabled and worker == 0 else None
        )

    def _build_observe(self) -> ObserveService:
        """Webhooks, performance events and the metrics listener; the queue is read for metrics without
        reading items (status_summary)."""
        summary = getattr(self.queue, "status_summary", None)
        if summary is not None:
            self.metrics.watch_queue(summary, self._reactor.seconds)
        processor = self.processor
        return ObserveService(
            bus=self.events,
            metrics=self.metrics,
            reactor=self._reactor,
            metrics_config=self.options.metrics_config if self.worker == 0 else None,
            events_config=self.options.events,
            summary=summary,
            in_flight=(lambda: processor.active) if processor is not None else (lambda: 0),
        )

    def _build_api(self) -> ApiService:
        reactor = self._reactor
        threadpool = self.threadpool
        processor, smtp, proxy, policy = self.processor, self.smtp, self.proxy, self.policy
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
            routing=self.routing_config if self.smtp_config is not None else None,
            replace_routing=self.replace_routing if self.smtp_config is not None else None,
            route_test=partial(dry_run, self),
            suppressions=self.suppressions,
            suppression_ttl=self.smtp_config.delivery.suppression_ttl / 1000.0 if self.smtp_config else 0.0,
            # The router's policy of the moment: a configuration reload replaces it.
            suppressed_refusals=(
                (lambda: self.policy.suppressed_refusals if self.policy is not None else 0)
                if policy is not None
                else (lambda: 0)
            ),
            rate_limits=(
                RateLimitControl(
                    self._smtp_config, self.set_rate_limits, self.delivery, self.persist_rate_limits
                )
                if self.smtp_config is not None
                else None
            ),
        )
        #: What the API reads; ``view.reload`` is set by whoever knows the configuration file (dcrouter.tap).
        self.api_view = view
        root = build_root(
            self.options.api_config,
            view,
            defer_to_thread=lambda work: deferToThreadPool(reactor, threadpool, work),
        )
        # Behind the API's Host check and a read token; the stream is the observe service's, so its clients
        # are counted (maxClients) and ended with it.
        root.mount("/metrics", MetricsResource(self.metrics), scope="read")
        root.mount("/api/v1/events", self.observe.stream, scope="read")
        return ApiService(self.options.api_config, root, reactor=reactor)

    def _shared_challenges(self) -> str | None:
        """Where the workers share HTTP-01 tokens (``workers`` > 1 with ACME), or None."""
        proxy = getattr(self.options, "smart_proxy_config", None)
        acme = proxy.acme if proxy is not None else None
        if acme is None or not acme.enabled or resolve_workers(self.options.workers) <= 1:
            return None
        return os.path.join(acme.state_directory, "http-01")

    def _build_dns(self) -> DnsService | None:
        """The DNS server ``dnsServerConfig`` describes (a child service), or None."""
        config = self.options.dns_server_config
        if config is None or self.worker != 0:
            return None
        try:
            zones = build_zones(
                self.options, serial=int(self._reactor.seconds()), dynamic=self.dns_challenges
            )
        except (OSError, ValueError) as error:
            # The configuration check read the keys already; one that broke since is a start-up error.
            raise StartupError(f"dnsServerConfig: {error}") from error
        service = DnsService(
            zones, interface=config.udp_bind_interface, port=config.udp_port, reactor=self._reactor
        )
        service.setServiceParent(self)
        self.metrics.watch(
            "dcrouter_dns_responses",
            "DNS responses sent by the router's DNS server",
            lambda: {labels: float(n) for labels, n in service.factory.responses.items()},
            ["transport", "rcode", "size"],
        )
        return service

    # -- routing while running ----------------------------------------------------------------------------

    def routing_config(self, show_passwords: bool = True) -> dict[str, Any] | None:
        """The routing keys of smtpConfig as configured (see :func:`dcrouter.config.edit.routing_of`); None
        when the router was given DcRouterOptions rather than a configuration."""
        if self.raw_config is None:
            return None
        return routing_of(self.raw_config, show_passwords=show_passwords)

    async def replace_routing(self, routing: Mapping[str, Any]) -> dict[str, Any]:
        """Replace ``domainConfigs``, ``routingRules`` and ``defaultServer`` (``defaultPort``, ``useTls``):
        the whole configuration with the new routing is checked as the loader checks a file (in the thread
        pool: it may read recipients files and keys), then routing, relay acceptance, recipient verification
        and per-destination delivery limits switch to it in one step on the reactor thread, so the next RCPT
        and the next delivery attempt use it. Raises ConfigError (every error with its key path), changing
        nothing. With ``apiConfig.persist`` the file is then rewritten (:func:`write_routing`). One change
        at a time."""
        async with self._routing_lock:
            return await self._replace_routing(routing)

    async def _replace_routing(self, routing: Mapping[str, Any]) -> dict[str, Any]:
        old = self.smtp_config
        if self.raw_config is None or old is None:
            raise ConfigError(
                ["smtpConfig: this router was not built from a configuration; nothing to change"]
            )
        hidden = hidden_passwords(routing)
        if hidden:
            raise ConfigError(hidden)
        raw = with_routing(self.raw_config, routing)
        reactor, pool = self._reactor, self.threadpool
        result: ConfigResult = await deferToThreadPool(reactor, pool, partial(load_options, raw))
        new = result.options.smtp_config
        assert new is not None
        errors = unapplied_changes(old, new)
        if errors:
            raise ConfigError(errors)
        try:
            verifier = self._build_verifier(new)
        except StartupError as error:
            raise ConfigError([str(error)]) from None
        # From here to the end of the swap nothing yields to the reactor: no RCPT and no delivery attempt sees
        # half of it.
        assert self.routes is not None and self.policy is not None and self.delivery is not None
        self.routes.reconfigure(new)
        self.policy.set_domains(new, verifier)
        self.delivery.reconfigure(new)
        old_verifier, self.verifier = self.verifier, verifier
        self.smtp_config = new
        self.options = dataclasses.replace(self.options, smtp_config=new)
        self.raw_config = raw
        log.info(
            "routing replaced: {rules} routing rules, {domains} domainConfigs entries, default {default}",
            rules=len(new.routing_rules),
            domains=len(new.domain_configs),
            default=new.default_server or "MX",
        )
        if old_verifier is not None:
            # Callouts in flight on the old one end unverified (450), as at shutdown.
            Deferred.fromCoroutine(old_verifier.close()).addErrback(
                lambda failure: log.failure("recipient callout connections did not close", failure)
            )
        answer: dict[str, Any] = {"persisted": False, "warnings": list(result.warnings)}
        path = self.config_path
        if self.options.api_config.persist and path is not None:
            written = routing_of(raw)
            try:
                await deferToThreadPool(reactor, pool, partial(write_routing, path, written))
            except (OSError, ValueError) as error:
                log.error("routing applied but not written to {path}: {error}", path=path, error=error)
                answer["persistError"] = f"{path}: {error}"
            else:
                answer["persisted"] = True
                log.info("routing written to {path} (previous file: {path}.bak)", path=path)
        return answer

    def _verification_resolver(self, config: SmtpConfig) -> Any:
        """The resolver inbound verification asks (mtaConfig's servers), when it is enabled."""
        if not config.verification.enabled:
            return None
        return make_resolver(self.options.mta_config, self._reactor)

    def _smtp_handover(self, context: RouteContext) -> IProtocol:
        """The ``smtp`` socket handler: an ESMTP session on the connection a proxy route hands over."""
        assert self.smtp is not None
        return self.smtp.handover_factory(context.port).buildProtocol(context.client_address)

    def _build_smtp(self, config: SmtpConfig, queue: IDeliveryQueue | None) -> None:
        reactor = self._reactor
        if queue is None:
            queue = build_queue(config, reactor, self.worker, resolve_workers(self.options.workers))
        self.queue = queue
        self.routes = RecipientRouter(config)
        self.suppressions = self._build_suppressions(config)
        self.processor = EmailProcessor(
            self.queue,
            reactor.seconds,
            reactor=reactor,
            threadpool=self.threadpool,
            events=self.events,
            **build_chain(config, reactor, self._verification_resolver(config)).options(),
        )
        self._build_delivery(config)
        self.verifier = self._build_verifier(config)
        self.limits = self._limits_built = self._build_limits(config)
        self.metrics.watch_limits(
            "smtp", lambda: self._limits_built.limiter.stats() if self._limits_built is not None else None
        )
        if self.limits is not None:
            report_limit_alerts(self.limits.limiter.alerts, self.events, "smtp")
        self.policy = SessionPolicy(
            config, verifier=self.verifier, limits=self.limits, suppressions=self.suppressions
        )
        self.authenticator = self.build_authenticator(config)
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
                events=self.events,
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
            events=self.events,
            suppressions=self.suppressions,
        )
        # With workers each delivers its share of the mail: each paces at 1/N of the outbound limits.
        self.delivery.shaper.share_among(resolve_workers(self.options.workers))
        if delivery.paused:
            self.delivery.pause_deliveries()
        self.delivery.setServiceParent(self)
        # Delivery starts on a message as soon as it is durable, not at the next periodic look.
        manager = self.delivery
        self.processor.on_queued = lambda item: manager.wake()
        # Queued with its destination, so claims share delivery between destinations from the first attempt.
        self.processor.destination_of = manager.destination_of

    def _build_suppressions(self, config: SmtpConfig) -> ISuppressionList | None:
        """The queue's suppression list (``suppression_list()`` of the backend), unless
        ``delivery.suppressionTtl`` is 0 or the queue (an embedding program's own) keeps none."""
        if not config.delivery.suppression_ttl:
            return None
        make = getattr(self.queue, "suppression_list", None)
        if make is None:
            log.warn("the queue keeps no suppression list; hard-bounced recipients are not suppressed")
            return None
        suppressions: ISuppressionList = make()
        return suppressions

    def _smtp_config(self) -> SmtpConfig:
        assert self.smtp_config is not None
        return self.smtp_config

    def set_rate_limits(self, config: SmtpConfig, raw: Mapping[str, Any] | None = None) -> None:
        """Put ``config``'s rate limits in force now (``PUT /api/v1/rate-limits``): ``rateLimits`` and the
        ``domainConfigs`` limits over the same counters (:func:`rebuild_ingress_limits`), the outbound
        limits in the delivery shaper. Nothing else of ``config`` is read; sessions ask the new limits from
        their next command on. ``raw``: the parts changed as the file spells them (``rateLimits``,
        ``domainConfigs``, ``delivery``), copied into :attr:`raw_config` so that a routing change, which
        starts from it, keeps these limits."""
        assert self.policy is not None
        built = self._limits_built
        if built is not None:
            limits = None
            if limits_configured(config):
                limits = rebuild_ingress_limits(built, config, self._reactor)
        else:
            limits = self._build_limits(config)
            if limits is not None:
                report_limit_alerts(limits.limiter.alerts, self.events, "smtp")
        if limits is not None:
            self._limits_built = limits
        elif built is not None:
            # Closes are not counted while off: open counts would be stale when limits come back.
            built.forget_connections()
        self.limits = self.policy.limits = limits
        if self.delivery is not None:
            delivery = config.delivery
            self.delivery.shaper.configure(
                delivery.global_rate_limit, delivery.per_server_rate_limit, delivery.per_domain_rate_limit
            )
            self.delivery.wake()
        self.smtp_config = config
        self.options = dataclasses.replace(self.options, smtp_config=config)
        if raw and self.raw_config is not None:
            self.raw_config = with_rate_limits(self.raw_config, raw)

    async def persist_rate_limits(self, parts: Mapping[str, Any]) -> dict[str, Any]:
        """With ``apiConfig.persist`` and a configuration file, write the rate-limit ``parts`` of a PUT to it
        (:func:`write_rate_limits`, in the thread pool): ``{"persisted": ...}`` as the routing answers."""
        path = self.config_path
        if not self.options.api_config.persist or path is None or not parts:
            return {"persisted": False}
        try:
            await deferToThreadPool(self._reactor, self.threadpool, partial(write_rate_limits, path, parts))
        except (OSError, ValueError) as error:
            log.error("rate limits applied but not written to {path}: {error}", path=path, error=error)
            return {"persisted": False, "persistError": f"{path}: {error}"}
        log.info("rate limits written to {path} (previous file: {path}.bak)", path=path)
        return {"persisted": True}

    def _build_limits(self, config: SmtpConfig) -> IngressLimits | None:
        """SMTP rate limits when any is configured; with the Redis queue their counters are in the same
        Redis (a connection pool of their own, with a short deadline: a check waits at most a second before
        it falls back to counting in this process)."""
        redis_call = None
        if limits_configured(config) and config.queue_storage == "redis" and self._limits_redis is None:
            from dcrouter.net.redis_url import parse_redis_url
            from dcrouter.queue.redis_connection import RedisConnection

            assert config.redis_url is not None  # the configuration check requires it
            self._limits_redis = RedisConnection(
                parse_redis_url(config.redis_url), reactor=self._reactor, timeout=1.0, pool_size=2
            )
        if self._limits_redis is not None:
            redis_call = self._limits_redis.call
        return build_ingress_limits(config, self._reactor, redis_call, resolve_workers(self.options.workers))

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

    def setServiceParent(self, parent: Any) -> Any:
        """Also hand :attr:`log_observer` to a twistd Application (a Componentized parent), which twistd's
        logger uses when it starts, unless ``--logger`` was given."""
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)

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
        if generated and tls_config.acme:
            log.info(
                "smtpConfig.tls: serving a generated self-signed certificate for {hostname} until ACME's "
                "arrives",
                hostname=config.hostname,
            )
        elif generated:
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
            self._smtp_tls_options: CertificateOptions | None = self.certificates.server_options(
                policy=policy
            )
        except ValueError as error:
            raise StartupError(f"smtpConfig.tls: {error}") from error
        return self._smtp_tls_options

    # -- what a configuration reload (dcrouter.reload) builds with -------------------------------------

    @property
    def reactor(self) -> IRouterReactor:
        return self._reactor

    @property
    def spool_directory(self) -> str:
        assert self.queue is not None
        return self.queue.spool_directory

    def smtp_tls_options(self) -> CertificateOptions | None:
        """The TLS options SMTP's ports were bound with (None: no TLS); they serve the store's current
        certificates, so a reload that changes the certificate files keeps them."""
        return getattr(self, "_smtp_tls_options", None)

    def verification_resolver(self, config: SmtpConfig) -> Any:
        return self._verification_resolver(config)

    def build_verifier(self, config: SmtpConfig) -> RecipientVerifier | None:
        return self._build_verifier(config)

    def build_authenticator(self, config: SmtpConfig) -> Authenticator | None:
        """SMTP AUTH's checker when ``config`` has users or providers (None: AUTH is not offered)."""
        auth = config.auth
        if not (auth.users or auth.ldap_url or auth.oauth2 or auth.providers):
            return None
        reactor = self._reactor
        return Authenticator(
            auth,
            clock=reactor,
            reactor=reactor,
            threadpool=self.threadpool,
            providers=build_providers(auth, reactor),
        )

    def build_limits(self, config: SmtpConfig) -> IngressLimits | None:
        limits = self._build_limits(config)
        if limits is not None:
            report_limit_alerts(limits.limiter.alerts, self.events, "smtp")
        return limits

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
            if self.dns is not None:
                self.dns.unbind()
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
            if self.dns is not None:
                self.dns.unbind()
            raise StartupError(str(error)) from error

    def _bind_dns(self) -> None:
        if self.dns is not None:
            try:
                self.dns.bind()
            except DnsBindError as error:
                if self.proxy is not None:
                    self.proxy.unbind()
                raise StartupError(str(error)) from error

    def privilegedStartService(self) -> None:
        self._bind_proxy()
        self._bind_dns()
        self._bind_api()
        try:
            super().privilegedStartService()  # the metrics listener binds here
        except ListenError as error:
            if self.proxy is not None:
                self.proxy.unbind()
            if self.api is not None:
                self.api.unbind()
            if self.dns is not None:
                self.dns.unbind()
            raise StartupError(str(error)) from error
        self._bind_smtp()

    def startService(self) -> None:
        # Embedded use may call startService alone; bind now then.
        self._bind_proxy()
        self._bind_dns()
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
        if self.authenticator is not None:
            self.authenticator.close()
        if self._limits_redis is not None:
            await _settle_all([self._limits_redis.disconnect()], "rate limit counters: Redis did not close")
        if self.queue is not None and self._starting is not None:
            try:
                await self.queue.save()
            except Exception:  # noqa: BLE001 (logged; the thread pool must still be stopped)
                log.failure("the queue could not be saved")
        if self.suppressions is not None:
            await _settle_all([self.suppressions.close()], "the suppression list did not close")
        if self.threadpool.started:
            self.threadpool.stop()
        if self._ready_result is None:
            self._settle_ready(Failure(StartupError("dcrouter was stopped before it became ready")))
        if self.smtp is not None:
            # Under a supervisor, each worker's line shows how the load was spread (docs/deployment.md).
            accepted = self.metrics.accepted_total()
            log.info("SMTP: {accepted} message(s) accepted since start", accepted=accepted)
        log.info("dcrouter stopped")
