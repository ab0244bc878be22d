"""Configuration reload without a restart: SIGHUP and ``POST /api/v1/reload`` (docs/operations.md).

:meth:`Reloader.reload` reads the configuration file again (in a thread) with the loader that start-up uses.
A file that does not load, or that changes a setting only a restart can change (:data:`RESTART_ONLY`),
changes nothing: the outcome lists the errors, each starting with its key path. Otherwise the new parts are
built off to the side (routing, the processing chain, policy and limits, the AUTH checker, TLS keys, proxy
routes, new listening ports bound but paused); only then are they put in place, in one step on the reactor
thread, with no wait between the first change and the last. A failure while building (a port taken, a
certificate that does not load) also changes nothing.

What sessions see: each SMTP session keeps the configuration it started with (its factory is copied at
connect), a proxied connection keeps the route it was given; sessions accepted after the swap get the new
configuration. The queue is never touched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred

from dcrouter.config import ConfigError, load_file
from dcrouter.config.options import DcRouterOptions
from dcrouter.config.schema import file_key
from dcrouter.config.smtp import SmtpConfig
from dcrouter.delivery.routing import RecipientRouter
from dcrouter.dns.zone import ZoneSet, build_zones
from dcrouter.log import logger, set_level
from dcrouter.net.certfiles import TlsMaterialError, load_certified_key
from dcrouter.net.certstore import CertifiedKey
from dcrouter.net.listen import ListenError
from dcrouter.processing.build import build_chain
from dcrouter.proxy.routes import build_routes, listening_ports
from dcrouter.proxy.service import ProxyBindError
from dcrouter.proxy.session import ProxySettings
from dcrouter.router import DcRouter, smtp_tls_config
from dcrouter.smtp.auth import Authenticator
from dcrouter.smtp.policy import SessionPolicy
from dcrouter.smtp.protocol import ESMTPServerFactory
from dcrouter.smtp.service import PendingPorts

log = logger(__name__)

#: Settings a reload refuses to change, as (key path, why): the queue, the addresses listeners are bound on,
#: and services built once at start (the API, metrics, webhooks, ACME, the outbound pool).
RESTART_ONLY: tuple[tuple[str, str], ...] = (
    ("workers", "the number of worker processes"),
    ("smtpConfig", "adding or removing SMTP"),
    ("smtpConfig.queueStorage", "the queue backend"),
    ("smtpConfig.persistentPath", "the queue's directory"),
    ("smtpConfig.redisUrl", "the queue's Redis"),
    ("smtpConfig.maxQueueSize", "the queue's bound"),
    ("smtpConfig.bindAddress", "the address every SMTP port is bound on"),
    ("smtpConfig.implicitTlsPorts", "TLS from the first byte on a bound port"),
    ("smtpConfig.proxyProtocol", "the PROXY header reader in front of bound ports"),
    ("smtpConfig.trustedProxies", "the PROXY header reader in front of bound ports"),
    ("smtpConfig.proxyHeaderTimeout", "the PROXY header reader in front of bound ports"),
    ("smtpConfig.delivery", "the outbound connection pool and pacing"),
    ("smtpConfig.checkInterval", "the delivery loop's timer"),
    ("smtpConfig.maxPerDestination", "the delivery slots"),
    ("smtpConfig.callout", "the recipient callout pool"),
    ("smtpConfig.verification", "the inbound verification resolver"),
    ("smartProxyConfig", "adding or removing the proxy"),
    ("smartProxyConfig.bindAddress", "the address every proxy port is bound on"),
    ("smartProxyConfig.acme", "ACME orders"),
    ("dnsServerConfig", "adding or removing the DNS server"),
    ("dnsServerConfig.udpPort", "the DNS server's bound port"),
    ("dnsServerConfig.udpBindInterface", "the address the DNS server is bound on"),
    ("httpDomainRoutes", "adding or removing the proxy"),
    ("apiConfig", "the management API itself"),
    ("metricsConfig", "the metrics listener"),
    ("events", "webhooks and event subscribers"),
    ("mtaConfig", "the resolver delivery and callouts share"),
    ("logFormat", "the log observer twistd installed at start"),
    ("tls.tlsProfile", "TLS settings of bound implicit-TLS ports"),
    ("tls.minVersion", "TLS settings of bound implicit-TLS ports"),
    ("tls.ciphers", "TLS settings of bound implicit-TLS ports"),
    ("smtpConfig.tls.tlsProfile", "TLS settings of bound implicit-TLS ports"),
    ("smtpConfig.tls.minVersion", "TLS settings of bound implicit-TLS ports"),
    ("smtpConfig.tls.ciphers", "TLS settings of bound implicit-TLS ports"),
)


@dataclass
class ReloadOutcome:
    """What a reload did: ``changes`` (key paths and what changed there) when applied, ``errors`` (each
    starting with its key path) when refused."""

    applied: bool
    path: str
    changes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _key_value(options: Any, path: str) -> Any:
    """The value at a camelCase key path of an options object (None where a section is absent)."""
    value = options
    for part in path.split("."):
        if value is None:
            return None
        fields = {file_key(f): f.name for f in dataclasses.fields(value)}
        value = getattr(value, fields[part])
    return value


def _present(value: Any) -> bool:
    return value is not None and value != []


def restart_needed(old: DcRouterOptions, new: DcRouterOptions) -> list[str]:
    """Errors for every :data:`RESTART_ONLY` setting that differs between ``old`` and ``new``."""
    errors = []
    for path, why in RESTART_ONLY:
        before, after = _key_value(old, path), _key_value(new, path)
        if path in ("smtpConfig", "smartProxyConfig", "httpDomainRoutes", "dnsServerConfig"):
            changed = _present(before) != _present(after)
        else:
            changed = before != after
        if changed:
            errors.append(f"{path}: changed, but {why} needs a restart; nothing was reloaded")
    return errors


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The key paths whose values differ, down to the fields of the top-level sections."""
    found = []
    for f in dataclasses.fields(old):
        key = prefix + file_key(f)
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before == after:
            continue
        if not prefix and dataclasses.is_dataclass(before) and dataclasses.is_dataclass(after):
            found.extend(changed_keys(before, after, key + "."))
        else:
            found.append(key)
    return found


