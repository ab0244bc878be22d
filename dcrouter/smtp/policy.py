"""The session policy: who may connect, send and relay, and how much (rate limits through
:class:`~dcrouter.interfaces.IIngressLimits`). A plain object the ESMTP protocol asks."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from dcrouter.config.domains import DomainConfig
from dcrouter.config.smtp import SmtpConfig
from dcrouter.interfaces import IIngressLimits, ISuppressionList, QueueUnavailable, Suppression
from dcrouter.log import logger
from dcrouter.mail.address import Address
from dcrouter.mail.reply import Reply
from dcrouter.net.cidr import CidrSet
from dcrouter.net.domains import DomainMatcher
from dcrouter.smtp.session import Session
from dcrouter.smtp.verify import RecipientVerifier

log = logger(__name__)


@dataclass
class ConnectionCounts:
    """Connections open now, in total and per client address (the caps' counters)."""

    total: int = 0
    per_ip: dict[str, int] = field(default_factory=dict)


class SessionPolicy:
    """Connection caps and the relay decision for one SMTP listener set, built once from ``SmtpConfig``.

    Relay rule (never an open relay): a recipient whose domain matches ``domainConfigs`` (exact or ``*.``
    wildcard) is accepted from anyone, unless its local part carries routing (:attr:`Address.relay_trick`);
    every other recipient — other domains, address literals, relay tricks — is accepted only from an
    authenticated session or a peer in ``relayNetworks``. The bare ``<postmaster>`` is always accepted
    (RFC 5321 §4.5.1). A recipient at one of our domains must also pass ``verifier`` (the entry's
    ``verifyRecipients``; :mod:`dcrouter.smtp.verify` says for which clients) when one is given.

    ``limits`` (rate limits, quotas, a domain's ``allowedIPs`` and ``maxRecipientsPerMessage``) is asked at
    connect (:meth:`check_connection`), AUTH, MAIL and RCPT when given; its checks may answer with a
    Deferred (counters in Redis, a tarpit delay).
    """

    def __init__(
        self,
        config: SmtpConfig,
        verifier: RecipientVerifier | None = None,
        limits: IIngressLimits | None = None,
        suppressions: ISuppressionList | None = None,
        counts: ConnectionCounts | None = None,
    ) -> None:
        """Raises ValueError naming a bad domain pattern or relay network. ``counts``: the open connections
        of the policy this one replaces at a reload (shared, so the caps hold across it)."""
        self._verifier = verifier
        self.limits = limits
        #: Recipients that hard-bounced recently: refused with 550 5.1.1 (counted in suppressed_refusals).
        self.suppressions = suppressions
        self.suppressed_refusals = 0
        self._hostname = config.hostname
        self._max_total = config.max_connections
        self._max_per_ip = config.max_connections_per_ip
        self._local_domains: DomainMatcher[DomainConfig] = DomainMatcher(
            (domain, entry) for entry in config.domain_configs for domain in entry.domains
        )
        self._relay_networks = CidrSet(config.relay_networks)
        #: Connections counted now; shared with the policy a reload replaces this one with.
        self.counts = counts if counts is not None else ConnectionCounts()

    def set_domains(self, config: SmtpConfig, verifier: RecipientVerifier | None) -> None:
        """Accept mail for ``config``'s domainConfigs, verified by ``verifier``, from the next RCPT on (a
        routing change; connection counts are kept). Raises ValueError, changing nothing, for a bad
        pattern."""
        local: DomainMatcher[DomainConfig] = DomainMatcher(
            (domain, entry) for entry in config.domain_configs for domain in entry.domains
        )
        self._local_domains, self._verifier = local, verifier

    # Connections

    def connection_opened(self, ip: str) -> Reply | None:
        """Count a new connection from ``ip``; None to proceed, or the ``421 4.7.0`` to send before closing.

        Contract: a connection refused here is not counted, so the protocol must call
        :meth:`connection_closed` exactly once for each connection this accepted (returned None for),
        and never for a refused one. IPv4-mapped IPv6 peers count as their IPv4 address.
        """
        key = _client_key(ip)
        counts = self.counts
        if counts.total >= self._max_total:
            return Reply(421, "4.7.0", f"{self._hostname} Too many connections, try again later")
        if counts.per_ip.get(key, 0) >= self._max_per_ip:
            return Reply(421, "4.7.0", f"{self._hostname} Too many connections from your address")
        counts.total += 1
        counts.per_ip[key] = counts.per_ip.get(key, 0) + 1
        return None

    def connection_closed(self, ip: str) -> None:
        """Forget one accepted connection from ``ip``. Counts never go below zero, even if misused."""
        key = _client_key(ip)
        counts = self.counts
        count = counts.per_ip.get(key, 0)
        if count == 0:
            return
        if count == 1:
            del counts.per_ip[key]
        else:
            counts.per_ip[key] = count - 1
        counts.total -= 1

    def check_connection(self, session: Session) -> Reply | Deferred[Reply | None] | None:
        """After :meth:`connection_opened` admitted ``session``: its rate limits (a ``421 4.7.0`` refuses).
        :meth:`session_closed` must follow once, whatever the answer."""
        if self.limits is None:
            return None
        return self.limits.connection_opened(session)

    def session_closed(self, session: Session) -> None:
        """The session :meth:`check_connection` was asked about has ended."""
        if self.limits is not None:
            self.limits.connection_closed(session)

    def check_auth(self, session: Session) -> Reply | Deferred[Reply | None] | None:
        """Before an AUTH exchange: a ``421 4.7.0`` (the session ends) when its failed attempts are over a
        limit."""
        if self.limits is None:
            return None
        return self.limits.check_auth(session)

    def auth_failed(self, session: Session) -> None:
        """Count a failed AUTH attempt."""
        if self.limits is not None:
            self.limits.auth_failed(session)

    def message_accepted(self, session: Session, sender: Address, size: int) -> None:
        """Count an accepted message's ``size`` octets."""
        if self.limits is not None:
            self.limits.message_accepted(session, sender, size)

    @property
    def connections(self) -> int:
        """Connections currently counted, in total."""
        return self.counts.total

    def connections_from(self, ip: str) -> int:
        """Connections currently counted from ``ip``."""
        return self.counts.per_ip.get(_client_key(ip), 0)

    # Transaction

    def check_sender(
        self, session: Session, address: Address, size: int = 0
    ) -> Reply | Deferred[Reply | None] | None:
        """None to accept MAIL FROM ``address`` declaring ``size`` octets (0: not declared), or the reply
        refusing it: a rate limit's (``451 4.7.1``).

        Every syntactically valid sender is accepted otherwise: a reverse path is not routed, so relay tricks
        in it are harmless. The hook is where sender authentication rules (SPF, own-domain spoofing) go.
        """
        if self.limits is None:
            return None
        return self.limits.check_mail(session, address, size)

    def check_recipient(
        self,
        session: Session,
        address: Address,
        sender: Address | None = None,
        accepted: Sequence[str] = (),
    ) -> Reply | Deferred[Reply | None] | None:
        """None to accept RCPT TO ``address`` in a transaction from ``sender`` that has ``accepted``
        recipients so far, or the reply refusing it: ``554 5.7.1 <addr>: Relay access denied``, the
        domain's client rules (``550 5.7.1``, ``452 4.5.3``), the verifier's, or a rate limit's
        (``451 4.7.1``). A Deferred when a check has to wait (a callout, a changed recipients file, counters
        in Redis)."""
        limits = self.limits
        if limits is not None and address.domain and self.is_local(address):
            refusal = limits.check_recipient_rules(session, address, accepted)
            if refusal is not None:
                return refusal
        verdict = self._recipient_verdict(session, address, sender)
        if limits is None or isinstance(verdict, Reply):
            return verdict
        from_address = sender if sender is not None else Address.null()
        if isinstance(verdict, Deferred):
            return verdict.addCallback(
                lambda found: (
                    found
                    if found is not None
                    else limits.check_recipient(session, from_address, address, accepted)
                )
            )
        return limits.check_recipient(session, from_address, address, accepted)

    def _recipient_verdict(
        self, session: Session, address: Address, sender: Address | None
    ) -> Reply | Deferred[Reply | None] | None:
        """The relay decision, then the suppression list (``550 5.1.1``), then recipient verification."""
        refusal = self.relay_refusal(session, address)
        if refusal is not None:
            return refusal
        if self.suppressions is not None and address.domain and not address.is_literal:
            d = self.suppressions.get(str(address))
            args = (session, address, sender)
            d.addCallbacks(self._suppressed, self._suppression_unknown, callbackArgs=args, errbackArgs=args)
            return d
        return self._verify(session, address, sender)

    def _verify(
        self, session: Session, address: Address, sender: Address | None
    ) -> Reply | Deferred[Reply | None] | None:
        if self._verifier is not None and address.domain and self.is_local(address):
            return self._verifier.check(address, sender, trusted=self.may_relay(session))
        return None

    def _suppressed(
        self, found: Suppression | None, session: Session, address: Address, sender: Address | None
    ) -> Reply | Deferred[Reply | None] | None:
        if found is None:
            return self._verify(session, address, sender)
        self.suppressed_refusals += 1
        return Reply(
            550, "5.1.1", f"<{address}>: Recipient address rejected: it bounced recently (suppressed)"
        )

    def _suppression_unknown(
        self, failure: Failure, session: Session, address: Address, sender: Address | None
    ) -> Reply | Deferred[Reply | None] | None:
        # The list cannot be read (its store is down, its disk full): go on as without one; delivery decides.
        if failure.check(QueueUnavailable):
            log.warn(
                "suppression list unavailable ({why}); {address} not checked against it",
                why=failure.getErrorMessage(),
                address=str(address),
            )
        else:
            log.failure(
                "suppression list failed; {address} not checked against it", failure, address=str(address)
            )
        return self._verify(session, address, sender)

    def relay_refusal(self, session: Session, address: Address) -> Reply | None:
        """The relay decision alone, before recipient verification (what ``POST /api/v1/routing/test``
        asks): None when ``session`` may send to ``address``, else ``554 5.7.1 Relay access denied``."""
        if not address.domain:
            if address.local.lower() == "postmaster":
                return None
            return self._relay_denied(address)
        if self.is_local(address) or self.may_relay(session):
            return None
        return self._relay_denied(address)

    def is_local(self, address: Address) -> bool:
        """True when ``address`` is for one of our domains and safe to accept from anyone."""
        if address.is_literal or address.relay_trick:
            return False
        return self._local_domains.match(address.domain) is not None

    def domain_config(self, domain: str) -> DomainConfig | None:
        """The ``domainConfigs`` entry serving ``domain`` (exact names first, then the most specific
        wildcard), or None."""
        return self._local_domains.match(domain)

    def may_relay(self, session: Session) -> bool:
        """True when the session may send to any domain: it authenticated, or its peer is in relayNetworks."""
        return bool(session.auth_user) or session.peer_host in self._relay_networks

    def _relay_denied(self, address: Address) -> Reply:
        return Reply(554, "5.7.1", f"<{address}>: Relay access denied")


def _client_key(ip: str) -> str:
    """One key per client address, whichever way the socket spelled it."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
