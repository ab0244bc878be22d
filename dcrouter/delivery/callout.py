"""Recipient callouts: ask a route's target server whether it would take mail for an address, without
sending any (Postfix's ``reject_unverified_recipient`` probe, done in the SMTP session rather than through
the queue).

What a caller may rely on:

- ``probe`` always fires with a :class:`ProbeResult`; network, DNS and protocol failures are results
  (``UNVERIFIED``), an errback is a bug.
- The route's targets come from the same :class:`MxResolver`, :class:`TargetHealth` and connection code
  (:class:`ConnectionPool`) as delivery, so a probe meets exactly the servers, TLS policy (``useTls``,
  ``verifyCertificates``, opportunistic STARTTLS otherwise) and AUTH a delivery of the message would meet.
  Down marks are shared with delivery: a target a probe could not reach is tried last by deliveries too.
- Targets are tried in order until one *answers*: the first server that replies to MAIL decides, as in
  delivery (we do not shop for a laxer server). RCPT 2xx is ``ACCEPTED``, 5xx ``REJECTED``, anything else
  (4xx greylisting, MAIL refused, no target reachable, DNS trouble) ``UNVERIFIED``.
- Past ``deadline`` (an absolute time on the clock) no further target is tried, and a probe cancelled
  there ends at once with ``UNVERIFIED``; targets are not marked down for a probe we gave up on.
- Nothing is sent after RCPT but RSET: a probe never opens DATA, so it can deliver nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from dcrouter.delivery.client import SMTPClientError
from dcrouter.delivery.mx import DnsTemporaryFailure, MxLookupError, MxResolver
from dcrouter.delivery.pool import (
    NETWORK_ERRORS,
    ConnectionPool,
    TargetFailure,
    network_failure,
    server_failure,
    target_name,
)
from dcrouter.delivery.route import Route
from dcrouter.log import logger
from dcrouter.mail.reply import Reply
from dcrouter.net.targets import Target, TargetHealth

log = logger(__name__)

NO_TARGET = Reply(451, "4.4.0", "No target could be tried")
GAVE_UP = Reply(451, "4.4.2", "Recipient verification timed out")


class CalloutAnswer(enum.Enum):
    """What a probe learnt about an address."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    UNVERIFIED = "unverified"


@dataclass(frozen=True)
class ProbeResult:
    """The verdict, the reply it rests on (the server's RCPT or MAIL reply, or our description of a failure)
    and ``host:port`` of the server that answered ("" when none did)."""

    verdict: CalloutAnswer
    reply: Reply
    target: str = ""


def verdict_of(reply: Reply) -> CalloutAnswer:
    """RCPT 2xx accepted, 5xx rejected, anything else unverified."""
    if 200 <= reply.code < 300:
        return CalloutAnswer.ACCEPTED
    if 500 <= reply.code < 600:
        return CalloutAnswer.REJECTED
    return CalloutAnswer.UNVERIFIED


class CalloutProber:
    """Probes recipients over ESMTP through a :class:`ConnectionPool` of its own (built with the callout
    timeouts), with failover across the route's targets like :class:`~dcrouter.delivery.transport.
    ESMTPTransport`."""

    def __init__(
        self, *, resolver: MxResolver, health: TargetHealth, pool: ConnectionPool, clock: IReactorTime
    ) -> None:
        self._resolver = resolver
        self._health = health
        self._pool = pool
        self._clock = clock

    def probe(self, route: Route, sender: str, recipient: str, *, deadline: float) -> Deferred[ProbeResult]:
        """Whether ``route``'s server would take mail from ``sender`` ("" for the null sender) to
        ``recipient``. See the module docstring."""
        return Deferred.fromCoroutine(self._probe(route, sender, recipient, deadline))

    async def close(self) -> None:
        """Close the probe connections (QUIT to idle ones)."""
        await self._pool.close()

    async def _probe(self, route: Route, sender: str, recipient: str, deadline: float) -> ProbeResult:
        try:
            targets = await self._resolver.targets(route)
        except DnsTemporaryFailure as error:
            return ProbeResult(CalloutAnswer.UNVERIFIED, Reply(error.code, error.enhanced, str(error)))
        except MxLookupError as error:
            # NullMX or no such domain: delivery would bounce the message, so it is refused now.
            return ProbeResult(CalloutAnswer.REJECTED, Reply(error.code, error.enhanced, str(error)))
        last = NO_TARGET
        for target in self._health.order(route.name, targets, rotate=bool(route.targets)):
            if self._clock.seconds() >= deadline:
                return ProbeResult(CalloutAnswer.UNVERIFIED, GAVE_UP)
            outcome = await self._attempt(route, target, sender, recipient)
            if isinstance(outcome, TargetFailure):
                if self._clock.seconds() >= deadline:
                    # Cut short by our own deadline: that says nothing about the target.
                    return ProbeResult(CalloutAnswer.UNVERIFIED, GAVE_UP)
                self._health.mark_down(target)
                last = outcome.reply
                continue
            self._health.mark_up(target)
            return outcome
        return ProbeResult(CalloutAnswer.UNVERIFIED, last)

    async def _attempt(
        self, route: Route, target: Target, sender: str, recipient: str
    ) -> ProbeResult | TargetFailure:
        try:
            client = await self._pool.acquire(route, target)
        except TargetFailure as failure:
            return failure
        try:
            replies = await client.probe(sender, recipient)
        except SMTPClientError as error:
            self._pool.release(route, target, client, reusable=False)
            return server_failure(target, error, "probe")
        except NETWORK_ERRORS as error:
            self._pool.release(route, target, client, reusable=False)
            return network_failure(target, error, "during the probe of")
        except BaseException:
            self._pool.release(route, target, client, reusable=False)
            raise
        clean = replies.reset is None or 200 <= replies.reset.code < 300
        self._pool.release(route, target, client, reusable=clean)
        where = target_name(target)
        if replies.rcpt is None:
            # The server answered, refusing the probe itself (often: no null sender). It decides; this says
            # nothing about the mailbox, so the address stays unverified (see calloutSender).
            log.warn(
                "recipient probe via {route}: {target} refused MAIL FROM:<{sender}>: {code} {text}",
                route=route.name,
                target=where,
                sender=sender,
                code=replies.mail.code,
                text=" ".join(replies.mail.lines()),
            )
            return ProbeResult(CalloutAnswer.UNVERIFIED, replies.mail, where)
        return ProbeResult(verdict_of(replies.rcpt), replies.rcpt, where)