def _ports_change(what: str, old: list[int], new: list[int]) -> list[str]:
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    notes = []
    if added:
        notes.append(f"{what}: listening on {', '.join(map(str, added))}")
    if removed:
        notes.append(f"{what}: stopped listening on {', '.join(map(str, removed))}")
    return notes


class BuildError(Exception):
    """A part of the new configuration could not be built; the message names its key path."""


@dataclass
class _SmtpParts:
    config: SmtpConfig
    routes: RecipientRouter
    chain: dict[str, Any]
    policy: SessionPolicy
    authenticator: Authenticator | None
    limits: Any
    verifier: Any
    key: CertifiedKey | None
    ports: PendingPorts


@dataclass
class _ProxyParts:
    routes: list[Any]
    settings: ProxySettings
    ports: list[int]
    keys: list[Any]
    added: list[Any]


class Reloader:
    """Reloads ``router``'s configuration from ``path``. ``defer_to_thread`` runs the file's reading off the
    reactor thread. One reload at a time: a second request waits for the first and then reads the file
    again."""

    def __init__(
        self, router: DcRouter, path: str, defer_to_thread: Callable[[Callable[[], Any]], Deferred[Any]]
    ) -> None:
        self._router = router
        self._path = path
        self._defer_to_thread = defer_to_thread
        self._running: Deferred[ReloadOutcome] | None = None
        self._dns_serial = 0

    def reload(self, source: str) -> Deferred[ReloadOutcome]:
        """Reload now (after one in progress). Never fails: a refusal is an outcome with errors."""
        previous = self._running

        async def run() -> ReloadOutcome:
            if previous is not None:
                await previous
            return await self._reload(source)

        running = self._running = Deferred.fromCoroutine(run())
        return running

    async def _reload(self, source: str) -> ReloadOutcome:
        router, path = self._router, self._path
        try:
            result = await self._defer_to_thread(lambda: load_file(path))
        except ConfigError as error:
            return self._failed(source, list(error.errors) or [str(error)])
        except OSError as error:
            return self._failed(source, [f"cannot read the configuration file: {error.strerror or error}"])
        old, new = router.options, result.options
        refused = restart_needed(old, new)
        if refused:
            return self._failed(source, refused)
        # Built even when the file is unchanged: certificate and DKIM key files are read again (a renewed
        # certificate is the usual reason for a SIGHUP).
        changes = changed_keys(old, new) or ["nothing changed in the file; certificates and keys read again"]
        try:
            smtp = self._build_smtp(new)
            proxy = self._build_proxy(new)
            zones = self._build_zones(new)
        except BuildError as error:
            return self._failed(source, [str(error)])
        # From here to the end, nothing waits: the new parts replace the old ones in one step.
        notes = []
        if smtp is not None:
            notes += self._swap_smtp(smtp)
        if proxy is not None:
            notes += self._swap_proxy(proxy)
        if zones is not None and router.dns is not None:
            router.dns.zones = zones  # the next query is answered from them
            notes.append("dnsServerConfig: zones rebuilt (configured and generated records)")
        set_level(new.log_level)
        router.options = new
        router.raw_config = result.raw
        for warning in result.warnings:
            log.warn("configuration: {problem}", problem=warning)
        return self._applied(source, changes + notes)

    # -- DNS -------------------------------------------------------------------------------------------

    def _build_zones(self, options: DcRouterOptions) -> ZoneSet | None:
        """The DNS server's zones from ``options``: its own records and those generated from the mail
        configuration (MX, DKIM keys read again, SPF, DMARC), with a new SOA serial; None without a server."""
        router = self._router
        if router.dns is None or options.dns_server_config is None:
            return None
        # A new SOA serial (the time, as at start), so secondaries copying the zones see they changed.
        self._dns_serial = max(int(router.reactor.seconds()), self._dns_serial + 1)
        try:
            return build_zones(options, serial=self._dns_serial, dynamic=router.dns_challenges)
        except (OSError, ValueError) as error:
            raise BuildError(f"dnsServerConfig: {error}") from error

    # -- SMTP ------------------------------------------------------------------------------------------

    def _build_smtp(self, options: DcRouterOptions) -> _SmtpParts | None:
        router = self._router
        config = options.smtp_config
        if config is None or router.smtp is None or router.processor is None:
            return None
        old = router.smtp_config
        assert old is not None
        reactor = router.reactor
        try:
            routes = RecipientRouter(config)  # a check only: the router's own is reconfigured in place
            chain = build_chain(config, reactor, router.verification_resolver(config)).options()
        except (OSError, ValueError) as error:
            raise BuildError(f"smtpConfig: {error}") from error
        verifier = router.verifier
        if config.domain_configs != old.domain_configs:
            try:
                verifier = router.build_verifier(config)
            except Exception as error:  # StartupError, and what reading the files raises
                raise BuildError(str(error)) from error
        assert router.policy is not None  # built with smtpConfig
        limits = router.limits
        if (config.rate_limits, config.domain_configs, config.max_recipients) != (
            old.rate_limits,
            old.domain_configs,
            old.max_recipients,
        ):
            limits = router.build_limits(config)
        try:
            policy = SessionPolicy(
                config,
                verifier=verifier,
                limits=limits,
                suppressions=router.policy.suppressions,
                counts=router.policy.counts,
            )
        except ValueError as error:
            raise BuildError(f"smtpConfig: {error}") from error
        authenticator = router.authenticator
        if config.auth != old.auth:
            try:
                authenticator = router.build_authenticator(config)
            except Exception as error:  # what building a provider raises
                raise BuildError(f"smtpConfig.auth: {error}") from error
        key = self._smtp_key(options, config)
        tls_options = router.smtp_tls_options()
        smtp = router.smtp
        new_ports = [port for port in config.ports if port not in smtp.factories]
        factories = [
            ESMTPServerFactory(
                config=config,
                port=port,
                policy=policy,
                authenticator=authenticator,
                acceptor=router.processor,
                spool_directory=router.spool_directory,
                tls_options=tls_options,
                clock=reactor,
                sessions=smtp.sessions,
                events=router.events,
            )
            for port in new_ports
        ]
        try:
            pending = smtp.bind_more(config, factories, tls_options)
        except ListenError as error:
            raise BuildError(f"smtpConfig.ports: {error}") from error
        return _SmtpParts(config, routes, chain, policy, authenticator, limits, verifier, key, pending)

    def _smtp_key(self, options: DcRouterOptions, config: SmtpConfig) -> CertifiedKey | None:
        """SMTP's certificate read again from its files (None: keep the one in use)."""
        tls_config = smtp_tls_config(options)
        if tls_config is None or tls_config.cert_path is None:
            return None
        try:
            return load_certified_key(tls_config, config.hostname, addresses=(config.bind_address,))
        except (TlsMaterialError, OSError) as error:
            raise BuildError(f"smtpConfig.tls: {error}") from error

    def _swap_smtp(self, parts: _SmtpParts) -> list[str]:
        router = self._router
        assert router.smtp is not None and router.processor is not None and router.delivery is not None
        old = router.smtp.config
        config = parts.config
        assert router.routes is not None and router.policy is not None
        router.processor.update_options(**parts.chain)
        router.routes.reconfigure(config)  # checked while building: cannot fail now
        router.delivery.reload_config(config)
        parts.policy.suppressed_refusals = router.policy.suppressed_refusals
        if parts.key is not None:
            router.certificates.set_default(parts.key)
        tls_options = router.smtp_tls_options()

        def update(factory: ESMTPServerFactory) -> None:
            factory.reconfigure(
                config=config,
                policy=parts.policy,
                authenticator=parts.authenticator,
                tls_options=tls_options,
            )

        router.smtp.reconfigure(config, parts.ports, update)
        router.policy, router.authenticator = parts.policy, parts.authenticator
        old_verifier = router.verifier
        router.limits, router.verifier = parts.limits, parts.verifier
        if old_verifier is not None and old_verifier is not parts.verifier:
            # Callouts in flight on the old one end unverified (450), as after PUT /api/v1/routing.
            Deferred.fromCoroutine(old_verifier.close()).addErrback(
                lambda failure: log.failure("recipient callout connections did not close", failure)
            )
        router.smtp_config = config
        return _ports_change("smtpConfig.ports", old.ports, config.ports)

    # -- proxy -----------------------------------------------------------------------------------------

    def _build_proxy(self, options: DcRouterOptions) -> _ProxyParts | None:
        proxy = self._router.proxy
        if proxy is None:
            return None
        config = options.smart_proxy_config
        try:
            routes = build_routes(config, options.http_domain_routes)
        except ValueError as error:
            raise BuildError(f"smartProxyConfig: {error}") from error
        ports = listening_ports(routes, config)
        try:
            keys = proxy.read_certificates(routes)
            added = proxy.bind_more([port for port in ports if port not in proxy.ports])
        except ProxyBindError as error:
            raise BuildError(str(error)) from error
        return _ProxyParts(routes, ProxySettings.from_config(config), ports, keys, added)

    def _swap_proxy(self, parts: _ProxyParts) -> list[str]:
        proxy = self._router.proxy
        assert proxy is not None
        before = list(proxy.ports)
        proxy.put_certificates(parts.keys)
        proxy.reconfigure(parts.routes, parts.settings, parts.ports, parts.added)
        return _ports_change("smartProxyConfig ports", before, parts.ports)

    # -- outcome ---------------------------------------------------------------------------------------

    def _failed(self, source: str, errors: list[str]) -> ReloadOutcome:
        for error in errors:
            log.error("configuration reload refused: {problem}", problem=error)
        log.error(
            "configuration reload ({source}) of {path} refused; nothing changed",
            source=source,
            path=self._path,
        )
        self._router.events.emit("config.reload_failed", source=source, path=self._path, errors=errors)
        return ReloadOutcome(False, self._path, errors=errors)

    def _applied(self, source: str, changes: list[str]) -> ReloadOutcome:
        log.info(
            "configuration reloaded ({source}) from {path}: {changes}",
            source=source,
            path=self._path,
            changes="; ".join(changes),
        )
        self._router.events.emit("config.reloaded", source=source, path=self._path, changes=changes)
        return ReloadOutcome(True, self._path, changes=changes)

