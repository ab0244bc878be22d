"""AcmeService: obtains and renews the certificates of terminated routes, as a child service of DcRouter.

What is ordered (:func:`certificate_orders`), with ``acme.enabled``: one certificate per terminating route
with ``tls.certificate = "auto"`` for the names of its ``match.domains``, and one per ``domainConfigs``
entry with ``useNetworkProxy`` and no ``certificate`` files for its ``domains``; with ``smtpConfig.tls.acme``,
one for ``smtpConfig.hostname``, which also becomes the store's default (SMTP clients rarely send SNI).

Lifecycle:

- ``startService`` starts a small thread pool of its own (ACME and file I/O block; DcRouter's pool is
  for password hashing and stays free), then, without holding up the router's start: loads the account key
  (created on first start) and every stored certificate under ``acme.stateDirectory``, puts the stored ones
  into the :class:`~dcrouter.net.certstore.CertificateStore` (so a restart serves them at once), and orders
  those that are missing, cover other names than configured, or are within ``renewThresholdDays`` of expiry.
- Each order then has a reactor timer for its next look: at ``notAfter - renewThresholdDays``, at most
  :data:`CHECK_INTERVAL` away (so a clock that jumped is noticed). A failed order is retried with exponential
  backoff from :data:`RETRY_BASE` to :data:`RETRY_MAX` and logged each time; the certificate in use, if any,
  stays in use meanwhile.
- A new certificate is written to disk first, then put into the store: new handshakes use it at once,
  connections already open keep theirs.
- ``stopService`` cancels the timers, waits for an order in flight (it cannot be interrupted inside a
  blocking HTTP call; each is bounded by the client's timeouts) and stops the thread pool.

Orders run one at a time: a CA's rate limits are per account, and nothing is gained by racing them.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from dcrouter.acme.challenges import ChallengeResponder, Dns01Responder
from dcrouter.acme.client import AcmeAccount, IssuedCertificate, generate_key_pem
from dcrouter.config.proxy import acme_directory_url, route_domains, route_tls
from dcrouter.events import NO_EVENTS, EventBus
from dcrouter.log import logger
from dcrouter.net.certstore import CertificateStore, CertifiedKey
from dcrouter.net.domains import normalize_domain
from dcrouter.net.reactor import IRouterReactor

log = logger(__name__)

#: Longest wait between two looks at an order, in seconds: a day.
CHECK_INTERVAL = 86_400.0
#: First retry delay after a failed order, in seconds; doubled on every further failure up to RETRY_MAX.
RETRY_BASE = 60.0
#: Longest retry delay, in seconds. Let's Encrypt allows 5 failed validations per name per hour.
RETRY_MAX = 6 * 3600.0
#: How often a worker other than worker 0 looks for a certificate worker 0 obtained (workers > 1), in
#: seconds: a stat of two files per certificate.
FOLLOW_INTERVAL = 10.0
#: Threads of the service's own pool: one order at a time needs one; the second serves file I/O meanwhile.
THREADPOOL_MAX = 2

_TERMINATING = ("terminate", "terminate-and-reencrypt")


@dataclass(frozen=True)
class CertificateOrder:
    """The names one certificate is obtained for (normalised; the first is its subject and its directory
    name under the state directory) and the key path that asked for it."""

    names: tuple[str, ...]
    source: str
    #: Also the certificate served to clients whose SNI matches nothing (SMTP's: ``smtpConfig.tls.acme``).
    default: bool = False

    @property
    def primary(self) -> str:
        return self.names[0]


def _normalize_name(pattern: str) -> str:
    """A host name normalised, or a ``*.`` wildcard with its base normalised (DNS-01 orders those)."""
    if pattern.startswith("*."):
        return "*." + normalize_domain(pattern[2:])
    return normalize_domain(pattern)


def certificate_orders(options: Any) -> list[CertificateOrder]:
    """The certificates ACME must obtain for a DcRouterOptions (see the module docstring); the config
    checks have made sure every name is an exact host name. Names already ordered are not ordered twice."""
    config = options.smart_proxy_config
    if config is None or config.acme is None or not config.acme.enabled:
        return []
    orders: list[CertificateOrder] = []
    seen: set[tuple[str, ...]] = set()

    def add(patterns: Sequence[str], source: str) -> None:
        names = tuple(dict.fromkeys(_normalize_name(p) for p in patterns))
        if names and names not in seen:
            seen.add(names)
            orders.append(CertificateOrder(names, source))

    for i, route in enumerate(config.routes):
        tls, _ = route_tls(route)
        if tls is not None and tls.mode in _TERMINATING and tls.certificate == "auto":
            add(route_domains(route.match.domains), f"smartProxyConfig.routes[{i}]")
    for i, entry in enumerate(config.domain_configs):
        # An entry with its own certificate files terminates with those.
        if entry.use_network_proxy and entry.certificate is None:
            add(entry.domains, f"smartProxyConfig.domainConfigs[{i}]")
    smtp = options.smtp_config
    if smtp is not None and smtp.tls is not None and smtp.tls.acme:
        names = (_normalize_name(smtp.hostname),)
        same = [i for i, order in enumerate(orders) if order.names == names]
        if same:  # a route orders that very certificate already: it is SMTP's default too
            orders[same[0]] = dataclasses.replace(orders[same[0]], default=True)
        else:
            orders.append(CertificateOrder(names, "smtpConfig.tls.acme", default=True))
    return orders


class Issuer(Protocol):
    """What the service needs of an ACME account (:class:`~dcrouter.acme.client.AcmeAccount`)."""

    async def issue(self, names: Sequence[str]) -> IssuedCertificate: ...

    def close(self) -> None:
        """Release connections to the CA (the service has stopped)."""


#: Runs a blocking function off the reactor thread: ``run(function, *args) -> Deferred``.
BlockingRunner = Callable[..., "Deferred[Any]"]


def _write_private(path: str, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically (a reader sees the old file or the new one, never half), created
    with ``mode`` from the start so a key is never readable by others even for an instant."""
    temporary = f"{path}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(temporary, mode)  # an older temporary file may have been created with another mode
    os.replace(temporary, path)


