"""Route choice by request (``match.path``, ``match.headers``) and by TLS version (``match.tlsVersion``):
the conditions themselves, the order (name level, then specificity, then priority), and plain-HTTP
connections on MemoryReactorClock routed by their request.
"""

from __future__ import annotations

import dataclasses
import re

from twisted.trial.unittest import SynchronousTestCase

from dcrouter.proxy.routes import (
    DEFERRED,
    ProxyRoute,
    RequestConditions,
    RouteTable,
    offered_versions,
    request_of,
)
from tests.test_proxy_session import SessionTestCase, route


def when(
    r: ProxyRoute, path: str | None = None, headers: tuple = (), versions: tuple[int, ...] = ()
) -> ProxyRoute:
    return dataclasses.replace(
        r, conditions=RequestConditions(path, headers), tls_versions=frozenset(versions)
    )


def req(path: str, **headers: str) -> object:
    fields = [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]
    return request_of(path.encode(), fields)


class ConditionTests(SynchronousTestCase):
    def test_prefixes(self) -> None:
        api = RequestConditions("/api")
        self.assertTrue(api.path_matches("/api"))
        self.assertTrue(api.path_matches("/api/v1"))
        self.assertFalse(api.path_matches("/apix"))
        self.assertFalse(api.path_matches("/"))
        slash = RequestConditions("/api/")
        self.assertTrue(slash.path_matches("/api/x"))
        self.assertFalse(slash.path_matches("/api"))

    def test_globs(self) -> None:
        images = RequestConditions("/img/*.png")
        self.assertTrue(images.path_matches("/img/a.png"))
        self.assertFalse(images.path_matches("/img/a.jpg"))
        self.assertTrue(RequestConditions("/v?/x").path_matches("/v2/x"))
        self.assertTrue(RequestConditions("/[ab]*").path_matches("/beta"))

    def test_headers_exact_and_regex(self) -> None:
        conditions = RequestConditions(None, (("x-env", re.compile("^(dev|test)$")), ("accept", "text/html")))
        self.assertTrue(conditions.matches(req("/", x_env="dev", accept="text/html")))
        self.assertFalse(conditions.matches(req("/", x_env="prod", accept="text/html")))
        self.assertFalse(conditions.matches(req("/", x_env="dev")))
        self.assertFalse(conditions.matches(req("/", x_env="dev", accept="text/html, */*")))  # exact is exact

    def test_request_of_strips_query_and_absolute_form(self) -> None:
        self.assertEqual(req("/a/b?x=1").path, "/a/b")  # type: ignore[attr-defined]
        self.assertEqual(req("http://h.test/p?q").path, "/p")  # type: ignore[attr-defined]
        self.assertEqual(req("http://h.test").path, "/")  # type: ignore[attr-defined]

    def test_offered_versions(self) -> None:
        self.assertEqual(offered_versions((0x0A0A, 0x0304, 0x0303), 0x0303), frozenset({0x0304}))
        self.assertEqual(offered_versions((), 0x0303), frozenset({0x0303}))


class OrderTests(SynchronousTestCase):
    def test_specificity_before_priority_within_a_name_level(self) -> None:
        anything = route("any", ports=(80,), domains=("a.test",), priority=100)
        glob = when(route("glob", ports=(80,), domains=("a.test",)), "/api/*.json")
        prefix = when(route("prefix", ports=(80,), domains=("a.test",)), "/api")
        longer = when(route("longer", ports=(80,), domains=("a.test",)), "/api/v2")
        header = when(route("header", ports=(80,), domains=("a.test",)), "/api", (("x-beta", "1"),))
        table = RouteTable([anything, glob, prefix, longer, header])

        def chosen(request: object) -> str | None:
            found = table.match(80, "a.test", "192.0.2.1", request=request)  # type: ignore[arg-type]
            return found.name if found else None

        self.assertEqual(chosen(req("/api/v2/x.json")), "longer")
        self.assertEqual(chosen(req("/api/x.json")), "prefix")
        self.assertEqual(chosen(req("/api/x.json", x_beta="1")), "header")
        self.assertEqual(chosen(req("/other")), "any")
        self.assertEqual(chosen(None), "any")  # no request: conditioned routes cannot match
        self.assertEqual(table.match(80, "a.test", "192.0.2.1", request=DEFERRED).name, "longer")  # type: ignore[union-attr]

    def test_a_name_level_before_request_specificity(self) -> None:
        exact = route("exact", ports=(80,), domains=("a.test",))
        wildcard_path = when(route("wild", ports=(80,), domains=("*.test",)), "/api")
        table = RouteTable([wildcard_path, exact])
        self.assertEqual(table.match(80, "a.test", "192.0.2.1", request=req("/api")).name, "exact")  # type: ignore[union-attr]
        self.assertEqual(table.match(80, "b.test", "192.0.2.1", request=req("/api")).name, "wild")  # type: ignore[union-attr]

    def test_priority_among_equally_specific(self) -> None:
        low = when(route("low", ports=(80,)), "/x")
        high = when(route("high", ports=(80,), priority=5), "/y")
        high_x = when(route("high-x", ports=(80,), priority=5), "/x")
        table = RouteTable([low, high, high_x])
        self.assertEqual(table.match(80, None, "192.0.2.1", request=req("/x")).name, "high-x")  # type: ignore[union-attr]

    def test_tls_version(self) -> None:
        old = when(route("tls12", ports=(443,)), versions=(0x0303,))
        rest = route("rest", ports=(443,))
        table = RouteTable([old, rest])
        self.assertEqual(table.match(443, None, "192.0.2.1", tls_versions=frozenset({0x0303})).name, "tls12")  # type: ignore[union-attr]
        self.assertEqual(table.match(443, None, "192.0.2.1", tls_versions=frozenset({0x0304})).name, "rest")  # type: ignore[union-attr]
        self.assertEqual(table.match(443, None, "192.0.2.1").name, "rest")  # type: ignore[union-attr]


class PlainHttpByRequestTests(SessionTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.context(
            when(route("api", ports=(80,), hosts=("10.0.0.1",), port=8001), "/api"),
            when(route("beta", ports=(80,), hosts=("10.0.0.3",), port=8003), None, (("x-beta", "yes"),)),
            route("site", ports=(80,), hosts=("10.0.0.2",), port=8002),
        )

    def test_the_request_chooses_and_carries_one_request(self) -> None:
        _session, client = self.connect(port=80, data=b"GET /api/items HTTP/1.1\r\nHost: a.test\r\n\r\n")
        self.assertEqual(self.attempts(), [("10.0.0.1", 8001)])
        backend, backend_transport = self.accept()
        sent = backend_transport.value()
        self.assertTrue(sent.startswith(b"GET /api/items HTTP/1.1\r\n"), sent)
        self.assertIn(b"X-Forwarded-For: 192.0.2.1", sent)
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(client.value().endswith(b"\r\n\r\nok"))
        self.assertIn(b"Connection: close", client.value())  # the next request is routed afresh
        self.assertEqual(self.ctx.counters["api"].connections, 1)

    def test_headers_choose(self) -> None:
        self.connect(port=80, data=b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Beta: yes\r\n\r\n")
        self.connect(port=80, data=b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        self.assertEqual(self.attempts(), [("10.0.0.3", 8003), ("10.0.0.2", 8002)])

    def test_a_port_with_conditions_is_peeked(self) -> None:
        self.assertTrue(self.ctx.peeks(80))
