"""DKIM signing, the last stage: ``domainConfigs[].signDkim`` and the ``dkimSign`` transformation.

The signer is chosen by the domain of the message's ``From:`` as it stands after every other change (DMARC
aligns on it). A ``From`` that is not exactly one strictly parsed mailbox is not signed (logged): signing an
ambiguous author would lend the domain's name to whichever address a reader's client shows. An
internationalised From (RFC 6532, a UTF-8 local part or an IDN domain) is one mailbox like any other: its
domain is matched in A-label form and its field signed as the raw UTF-8 it holds (RFC 8616). Signing reads
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

log = logger(__name__)


@implementer(ITransformation)
class DkimSign:
    name = "dkimSign"

    def __init__(self, signers: Iterable[tuple[str, DkimSigner]]) -> None:
        """``signers``: (From domain pattern, signer) pairs. Every distinct key (``d=``/``s=``) given for a
        pattern signs, so RSA and Ed25519 keys of one domain give two signatures (RFC 8463 §6)."""
        grouped: dict[str, list[DkimSigner]] = {}
        for pattern, signer in signers:
            keys = grouped.setdefault(pattern.lower(), [])
            if all((s.domain, s.selector) != (signer.domain, signer.selector) for s in keys):
                keys.append(signer)
        self._matcher: DomainMatcher[list[DkimSigner]] = DomainMatcher(grouped.items())

    def __len__(self) -> int:
        return len(self._matcher)

    def signers_for(self, draft: Draft) -> list[DkimSigner] | None:
        """The signers for the draft's From domain; None when From is missing or ambiguous."""
        fields = draft.headers.get_all("From")
        if len(fields) != 1:
            return None
        mailboxes = strict_mailboxes(fields[0])
        if not mailboxes or len(mailboxes) != 1:
            return None
        return self._matcher.match(mailboxes[0].rpartition("@")[2]) or []

    def apply(self, draft: Draft) -> Deferred:
        signers = self.signers_for(draft)
        if signers is None:
            log.info("{queue_id}: not DKIM-signed: From is missing or ambiguous", queue_id=draft.queue_id)
            return succeed(None)
        if not signers:
            return succeed(None)

        def work() -> list[bytes]:
            # Each signature covers the same message: none signs another's DKIM-Signature field.
            fields = []
            for signer in signers:
                with draft.open_message() as stream:
                    fields.append(signer.sign(stream))
            return fields

        def signed(fields: list[bytes]) -> None:
            for field in reversed(fields):
                draft.headers.add_raw(field, top=True)
            log.debug(
                "{queue_id}: DKIM-signed: {keys}",
                queue_id=draft.queue_id,
                keys=", ".join(f"d={s.domain} s={s.selector}" for s in signers),
            )

        return draft.run_in_thread(work).addCallback(signed)