def _directory_slug(directory_url: str) -> str:
    """A directory name for an ACME directory URL: accounts and certificates of one CA (staging) are never
    taken for another's (production)."""
    parts = urlsplit(directory_url)
    return re.sub(r"[^A-Za-z0-9.-]+", "_", f"{parts.netloc}{parts.path}").strip("_") or "acme"


class AcmeStateDirectory:
    """The files under ``acme.stateDirectory`` for one ACME directory::

        <root>/<directory host and path>/account.key                  the account's key (0600)
        <root>/<directory host and path>/certificates/<name>/cert.pem  the leaf certificate
                                                             chain.pem the intermediates
                                                             key.pem   its key (0600)

    Blocking: call from a worker thread."""

    def __init__(self, root: str, directory_url: str) -> None:
        self.path = os.path.join(root, _directory_slug(directory_url))

    def _ensure(self, path: str) -> None:
        # Level by level: os.makedirs gives only the last level the mode; keys are 0600 anyway, but the
        # names of the certificates held are nobody else's business either.
        parent = os.path.dirname(path)
        if parent and parent != path and not os.path.isdir(parent):
            self._ensure(parent)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass

    def account_key(self) -> bytes:
        """The account key, created on first use."""
        self._ensure(self.path)
        path = os.path.join(self.path, "account.key")
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            key = generate_key_pem()
            _write_private(path, key, 0o600)
            log.info("ACME: created an account key in {path}", path=path)
            return key

    def certificate_directory(self, order: CertificateOrder) -> str:
        # "*" is awkward in a path; "_" never starts a normalised host name, so "_.example.com" is no one's.
        return os.path.join(self.path, "certificates", order.primary.replace("*", "_", 1))

    def load(self, order: CertificateOrder) -> CertifiedKey | None:
        """The stored certificate of ``order``, or None when there is none or it cannot be read (logged)."""
        where = self.certificate_directory(order)
        cert, key, chain = (os.path.join(where, n) for n in ("cert.pem", "key.pem", "chain.pem"))
        if not (os.path.exists(cert) and os.path.exists(key)):
            return None
        try:
            return CertifiedKey.from_files(cert, key, chain if os.path.exists(chain) else None)
        except (OSError, ValueError) as error:
            log.warn("ACME: ignoring the stored certificate in {path}: {error}", path=where, error=error)
            return None

    def stamp(self, order: CertificateOrder) -> tuple[int, ...] | None:
        """Modification times and sizes of the stored certificate and key of ``order`` (None while either is
        missing): a change means another process stored a new pair."""
        where = self.certificate_directory(order)
        try:
            cert, key = (os.stat(os.path.join(where, n)) for n in ("cert.pem", "key.pem"))
        except FileNotFoundError:
            return None
        return (cert.st_mtime_ns, cert.st_size, key.st_mtime_ns, key.st_size)

    def save(self, order: CertificateOrder, issued: IssuedCertificate) -> None:
        """Store a new certificate; the key is written last, after the certificate it belongs to, so a
        crash in between leaves a pair the store refuses (key does not match) and a new order follows."""
        where = self.certificate_directory(order)
        self._ensure(where)
        _write_private(os.path.join(where, "chain.pem"), issued.chain_pem, 0o644)
        _write_private(os.path.join(where, "cert.pem"), issued.cert_pem, 0o644)
        _write_private(os.path.join(where, "key.pem"), issued.key_pem, 0o600)


