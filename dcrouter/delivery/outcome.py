"""What one delivery attempt achieved, recipient by recipient."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Outcome(str, enum.Enum):
    DELIVERED = "delivered"  # 2xx after DATA for this recipient
    TEMPORARY = "temporary"  # 4xx, a connection or TLS failure, a timeout: retry later
    PERMANENT = "permanent"  # 5xx (or null MX, or no route): bounce


@dataclass(frozen=True)
class RecipientResult:
    """The fate of one recipient in one attempt, with the reply that decided it (or our own description of a
    local failure, phrased as an SMTP reply: ``451 4.4.1 Connection refused by 127.0.0.1:2626``)."""

    recipient: str
    outcome: Outcome
    code: int
    enhanced: str
    text: str
    #: The server that answered (``host:port``), or "" when none was reached.
    target: str = ""

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".strip()


@dataclass
class DeliveryReport:
    """The results of delivering one message to a group of recipients sharing a route."""

    route_name: str
    results: list[RecipientResult] = field(default_factory=list)
    #: Every server tried, in order, with what happened (``"127.0.0.1:2626 refused"``): the attempt history.
    tried: list[str] = field(default_factory=list)
