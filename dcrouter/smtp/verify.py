"""Recipient verification at RCPT: refuse mail for mailboxes that do not exist before it is accepted, so the
gateway never has to bounce it later to a sender that may be forged (backscatter).

Per ``domainConfigs`` entry, ``verifyRecipients`` says how (docs/smtp.md "Recipient verification"):

- ``"off"`` (the default): every address at the entry's domains is accepted.
- ``"list"``: only the addresses in ``recipients``/``recipientsFile`` (:mod:`dcrouter.smtp.recipients`), as
  Postfix's ``relay_recipient_maps``. It applies to every client, trusted or not, as Postfix's
  ``smtpd_reject_unlisted_recipient`` does: the list is the truth about the domain, and refusing at RCPT is
  kinder to a trusted sender than a bounce.
- ``"callout"``: the route's target is asked (:mod:`dcrouter.delivery.callout`), as Postfix's
  ``reject_unverified_recipient``. Only for clients that are neither authenticated nor in
  ``relayNetworks``, where Postfix's documentation places that restriction (after ``permit_mynetworks`` and
  ``permit_sasl_authenticated``): a trusted client's sender is real, so a later bounce reaches the person
  who made the mistake, and probing for it would only add load.

Replies: an unknown recipient gets ``550 5.1.1 <addr>: Recipient address rejected: User unknown`` (Postfix's
wording); a callout that could not decide (4xx, timeout, no target reachable) gets ``450 4.1.1 <addr>:
Recipient address rejected: unverified address: ...`` (Postfix's ``unverified_recipient_tempfail_action``),
or is accepted when the entry sets ``calloutFailOpen``. What the target said is logged, never shown to the
client.

Callouts, what a caller may rely on:

- Routed as delivery routes the message (``RecipientRouter.route`` with the transaction's real sender), so the
  probe goes where the message would go; the probe itself says ``MAIL FROM:<calloutSender>`` (``<>``).
- Results are cached per (route, probe sender, address) on the clock: accepted for ``callout.positiveTtl``,
  refused for ``callout.negativeTtl``, at most ``callout.cacheSize`` addresses (least recently used go
  first). Undecided results are not cached.
- One probe per address at a time: RCPTs for an address already being probed wait for that probe.
- At most ``callout.maxParallel`` probes run at once; the others wait their turn. Waiting and probing
  together take at most ``callout.timeout``; then the answer is "unverified" whatever the probe is doing,
  and the probe is cancelled.
- The SMTP session only awaits a Deferred: nothing blocks the reactor, and since the protocol handles one
  command at a time, replies to pipelined RCPTs stay in order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from dcrouter.config.domains import CalloutConfig, DomainConfig
from dcrouter.config.smtp import SmtpConfig
from dcrouter.delivery.callout import CalloutAnswer, ProbeResult
from dcrouter.delivery.route import Route
from dcrouter.log import logger
from dcrouter.mail.address import Address
from dcrouter.mail.recipients import RecipientTable
from dcrouter.mail.reply import Reply
from dcrouter.net.domains import DomainMatcher
from dcrouter.smtp.recipients import DeferToThread, RecipientsFile

log = logger(__name__)

_T = TypeVar("_T")

TIMED_OUT = ProbeResult(CalloutAnswer.UNVERIFIED, Reply(451, "4.4.2", "Recipient verification timed out"))
FAILED_LOCALLY = ProbeResult(
    CalloutAnswer.UNVERIFIED, Reply(451, "4.3.0", "Recipient verification failed locally")
)


def unknown_recipient(address: Address) -> Reply:
    """Postfix's reply for an address not in its recipient table."""
    return Reply(550, "5.1.1", f"<{address}>: Recipient address rejected: User unknown")


def unverified_recipient(address: Address) -> Reply:
    """The temporary refusal of an address whose callout could not decide."""
    return Reply(
        450, "4.1.1", f"<{address}>: Recipient address rejected: unverified address: try again later"
    )


class Prober(Protocol):
    """What verification needs from :class:`~dcrouter.delivery.callout.CalloutProber`."""

    def probe(
        self, route: Route, sender: str, recipient: str, *, deadline: float
    ) -> Deferred[ProbeResult]: ...

    async def close(self) -> None: ...


