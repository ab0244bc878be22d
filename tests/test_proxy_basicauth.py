"""``security.basicAuth`` on a route: credentials parsed strictly, scrypt hashes checked off the reactor
(here by a runner the test controls), constant work for unknown users, 401 with a challenge, good
credentials remembered; and on a connection: the proxy's own answers and plain HTTP forwarded per request.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.passwords import hash_password
from dcrouter.proxy.basicauth import BasicAuth, Unauthorized, credentials
from dcrouter.proxy.routes import NO_TARGET, BasicAuthRule, RouteAction, StaticContent
from tests.test_proxy_session import SessionTestCase, route

# A cheap cost: the tests check behaviour, not scrypt's strength.
HASH = hash_password("s3cret", log2_n=10)
RULE = BasicAuthRule("staff area", (("ann", HASH),))


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class Runner:
    """Runs the 'blocking' function at once, counting the calls (each would be a thread hop)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, function: Any, *args: Any) -> Deferred[Any]:
        self.calls.append(args)
        return succeed(function(*args))


class CredentialTests(SynchronousTestCase):
    def test_parsing(self) -> None:
        self.assertEqual(credentials(basic("ann", "pa:ss")), ("ann", "pa:ss"))
        self.assertEqual(credentials(b"basic " + base64.b64encode(b"a:b")), ("a", "b"))
        for bad in (
            None,
            b"Bearer x",
            b"Basic !!!",
            b"Basic " + base64.b64encode(b"nocolon"),
            b"Basic " + base64.b64encode(b"\xff:x"),
        ):
            self.assertIsNone(credentials(bad))

    def outcome(self, auth: BasicAuth, header: bytes | None) -> Any:
        results: list[Any] = []
        auth.check(header).addBoth(results.append)
        (result,) = results
        return result.value if hasattr(result, "value") else result

    def test_check(self) -> None:
        runner = Runner()
        auth = BasicAuth(RULE, runner)
        self.assertEqual(self.outcome(auth, basic("ann", "s3cret")), "ann")
        wrong = self.outcome(auth, basic("ann", "nope"))
        self.assertIsInstance(wrong, Unauthorized)
        self.assertEqual(wrong.status, 401)
        self.assertEqual(wrong.extra, (b'WWW-Authenticate: Basic realm="staff area", charset="UTF-8"',))
        self.assertIsInstance(self.outcome(auth, None), Unauthorized)

    def test_unknown_users_cost_a_check_too(self) -> None:
        runner = Runner()
        auth = BasicAuth(RULE, runner)
        self.assertIsInstance(self.outcome(auth, basic("bob", "s3cret")), Unauthorized)
        ((stored, _password),) = runner.calls
        self.assertTrue(stored.startswith("scrypt$10$"))  # a dummy of the same cost, not the user's hash
        self.assertNotEqual(stored, HASH)

    def test_good_credentials_are_remembered(self) -> None:
        runner = Runner()
        auth = BasicAuth(RULE, runner)
        for _ in range(3):
            self.assertEqual(self.outcome(auth, basic("ann", "s3cret")), "ann")
        self.assertEqual(len(runner.calls), 1)
        for _ in range(2):
            self.outcome(auth, basic("ann", "bad"))
        self.assertEqual(len(runner.calls), 3)  # failures are never remembered

    def test_a_pending_check_holds_the_answer(self) -> None:
        pending: list[Deferred[Any]] = []

        def later(function: Any, *args: Any) -> Deferred[Any]:
            waiting: Deferred[Any] = Deferred()
            pending.append(waiting)
            waiting.addCallback(lambda _: function(*args))
            return waiting

        results: list[Any] = []
        BasicAuth(RULE, later).check(basic("ann", "s3cret")).addBoth(results.append)
        self.assertEqual(results, [])
        pending[0].callback(None)
        self.assertEqual(results, ["ann"])


class OnConnectionTests(SessionTestCase):
    def static_route(self) -> Any:
        action = RouteAction("static", static=StaticContent(content=b"inside"))
        return dataclasses.replace(
            route("r", ports=(8080,)), action=action, target=NO_TARGET, basic_auth=RULE
        )

    def request(self, authorization: bytes | None) -> bytes:
        extra = b"Authorization: " + authorization + b"\r\n" if authorization else b""
        return b"GET / HTTP/1.1\r\nHost: a.test\r\n" + extra + b"\r\n"

    def test_answers_need_credentials(self) -> None:
        ctx = self.context(self.static_route())
        ctx.run_blocking = Runner()
        _session, client = self.connect(port=8080, data=self.request(None))
        self.assertTrue(client.value().startswith(b"HTTP/1.1 401 Unauthorized\r\n"))
        self.assertIn(b'WWW-Authenticate: Basic realm="staff area"', client.value())
        _session, client = self.connect(port=8080, data=self.request(basic("ann", "s3cret")))
        self.assertTrue(client.value().endswith(b"\r\n\r\ninside"))

    def test_plain_http_forwarded_per_request(self) -> None:
        forward = dataclasses.replace(route("fwd", ports=(8080,), port=9000), basic_auth=RULE)
        ctx = self.context(forward)
        ctx.run_blocking = Runner()
        self.assertTrue(ctx.peeks(8080))
        session, client = self.connect(port=8080, data=self.request(None))
        self.assertTrue(client.value().startswith(b"HTTP/1.1 401 "))
        self.assertEqual(self.attempts(), [])  # nothing reached a backend
        good = self.request(basic("ann", "s3cret"))
        session, client = self.connect(port=8080, data=good)
        backend, backend_transport = self.accept()
        self.assertTrue(backend_transport.value().startswith(b"GET / HTTP/1.1\r\n"))
        backend.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 204 "))
        # The connection stays open: the next request is checked too (from memory: no second scrypt).
        session.dataReceived(self.request(basic("ann", "wrong")))
        self.assertIn(b"HTTP/1.1 401 ", client.value())

    def test_plain_forward_with_basic_auth_refuses_other_protocols(self) -> None:
        forward = dataclasses.replace(route("fwd", ports=(8080,), port=9000), basic_auth=RULE)
        self.context(forward)
        session, client = self.connect(port=8080, data=b"\x00\x01binary protocol\r\n\r\n")
        self.reactor.advance(11)
        self.assertRefused(client, session)
