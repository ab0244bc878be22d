"""Outbound ESMTP connections, opened ready to send and kept for reuse per (route, target).

What a caller may rely on:

- ``acquire`` returns a client that is connected, greeted (220), EHLO'd, encrypted when the TLS policy says
  so, and authenticated when the route has credentials; or it raises :class:`TargetFailure`, whose ``reply``
  says why in SMTP terms. A TargetFailure is always about this target only: the caller tries the next one, and
  when none is left the message is deferred (never bounced: see the decisions below).
- Every client handed out must be given back with ``release``; ``reusable=False`` (an error happened on it)
  means it is closed and never handed out again.
- A reused connection is reset with ``RSET`` before its next transaction, so a connection the server
  dropped while idle is noticed before anything of a transaction counts: with ``acquire(probe=True)`` (the
  default) the RSET is answered before the connection is handed out; with ``probe=False`` (deliveries) the
  client is handed out with ``reset_due`` set and sends the RSET in front of its transaction, in the same
  write when the server offers PIPELINING (one send and one round trip less per message), raising
  :class:`~dcrouter.delivery.client.StaleSession` when it fails: the caller then releases it and acquires
  again.
- At most ``connectionPoolSize`` idle connections are kept per key; each is closed after ``idleTimeout``,
  and a connection is closed after ``maxMessagesPerConnection`` messages.

Decisions:

- **A greeting other than 220** (RFC 5321 §3.1, §4.2.5: a 554 greeting means "this server will not talk to
  you", not "this mailbox does not exist") fails the target. It is never a bounce, even when every target
  greets with 5xx: like Postfix's ``smtp_skip_5xx_greeting``, we move on to the next target and defer.
- **STARTTLS**: with ``route.require_tls`` a target without STARTTLS, or whose handshake fails, fails with
  ``451 4.7.5``; nothing is sent in plaintext. Otherwise STARTTLS is used whenever offered, and a failed
  handshake also fails the target (no fallback to plaintext in the same attempt: with ``verifyCertificates``
  a failure must defer, and a silent downgrade would make verification meaningless).
- **Which TLS** (:mod:`dcrouter.net.tls`): required (``route.require_tls``) or verified
  (``verifyCertificates``) TLS uses the router's ``intermediate`` policy, as its listeners do; STARTTLS that
  is merely opportunistic uses the wider ``opportunistic`` profile, which also accepts CBC and static-RSA
  suites, since a server that offers nothing better would otherwise get the message in plaintext, or (the
  handshake having failed) not at all. ``tlsMinVersion`` applies to both.
- **AUTH** is only sent over TLS, or in plaintext to a loopback address (127.0.0.0/8, ::1) where nothing
  crosses a network; otherwise the target fails with ``451 4.7.0``. A rejected AUTH defers rather than
  bounces (a wrong password in our configuration is not the recipient's fault; Postfix's
  ``smtp_sasl_auth_soft_bounce`` does the same).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.ssl import platformTrust

from dcrouter.config.delivery import DeliveryConfig
from dcrouter.delivery.client import ESMTPClient, SMTPClientError
from dcrouter.delivery.route import Route
from dcrouter.log import logger
from dcrouter.mail.reply import Reply
from dcrouter.net.quiet import connect_quietly
from dcrouter.net.reactor import IRouterReactor
from dcrouter.net.targets import Target
from dcrouter.net.tls import TlsPolicy, client_options, verified_client_options

if TYPE_CHECKING:
    # Twisted exports the interface only from a private module; it is needed for the annotation alone.
    from twisted.internet._sslverify import IOpenSSLTrustRoot

log = logger(__name__)

#: Errors that mean "the network or the peer failed", as opposed to a bug here.
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    net_error.ConnectError,
    net_error.ConnectionLost,
    net_error.ConnectionDone,
    TimeoutError,
    CancelledError,
    OSError,
)


def target_name(target: Target) -> str:
    """``host:port`` (what RecipientResult.target holds)."""
    return f"{target.host}:{target.port}"


def target_label(target: Target) -> str:
    """``host:port``, with the address when it differs from the host: ``mx.example.org[192.0.2.1]:25``."""
    if target.host == target.address:
        return target_name(target)
    return f"{target.host}[{target.address}]:{target.port}"


class TargetFailure(Exception):
    """This target cannot take mail now. ``reply`` is the server's answer or our own description of a local
    or network failure phrased as a 4xx reply; ``summary`` is a few words for the attempt history."""

    def __init__(self, reply: Reply, summary: str) -> None:
        super().__init__(f"{reply.code} {reply.enhanced} {' '.join(reply.lines())}")
        self.reply = reply
        self.summary = summary


def network_failure(target: Target, error: BaseException, phase: str) -> TargetFailure:
    """A TargetFailure describing a network-level ``error`` that happened during ``phase``."""
    where = target_label(target)
    if isinstance(error, net_error.ConnectionRefusedError):
        return TargetFailure(Reply(451, "4.4.1", f"Connection refused by {where}"), "refused")
    if isinstance(error, (TimeoutError, CancelledError, net_error.TimeoutError)):
        return TargetFailure(Reply(451, "4.4.2", f"Timeout {phase} {where}"), f"timeout {phase}")
    if isinstance(error, net_error.ConnectError):
        return TargetFailure(Reply(451, "4.4.1", f"Cannot connect to {where}: {error}"), "unreachable")
    return TargetFailure(Reply(451, "4.4.2", f"Connection lost {phase} {where}"), f"lost {phase}")


def server_failure(target: Target, error: SMTPClientError, phase: str) -> TargetFailure:
    """A TargetFailure carrying the server's own reply (``error.reply``)."""
    return TargetFailure(error.reply, f"{phase} {error.reply.code}")


