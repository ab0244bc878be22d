"""What ingress learns when it hands a complete message on (:class:`dcrouter.interfaces.IMessageAcceptor`):
the message was accepted (:class:`Accepted`: queued, quarantined or discarded on purpose), or it was refused
with the SMTP reply to send (:class:`Refusal`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dcrouter.mail.reply import Reply

#: The answer when the queue is full (``maxQueueSize``).
QUEUE_FULL = Reply(452, "4.3.1", "Insufficient system storage")
#: The answer when the store cannot take the message now, or something unexpected failed.
LOCAL_ERROR = Reply(451, "4.3.0", "Requested action aborted: local error in processing")


class Disposition(enum.StrEnum):
    """What became of an accepted message. Ingress answers 250 to each: a sender learns nothing from it."""

    QUEUED = "queued"
    QUARANTINED = "quarantined"
    #: Dropped on purpose by policy (a ``discard`` action).
    DISCARDED = "discarded"


@dataclass(frozen=True)
class Accepted:
    """A message that is durable (queued or quarantined) or dropped on purpose; ``reason`` says why for the
    last two (for the log)."""

    queue_id: str
    disposition: Disposition = Disposition.QUEUED
    reason: str = ""


class Refusal(Exception):
    """Refuse the message with ``reply``; ingress sends it. ``reason`` is for the log only.

    ``storage`` marks a refusal because the store failed (disk full, Redis down): an operating condition that
    the log reports as an error, where other refusals are decisions about the message."""

    def __init__(self, reply: Reply, reason: str = "", *, storage: bool = False) -> None:
        super().__init__(f"{reply.code} {reply.enhanced} {reason or reply.text}")
        self.reply = reply
        self.reason = reason
        self.storage = storage