@dataclass
class OrderState:
    """What the service knows of one order: the certificate in use, failures in a row, the next look."""

    order: CertificateOrder
    current: CertifiedKey | None = None
    failures: int = 0
    next_check: float | None = None
    timer: IDelayedCall | None = field(default=None, repr=False)
    #: The stored files' :meth:`AcmeStateDirectory.stamp` when :class:`AcmeFollower` last took them.
    stamp: tuple[int, ...] | None = None


class AcmeService(Service):
    """Obtains and renews ``orders`` (see the module docstring).

    ``account`` replaces the :class:`~dcrouter.acme.client.AcmeAccount` built from the account key (tests
    pass a fake issuer); ``run_blocking`` replaces the service's thread pool (tests pass a synchronous
    runner, so everything runs under a ``Clock``). ``ca_bundle``: CAs trusted for the directory's HTTPS.

    Attributes callers may rely on: ``states`` (primary name → :class:`OrderState`) and :meth:`when_settled`.
    """

    name = "acme"  # type: ignore[assignment]

    def __init__(
        self,
        orders: Sequence[CertificateOrder],
        *,
        store: CertificateStore,
        responder: ChallengeResponder,
        state_directory: str,
        directory_url: str,
        email: str | None,
        renew_threshold_days: int,
        auto_renew: bool = True,
        reactor: IRouterReactor,
        ca_bundle: str | None = None,
        account: Issuer | None = None,
        run_blocking: BlockingRunner | None = None,
        challenge: str = "http-01",
        dns_responder: Dns01Responder | None = None,
        events: EventBus = NO_EVENTS,
    ) -> None:
        self._reactor = reactor
        self.challenge = challenge
        self.dns_responder = dns_responder
        #: Where certificate.issued and certificate.order_failed go (dcrouter.events).
        self.events = events
        self._clock = reactor
        self.store = store
        self.responder = responder
        self.directory_url = directory_url
        self.state = AcmeStateDirectory(state_directory, directory_url)
        self._email = email
        self.renew_threshold = renew_threshold_days * 86_400.0
        self.auto_renew = auto_renew
        self._ca_bundle = ca_bundle
        self._account = account
        self._threadpool: ThreadPool | None = None
        if run_blocking is None:
            self._threadpool = ThreadPool(minthreads=0, maxthreads=THREADPOOL_MAX, name="dcrouter-acme")
            pool = self._threadpool
            run_blocking = lambda f, *a: deferToThreadPool(reactor, pool, f, *a)  # noqa: E731
        self._run = run_blocking
        self.states: dict[str, OrderState] = {o.primary: OrderState(o) for o in orders}
        self._lock = DeferredLock()
        self._in_flight: set[Deferred[None]] = set()
        self._settled_waiters: list[Deferred[None]] = []

    @classmethod
    def from_options(
        cls,
        options: Any,
        *,
        store: CertificateStore,
        responder: ChallengeResponder,
        reactor: IRouterReactor,
        dns_responder: Dns01Responder | None = None,
        events: EventBus = NO_EVENTS,
    ) -> AcmeService | None:
        """The service a DcRouterOptions configures, or None when there is nothing to obtain."""
        orders = certificate_orders(options)
        if not orders:
            return None
        acme = options.smart_proxy_config.acme
        return cls(
            orders,
            store=store,
            responder=responder,
            state_directory=acme.state_directory,
            directory_url=acme_directory_url(acme),
            email=acme.account_email,
            renew_threshold_days=acme.renew_threshold_days,
            auto_renew=acme.auto_renew,
            reactor=reactor,
            challenge=acme.challenge,
            dns_responder=dns_responder,
            events=events,
        )

    # -- service ---------------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._threadpool is not None:
            self._threadpool.start()
        self._track(Deferred.fromCoroutine(self._start()))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for state in self.states.values():
            self._cancel(state)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        for deferred in list(self._in_flight):
            await deferred  # _track made these infallible
        if self._account is not None:
            self._account.close()
        if self._threadpool is not None and self._threadpool.started:
            self._threadpool.stop()

    def _track(self, deferred: Deferred[None]) -> Deferred[None]:
        """Keep ``deferred`` until it fires, so stopService can wait for it; a failure is logged."""
        self._in_flight.add(deferred)

        def done(result: Any) -> None:
            self._in_flight.discard(deferred)
            if not self._in_flight:
                waiters, self._settled_waiters = self._settled_waiters, []
                for waiter in waiters:
                    waiter.callback(None)
            if isinstance(result, Failure):
                log.failure("ACME: unexpected error", result)

        deferred.addBoth(done)
        return deferred

    def when_settled(self) -> Deferred[None]:
        """Fires once nothing is in flight (start-up loading and orders done, successful or not)."""
        if not self._in_flight:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._settled_waiters.append(waiter)
        return waiter

    async def _start(self) -> None:
        try:
            if self._account is None:
                key_pem = await self._run(self.state.account_key)
                assert self._threadpool is not None  # a custom runner comes with a custom account
                self._account = AcmeAccount(
                    directory_url=self.directory_url,
                    account_key_pem=key_pem,
                    email=self._email,
                    responder=self.responder,
                    reactor=self._reactor,
                    threadpool=self._threadpool,
                    ca_bundle=self._ca_bundle,
                    challenge=self.challenge,
                    dns_responder=self.dns_responder,
                )
        except Exception:  # noqa: BLE001 (no account: every order fails alike; logged, retried as one)
            log.failure("ACME: cannot set up the account in {path}", path=self.state.path)
            for state in self.states.values():
                self._failed(state)
            return
        for state in self.states.values():
            stored = await self._run(self.state.load, state.order)
            if stored is not None and set(state.order.names) <= set(stored.names):
                self._use(state, stored)
                log.info(
                    "ACME: using the stored certificate for {names} (valid until {not_after})",
                    names=", ".join(state.order.names),
                    not_after=stored.not_after.isoformat(),
                )
        for state in self.states.values():
            await self._check(state)

    # -- one order -------------------------------------------------------------------------------------

    def _due(self, state: OrderState) -> float | None:
        """When ``state`` needs a new certificate (seconds on the clock), or None for never."""
        if state.current is None:
            return self._clock.seconds()
        if not self.auto_renew:
            return None
        return state.current.not_after.timestamp() - self.renew_threshold

    async def _check(self, state: OrderState) -> None:
        """Order now if due, else schedule the next look."""
        state.timer = None
        if not self.running:
            return
        due = self._due(state)
        now = self._clock.seconds()
        if due is not None and due <= now:
            await self._lock.run(lambda: Deferred.fromCoroutine(self._obtain(state)))
        else:
            self._schedule(state, CHECK_INTERVAL if due is None else due - now)

    async def _obtain(self, state: OrderState) -> None:
        if not self.running:
            return
        names = state.order.names
        renewal = state.current is not None
        assert self._account is not None
        log.info(
            "ACME: ordering a certificate for {names} from {directory} ({why})",
            names=", ".join(names),
            directory=self.directory_url,
            why="none stored" if state.current is None else "renewal",
        )
        try:
            issued = await self._account.issue(names)
            key = CertifiedKey.from_pem(issued.cert_pem, issued.key_pem, issued.chain_pem or None)
            await self._run(self.state.save, state.order, issued)
        except Exception as error:  # noqa: BLE001 (any failure is logged and retried; the service goes on)
            self._failed(state, error)
            self.events.emit(
                "certificate.order_failed",
                name=state.order.primary,
                renewal=renewal,
                failures=state.failures,
                error=str(error)[:200],
            )
            return
        self._use(state, key)
        state.failures = 0
        self.events.emit(
            "certificate.issued",
            name=state.order.primary,
            renewal=renewal,
            notAfter=key.not_after.timestamp(),
        )
        log.info(
            "ACME: obtained a certificate for {names}, valid until {not_after}",
            names=", ".join(names),
            not_after=key.not_after.isoformat(),
        )
        due = self._due(state)
        self._schedule(state, CHECK_INTERVAL if due is None else due - self._clock.seconds())

    def _use(self, state: OrderState, key: CertifiedKey) -> None:
        state.current = key
        for name in state.order.names:
            self.store.put(name, key)
        if state.order.default:
            self.store.set_default(key)

    def _failed(self, state: OrderState, error: BaseException | None = None) -> None:
        state.failures += 1
        delay = min(RETRY_MAX, RETRY_BASE * 2 ** (state.failures - 1))
        if error is not None:
            log.error(
                "ACME: ordering a certificate for {names} failed ({failures} in a row), retrying in "
                "{delay:.0f}s: {error}",
                names=", ".join(state.order.names),
                failures=state.failures,
                delay=delay,
                error=error,
            )
        self._schedule(state, delay)

    def _schedule(self, state: OrderState, delay: float) -> None:
        if not self.running:
            return
        self._cancel(state)
        delay = max(0.0, min(delay, CHECK_INTERVAL))
        state.next_check = self._clock.seconds() + delay
        state.timer = self._clock.callLater(delay, self._wake, state)

    def _wake(self, state: OrderState) -> None:
        self._track(Deferred.fromCoroutine(self._check(state)))

    def _cancel(self, state: OrderState) -> None:
        if state.timer is not None and state.timer.active():
            state.timer.cancel()
        state.timer = None
        state.next_check = None


