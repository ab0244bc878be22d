"""``security.jwtAuth``: bearer tokens verified with joserfc against a PEM key, a JWKS file or a JWKS URL
(fetched by a fetcher the test answers, on a Clock), with issuer, audience, expiry and algorithm checks,
a 401 challenge; and on a connection, the proxy's own answer behind it.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import time
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.proxy.httpmessage import HttpError
from dcrouter.proxy.jwtauth import BearerRefused, JwtAuth
from dcrouter.proxy.routes import NO_TARGET, JwtRule, RouteAction, StaticContent
from tests.test_proxy_session import SessionTestCase, route

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _jwk(key: Any) -> Any:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return (ECKey if isinstance(key, ec.EllipticCurvePrivateKey) else RSAKey).import_key(pem)


def encode(claims: dict[str, Any], key: Any, algorithm: str, kid: str | None = None) -> str:
    header: dict[str, Any] = {"alg": algorithm, "typ": "JWT"}
    if kid:
        header["kid"] = kid
    return jwt.encode(header, claims, _jwk(key), algorithms=[algorithm])


def token(key: Any = RSA_KEY, algorithm: str = "RS256", kid: str | None = None, **claims: Any) -> bytes:
    claims.setdefault("exp", int(time.time()) + 300)
    return b"Bearer " + encode(claims, key, algorithm, kid).encode()


def unsigned(claims: dict[str, Any]) -> bytes:
    """An ``alg: none`` token (no library makes one by default)."""

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    return b"Bearer " + b64(b'{"alg":"none","typ":"JWT"}') + b"." + b64(json.dumps(claims).encode()) + b"."


def jwks(*pairs: tuple[str, Any]) -> str:
    keys = []
    for kid, key in pairs:
        entry = dict(_jwk(key).as_dict(private=False))
        entry["kid"] = kid
        keys.append(entry)
    return json.dumps({"keys": keys})


def outcome(deferred: Deferred[Any]) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    (result,) = results
    return result.value if hasattr(result, "value") else result


class KeyFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pem = self.mktemp()
        with open(self.pem, "wb") as handle:
            handle.write(
                RSA_KEY.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        rule = JwtRule(algorithms=("RS256",), key_file=self.pem, issuer="https://id.test", audience=("app",))
        self.auth = JwtAuth(rule, clock=Clock())

    def test_a_good_token(self) -> None:
        claims = outcome(self.auth.check(token(iss="https://id.test", aud="app", sub="ann")))
        self.assertEqual(claims["sub"], "ann")

    def test_refusals(self) -> None:
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cases = {
            "no header": None,
            "basic": b"Basic YTpi",
            "garbage": b"Bearer not.a.token",
            "other key": token(other, iss="https://id.test", aud="app"),
            "expired": token(iss="https://id.test", aud="app", exp=int(time.time()) - 120),
            "no exp": b"Bearer "
            + encode({"iss": "https://id.test", "aud": "app"}, RSA_KEY, "RS256").encode(),
            "issuer": token(iss="https://evil.test", aud="app"),
            "audience": token(iss="https://id.test", aud="other"),
            "algorithm": token(EC_KEY, "ES256", iss="https://id.test", aud="app"),
            "none alg": unsigned({"iss": "https://id.test", "aud": "app", "exp": int(time.time()) + 60}),
            "not before": token(iss="https://id.test", aud="app", nbf=int(time.time()) + 600),
        }
        for name, header in cases.items():
            refused = outcome(self.auth.check(header))
            self.assertIsInstance(refused, BearerRefused, name)
            self.assertEqual(refused.status, 401, name)
        challenge = outcome(self.auth.check(None)).extra
        self.assertEqual(challenge, (b'WWW-Authenticate: Bearer realm="dcrouter"',))
        self.assertIn(b'error="invalid_token"', outcome(self.auth.check(cases["expired"])).extra[0])

    def test_leeway(self) -> None:
        late = token(iss="https://id.test", aud="app", exp=int(time.time()) - 10)
        self.assertIsInstance(outcome(self.auth.check(late)), dict)  # within the default 30 s


class JwksTests(SynchronousTestCase):
    def test_jwks_file_by_kid(self) -> None:
        path = self.mktemp()
        second = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        with open(path, "w") as handle:
            handle.write(jwks(("one", RSA_KEY), ("two", second)))
        auth = JwtAuth(JwtRule(algorithms=("RS256",), jwks_file=path), clock=Clock())
        self.assertIsInstance(outcome(auth.check(token(second, kid="two"))), dict)
        self.assertIsInstance(outcome(auth.check(token(second, kid="one"))), BearerRefused)
        self.assertIsInstance(outcome(auth.check(token(second))), BearerRefused)  # no kid among two keys

    def test_jwks_url_fetched_refreshed_and_on_unknown_kid(self) -> None:
        clock = Clock()
        fetches: list[Deferred[bytes]] = []

        def fetch(url: str) -> Deferred[bytes]:
            self.assertEqual(url, "https://id.test/jwks")
            fetches.append(Deferred())
            return fetches[-1]

        rule = JwtRule(algorithms=("RS256",), jwks_url="https://id.test/jwks", refresh=600)
        auth = JwtAuth(rule, clock=clock, fetch=fetch)
        waiting = outcome(auth.check(token(kid="one")))
        self.assertIsInstance(waiting, HttpError)
        self.assertEqual(waiting.status, 503)  # before the first fetch
        auth.start()
        fetches[0].callback(jwks(("one", RSA_KEY)).encode())
        self.assertIsInstance(outcome(auth.check(token(kid="one"))), dict)
        # A rotated key: a token with a new kid causes one fetch (not more than once a minute).
        rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        clock.advance(61)
        pending: list[Any] = []
        auth.check(token(rotated, kid="two")).addBoth(pending.append)
        self.assertEqual((len(fetches), pending), (2, []))
        fetches[1].callback(jwks(("one", RSA_KEY), ("two", rotated)).encode())
        self.assertIsInstance(pending[0], dict)
        self.assertIsInstance(outcome(auth.check(token(rotated, kid="three"))), BearerRefused)
        self.assertEqual(len(fetches), 2)  # within the minute: refused without a fetch
        # The timer refreshes; a failed fetch keeps the keys in hand.
        clock.advance(600)
        self.assertEqual(len(fetches), 3)
        fetches[2].errback(ValueError("HTTP 500"))
        self.assertIsInstance(outcome(auth.check(token(kid="one"))), dict)
        auth.stop()
        clock.advance(6000)
        self.assertEqual(len(fetches), 3)


class OnConnectionTests(SessionTestCase):
    def test_the_answer_needs_a_token(self) -> None:
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write(jwks(("k", RSA_KEY)))
        static = RouteAction("static", static=StaticContent(content=b"for token holders"))
        protected = dataclasses.replace(
            route("r", ports=(8080,)),
            action=static,
            target=NO_TARGET,
            jwt_auth=JwtRule(algorithms=("RS256",), jwks_file=path, realm="api"),
        )
        self.context(protected)
        request = b"GET / HTTP/1.1\r\nHost: a.test\r\n%s\r\n"
        _session, client = self.connect(port=8080, data=request % b"")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 401 "))
        self.assertIn(b'WWW-Authenticate: Bearer realm="api"', client.value())
        _session, client = self.connect(
            port=8080, data=request % (b"Authorization: " + token(kid="k") + b"\r\n")
        )
        self.assertTrue(client.value().endswith(b"for token holders"))
        os.remove(path)
