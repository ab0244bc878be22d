"""HTTP-01 challenge responses (RFC 8555 §8.3), shared by the ACME client and the proxy's port 80."""

from __future__ import annotations

import re

#: The path prefix an ACME server fetches HTTP-01 challenges from (RFC 8555 §8.3).
CHALLENGE_PATH_PREFIX = "/.well-known/acme-challenge/"

# Tokens are base64url without padding (RFC 8555 §8.1); anything else is never one of ours, and refusing it
# early keeps odd paths ("..", "%2F", query strings) from being looked up at all.
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


class ChallengeResponder:
    """HTTP-01 key authorizations being served (RFC 8555 §8.3).

    The ACME client adds a token's key authorization before it asks the server to validate and removes it
    once the authorization is settled; the proxy's port-80 listener asks `response_for` for every request
    path and answers 200 with the body (``Content-Type: application/octet-stream``) when it is not None.
    Plain in-memory state: both sides run on the reactor thread.
    """

    def __init__(self) -> None:
        self._authorizations: dict[str, bytes] = {}

    def add(self, token: str, key_authorization: str) -> None:
        """Serve `key_authorization` for `token` until `remove` is called.

        :raises ValueError: `token` is not base64url, so no request path could ever name it.
        """
        if not _TOKEN.fullmatch(token):
            raise ValueError(f"ACME token is not base64url: {token!r}")
        self._authorizations[token] = key_authorization.encode("ascii")

    def remove(self, token: str) -> None:
        """Stop serving `token`; removing an unknown token is not an error (cleanup runs on every path)."""
        self._authorizations.pop(token, None)

    def response_for(self, path: str) -> bytes | None:
        """The body for a request to `path` ("/.well-known/acme-challenge/<token>"), or None.

        None means "not a challenge we serve": the caller goes on with its usual handling (redirect, 404).
        A query string is ignored, as validation servers do not send one but proxies may append one.
        """
        path = path.split("?", 1)[0]
        if not path.startswith(CHALLENGE_PATH_PREFIX):
            return None
        token = path[len(CHALLENGE_PATH_PREFIX):]
        if not _TOKEN.fullmatch(token):
            return None
        return self._authorizations.get(token)

    def __len__(self) -> int:
        """How many challenges are being served (for logs and tests)."""
        return len(self._authorizations)