@dataclass(eq=False)
class _Idle:
    client: ESMTPClient
    timer: IDelayedCall | None = None

    def stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()


_Key = tuple[Route, Target]


class ConnectionPool:
    """Ready-to-send ESMTP clients per (route, target). ``trust_root`` overrides the system's CA store for
    certificate verification (tests pass their own CA)."""

    def __init__(
        self,
        *,
        reactor: IRouterReactor,
        clock: IReactorTime,
        config: DeliveryConfig,
        helo_name: str,
        trust_root: IOpenSSLTrustRoot | None = None,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self._config = config
        self._helo_name = helo_name
        self._trust_root = trust_root
        self._idle: dict[_Key, list[_Idle]] = {}
        #: Clients handed out, with the number of messages each has been acquired for so far.
        self._busy: dict[ESMTPClient, int] = {}
        self._counts: dict[ESMTPClient, int] = {}
        self._closing: list[Deferred[Any]] = []
        self._closed = False
        self._unverified: dict[str, IOpenSSLClientConnectionCreator] = {}

    # -- handing out ----------------------------------------------------------------------------------

    async def acquire(self, route: Route, target: Target, *, probe: bool = True) -> ESMTPClient:
        """A client ready for ``send`` to ``target`` under ``route``'s policy; reuses an idle one when it
        still answers RSET (``probe``) or hands it out with its RSET due in front of the next ``send``
        (module docstring). Raises TargetFailure."""
        if self._closed:
            raise TargetFailure(Reply(421, "4.3.2", "Delivery is shutting down"), "shutting down")
        client = await self._reuse((route, target), probe)
        if client is None:
            client = await self._open(route, target)
            if self._closed:
                # close() ran while this connection was being opened: it must not outlive the pool.
                client.abort()
                raise TargetFailure(Reply(421, "4.3.2", "Delivery is shutting down"), "shutting down")
            self._counts[client] = 0
        self._counts[client] += 1
        self._busy[client] = self._counts[client]
        return client

    def release(self, route: Route, target: Target, client: ESMTPClient, *, reusable: bool) -> None:
        """Give ``client`` back. It is kept idle for reuse when ``reusable`` and the limits allow; otherwise
        it is closed (politely with QUIT when reusable, aborted when not)."""
        messages = self._busy.pop(client, None)
        if messages is None:
            log.warn(
                "release of a connection to {target} that was not handed out", target=target_label(target)
            )
        if not reusable or self._closed or not _alive(client):
            self._forget(client)
            client.abort()
            return
        key = (route, target)
        idle = self._idle.setdefault(key, [])
        spent = (messages or 0) >= self._config.max_messages_per_connection
        if spent or len(idle) >= self._config.connection_pool_size:
            self._quit(client)
            return
        entry = _Idle(client)
        entry.timer = self._clock.callLater(self._config.idle_timeout / 1000, self._expire, key, entry)
        idle.append(entry)

    async def close(self) -> None:
        """Close everything: QUIT to idle connections, abort those in use. Returns when all are closed."""
        self._closed = True
        for entries in self._idle.values():
            for entry in entries:
                entry.stop_timer()
                self._quit(entry.client)
        self._idle.clear()
        for client in list(self._busy):
            self._forget(client)
            client.abort()
        self._busy.clear()
        if self._closing:
            await DeferredList(list(self._closing), consumeErrors=True)

    def idle_count(self, route: Route, target: Target) -> int:
        """Idle connections kept for (route, target) (for status pages and tests)."""
        return len(self._idle.get((route, target), []))

    # -- reuse and closing ----------------------------------------------------------------------------

    async def _reuse(self, key: _Key, probe: bool) -> ESMTPClient | None:
        idle = self._idle.get(key)
        while idle:
            # Most recently used first: the one least likely to have been dropped by the server.
            entry = idle.pop()
            entry.stop_timer()
            if not _alive(entry.client):
                self._forget(entry.client)
                continue
            if not probe:
                entry.client.reset_due = True
                return entry.client
            try:
                reply = await entry.client.reset()
            except SMTPClientError as error:  # the session ended while idle: not this connection
                log.debug("idle connection failed RSET: {error}", error=str(error))
                self._forget(entry.client)
                entry.client.abort()
                continue
            if reply.code == 250:
                return entry.client
            self._quit(entry.client)
        return None

    def _expire(self, key: _Key, entry: _Idle) -> None:
        idle = self._idle.get(key, [])
        if entry in idle:
            idle.remove(entry)
            self._quit(entry.client)

    def _quit(self, client: ESMTPClient) -> None:
        """Close politely; abort if QUIT fails or times out (the client's reply timeout bounds it)."""
        self._forget(client)
        if not _alive(client):
            client.abort()
            return
        closing = Deferred.fromCoroutine(client.quit())

        def failed(failure: Any) -> None:
            log.debug("QUIT failed: {error}", error=failure.getErrorMessage())
            client.abort()

        def done(result: Any) -> Any:
            if closing in self._closing:
                self._closing.remove(closing)
            return result

        closing.addErrback(failed).addBoth(done)
        if not closing.called:
            self._closing.append(closing)

    def _forget(self, client: ESMTPClient) -> None:
        self._counts.pop(client, None)

    # -- opening --------------------------------------------------------------------------------------

    async def _open(self, route: Route, target: Target) -> ESMTPClient:
        client = await self._connect(target)
        try:
            await self._prepare(client, route, target)
        except BaseException:
            client.abort()
            raise
        return client

    async def _connect(self, target: Target) -> ESMTPClient:
        client = ESMTPClient(
            clock=self._clock,
            reply_timeout=self._config.socket_timeout / 1000,
            send_timeout=self._config.send_timeout / 1000,
        )
        endpoint_class = TCP6ClientEndpoint if ":" in target.address else TCP4ClientEndpoint
        timeout = self._config.connect_timeout / 1000
        # The endpoint's own timeout runs on the reactor; ours runs on the injected clock so tests drive it.
        endpoint = endpoint_class(self._reactor, target.address, target.port, timeout=timeout)
        connecting = connect_quietly(endpoint, lambda: client)
        connecting.addTimeout(timeout, self._clock)
        try:
            await connecting
        except NETWORK_ERRORS as error:
            raise network_failure(target, error, "connecting to") from error
        return client

    async def _prepare(self, client: ESMTPClient, route: Route, target: Target) -> None:
        phase = "greeting"
        try:
            await client.wait_greeting()
            phase = "EHLO"
            capabilities = await client.ehlo(self._helo_name)
            if capabilities.starttls or route.require_tls:
                phase = "STARTTLS"
                await self._starttls(client, route, target, capabilities)
            if route.auth_user is not None:
                phase = "AUTH"
                self._check_auth_allowed(client, target)
                await client.authenticate(route.auth_user, route.auth_password or "")
        except SMTPClientError as error:
            raise server_failure(target, error, phase) from error
        except NETWORK_ERRORS as error:
            raise network_failure(target, error, f"waiting for {phase} from") from error

    async def _starttls(self, client: ESMTPClient, route: Route, target: Target, capabilities: Any) -> None:
        """STARTTLS per the route's policy (see the module docstring); TargetFailure when the target fails."""
        if not capabilities.starttls:
            raise TargetFailure(
                Reply(451, "4.7.5", f"STARTTLS required but not offered by {target_label(target)}"),
                "no STARTTLS",
            )
        try:
            await client.starttls(self._tls_options(route, target), self._helo_name)
        except SMTPClientError as error:
            refused = error.reply.code != 421 and not client.is_tls
            if refused and not route.require_tls:
                # The server declined (454) and the session goes on: opportunistic TLS means plaintext now.
                log.info(
                    "{target} declined STARTTLS ({code}); continuing without TLS",
                    target=target_label(target),
                    code=error.reply.code,
                )
                return
            # A handshake failure (verification included) ends the session as 421: never plaintext after it.
            text = f"STARTTLS with {target_label(target)} failed: {' '.join(error.reply.lines())}"
            raise TargetFailure(Reply(451, "4.7.5", text), "TLS failed") from error

    def _check_auth_allowed(self, client: ESMTPClient, target: Target) -> None:
        if client.is_tls or _is_loopback(target.address):
            return
        raise TargetFailure(
            Reply(451, "4.7.0", f"Not sending credentials to {target_label(target)} without TLS"),
            "AUTH needs TLS",
        )

    def _tls_options(self, route: Route, target: Target) -> IOpenSSLClientConnectionCreator:
        minimum = self._config.tls_min_version
        if self._config.verify_certificates:
            policy = TlsPolicy("intermediate", minimum)
            return verified_client_options(policy, target.host, self._trust_root or platformTrust())
        profile = "intermediate" if route.require_tls else "opportunistic"
        options = self._unverified.get(profile)
        if options is None:
            # One per profile: its SSL context serves every connection.
            options = self._unverified[profile] = client_options(TlsPolicy(profile, minimum))
        return options


def _alive(client: ESMTPClient) -> bool:
    """Whether the connection looks open. Approximate (an abort in progress may not show yet): the RSET
    probe before reuse settles it."""
    transport = client.transport
    if not client.is_open:
        return False
    return bool(getattr(transport, "connected", True)) and not getattr(transport, "disconnecting", False)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
