"""Credentials that twisted.cred does not have: OAuth 2.0 bearer tokens."""

from __future__ import annotations

from dataclasses import dataclass

from zope.interface import implementer

from dcrouter.interfaces import IOAuthBearerToken


@implementer(IOAuthBearerToken)
@dataclass(frozen=True)
class OAuthBearer:
    """A bearer token and the user the client named (``None``: none). ``repr`` never shows the token."""

    username: str | None
    token: str

    def __repr__(self) -> str:
        return f"OAuthBearer(username={self.username!r}, token=<{len(self.token)} chars>)"
