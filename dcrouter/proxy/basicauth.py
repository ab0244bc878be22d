"""HTTP Basic authentication (RFC 7617) for a route's ``security.basicAuth``.

Passwords are stored as ``scrypt$`` hashes (``dcrouter hash-password``, :mod:`dcrouter.passwords`) and
compared in constant time; verifying one costs tens of milliseconds of CPU, so it runs through
``run_blocking`` (the reactor's thread pool), never on the reactor. An unknown user name is checked against
a dummy hash of the same cost, so the time an answer takes does not tell whether the name exists. A
successful ``Authorization`` value is remembered (its SHA-256, at most :data:`REMEMBERED`), so the
requests that follow on a keep-alive connection, or from the same browser, cost no scrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed

from dcrouter.passwords import ScryptHash, parse_password_hash, verify_password
from dcrouter.proxy.httpmessage import HttpError
from dcrouter.proxy.routes import BasicAuthRule

#: Successful credentials remembered per route (least recently used forgotten first).
REMEMBERED = 1024

#: Runs a blocking function off the reactor: ``run(function, *args) -> Deferred``.
BlockingRunner = Callable[..., "Deferred[Any]"]


class Unauthorized(HttpError):
    """A ``401`` with its ``WWW-Authenticate`` challenge (``extra``: the header lines to answer with)."""

    def __init__(self, realm: str, reason: str) -> None:
        super().__init__(401, reason)
        quoted = realm.replace("\\", "\\\\").replace('"', '\\"')
        self.extra = (b'WWW-Authenticate: Basic realm="%s", charset="UTF-8"' % quoted.encode("utf-8"),)


def _dummy(users: tuple[tuple[str, str], ...]) -> str:
    """A hash of the first user's cost that no password matches (made of random bytes: no CPU spent)."""
    parsed = parse_password_hash(users[0][1]) if users else None
    if parsed is None:
        return "scrypt$1$1$1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA=="
    salt, digest = os.urandom(len(parsed.salt)), os.urandom(len(parsed.digest))
    return ScryptHash(parsed.log2_n, parsed.r, parsed.p, salt, digest).encode()


def credentials(value: bytes | None) -> tuple[str, str] | None:
    """The user name and password of a ``Basic`` Authorization value; None when it is absent or malformed."""
    if value is None:
        return None
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, colon, password = decoded.partition(":")
    return (username, password) if colon else None


class BasicAuth:
    """Checks requests' ``Authorization`` against one route's users."""

    def __init__(self, rule: BasicAuthRule, run_blocking: BlockingRunner) -> None:
        self.rule = rule
        self._users = dict(rule.users)
        self._dummy = _dummy(rule.users)
        self._run = run_blocking
        self._remembered: OrderedDict[bytes, str] = OrderedDict()

    def check(self, authorization: bytes | None) -> Deferred[str]:
        """Fires with the user name, or fails with :class:`Unauthorized` (no, malformed or wrong
        credentials)."""
        found = credentials(authorization)
        if found is None:
            what = "no credentials" if authorization is None else "malformed credentials"
            return _failed(Unauthorized(self.rule.realm, what))
        assert authorization is not None
        key = hashlib.sha256(authorization).digest()
        known = self._remembered.get(key)
        if known is not None:
            self._remembered.move_to_end(key)
            return succeed(known)
        username, password = found
        stored = self._users.get(username)
        checking: Deferred[bool] = self._run(
            verify_password, stored if stored is not None else self._dummy, password
        )

        def decide(matched: bool) -> str:
            if not (matched and stored is not None):
                raise Unauthorized(self.rule.realm, f"wrong credentials for {username[:64]!r}")
            self._remembered[key] = username
            if len(self._remembered) > REMEMBERED:
                self._remembered.popitem(last=False)
            return username

        return checking.addCallback(decide)


def _failed(error: Exception) -> Deferred[str]:
    result: Deferred[str] = Deferred()
    result.errback(error)
    return result
