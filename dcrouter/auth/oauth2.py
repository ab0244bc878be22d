"""OAuth 2.0 bearer tokens (SASL XOAUTH2 and OAUTHBEARER) verified as ``smtpConfig.auth.oauth2`` says.

Two ways, one per configuration:

- **Introspection** (RFC 7662): the token is POSTed to ``introspectionUrl`` with dcrouter's client
  credentials (HTTP Basic) through treq; an ``active`` answer names the user. Answers are cached by the
  token's SHA-256 until the token's ``exp`` (never past it), at most ``cacheSize`` of them, the least recently
  used going first; inactive answers are not cached.
- **Local JWT verification** against a JWKS (``jwksUrl``, fetched with treq, or ``jwksFile``) with
  `joserfc`: asymmetric algorithms only (never ``none`` or an HMAC, which a public key set would turn into a
  forgery), ``iss`` and ``aud`` required and checked, ``exp`` required, ``exp``/``nbf``/``iat`` within
  ``maxClockSkew``. A fetched key set is kept for :data:`JWKS_MAX_AGE` and fetched again sooner (at most every
  :data:`JWKS_MIN_REFETCH`) when a token names a key id it does not hold, so rotated keys are picked up.

A token that fails any check is a refusal (``UnauthorizedLogin``: 535 after the error challenge); an endpoint
that is down, slow (``timeout``) or answers with an error is :class:`~dcrouter.interfaces.ProviderUnavailable`
(``454 4.7.0``). The user the client named (``user=``, ``a=``), when it named one, must be the token's user.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from dcrouter.config.auth import OAuth2Config
from dcrouter.interfaces import IOAuthBearerToken, ProviderUnavailable
from dcrouter.log import logger

log = logger(__name__)

#: Signature algorithms a token may use: public-key ones only.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
JWKS_MAX_AGE = 3600.0
JWKS_MIN_REFETCH = 60.0
#: Largest answer read from an endpoint.
MAX_RESPONSE = 1024 * 1024


def _user_of(claims: dict[str, Any], claim: str) -> str:
    user = claims.get(claim)
    if not isinstance(user, str) or not user:
        raise UnauthorizedLogin()
    return user


class _Endpoint:
    """HTTP calls bounded in time; any failure to get a 200 with a JSON object is ProviderUnavailable."""

    def __init__(self, http: Any, clock: IReactorTime, timeout: float) -> None:
        self._http = http
        self._clock = clock
        self._timeout = timeout

    async def json(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        call = Deferred.fromCoroutine(self._call(method, url, **kwargs))
        call.addTimeout(self._timeout, self._clock)
        try:
            return await call
        except TimeoutError:
            raise ProviderUnavailable(f"{url}: no answer within {self._timeout:g}s") from None

    async def _call(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._http.request(method, url, **kwargs)
            body = await response.content()
        except CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 (refused, reset, TLS: the endpoint is unreachable)
            raise ProviderUnavailable(f"{url}: {type(e).__name__}: {e}") from None
        if response.code != 200:
            raise ProviderUnavailable(f"{url}: HTTP {response.code}")
        if len(body) > MAX_RESPONSE:
            raise ProviderUnavailable(f"{url}: answer of {len(body)} bytes is too large")
        try:
            data = json.loads(body)
        except ValueError:
            raise ProviderUnavailable(f"{url}: answer is not JSON") from None
        if not isinstance(data, dict):
            raise ProviderUnavailable(f"{url}: answer is not a JSON object")
        return data


class IntrospectionVerifier:
    """RFC 7662: asks the authorization server whether a token is active and whose it is."""

    def __init__(self, config: OAuth2Config, *, http: Any, clock: IReactorTime) -> None:
        assert config.introspection_url is not None
        self._config = config
        self._clock = clock
        self._endpoint = _Endpoint(http, clock, config.timeout / 1000.0)
        self._cache: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    async def verify(self, token: str) -> str:
        key = hashlib.sha256(token.encode("utf-8")).digest()
        now = self._clock.seconds()
        cached = self._cache.get(key)
        if cached is not None:
            if cached[1] > now:
                self._cache.move_to_end(key)
                return cached[0]
            del self._cache[key]
        config = self._config
        assert config.introspection_url is not None
        claims = await self._endpoint.json(
            "POST",
            config.introspection_url,
            data={"token": token, "token_type_hint": "access_token"},
            auth=(config.client_id or "", config.client_secret or ""),
            headers={"Accept": "application/json"},
        )
        if claims.get("active") is not True:
            raise UnauthorizedLogin()
        skew = config.max_clock_skew / 1000.0
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if isinstance(exp, (int, float)) and exp + skew <= now:
            raise UnauthorizedLogin()
        if isinstance(nbf, (int, float)) and nbf - skew > now:
            raise UnauthorizedLogin()
        if config.issuer is not None and claims.get("iss") != config.issuer:
            raise UnauthorizedLogin()
        if config.audience is not None:
            aud = claims.get("aud")
            if not (aud == config.audience or (isinstance(aud, list) and config.audience in aud)):
                raise UnauthorizedLogin()
        user = _user_of(claims, config.user_claim)
        if isinstance(exp, (int, float)):
            self._cache[key] = (user, float(exp))
            while len(self._cache) > config.cache_size:
                self._cache.popitem(last=False)
        return user


class JwksVerifier:
    """Verifies tokens locally as signed JWTs against a key set (from a file, or fetched from a URL)."""

    def __init__(self, config: OAuth2Config, *, http: Any, clock: IReactorTime) -> None:
        self._config = config
        self._clock = clock
        self._endpoint = _Endpoint(http, clock, config.timeout / 1000.0)
        self._keys: KeySet | None = None
        self._fetched_at = float("-inf")
        self._waiters: list[Deferred[None]] | None = None
        if config.jwks_file is not None:
            with open(config.jwks_file, "rb") as f:
                self._keys = KeySet.import_key_set(json.load(f))

    async def verify(self, token: str) -> str:
        keys = await self._key_set(refresh=False)
        try:
            decoded = jwt.decode(token, keys, algorithms=ALGORITHMS)
        except JoseError as e:
            if self._config.jwks_url is None or not _unknown_key(e):
                raise UnauthorizedLogin() from None
            if self._clock.seconds() - self._fetched_at < JWKS_MIN_REFETCH:
                raise UnauthorizedLogin() from None
            keys = await self._key_set(refresh=True)
            try:
                decoded = jwt.decode(token, keys, algorithms=ALGORITHMS)
            except JoseError:
                raise UnauthorizedLogin() from None
        config = self._config
        assert config.issuer is not None and config.audience is not None  # the loader requires both here
        registry = jwt.JWTClaimsRegistry(
            now=lambda: int(self._clock.seconds()),
            leeway=config.max_clock_skew // 1000,
            iss={"essential": True, "value": config.issuer},
            aud={"essential": True, "value": config.audience},
            exp={"essential": True},
        )
        try:
            registry.validate(decoded.claims)
        except JoseError:
            raise UnauthorizedLogin() from None
        return _user_of(decoded.claims, config.user_claim)

    async def _key_set(self, *, refresh: bool) -> KeySet:
        url = self._config.jwks_url
        if url is None:
            assert self._keys is not None
            return self._keys
        stale = self._clock.seconds() - self._fetched_at >= JWKS_MAX_AGE
        if self._keys is not None and not stale and not refresh:
            return self._keys
        if self._waiters is not None:
            # A fetch is under way: wait for it rather than fetch the same keys again.
            waiter: Deferred[None] = Deferred()
            self._waiters.append(waiter)
            await waiter
        else:
            self._waiters = []
            try:
                await self._fetch(url)
            finally:
                waiters, self._waiters = self._waiters, None
                for w in waiters:
                    w.callback(None)
        if self._keys is None:
            raise ProviderUnavailable(f"{url}: no key set")
        return self._keys

    async def _fetch(self, url: str) -> None:
        try:
            data = await self._endpoint.json("GET", url, headers={"Accept": "application/json"})
            keys = KeySet.import_key_set(data)  # type: ignore[arg-type]
        except ProviderUnavailable as e:
            if self._keys is None:
                raise
            log.warn("JWKS fetch failed, keeping the keys fetched before: {reason}", reason=str(e))
            self._fetched_at = self._clock.seconds() - JWKS_MAX_AGE + JWKS_MIN_REFETCH
            return
        except (JoseError, ValueError, TypeError, KeyError) as e:
            if self._keys is None:
                raise ProviderUnavailable(f"{url}: not a key set: {e}") from None
            log.warn("JWKS at {url} is not a key set, keeping the keys fetched before", url=url)
            return
        self._keys = keys
        self._fetched_at = self._clock.seconds()


def _unknown_key(error: JoseError) -> bool:
    return type(error).__name__ in ("MissingKeyError", "InvalidKeyIdError", "KeyParameterError")


@implementer(ICredentialsChecker)
class OAuth2Checker:
    """Checks :class:`~dcrouter.interfaces.IOAuthBearerToken` credentials; fires with the token's user."""

    credentialInterfaces = (IOAuthBearerToken,)

    def __init__(self, config: OAuth2Config, *, http: Any, clock: IReactorTime) -> None:
        self._verifier: IntrospectionVerifier | JwksVerifier
        if config.introspection_url is not None:
            self._verifier = IntrospectionVerifier(config, http=http, clock=clock)
        else:
            self._verifier = JwksVerifier(config, http=http, clock=clock)

    # Avatar ids are user names as text, as UserTableChecker's (see there).
    def requestAvatarId(self, credentials: Any) -> Deferred[str]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._check(credentials.username, credentials.token))

    async def _check(self, claimed: str | None, token: str) -> str:
        user = await self._verifier.verify(token)
        if claimed is not None and claimed.casefold() != user.casefold():
            log.info("OAUTH2: the token is {user!r}'s, not {claimed!r}'s", user=user, claimed=claimed[:256])
            raise UnauthorizedLogin()
        return user
