"""JWT bearer authentication (RFC 6750, RFC 7519) for a route's ``security.jwtAuth``, with joserfc (the
JOSE library OAUTH2 token verification uses too: one library to patch and audit).

Every request must carry ``Authorization: Bearer <token>``: a JWS signed by one of the configured keys
with one of the configured algorithms (public-key algorithms only: an HMAC secret in a proxy config would
be one more secret to leak), not expired (``exp`` is required), not before ``nbf``, and with the
configured ``iss`` and ``aud`` when set, with ``leeway`` for clock differences. Otherwise ``401`` with a
``WWW-Authenticate: Bearer`` challenge (``error="invalid_token"`` for a token that was given).

Keys come from a PEM file (a public key or a certificate), a JWKS file, or a JWKS URL fetched at start and
every ``refresh`` seconds, and again (at most once a minute) when a token names a ``kid`` it does not hold,
so a key rotation at the issuer is picked up. Until the first fetch has succeeded, requests are answered
``503``. Verifying a signature costs tens of microseconds: it runs on the reactor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, OKPKey, RSAKey
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from dcrouter.log import logger
from dcrouter.proxy.httpmessage import HttpError
from dcrouter.proxy.routes import JwtRule

log = logger(__name__)

#: Seconds between fetches a token with an unknown ``kid`` may cause.
UNKNOWN_KID_INTERVAL = 60.0

#: Fetches a URL: ``fetch(url) -> Deferred[bytes]`` (the body of a 200 answer; fails otherwise).
Fetcher = Callable[[str], "Deferred[bytes]"]


class BearerRefused(HttpError):
    """A ``401`` with its ``WWW-Authenticate: Bearer`` challenge in ``extra``."""

    def __init__(self, realm: str, reason: str, *, token_given: bool) -> None:
        super().__init__(401, reason)
        challenge = b'Bearer realm="%s"' % realm.replace('"', "'").encode("utf-8")
        if token_given:
            challenge += b', error="invalid_token"'
        self.extra = (b"WWW-Authenticate: " + challenge,)


def load_pem_key(path: str) -> Any:
    """The public key of a PEM file holding a public key or a certificate, as a JWK; ValueError if it holds
    neither (or a key of a type JWS does not sign with)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_pem_public_key,
    )

    with open(path, "rb") as handle:
        data = handle.read()
    public: Any = (
        x509.load_pem_x509_certificate(data).public_key()
        if b"BEGIN CERTIFICATE" in data
        else load_pem_public_key(data)
    )
    pem = public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    if isinstance(public, rsa.RSAPublicKey):
        return RSAKey.import_key(pem)
    if isinstance(public, ec.EllipticCurvePublicKey):
        return ECKey.import_key(pem)
    if isinstance(public, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return OKPKey.import_key(pem)
    raise ValueError(f"{path}: a {type(public).__name__} signs no JWS")


def load_jwks(data: bytes | str) -> KeySet:
    """A JWKS document; ValueError when it is not one."""
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError('no "keys" list')
        return KeySet.import_key_set(document)  # type: ignore[arg-type]
    except (JoseError, ValueError, TypeError, KeyError, UnicodeDecodeError) as error:
        raise ValueError(f"not a usable JWKS: {error}") from error


class JwtAuth:
    """Checks requests' bearer tokens against one route's keys (see the module docstring)."""

    def __init__(self, rule: JwtRule, *, clock: IReactorTime, fetch: Fetcher | None = None) -> None:
        self.rule = rule
        self._clock = clock
        self._fetch = fetch
        self._key: Any = load_pem_key(rule.key_file) if rule.key_file else None
        self._keys: KeySet | None = None
        if rule.jwks_file:
            with open(rule.jwks_file, "rb") as handle:
                self._keys = load_jwks(handle.read())
        self._refresh_call: IDelayedCall | None = None
        self._last_fetch = float("-inf")
        self._fetching: Deferred[None] | None = None
        self._stopped = False

    # -- the JWKS URL ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Fetch the JWKS (with a URL) now and every ``refresh`` seconds until :meth:`stop`."""
        if self.rule.jwks_url and self._fetch is not None and self._fetching is None:
            self._stopped = False
            self._fetch_keys()

    def stop(self) -> None:
        self._stopped = True
        if self._refresh_call is not None and self._refresh_call.active():
            self._refresh_call.cancel()
        self._refresh_call = None

    def _fetch_keys(self) -> Deferred[None]:
        assert self.rule.jwks_url is not None and self._fetch is not None
        if self._fetching is not None:
            return self._fetching
        self._last_fetch = self._clock.seconds()
        url = self.rule.jwks_url
        fetching = self._fetch(url)

        def loaded(body: bytes) -> None:
            self._keys = load_jwks(body)
            log.info("proxy: jwtAuth: {n} keys from {url}", n=len(self._keys.keys), url=url)

        def failed(failure: Failure) -> None:
            # The keys in hand (if any) stay in use; the next refresh tries again.
            log.warn("proxy: jwtAuth: fetching {url} failed: {why}", url=url, why=failure.getErrorMessage())

        def done(_: object) -> None:
            self._fetching = None
            if not self._stopped and (self._refresh_call is None or not self._refresh_call.active()):
                self._refresh_call = self._clock.callLater(self.rule.refresh, self._fetch_keys)

        self._fetching = fetching.addCallback(loaded).addErrback(failed).addBoth(done)
        return self._fetching

    # -- checking -------------------------------------------------------------------------------------

    def check(self, authorization: bytes | None) -> Deferred[dict[str, Any]]:
        """Fires with the token's claims, or fails with :class:`BearerRefused` (or ``503`` while a JWKS URL
        has not been fetched yet)."""
        realm = self.rule.realm
        scheme, _, token = (authorization or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return _failed(BearerRefused(realm, "no bearer token", token_given=False))
        text = token.strip().decode("ascii", "replace")
        try:
            header = jws.extract_compact(text.encode("ascii")).headers()
        except (JoseError, ValueError) as error:
            return _failed(BearerRefused(realm, f"malformed token: {error}", token_given=True))
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            return _failed(BearerRefused(realm, "malformed token: kid is not a string", token_given=True))
        if self._key is None and self._keys is None:
            return _failed(HttpError(503, "the signing keys have not been fetched yet"))
        if (
            kid is not None
            and self._keys is not None
            and self.rule.jwks_url
            and not any(k.kid == kid for k in self._keys.keys)
            and self._clock.seconds() - self._last_fetch >= UNKNOWN_KID_INTERVAL
        ):
            # A key the issuer may just have rotated in: fetch once, then decide. A Deferred of its own, so
            # that a refusal here does not travel down the shared fetch's callbacks.
            fetched: Deferred[None] = Deferred()

            def settled(_: object) -> None:
                fetched.callback(None)

            self._fetch_keys().addBoth(settled)
            return fetched.addCallback(lambda _: self._verify(text, kid))
        try:
            return succeed(self._verify(text, kid))
        except HttpError as error:
            return _failed(error)

    def _verify(self, token: str, kid: str | None) -> dict[str, Any]:
        realm = self.rule.realm
        key = self._key if self._key is not None else self._jwk(kid)
        claims_rules: dict[str, Any] = {"exp": {"essential": True}}
        if self.rule.issuer is not None:
            claims_rules["iss"] = {"essential": True, "value": self.rule.issuer}
        if self.rule.audience:
            claims_rules["aud"] = {"essential": True, "values": list(self.rule.audience)}
        try:
            decoded = jwt.decode(token, key, algorithms=list(self.rule.algorithms))
            # Claims against the wall clock (tokens carry wall-clock times), with the configured leeway.
            jwt.JWTClaimsRegistry(leeway=int(self.rule.leeway), **claims_rules).validate(decoded.claims)
        except (JoseError, ValueError) as error:
            raise BearerRefused(realm, f"token refused: {error}", token_given=True) from error
        claims: dict[str, Any] = decoded.claims
        return claims

    def _jwk(self, kid: str | None) -> Any:
        assert self._keys is not None
        keys = self._keys.keys
        if kid is None:
            if len(keys) != 1:
                raise BearerRefused(
                    self.rule.realm, "token names no kid among several keys", token_given=True
                )
            return keys[0]
        for candidate in keys:
            if candidate.kid == kid:
                return candidate
        raise BearerRefused(self.rule.realm, f"no key {kid!r}", token_given=True)


def _failed(error: Exception) -> Deferred[dict[str, Any]]:
    result: Deferred[dict[str, Any]] = Deferred()
    result.errback(error)
    return result
