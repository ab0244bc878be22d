"""One message waiting in the delivery queue."""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field, fields, replace
from typing import Any

from dcrouter.mail.envelope import Envelope


class QueueItemStatus(str, enum.Enum):
    QUEUED = "queued"  # waiting for its next attempt
    DEFERRED = "deferred"  # at least one temporary failure; waiting for a retry
    DELIVERING = "delivering"  # claimed by a delivery worker (get_next); returns to ready after a crash
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    FAILED = "failed"
    QUARANTINED = "quarantined"
    #: Held by an operator (``POST /api/v1/queue/{id}/hold``): never claimed until released, across restarts.
    HELD = "held"


#: Statuses ``get_next`` may hand out.
READY_STATUSES = (QueueItemStatus.QUEUED, QueueItemStatus.DEFERRED)


class Priority(enum.IntEnum):
    """Lower values are served first among due items, so fresh mail is never starved by retries or bounces."""

    FRESH = 0
    RETRY = 10
    BOUNCE = 20


@dataclass
class QueueItem:
    """A message and its delivery state. ``id`` is the correlation id shown in ``250 ... queued as <id>``."""

    id: str
    envelope: Envelope
    size: int
    status: QueueItemStatus = QueueItemStatus.QUEUED
    priority: int = Priority.FRESH
    created_at: float = 0.0
    next_attempt_at: float = 0.0
    attempts: int = 0
    #: The routing destination (host or route name) once known; used by ``get_by_destination``.
    destination: str | None = None
    last_error: str | None = None
    #: One dict per route group of each delivery attempt: ``{"at": float, "route": str, "tried": [str],
    #: "results": [{"recipient", "outcome", "reply", "target"}]}``.
    history: list[dict[str, Any]] = field(default_factory=list)
    #: Final outcomes per recipient, recorded durably as they happen, so that a crash never re-sends to a
    #: recipient already delivered: ``{"rcpt@x": {"outcome": "delivered" | "permanent", "reply": str,
    #: "target": str, "at": float}}``. Recipients of ``envelope.recipients`` not in here are still pending.
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Queue id of the DSN sent for this message, if any: at most one bounce per message.
    bounce_id: str | None = None
    #: When a delay warning was sent to the sender, if one was.
    warned_at: float | None = None
    #: The message as relayed is ``head`` followed by the stored body from byte ``body_offset`` on. Set when
    #: processing changed the header block only: the new block is kept here and the received file's own
    #: header block skipped, so the body is never copied. ``None``/0: the stored body is the message.
    head: bytes | None = None
    body_offset: int = 0

    def pending_recipients(self) -> list[str]:
        """Recipients with no final outcome yet, in envelope order."""
        return [r for r in self.envelope.recipients if r not in self.outcomes]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view of the item, for storage. Shallow: nested lists and dicts are the item's
        own, so serialise it, don't change it (``dataclasses.asdict``'s deep copy cost ~150 us per write)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["envelope"] = self.envelope.to_dict()
        data["status"] = self.status.value
        if self.head is not None:
            data["head"] = self.head.decode("latin-1")  # any bytes, losslessly, as JSON text
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QueueItem:
        data = dict(data)
        data["envelope"] = Envelope.from_dict(data["envelope"])
        data["status"] = QueueItemStatus(data["status"])
        if data.get("head") is not None:
            data["head"] = data["head"].encode("latin-1")
        return cls(**data)

    def copy(self) -> QueueItem:
        """An independent copy: changing it (or its envelope, history, outcomes) never changes this item.
        Much cheaper than ``copy.deepcopy``, which matters on the enqueue path."""
        # Field by field through __dict__ rather than dataclasses.replace (which calls __init__ by keyword for
        # every field): a third of the cost, and neither class has an __init__ that checks anything.
        env = self.envelope
        envelope = object.__new__(Envelope)
        envelope.__dict__.update(env.__dict__)
        envelope.recipients = list(env.recipients)
        envelope.mail_params = dict(env.mail_params)
        new = object.__new__(QueueItem)
        new.__dict__.update(self.__dict__)
        new.envelope = envelope
        new.history = copy.deepcopy(self.history) if self.history else []
        new.outcomes = copy.deepcopy(self.outcomes) if self.outcomes else {}
        return new

    def evolve(self, **changes: Any) -> QueueItem:
        return replace(self, **changes)
