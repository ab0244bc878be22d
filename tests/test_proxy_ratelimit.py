"""``security.rateLimit``: requests per client address, path or header value through the traffic-control
limiter (GCRA, counted in this process), answered ``429`` with ``Retry-After`` when over; checked before
credentials, so an over-rate client costs no password check. Time is MemoryReactorClock's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dcrouter.limits.gcra import Rate
from dcrouter.proxy.routes import NO_TARGET, RequestRateRule, RouteAction, StaticContent
from tests.test_proxy_basicauth import RULE, Runner, basic
from tests.test_proxy_session import SessionTestCase, route


def request(path: str = "/", extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: a.test\r\n" + extra + b"\r\n"


class RateLimitTests(SessionTestCase):
    def limited(self, rule: RequestRateRule, **keys: Any) -> None:
        static = RouteAction("static", static=StaticContent(content=b"ok"))
        self.context(
            dataclasses.replace(
                route("r", ports=(8080,)), action=static, target=NO_TARGET, request_rate=rule, **keys
            )
        )

    def status(self, data: bytes, ip: str = "192.0.2.1") -> tuple[int, bytes]:
        _session, client = self.connect(ip=ip, port=8080, data=data)
        response = client.value()
        return int(response.split(b" ")[1]), response

    def test_per_client_address(self) -> None:
        self.limited(RequestRateRule(Rate(2, 60.0)))
        self.assertEqual([self.status(request())[0] for _ in range(2)], [200, 200])
        status, response = self.status(request())
        self.assertEqual(status, 429)
        self.assertIn(b"\r\nRetry-After: 30\r\n", response)  # the next request is allowed 30 s on
        self.assertEqual(self.status(request(), ip="192.0.2.2")[0], 200)  # another client counts apart
        self.reactor.advance(30)
        self.assertEqual(self.status(request())[0], 200)

    def test_per_path_and_per_header(self) -> None:
        self.limited(RequestRateRule(Rate(1, 60.0), "path"))
        self.assertEqual(self.status(request("/a?x=1"))[0], 200)
        self.assertEqual(self.status(request("/a?x=2"), ip="192.0.2.9")[0], 429)  # same path, any client
        self.assertEqual(self.status(request("/b"))[0], 200)
        self.limited(RequestRateRule(Rate(1, 60.0), "header", "X-Api-Key"))
        self.assertEqual(self.status(request(extra=b"X-Api-Key: one\r\n"))[0], 200)
        self.assertEqual(self.status(request(extra=b"X-Api-Key: one\r\n"))[0], 429)
        self.assertEqual(self.status(request(extra=b"X-Api-Key: two\r\n"))[0], 200)

    def test_the_rate_comes_before_the_password_check(self) -> None:
        self.limited(RequestRateRule(Rate(1, 60.0)), basic_auth=RULE)
        runner = Runner()
        self.ctx.run_blocking = runner
        good = request(extra=b"Authorization: " + basic("ann", "wrong") + b"\r\n")
        self.assertEqual(self.status(good)[0], 401)
        self.assertEqual(self.status(good)[0], 429)
        self.assertEqual(len(runner.calls), 1)  # the refused request cost no scrypt

    def test_plain_forward_routes_count_each_request(self) -> None:
        forward = dataclasses.replace(
            route("fwd", ports=(8080,), port=9000), request_rate=RequestRateRule(Rate(1, 60.0))
        )
        self.context(forward)
        session, client = self.connect(port=8080, data=request())
        backend, _transport = self.accept()
        backend.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        session.dataReceived(request())  # the second request on the same connection
        self.assertIn(b"HTTP/1.1 429 ", client.value())
