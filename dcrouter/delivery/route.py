"""Where mail for one recipient goes: the answer of routing, the question of delivery."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    """A delivery destination for a group of recipients.

    Either ``targets`` names the servers (host names or IPs, tried in the order the target pool picks, all on
    ``port``), or ``mx_domain`` says "look up the MX records of this domain at delivery time" (``targets`` is
    then empty and ``port`` is 25 unless configured). Recipients of one message whose routes are equal are
    delivered in one SMTP transaction.
    """

    #: Stable, human-readable key: ``domain:example.com``, ``rule:billing``, ``default``, ``mx:example.org``.
    #: It is the queue item's ``destination`` and the key of per-destination limits and connection pools.
    name: str
    targets: tuple[str, ...] = ()
    port: int = 25
    mx_domain: str | None = None
    #: STARTTLS required: no STARTTLS offered, or a failed handshake, defers the delivery (never plaintext).
    require_tls: bool = False
    auth_user: str | None = None
    auth_password: str | None = None

    def __post_init__(self) -> None:
        if bool(self.targets) == bool(self.mx_domain):
            raise ValueError("a Route has either targets or an mx_domain")

    def __repr__(self) -> str:
        # Never show the password (routes end up in logs and tracebacks).
        secret = ", auth_password=<hidden>" if self.auth_password else ""
        return (
            f"Route(name={self.name!r}, targets={self.targets!r}, port={self.port},"
            f" mx_domain={self.mx_domain!r}, require_tls={self.require_tls},"
            f" auth_user={self.auth_user!r}{secret})"
        )
