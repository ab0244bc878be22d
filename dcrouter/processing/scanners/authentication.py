"""The verification stage (``smtpConfig.verification``) as a scanner: SPF, DKIM, DMARC and ARC checked in a
thread of the reactor's pool, the findings reported in one ``Authentication-Results`` field, and a DMARC
failure acted on as the configuration and the sender domain's published policy say.

What a caller may rely on:

- Mail from an authenticated session or a relayNetworks client is not checked (it is the gateway's own
  users' outgoing mail) and gets no field.
- Every other message gets one ``Authentication-Results`` field at the top, whatever the action;
  ``Authentication-Results`` fields that arrived claiming the same authserv-id are removed first (RFC 8601
  §5), those of other authserv-ids are kept.
- DMARC ``fail``: the action configured for the domain's policy (``onDmarcReject`` for p=reject,
  ``onDmarcQuarantine`` for p=quarantine; p=none is only tagged), from the recipients' ``policies`` entries
  or the global keys, the strictest where recipients differ: ``reject`` is ``550 5.7.1``,
  ``quarantine`` the chain's quarantine. DMARC ``temperror`` (a DNS lookup timed out or failed) is
  ``451 4.7.0`` whenever the result could have led to an action (the policy is known and acts, or unknown
  and some action is configured): mail is deferred, never bounced, and the sender retries.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from dcrouter.config.verification import VerificationConfig
from dcrouter.interfaces import IScanner
from dcrouter.net.cidr import CidrSet
from dcrouter.net.domains import DomainMatcher
from dcrouter.net.reactor import IRouterReactor
from dcrouter.processing.message import Draft, ScanResult, Verdict
from dcrouter.processing.verification.checks import Identities, Results, verify
from dcrouter.processing.verification.dns import BlockingDns
from dcrouter.processing.verification.header import authentication_results, authserv_id

HEADER = "Authentication-Results"
_STRICTNESS = {"tag": 0, "quarantine": 1, "reject": 2}


@implementer(IScanner)
class AuthenticationScanner:
    """See the module docstring. ``resolver`` is a ``twisted.names`` resolver (``mtaConfig``'s)."""

    name = "verification"

    def __init__(
        self,
        config: VerificationConfig,
        *,
        hostname: str,
        resolver: Any,
        reactor: IRouterReactor,
        relay_networks: CidrSet | None = None,
    ) -> None:
        self.config = config
        self.authserv_id = config.authserv_id or hostname
        self._own_id = self.authserv_id.lower()
        self._resolver = resolver
        self._reactor = reactor
        self._relay = relay_networks
        self._global = (config.on_dmarc_reject, config.on_dmarc_quarantine)
        self._policies: DomainMatcher[tuple[str, str]] = DomainMatcher(
            (domain, (policy.on_dmarc_reject, policy.on_dmarc_quarantine))
            for policy in config.policies
            for domain in policy.domains
        )

    def scan(self, message: Draft) -> Deferred[ScanResult]:
        envelope = message.envelope
        if envelope.auth_user is not None or (self._relay is not None and envelope.peer_host in self._relay):
            return succeed(ScanResult(self.name, Verdict.CLEAN, "not checked: a local client"))
        who = Identities(ip=_plain_ip(envelope.peer_host), helo=envelope.helo, mail_from=envelope.mail_from)

        def work() -> Results:
            with message.open_received() as stream:
                data = stream.read()
            config = self.config
            return verify(
                data,
                who,
                BlockingDns(self._resolver, self._reactor),
                check_spf=config.spf,
                check_dkim=config.dkim,
                check_dmarc=config.dmarc,
                check_arc=config.arc,
            )

        # Always in a thread (never inline, however small the message): the checks wait for the reactor.
        running: Deferred[Results] = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), work)
        return running.addCallback(self.judge, self.actions_for(envelope.recipients))

    def keep(self, name: str, value: str) -> bool:
        """Whether an arrived field stays: only those claiming our authserv-id go."""
        return authserv_id(value) != self._own_id

    def actions_for(self, recipients: list[str]) -> tuple[str, str]:
        """``(onDmarcReject, onDmarcQuarantine)`` for a message to ``recipients``: each recipient's policy
        entry or the global actions, the strictest of them where they differ."""
        chosen = [self._policies.match(r.rpartition("@")[2]) or self._global for r in recipients]
        if not chosen:
            return self._global
        return (
            max((c[0] for c in chosen), key=_STRICTNESS.__getitem__),
            max((c[1] for c in chosen), key=_STRICTNESS.__getitem__),
        )

    def judge(self, results: Results, actions: tuple[str, str] | None = None) -> ScanResult:
        """The finding for ``results``: the field, and the action the DMARC outcome asks for under
        ``actions`` (``(onDmarcReject, onDmarcQuarantine)``; by default the global ones)."""
        on_reject, on_quarantine = actions or self._global
        value = authentication_results(self.authserv_id, results)
        dmarc = results.dmarc
        if dmarc is None or dmarc.result not in ("fail", "temperror"):
            return self._finding(value, Verdict.CLEAN, "")
        action = {"reject": on_reject, "quarantine": on_quarantine}.get(dmarc.policy, "tag")
        if dmarc.result == "temperror":
            could_act = action != "tag" if dmarc.policy else (on_reject, on_quarantine) != ("tag", "tag")
            if could_act:
                reason = f"DMARC for {dmarc.from_domain}: DNS temporary failure"
                return self._finding(value, Verdict.BLOCKED, reason, "tempfail")
            return self._finding(value, Verdict.CLEAN, "")
        reason = f"DMARC policy of {dmarc.from_domain} (p={dmarc.policy})"
        return self._finding(value, Verdict.BLOCKED, reason, action)

    def _finding(self, value: str, verdict: Verdict, reason: str, action: str | None = None) -> ScanResult:
        return ScanResult(
            self.name, verdict, reason, headers=((HEADER, value),), action=action, keep=self.keep, on_top=True
        )


def _plain_ip(host: str) -> str:
    """``host`` with an IPv4-mapped IPv6 address (a dual-stack listener's IPv4 client) as plain IPv4, which is
    what SPF's ip4 mechanisms match."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
