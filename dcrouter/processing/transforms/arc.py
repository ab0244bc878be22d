"""ARC sealing (``smtpConfig.verification.arcSign``, RFC 8617): after every other change, a message this
gateway verified gets the next ARC set — ARC-Authentication-Results (its own Authentication-Results),
ARC-Message-Signature and ARC-Seal — so a receiver after a forwarding that breaks SPF or DKIM (a mailing
list, an alias) can still see what this gateway found.

What a caller may rely on: only a message carrying an ``Authentication-Results`` field of this gateway's
authserv-id is sealed (the verification stage adds it; a local client's mail has none). The seal is made by
dkimpy (rsa-sha256) on the message as it stands, in a thread when the message is big; its ``cv=`` comes from
the ``arc=`` result of that field. A message that cannot be sealed (no From field, 50 ARC sets already, a
result dkimpy cannot parse) is queued unsealed and the reason logged: sealing never refuses mail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dkim
from twisted.internet.defer import Deferred
from zope.interface import implementer

from dcrouter.interfaces import ITransformation
from dcrouter.log import logger
from dcrouter.mail.headers import HeaderError
from dcrouter.processing.message import Draft
from dcrouter.processing.verification.header import authserv_id

log = logger(__name__)


@implementer(ITransformation)
class ArcSeal:
    name = "arcSeal"

    def __init__(
        self, domain: str, selector: str, private_key_pem: bytes, authserv: str, now: Callable[[], float]
    ) -> None:
        self.domain = domain
        self.selector = selector
        self._key = private_key_pem
        self.authserv_id = authserv
        self._now = now

    def apply(self, message: Draft) -> Deferred[None] | None:
        own = self.authserv_id.lower()
        if not any(authserv_id(v) == own for v in message.headers.get_all("Authentication-Results")):
            return None
        timestamp = int(self._now())

        def work() -> list[bytes]:
            with message.open_message() as stream:
                data = stream.read()
            sealed: list[bytes] = dkim.arc_sign(
                data,
                self.selector.encode("ascii"),
                self.domain.encode("ascii"),
                self._key,
                self.authserv_id.encode("ascii"),
                timestamp=timestamp,
            )
            return sealed

        running: Deferred[Any] = message.run_in_thread(work)
        return running.addCallbacks(
            self._add, self._not_sealed, callbackArgs=(message,), errbackArgs=(message,)
        )

    def _add(self, fields: list[bytes], message: Draft) -> None:
        if not fields:
            log.warn("{queue_id}: not ARC-sealed: no results to seal", queue_id=message.queue_id)
            return
        try:
            for field in reversed(fields):
                message.headers.add_raw(field, top=True)
        except HeaderError as e:
            log.warn("{queue_id}: not ARC-sealed: {error}", queue_id=message.queue_id, error=str(e))

    def _not_sealed(self, failure: Any, message: Draft) -> None:
        failure.trap(dkim.DKIMException, UnicodeError, ValueError)
        log.warn("{queue_id}: not ARC-sealed: {error}", queue_id=message.queue_id, error=str(failure.value))
