"""The SMTP envelope of one received message: who sent it, to whom, and how it reached us."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class Envelope:
    """What the SMTP session established for one message, independent of the message's own headers.

    ``mail_from`` is the reverse path without angle brackets; ``""`` is the null sender (``MAIL FROM:<>``).
    ``recipients`` are forward paths in the order they were accepted, without duplicates.
    """

    mail_from: str
    recipients: list[str] = field(default_factory=list)
    #: ESMTP parameters given with MAIL FROM, upper-cased keys (``BODY``, ``SMTPUTF8``, ``SIZE``).
    mail_params: dict[str, str] = field(default_factory=dict)
    helo: str = ""
    peer_host: str = ""
    peer_port: int = 0
    #: ``"TLSv1.3 TLS_AES_256_GCM_SHA384"`` when the session was encrypted, else ``None``.
    tls: str | None = None
    auth_user: str | None = None
    received_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (shallow: the lists and dicts are the envelope's own)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Envelope:
        return cls(**data)