class VerdictCache:
    """Callout verdicts by key, each kept for its verdict's time to live, at most ``size`` of them (least
    recently used forgotten first). ``UNVERIFIED`` is never kept."""

    def __init__(self, clock: IReactorTime, *, size: int, positive_ttl: float, negative_ttl: float) -> None:
        self._clock = clock
        self._size = size
        self._ttl = {CalloutAnswer.ACCEPTED: positive_ttl, CalloutAnswer.REJECTED: negative_ttl}
        self._entries: OrderedDict[Any, tuple[float, CalloutAnswer]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Any) -> CalloutAnswer | None:
        """The verdict kept for ``key``, or None (never stored, expired or evicted)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, verdict = entry
        if expires <= self._clock.seconds():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return verdict

    def put(self, key: Any, verdict: CalloutAnswer) -> None:
        ttl = self._ttl.get(verdict, 0)
        if ttl <= 0:
            return
        self._entries[key] = (self._clock.seconds() + ttl, verdict)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


def within(work: Deferred[_T], timeout: float, clock: IReactorTime, fallback: _T) -> Deferred[_T]:
    """A Deferred with ``work``'s result, or ``fallback`` once ``timeout`` seconds have passed; then
    ``work`` is cancelled and whatever it ends with is dropped. Unlike ``addTimeout`` this does not wait
    for a cancelled coroutine to wind down."""
    result: Deferred[_T] = Deferred()

    def expire() -> None:
        result.callback(fallback)
        work.cancel()

    timer = clock.callLater(timeout, expire)

    def settle(outcome: _T | Failure) -> None:
        if result.called:
            return
        timer.cancel()
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)

    work.addBoth(settle)
    return result


@dataclass(frozen=True)
class _Listed:
    """``verifyRecipients = "list"`` for one entry: its inline table and/or its file."""

    inline: RecipientTable | None
    file: RecipientsFile | None

    def knows(self, address: Address) -> bool | Deferred[bool]:
        if self.inline is not None and self.inline.knows(address):
            return True
        if self.file is None:
            return False
        return self.file.knows(address)


@dataclass(frozen=True)
class _Probed:
    """``verifyRecipients = "callout"`` for one entry."""

    sender: str
    fail_open: bool


_Rule = _Listed | _Probed | None


class RecipientVerifier:
    """Verification for every ``domainConfigs`` entry of one configuration (see the module docstring).

    ``route_for(sender, recipient)`` is delivery's routing (``RecipientRouter.route``) and ``prober`` asks a
    route's target; both are needed only when some entry uses callouts. ``defer_to_thread`` runs the
    re-reads of recipients files. ``stats`` counts probes started, cache hits and RCPTs that joined a probe
    already running.
    """

    def __init__(
        self,
        config: SmtpConfig,
        *,
        clock: IReactorTime,
        defer_to_thread: DeferToThread,
        prober: Prober | None = None,
        route_for: Callable[[str, str], Route] | None = None,
    ) -> None:
        """Reads every ``recipientsFile`` (blocking, at start-up). Raises OSError or ValueError for one that
        cannot be used, and ValueError when an entry uses callouts but no prober or routing was given."""
        self._clock = clock
        self._prober = prober
        self._route_for = route_for
        callout: CalloutConfig = config.callout
        self._timeout = callout.timeout / 1000
        self._cache = VerdictCache(
            clock,
            size=callout.cache_size,
            positive_ttl=callout.positive_ttl / 1000,
            negative_ttl=callout.negative_ttl / 1000,
        )
        self._slots = DeferredSemaphore(callout.max_parallel)
        self._probing: dict[Any, list[Deferred[ProbeResult]]] = {}
        self.stats = {"probes": 0, "cache_hits": 0, "joined": 0}
        rules: list[tuple[str, _Rule]] = []
        for entry in config.domain_configs:
            rule = self._rule(entry, clock, defer_to_thread)
            rules.extend((domain, rule) for domain in entry.domains)
        # Matched like the relay decision (same patterns, same precedence), so the entry whose rule applies is
        # the entry that accepted the domain.
        self._rules: DomainMatcher[_Rule] = DomainMatcher(rules)

    def _rule(self, entry: DomainConfig, clock: IReactorTime, defer_to_thread: DeferToThread) -> _Rule:
        if entry.verify_recipients == "list":
            inline = RecipientTable(entry.recipients, entry.domains) if entry.recipients else None
            file = None
            if entry.recipients_file is not None:
                file = RecipientsFile(
                    entry.recipients_file, entry.domains, clock=clock, defer_to_thread=defer_to_thread
                )
            return _Listed(inline, file)
        if entry.verify_recipients == "callout":
            if self._prober is None or self._route_for is None:
                raise ValueError("recipient callouts need a prober and delivery's routing")
            return _Probed(entry.callout_sender, entry.callout_fail_open)
        return None

    @property
    def probes_running(self) -> int:
        """Addresses being probed right now."""
        return len(self._probing)

    def check(
        self, address: Address, sender: Address | None, *, trusted: bool
    ) -> Reply | Deferred[Reply | None] | None:
        """None to accept ``address`` (a recipient at one of our domains), or the reply refusing it; a
        Deferred when the answer needs a file check or a callout. ``trusted``: the session authenticated or
        comes from ``relayNetworks`` (callouts are skipped then). ``sender`` routes the probe as the message
        would be routed."""
        rule = self._rules.match(address.domain)
        if isinstance(rule, _Listed):
            known = rule.knows(address)
            if isinstance(known, Deferred):
                return known.addCallback(self._listed, address)
            return self._listed(known, address)
        if isinstance(rule, _Probed) and not trusted:
            return self._callout(rule, address, sender)
        return None

    async def close(self) -> None:
        """Close the probe connections."""
        if self._prober is not None:
            await self._prober.close()

    def _listed(self, known: bool, address: Address) -> Reply | None:
        if known:
            return None
        log.info("recipient <{recipient}> is not in the recipient list", recipient=str(address))
        return unknown_recipient(address)

    def _callout(
        self, rule: _Probed, address: Address, sender: Address | None
    ) -> Reply | Deferred[Reply | None] | None:
        assert self._route_for is not None
        route = self._route_for(str(sender) if sender is not None else "", str(address))
        key = (route.name, rule.sender, str(address))
        verdict = self._cache.get(key)
        if verdict is not None:
            self.stats["cache_hits"] += 1
            return self._answer(verdict, rule, address)
        return self._shared_probe(key, route, rule.sender, address).addCallback(
            lambda result: self._answer(result.verdict, rule, address)
        )

    def _answer(self, verdict: CalloutAnswer, rule: _Probed, address: Address) -> Reply | None:
        if verdict is CalloutAnswer.ACCEPTED:
            return None
        if verdict is CalloutAnswer.REJECTED:
            return unknown_recipient(address)
        if rule.fail_open:
            log.info("recipient <{recipient}> unverified, accepted (calloutFailOpen)", recipient=str(address))
            return None
        return unverified_recipient(address)

    def _shared_probe(
        self, key: Any, route: Route, probe_sender: str, address: Address
    ) -> Deferred[ProbeResult]:
        waiter: Deferred[ProbeResult] = Deferred()
        waiting = self._probing.get(key)
        if waiting is not None:
            self.stats["joined"] += 1
            waiting.append(waiter)
            return waiter
        self._probing[key] = [waiter]
        self.stats["probes"] += 1
        deadline = self._clock.seconds() + self._timeout
        probing = self._slots.run(self._probe, route, probe_sender, str(address), deadline)
        outcome = within(probing, self._timeout, self._clock, TIMED_OUT)
        outcome.addErrback(self._probe_failed, route)
        outcome.addCallback(self._probed, key, route, address)
        return waiter

    def _probe(self, route: Route, sender: str, recipient: str, deadline: float) -> Deferred[ProbeResult]:
        assert self._prober is not None
        if self._clock.seconds() >= deadline:
            # Its turn came only as its time ran out (the probe before it timed out just now).
            return succeed(TIMED_OUT)
        return self._prober.probe(route, sender, recipient, deadline=deadline)

    def _probe_failed(self, failure: Failure, route: Route) -> ProbeResult:
        log.failure("recipient probe via {route} failed", failure, route=route.name)
        return FAILED_LOCALLY

    def _probed(self, result: ProbeResult, key: Any, route: Route, address: Address) -> None:
        self._cache.put(key, result.verdict)
        log.info(
            "recipient <{recipient}> {verdict} by callout via {route} ({target}: {code} {enhanced} {text})",
            recipient=str(address),
            verdict=result.verdict.value,
            route=route.name,
            target=result.target or "no target answered",
            code=result.reply.code,
            enhanced=result.reply.enhanced,
            text=" ".join(result.reply.lines()),
        )
        for waiter in self._probing.pop(key, []):
            waiter.callback(result)
