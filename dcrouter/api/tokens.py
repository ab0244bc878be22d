"""Bearer tokens of the management API (``apiConfig.tokens``): constant-time checks, scrypt off the reactor.

What a caller may rely on:

- :meth:`TokenVerifier.verify` fires with the matching :class:`~dcrouter.config.api.ApiToken`, or None.
- ``sha256$`` hashes are compared with :func:`hmac.compare_digest` against the SHA-256 of the presented
  token, every configured one each time (no early exit that would time which one matched).
- ``scrypt$`` hashes cost ~50 ms and 32 MiB each: they are checked in ``defer_to_thread`` (the router's
  bounded thread pool), never on the reactor thread. A token once verified is remembered, keyed by the
  SHA-256 of the presented token (never the token itself), in a bounded LRU cache, so a client making many
  requests pays scrypt once. Failures are not cached: a stream of wrong tokens cannot evict good ones.
- A presented token longer than MAX_TOKEN_LENGTH is refused without hashing.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred

from dcrouter.config.api import ApiToken
from dcrouter.passwords import verify_password

#: Longest token looked at (``dcrouter api-token`` makes 43 characters).
MAX_TOKEN_LENGTH = 512
#: Verified tokens remembered.
CACHE_SIZE = 256

DeferToThread = Callable[[Callable[[], Any]], Deferred[Any]]


class TokenVerifier:
    """Checks presented bearer tokens against ``tokens``; ``defer_to_thread(work)`` runs scrypt."""

    def __init__(
        self, tokens: Sequence[ApiToken], *, defer_to_thread: DeferToThread, cache_size: int = CACHE_SIZE
    ) -> None:
        self._sha = [
            (t, bytes.fromhex(t.token_hash.removeprefix("sha256$")))
            for t in tokens
            if t.token_hash.startswith("sha256$")
        ]
        self._scrypt = [t for t in tokens if not t.token_hash.startswith("sha256$")]
        self._defer_to_thread = defer_to_thread
        self._cache: OrderedDict[bytes, ApiToken] = OrderedDict()
        self._cache_size = cache_size
        #: scrypt checks run (for tests and metrics: the cache's effect).
        self.slow_checks = 0

    def cached(self, presented: str) -> ApiToken | None:
        """The token ``presented`` was verified as earlier, if it is remembered (no hashing but SHA-256)."""
        key = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
        return found

    async def verify(self, presented: str) -> ApiToken | None:
        if not presented or len(presented) > MAX_TOKEN_LENGTH:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = self.cached(presented)
        if found is not None:
            return found
        for token, expected in self._sha:
            # Every entry is compared, match or not.
            if hmac.compare_digest(digest, expected) and found is None:
                found = token
        if found is None:
            for token in self._scrypt:
                self.slow_checks += 1
                hash_ = token.token_hash
                if await self._defer_to_thread(lambda h=hash_: verify_password(h, presented)):  # type: ignore[misc]
                    found = token
                    break
        if found is not None:
            self._cache[digest] = found
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return found