class AcmeFollower(AcmeService):
    """The certificates of ``orders`` as another process obtains them: with ``workers`` > 1, worker 0 runs the
    :class:`AcmeService` (one account, one order and one renewal per certificate, DNS-01 through worker 0's
    DNS server) and every other worker runs a follower over the same ``acme.stateDirectory``.

    A follower orders nothing. At start it puts every stored certificate into its store (as the service does),
    then every :data:`FOLLOW_INTERVAL` seconds compares the stored files' :meth:`~AcmeStateDirectory.stamp`
    with the last one it took and loads a changed pair: a certificate worker 0 obtains or renews is served by
    every worker within that interval. A pair caught half-written (the key is written last, so the store
    refuses a new certificate with the old key) is simply taken on the next look. HTTP-01 validations reach
    whichever worker accepts them: the :class:`~dcrouter.acme.challenges.ChallengeResponder` of every worker
    shares its tokens through files.
    """

    name = "acme-follower"  # type: ignore[assignment]

    async def _start(self) -> None:
        for state in self.states.values():
            await self._check(state)

    async def _check(self, state: OrderState) -> None:
        state.timer = None
        if not self.running:
            return
        try:
            await self._take(state)
        finally:
            self._schedule(state, FOLLOW_INTERVAL)

    async def _take(self, state: OrderState) -> None:
        stamp = await self._run(self.state.stamp, state.order)
        if stamp is None or stamp == state.stamp:
            return
        stored = await self._run(self.state.load, state.order)
        if stored is None or not set(state.order.names) <= set(stored.names):
            return  # not (yet) a usable pair for these names: looked at again next time
        if state.current is not None and stored.fingerprint == state.current.fingerprint:
            state.stamp = stamp
            return
        state.stamp = stamp
        self._use(state, stored)
        log.info(
            "ACME: serving the certificate for {names} stored by worker 0 (valid until {not_after})",
            names=", ".join(state.order.names),
            not_after=stored.not_after.isoformat(),
        )
