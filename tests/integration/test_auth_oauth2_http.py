"""OAUTH2 token verification over HTTP on 127.0.0.1: an RFC 7662 introspection endpoint and a JWKS URL
served by the test with twisted.web, asked through treq. Good tokens log in, refused ones are 535, and an
endpoint that is down, failing or silent is 454 4.7.0. Introspection answers are cached until the token
expires; a JWKS is fetched again when a token names a key it does not hold."""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from dcrouter.auth.build import _http_client
from dcrouter.auth.credentials import OAuthBearer
from dcrouter.auth.oauth2 import JWKS_MIN_REFETCH, OAuth2Checker
from dcrouter.config.auth import AuthConfig, OAuth2Config
from dcrouter.smtp.auth import Authenticator, AuthFailed
from tests.oauth_tokens import AUDIENCE, ISSUER, jwks_json, token

CLIENT_ID, CLIENT_SECRET = "dcrouter", "client-secret"


class Introspection(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.tokens: dict[str, dict[str, Any]] = {}
        self.requests = 0
        self.status = 200
        self.silent = False

    def render_POST(self, request: Any) -> Any:
        self.requests += 1
        if self.silent:
            return NOT_DONE_YET
        expected = b"Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode())
        if request.getHeader(b"authorization") != expected:
            request.setResponseCode(401)
            return b'{"error":"invalid_client"}'
        request.setResponseCode(self.status)
        given = request.args.get(b"token", [b""])[0].decode()
        return json.dumps(self.tokens.get(given, {"active": False})).encode()


class Jwks(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.body = jwks_json()
        self.requests = 0

    def render_GET(self, request: Any) -> bytes:
        self.requests += 1
        return self.body


class Endpoints(unittest.TestCase):
    def setUp(self) -> None:
        root = Resource()
        self.introspection = Introspection()
        self.jwks = Jwks()
        root.putChild(b"introspect", self.introspection)
        root.putChild(b"jwks.json", self.jwks)
        site = Site(root)
        site.noisy = False
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        self.http = _http_client(reactor)
        self.clock = Clock()
        self.clock.advance(reactor.seconds())

    def authenticator(self, checker: OAuth2Checker, config: OAuth2Config) -> Authenticator:
        auth = AuthConfig(methods=["OAUTH2"], oauth2=config, failure_delay=0)
        return Authenticator(
            auth, clock=self.clock, reactor=reactor, threadpool=ThreadPool(), providers=[checker]
        )

    async def outcome(self, auth: Authenticator, bearer: str, user: str | None = None) -> str:
        try:
            return await auth.authenticate(OAuthBearer(user, bearer), "127.0.0.1")
        except AuthFailed as failed:
            return f"{failed.reply.code} {failed.reply.enhanced}"


class IntrospectionTests(Endpoints):
    def setUp(self) -> None:
        super().setUp()
        self.config = OAuth2Config(
            introspection_url=self.base + "/introspect",
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            audience=AUDIENCE,
            user_claim="username",
            timeout=300,
        )
        self.checker = OAuth2Checker(self.config, http=self.http, clock=self.clock)
        self.auth = self.authenticator(self.checker, self.config)
        now = int(self.clock.seconds())
        self.introspection.tokens = {
            "good": {"active": True, "username": "alice", "aud": [AUDIENCE, "x"], "exp": now + 600},
            "expired": {"active": True, "username": "alice", "aud": AUDIENCE, "exp": now - 120},
            "elsewhere": {"active": True, "username": "alice", "aud": "other", "exp": now + 600},
            "revoked": {"active": False},
        }

    async def test_active_token_logs_in_and_is_cached_until_it_expires(self) -> None:
        self.assertEqual(await self.outcome(self.auth, "good", "alice"), "alice")
        self.assertEqual(await self.outcome(self.auth, "good"), "alice")
        self.assertEqual(self.introspection.requests, 1)
        self.clock.advance(601)
        self.introspection.tokens["good"]["exp"] = int(self.clock.seconds()) + 600
        self.assertEqual(await self.outcome(self.auth, "good"), "alice")
        self.assertEqual(self.introspection.requests, 2)

    async def test_refused_tokens(self) -> None:
        for bearer in ("revoked", "expired", "elsewhere", "unknown"):
            self.assertEqual(await self.outcome(self.auth, bearer), "535 5.7.8", bearer)
        self.assertEqual(await self.outcome(self.auth, "good", "bob"), "535 5.7.8")

    async def test_endpoint_failing_is_temporary(self) -> None:
        self.introspection.status = 500
        self.assertEqual(await self.outcome(self.auth, "good"), "454 4.7.0")

    async def test_wrong_client_secret_is_temporary(self) -> None:
        config = OAuth2Config(
            introspection_url=self.base + "/introspect",
            client_id=CLIENT_ID,
            client_secret="wrong",
            timeout=300,
        )
        checker = OAuth2Checker(config, http=self.http, clock=self.clock)
        self.assertEqual(await self.outcome(self.authenticator(checker, config), "good"), "454 4.7.0")

    async def test_endpoint_down_is_temporary(self) -> None:
        await self.port.stopListening()
        self.assertEqual(await self.outcome(self.auth, "good"), "454 4.7.0")

    async def test_endpoint_silent_is_temporary(self) -> None:
        self.introspection.silent = True
        checker = OAuth2Checker(self.config, http=self.http, clock=reactor)
        self.assertEqual(await self.outcome(self.authenticator(checker, self.config), "good"), "454 4.7.0")


class JwksUrlTests(Endpoints):
    def setUp(self) -> None:
        super().setUp()
        self.config = OAuth2Config(
            jwks_url=self.base + "/jwks.json", issuer=ISSUER, audience=AUDIENCE, user_claim="sub"
        )
        self.checker = OAuth2Checker(self.config, http=self.http, clock=self.clock)
        self.auth = self.authenticator(self.checker, self.config)
        self.now = self.clock.seconds()

    async def test_good_and_refused_tokens(self) -> None:
        self.assertEqual(await self.outcome(self.auth, token(self.now)), "alice@example.test")
        for bad in (
            token(self.now, exp=int(self.now) - 3600),
            token(self.now, aud="other"),
            token(self.now, iss="https://other.example.test"),
            token(self.now, signer="stranger", kid="good"),
        ):
            self.assertEqual(await self.outcome(self.auth, bad), "535 5.7.8")
        self.assertEqual(self.jwks.requests, 1)

    async def test_rotated_key_is_fetched(self) -> None:
        self.assertEqual(await self.outcome(self.auth, token(self.now)), "alice@example.test")
        self.jwks.body = jwks_json("good", "next")
        rotated = token(self.now, signer="next")
        # An unknown key id shortly after a fetch does not fetch again (no fetch per forged kid).
        self.assertEqual(await self.outcome(self.auth, rotated), "535 5.7.8")
        self.assertEqual(self.jwks.requests, 1)
        self.clock.advance(JWKS_MIN_REFETCH)
        self.assertEqual(await self.outcome(self.auth, rotated), "alice@example.test")
        self.assertEqual(self.jwks.requests, 2)

    async def test_jwks_down_is_temporary(self) -> None:
        await self.port.stopListening()
        self.assertEqual(await self.outcome(self.auth, token(self.now)), "454 4.7.0")
