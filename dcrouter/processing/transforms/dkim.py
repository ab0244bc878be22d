"""DKIM signing, the last stage: ``domainConfigs[].signDkim`` and the ``dkimSign`` transformation.

The signer is chosen by the domain of the message's ``From:`` as it stands after every other change (DMARC
aligns on it). A ``From`` that is not exactly one strictly parsed mailbox is not signed (logged): signing an
ambiguous author would lend the domain's name to whichever address a reader's client shows. Signing reads
the message (header block plus body, streamed) in the thread pool, so a big message never blocks the reactor
and is never held whole in memory.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from dcrouter.interfaces import ITransformation
from dcrouter.log import logger
from dcrouter.net.domains import DomainMatcher
from dcrouter.processing.dkim import DkimSigner
from dcrouter.processing.message import Draft
from dcrouter.processing.mime import strict_mailboxes

log = logger("dcrouter.processing")


@implementer(ITransformation)
class DkimSign:
    name = "dkimSign"

    def __init__(self, signers: Iterable[tuple[str, DkimSigner]]) -> None:
        """``signers``: (From domain pattern, signer) pairs; the first pattern given for a domain wins."""
        pairs = []
        seen = set()
        for pattern, signer in signers:
            if pattern.lower() not in seen:
                seen.add(pattern.lower())
                pairs.append((pattern, signer))
        self._matcher: DomainMatcher[DkimSigner] = DomainMatcher(pairs)

    def __len__(self) -> int:
        return len(self._matcher)

    def signer_for(self, draft: Draft) -> DkimSigner | None:
        fields = draft.headers.get_all("From")
        if len(fields) != 1:
            return None
        mailboxes = strict_mailboxes(fields[0])
        if not mailboxes or len(mailboxes) != 1:
            return None
        return self._matcher.match(mailboxes[0].rpartition("@")[2])

    def apply(self, draft: Draft) -> Deferred:
        signer = self.signer_for(draft)
        if signer is None:
            if len(draft.headers.get_all("From")) != 1 or not strict_mailboxes(
                draft.headers.get("From") or ""
            ):
                log.info("{queue_id}: not DKIM-signed: From is missing or ambiguous", queue_id=draft.queue_id)
            return succeed(None)

        def work() -> bytes:
            with draft.open_message() as stream:
                return signer.sign(stream)

        def signed(field: bytes) -> None:
            draft.headers.add_raw(field, top=True)
            log.debug(
                "{queue_id}: DKIM-signed d={domain} s={selector}",
                queue_id=draft.queue_id,
                domain=signer.domain,
                selector=signer.selector,
            )

        return draft.run_in_thread(work).addCallback(signed)
