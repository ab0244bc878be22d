"""Signing keys and tokens for the OAUTH2 tests: an RSA key pair made once per test run, JWTs signed with it
(or with a stranger's key), and the key set (JWKS) a verifier is given."""

from __future__ import annotations

import json
from typing import Any

from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

ISSUER = "https://issuer.example.test"
AUDIENCE = "dcrouter"

_keys: dict[str, RSAKey] = {}


def key(name: str = "good") -> RSAKey:
    """An RSA key (2048 bits) made once per name; its ``kid`` is the name."""
    if name not in _keys:
        _keys[name] = RSAKey.generate_key(2048, parameters={"kid": name}, private=True)
    return _keys[name]


def jwks(*names: str) -> dict[str, Any]:
    """The public key set of the named keys (default: the good one)."""
    return KeySet([key(n) for n in names or ("good",)]).as_dict(private=False)


def jwks_json(*names: str) -> bytes:
    return json.dumps(jwks(*names)).encode()


def token(
    now: float, *, signer: str = "good", kid: str | None = None, alg: str = "RS256", **claims: Any
) -> str:
    """A JWT for ``alice@example.test`` valid for an hour from ``now``; ``claims`` change or (None) remove
    claims; ``kid`` overrides the header's key id (default: the signer's)."""
    body: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice@example.test",
        "iat": int(now),
        "exp": int(now) + 3600,
    }
    for name, value in claims.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    header = {"alg": alg, "kid": kid or signer}
    return jwt.encode(header, body, key(signer), algorithms=[alg])
