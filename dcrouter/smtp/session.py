"""What a session policy may know about the SMTP session asking it something."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Session:
    """The state of one SMTP connection that matters to policy. The protocol owns and updates it."""

    session_id: str
    peer_host: str
    peer_port: int
    local_port: int
    #: The port's role: submission ports require AUTH before MAIL.
    submission: bool = False
    implicit_tls: bool = False
    #: ``"TLSv1.3 TLS_AES_256_GCM_SHA384"`` once encrypted.
    tls: str | None = None
    helo: str | None = None
    esmtp: bool = False
    auth_user: str | None = None
