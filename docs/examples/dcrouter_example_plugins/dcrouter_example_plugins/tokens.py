"""StaticTokens: an authentication provider that accepts OAUTH2 bearer tokens from a fixed list.

Configured as a provider entry (``authMethods`` must offer OAUTH2 for clients to send tokens)::

    [smtpConfig.auth]
    methods = ["PLAIN", "OAUTH2"]

    [[smtpConfig.auth.providers]]
    type = "static-tokens"      # the entry point; or "dcrouter_example_plugins.tokens:StaticTokens"
    options = { tokens = { "build-bot" = "<sha256 hex of the bot's token>" } }

Only digests are configured, so the file does not hold the tokens. A provider is a twisted.cred checker:
``credentialInterfaces`` says what it takes (here OAUTH2 tokens; ``IUsernamePassword`` for passwords), and
``requestAvatarId`` returns a Deferred firing with the user name, failing with ``UnauthorizedLogin`` when the
credentials are wrong (``535``), or with ``ProviderUnavailable`` when it cannot decide now (``454 4.7.0``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from dcrouter.config import values
from dcrouter.config.schema import option
from dcrouter.interfaces import IOAuthBearerToken

_SHA256_HEX = re.compile(r"[0-9a-f]{64}\Z")


def sha256_digests(value: dict[str, str]) -> str | None:
    for user, digest in value.items():
        if not _SHA256_HEX.match(digest):
            return f"{user!r}: expected the SHA-256 of the token in lowercase hex"
    return None


@dataclass(frozen=True)
class StaticTokensOptions:
    tokens: dict[str, str] = option(
        doc="User name -> SHA-256 (hex) of that user's token.",
        check=values.all_of(values.not_empty, sha256_digests),
    )


@implementer(ICredentialsChecker)
class StaticTokens:
    credentialInterfaces = (IOAuthBearerToken,)
    options_schema = StaticTokensOptions

    def __init__(self, options: StaticTokensOptions) -> None:
        self._digests = {user: bytes.fromhex(digest) for user, digest in options.tokens.items()}

    def requestAvatarId(self, credentials: IOAuthBearerToken) -> Deferred[str]:
        given = hashlib.sha256(credentials.token.encode("utf-8")).digest()
        found = None
        for user, digest in self._digests.items():
            if hmac.compare_digest(given, digest):
                found = user
        if found is None or credentials.username not in (None, found):
            return fail(UnauthorizedLogin())
        return succeed(found)
