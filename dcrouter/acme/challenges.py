"""Challenge responses shared by the ACME client and what serves them: HTTP-01 (RFC 8555 §8.3) on the
proxy's port 80, DNS-01 (RFC 8555 §8.4) in the router's DNS server."""

from __future__ import annotations

import os
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

    With ``shared_directory`` (several workers: worker 0 orders, but any worker may accept the CA's request
    on port 80), each key authorization is also a file ``<shared_directory>/<token>`` while it is served, and
    a token not held in memory is looked up there. The files are a few dozen bytes, written (to a temporary
    name, then renamed, so a reader never sees half of one) and read only for real challenge tokens, so the
    reactor does no more file I/O than one small read per validation request.
    """

    def __init__(self, shared_directory: str | None = None) -> None:
        self._authorizations: dict[str, bytes] = {}
        self.shared_directory = shared_directory

    def add(self, token: str, key_authorization: str) -> None:
        """Serve `key_authorization` for `token` until `remove` is called.

        :raises ValueError: `token` is not base64url, so no request path could ever name it.
        """
        if not _TOKEN.fullmatch(token):
            raise ValueError(f"ACME token is not base64url: {token!r}")
        body = key_authorization.encode("ascii")
        self._authorizations[token] = body
        if self.shared_directory is not None:
            path = os.path.join(self.shared_directory, token)
            with open(f"{path}.tmp", "wb") as f:
                f.write(body)
            os.replace(f"{path}.tmp", path)

    def remove(self, token: str) -> None:
        """Stop serving `token`; removing an unknown token is not an error (cleanup runs on every path)."""
        self._authorizations.pop(token, None)
        if self.shared_directory is not None:
            try:
                os.unlink(os.path.join(self.shared_directory, token))
            except FileNotFoundError:
                pass

    def clear_shared(self) -> None:
        """Remove every token file left in the shared directory (by an owner that was killed mid-order), and
        create the directory if it is missing. Called by the worker that orders, at start."""
        if self.shared_directory is None:
            return
        os.makedirs(self.shared_directory, mode=0o755, exist_ok=True)
        for name in os.listdir(self.shared_directory):
            if name not in self._authorizations:
                try:
                    os.unlink(os.path.join(self.shared_directory, name))
                except FileNotFoundError:
                    pass

    def response_for(self, path: str) -> bytes | None:
        """The body for a request to `path` ("/.well-known/acme-challenge/<token>"), or None.

        None means "not a challenge we serve": the caller goes on with its usual handling (redirect, 404).
        A query string is ignored, as validation servers do not send one but proxies may append one.
        """
        path = path.split("?", 1)[0]
        if not path.startswith(CHALLENGE_PATH_PREFIX):
            return None
        token = path[len(CHALLENGE_PATH_PREFIX) :]
        if not _TOKEN.fullmatch(token):
            return None
        body = self._authorizations.get(token)
        if body is None and self.shared_directory is not None:
            try:
                with open(os.path.join(self.shared_directory, token), "rb") as f:
                    body = f.read(4096)
            except OSError:
                return None
        return body

    def __len__(self) -> int:
        """How many challenges are being served (for logs and tests)."""
        return len(self._authorizations)


class Dns01Responder:
    """DNS-01 TXT values being published (RFC 8555 §8.4): ``_acme-challenge.<name>`` → values.

    The ACME client adds the value of each authorization before it asks the server to validate and removes
    it once settled; the DNS server asks :meth:`txt_values` on every lookup. Several values may stand at
    one name at once (a certificate for ``example.com`` and ``*.example.com`` has two authorizations for
    ``_acme-challenge.example.com``). Plain in-memory state: both sides run on the reactor thread.
    """

    def __init__(self) -> None:
        self._values: dict[str, list[str]] = {}

    @staticmethod
    def _key(name: str) -> str:
        return name.rstrip(".").lower()

    def add(self, name: str, value: str) -> None:
        """Publish ``value`` as a TXT record at ``name`` until :meth:`remove`."""
        self._values.setdefault(self._key(name), []).append(value)

    def remove(self, name: str, value: str) -> None:
        """Stop publishing ``value`` at ``name``; an unknown one is not an error (cleanup runs on every
        path)."""
        values = self._values.get(self._key(name), [])
        if value in values:
            values.remove(value)
        if not values:
            self._values.pop(self._key(name), None)

    def txt_values(self, name: str) -> list[str]:
        """The values published at ``name`` (compared without case or final dot)."""
        return list(self._values.get(self._key(name), ()))

    def __len__(self) -> int:
        return sum(len(v) for v in self._values.values())
