"""The built-in IDeliveryTransport: one message, one route, over ESMTP to the route's servers.

What a caller may rely on:

- ``deliver`` always fires with a DeliveryReport holding exactly one RecipientResult per recipient, in the
  order given; remote and network failures are results, an errback is a local bug (or ``open_body`` failing).
- Targets come from the MX resolver (``NullMX``/``NoSuchDomain`` make every recipient PERMANENT with that
  reply; ``DnsTemporaryFailure`` TEMPORARY), in the order the target health keeper gives them.
- Targets are tried one after the other until one *answers* the transaction: a server that replies to MAIL
  decides, whatever it replies (a 4xx there is its answer: we do not shop for a laxer server). A target that
  cannot be reached, times out, fails the TLS policy or breaks the connection is marked down and the next one
  is tried. When no target answers, every recipient is TEMPORARY with the last failure.
- Replies map per recipient: MAIL 5xx → all PERMANENT, MAIL 4xx → all TEMPORARY; RCPT 4xx/5xx decide that
  recipient; the reply after the end of data decides every recipient accepted at RCPT.
- ``open_body()`` is called once per transaction attempt and the file is always closed.
- ``DeliveryReport.tried`` lists each target tried with what happened (``mx1.example.org[192.0.2.1]:25
  refused``); ``RecipientResult.target`` is ``host:port`` of the server that answered, "" when none did.

A connection that breaks after the end of data was sent but before its reply arrived leaves the message's
fate unknown; the next target is tried, so the message may arrive twice (RFC 5321 §6.1 prefers a duplicate
to a loss).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.delivery.client import ESMTPClient, SMTPClientError, StaleSession
from dcrouter.delivery.mx import DnsTemporaryFailure, MxLookupError, MxResolver
from dcrouter.delivery.outcome import DeliveryReport, Outcome, RecipientResult
from dcrouter.delivery.pool import (
    NETWORK_ERRORS,
    ConnectionPool,
    TargetFailure,
    network_failure,
    server_failure,
    target_label,
    target_name,
)
from dcrouter.delivery.route import Route
from dcrouter.interfaces import ClaimLost, IDeliveryTransport
from dcrouter.log import logger
from dcrouter.mail.reply import Reply
from dcrouter.net.targets import Target, TargetHealth
from dcrouter.queue.item import QueueItem

log = logger(__name__)

NO_TARGET = Reply(451, "4.4.0", "No target could be tried")


def classify(code: int) -> Outcome:
    """2xx delivered, 5xx permanent, anything else (4xx, or a reply that makes no sense here) temporary."""
    if 200 <= code < 300:
        return Outcome.DELIVERED
    if 500 <= code < 600:
        return Outcome.PERMANENT
    return Outcome.TEMPORARY


def result_for(recipient: str, reply: Reply, target: str = "") -> RecipientResult:
    """A RecipientResult from a reply; a missing enhanced code is taken from the class (RFC 3463 X.0.0)."""
    enhanced = reply.enhanced or f"{reply.code // 100}.0.0"
    return RecipientResult(
        recipient=recipient,
        outcome=classify(reply.code),
        code=reply.code,
        enhanced=enhanced,
        text=" ".join(reply.lines()),
        target=target,
    )


def map_transaction(transaction: Any, recipients: list[str], target: str) -> list[RecipientResult]:
    """Per-recipient results from a client TransactionResult (``mail``, ``recipients``, ``data``)."""
    mail: Reply = transaction.mail
    if not 200 <= mail.code < 300:
        return [result_for(r, mail, target) for r in recipients]
    results = []
    for recipient in recipients:
        rcpt: Reply | None = transaction.recipients.get(recipient)
        if rcpt is None:
            rcpt = Reply(451, "4.4.2", "No reply to RCPT")
        if not 200 <= rcpt.code < 300:
            results.append(result_for(recipient, rcpt, target))
            continue
        data: Reply | None = transaction.data
        results.append(result_for(recipient, data or Reply(451, "4.4.2", "No reply to DATA"), target))
    return results


def _transaction_flags(item: QueueItem, recipients: list[str]) -> tuple[bool, bool]:
    """(smtputf8, eight_bit) for MAIL FROM, from what the message arrived with."""
    params = {key.upper(): value for key, value in item.envelope.mail_params.items()}
    addresses = [item.envelope.mail_from, *recipients]
    smtputf8 = "SMTPUTF8" in params or not all(a.isascii() for a in addresses)
    eight_bit = params.get("BODY", "").upper() == "8BITMIME"
    return smtputf8, eight_bit


@implementer(IDeliveryTransport)
class ESMTPTransport:
    """Delivers over ESMTP through a :class:`ConnectionPool`, with failover across the route's targets."""

    def __init__(
        self, *, resolver: MxResolver, health: TargetHealth, pool: ConnectionPool, clock: IReactorTime
    ) -> None:
        self._resolver = resolver
        self._health = health
        self._pool = pool
        self._clock = clock

    def deliver(
        self,
        item: QueueItem,
        route: Route,
        recipients: list[str],
        open_body: Callable[[], Deferred[BinaryIO]],
    ) -> Deferred[DeliveryReport]:
        """See IDeliveryTransport.deliver and the module docstring."""
        delivering = Deferred.fromCoroutine(self._deliver(item, route, list(recipients), open_body))

        def local_error(failure: Failure) -> Failure:
            if failure.check(ClaimLost):
                return failure  # foreseen, and nothing was sent: the manager says what happened
            log.failure(
                "delivery of {queue_id} via {route} failed locally",
                failure,
                queue_id=item.id,
                route=route.name,
            )
            return failure

        return delivering.addErrback(local_error)

    async def _deliver(
        self,
        item: QueueItem,
        route: Route,
        recipients: list[str],
        open_body: Callable[[], Deferred[BinaryIO]],
    ) -> DeliveryReport:
        report = DeliveryReport(route_name=route.name)
        try:
            targets = await self._resolver.targets(route)
        except MxLookupError as error:
            reply = Reply(error.code, error.enhanced, str(error))
            report.results = [result_for(r, reply) for r in recipients]
            if isinstance(error, DnsTemporaryFailure):
                report.tried.append(f"DNS: {error}")
            self._log_unreached(item, route, report, f"no target to try ({_describe(reply)})")
            return report
        last = NO_TARGET
        for target in self._health.order(route.name, targets, rotate=bool(route.targets)):
            outcome = await self._attempt(item, route, target, recipients, open_body)
            if isinstance(outcome, TargetFailure):
                self._health.mark_down(target)
                report.tried.append(f"{target_label(target)} {outcome.summary}")
                last = outcome.reply
                log.info(
                    "delivery of {queue_id} via {route}: {target} failed: {reply}",
                    queue_id=item.id,
                    route=route.name,
                    target=target_label(target),
                    reply=" ".join(last.lines()),
                )
                continue
            self._health.mark_up(target)
            report.tried.append(f"{target_label(target)} answered")
            report.results = outcome
            log.info(
                "delivery of {queue_id} via {route} to {target}: recipients: {counts}",
                queue_id=item.id,
                route=route.name,
                target=target_label(target),
                counts=_counts(report),
                tried=list(report.tried),
            )
            return report
        report.results = [result_for(r, last) for r in recipients]
        if report.tried:
            why = f"no target reachable ({len(report.tried)} tried; last: {_describe(last)})"
        else:
            why = f"no target to try ({_describe(last)})"
        self._log_unreached(item, route, report, why)
        return report

    async def _attempt(
        self,
        item: QueueItem,
        route: Route,
        target: Target,
        recipients: list[str],
        open_body: Callable[[], Deferred[BinaryIO]],
    ) -> list[RecipientResult] | TargetFailure:
        """The results if ``target`` answered the transaction, else the TargetFailure saying why not."""
        try:
            client = await self._pool.acquire(route, target, probe=False)
        except TargetFailure as failure:
            return failure
        try:
            body = await open_body()
        except BaseException:
            # Nothing was sent: the connection is as good as before.
            self._pool.release(route, target, client, reusable=True)
            raise
        try:
            while True:
                try:
                    transaction = await self._send(client, item, recipients, body)
                    break
                except StaleSession:
                    # A reused connection that failed its RSET: nothing of this transaction happened on it
                    # and no text was read. Another one (idle, else new), as a failed probe would have done.
                    self._pool.release(route, target, client, reusable=False)
                    try:
                        client = await self._pool.acquire(route, target, probe=False)
                    except TargetFailure as failure:
                        return failure
        except SMTPClientError as error:
            self._pool.release(route, target, client, reusable=False)
            return server_failure(target, error, "transaction")
        except NETWORK_ERRORS as error:
            self._pool.release(route, target, client, reusable=False)
            return network_failure(target, error, "during the transaction with")
        except BaseException:
            self._pool.release(route, target, client, reusable=False)
            raise
        finally:
            body.close()
        self._pool.release(route, target, client, reusable=True)
        return map_transaction(transaction, recipients, target_name(target))

    async def _send(self, client: ESMTPClient, item: QueueItem, recipients: list[str], body: BinaryIO) -> Any:
        smtputf8, eight_bit = _transaction_flags(item, recipients)
        return await client.send(
            item.envelope.mail_from,
            recipients,
            body,
            item.size,
            smtputf8=smtputf8,
            eight_bit=eight_bit,
            queue_id=item.id,
        )

    def _log_unreached(self, item: QueueItem, route: Route, report: DeliveryReport, why: str) -> None:
        """The line for an attempt no server answered: what happened instead of a target name."""
        log.info(
            "delivery of {queue_id} via {route}: {why}; recipients: {counts}",
            queue_id=item.id,
            route=route.name,
            why=why,
            counts=_counts(report),
            tried=list(report.tried),
        )


def _describe(reply: Reply) -> str:
    """``451 4.4.1 Connection refused by ...``: a reply on one line."""
    return " ".join(part for part in (str(reply.code), reply.enhanced, *reply.lines()) if part)


def _counts(report: DeliveryReport) -> str:
    """``2 delivered, 1 failed``: the outcomes of a report's recipients, those that occurred."""
    names = {Outcome.DELIVERED: "delivered", Outcome.TEMPORARY: "deferred", Outcome.PERMANENT: "failed"}
    counts = dict.fromkeys(names, 0)
    for result in report.results:
        counts[result.outcome] += 1
    return ", ".join(f"{n} {names[o]}" for o, n in counts.items() if n) or "none"
