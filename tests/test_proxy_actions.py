"""The actions other than forward, on one connection in memory: redirect, block, static (fixed content and
files from a directory, with the path-traversal forms refused) and socket-handler.

The client is a StringTransport on MemoryReactorClock, as in test_proxy_session; nothing is connected to.
"""

from __future__ import annotations

import dataclasses
import os
from email.utils import formatdate
from typing import Any

from twisted.internet.protocol import Protocol

from dcrouter.proxy.answer import content_type, redirect_location, split_target, static_file
from dcrouter.proxy.handlers import RouteContext, SocketHandlerError, resolve
from dcrouter.proxy.httpmessage import HttpError
from dcrouter.proxy.routes import NO_TARGET, ProxyRoute, Redirect, RouteAction, StaticContent
from tests.test_proxy_session import HELLO_A, SessionTestCase, route


def acting(action: RouteAction, **keys: Any) -> ProxyRoute:
    keys.setdefault("ports", (8080,))
    return dataclasses.replace(route("r", **keys), action=action, target=NO_TARGET)


def get(path: str = "/", host: str = "a.test:8080", method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def drained(transport: Any) -> bytes:
    """What the client got, after letting a file transfer (a pull producer) run to its end."""
    while transport.producer is not None:
        transport.producer.resumeProducing()
    return bytes(transport.value())


class RedirectTests(SessionTestCase):
    def test_template_filled_from_the_request(self) -> None:
        action = RouteAction("redirect", redirect=Redirect("https://{domain}:8443{path}{query}", 308))
        self.context(acting(action))
        _session, client = self.connect(port=8080, data=get("/a/b?x=1&y=2"))
        response = client.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 308 Permanent Redirect\r\n"), response)
        self.assertIn(b"\r\nLocation: https://a.test:8443/a/b?x=1&y=2\r\n", response)
        self.assertTrue(client.disconnecting)
        self.assertEqual(self.attempts(), [])
        self.assertEqual(self.ctx.counters["r"].connections, 1)

    def test_placeholders(self) -> None:
        self.assertEqual(
            redirect_location("http://x/{port}{path}{query}", domain="d", path=b"/p", query=b"", port=81),
            b"http://x/81/p",
        )
        self.assertEqual(split_target(b"http://h.test/q?a"), (b"/q", b"a"))
        self.assertEqual(split_target(b"/a#frag"), (b"/a", b""))

    def test_named_redirect_on_a_peeked_port(self) -> None:
        action = RouteAction("redirect", redirect=Redirect("https://{domain}/"))
        self.context(acting(action, domains=("a.test",)), route("other", ports=(8080,), domains=("b.test",)))
        _session, client = self.connect(port=8080, data=get())
        self.assertIn(b"Location: https://a.test/\r\n", client.value())


class BlockTests(SessionTestCase):
    def test_block_closes_without_a_byte(self) -> None:
        self.context(acting(RouteAction("block"), ports=(443,)))
        session, client = self.connect(port=443, data=HELLO_A)
        self.assertRefused(client, session)
        self.assertEqual(self.ctx.counters["r"].refused, 1)
        self.assertEqual(self.attempts(), [])

    def test_block_with_a_status_answers_http(self) -> None:
        self.context(acting(RouteAction("block", status=403)))
        _session, client = self.connect(port=8080, data=get())
        self.assertTrue(client.value().startswith(b"HTTP/1.1 403 Forbidden\r\n"))
        self.assertTrue(client.disconnecting)


class StaticContentTests(SessionTestCase):
    def setUp(self) -> None:
        super().setUp()
        static = StaticContent(content=b"hello\n", content_type="text/plain; charset=utf-8", status=200)
        self.context(acting(RouteAction("static", static=static)))

    def test_content(self) -> None:
        _session, client = self.connect(port=8080, data=get())
        head, _, body = client.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"Content-Length: 6", head)
        self.assertEqual(body, b"hello\n")

    def test_request_in_pieces(self) -> None:
        session, client = self.connect(port=8080)
        for byte in get():
            session.dataReceived(bytes([byte]))
        self.assertTrue(client.value().endswith(b"\r\n\r\nhello\n"))

    def test_head_has_no_body(self) -> None:
        _session, client = self.connect(port=8080, data=get(method="HEAD"))
        self.assertTrue(client.value().endswith(b"Content-Length: 6\r\nConnection: close\r\n\r\n"))

    def test_other_methods_405(self) -> None:
        _session, client = self.connect(port=8080, data=get(method="DELETE"))
        self.assertTrue(client.value().startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"))
        self.assertIn(b"\r\nAllow: GET, HEAD\r\n", client.value())

    def test_malformed_request_400(self) -> None:
        _session, client = self.connect(port=8080, data=b"GET / HTTP/1.1\nHost: a\n\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 400 "))

    def test_tls_to_a_plain_http_route_is_refused(self) -> None:
        self.context(
            acting(
                RouteAction("static", static=StaticContent(content=b"x")), domains=("a.test",), ports=(443,)
            )
        )
        session, client = self.connect(port=443, data=HELLO_A)
        self.assertRefused(client, session)

    def test_idle_client_is_cut_off(self) -> None:
        _session, client = self.connect(port=8080, data=b"GET / HT")
        self.reactor.advance(301)
        self.assertTrue(client.aborted)


class StaticFilesTests(SessionTestCase):
    def setUp(self) -> None:
        super().setUp()
        base = os.path.abspath(self.mktemp())
        self.root = os.path.join(base, "site")
        os.makedirs(os.path.join(self.root, "docs"))
        self.write("index.html", b"<h1>home</h1>")
        self.write("style.css", b"body{}")
        self.write("docs/a b.txt", b"spaced")
        self.write("big.bin", os.urandom(100_000))
        with open(os.path.join(base, "secret.txt"), "wb") as handle:
            handle.write(b"secret")
        os.symlink(os.path.join(base, "secret.txt"), os.path.join(self.root, "link.txt"))
        os.symlink(base, os.path.join(self.root, "up"))
        os.symlink(os.path.join(self.root, "style.css"), os.path.join(self.root, "inside.css"))
        self.context(acting(RouteAction("static", static=StaticContent(root=self.root))))

    def write(self, name: str, data: bytes) -> None:
        with open(os.path.join(self.root, name), "wb") as handle:
            handle.write(data)

    def fetch(self, path: str, **keys: Any) -> tuple[bytes, bytes]:
        _session, client = self.connect(port=8080, data=get(path, **keys))
        head, _, body = drained(client).partition(b"\r\n\r\n")
        self.assertTrue(client.disconnecting)
        return head, body

    def status(self, path: str) -> int:
        return int(self.fetch(path)[0].split(b" ")[1])

    def test_index_and_content_types(self) -> None:
        head, body = self.fetch("/")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK"))
        self.assertIn(b"Content-Type: text/html; charset=utf-8", head)
        self.assertEqual(body, b"<h1>home</h1>")
        head, body = self.fetch("/style.css?v=2")
        self.assertIn(b"Content-Type: text/css; charset=utf-8", head)
        self.assertEqual(self.fetch("/docs/a%20b.txt")[1], b"spaced")
        self.assertEqual(content_type("x.png"), "image/png")
        self.assertEqual(content_type("x.tar.gz"), "application/octet-stream")
        self.assertEqual(content_type("noextension"), "application/octet-stream")

    def test_a_large_file_streams_whole(self) -> None:
        head, body = self.fetch("/big.bin")
        self.assertIn(b"Content-Length: 100000", head)
        with open(os.path.join(self.root, "big.bin"), "rb") as handle:
            self.assertEqual(body, handle.read())
        self.assertEqual(self.ctx.counters["r"].bytes_out, len(head) + 4 + 100_000)

    def test_missing_is_404(self) -> None:
        self.assertEqual(self.status("/nothing.html"), 404)
        self.assertEqual(self.status("/docs/"), 404)  # a directory without an index

    def test_traversal_forms_are_refused(self) -> None:
        for path in (
            "/../secret.txt",
            "/docs/../../secret.txt",
            "/%2e%2e/secret.txt",
            "/%2E%2E%2Fsecret.txt",
            "/docs/..%2f..%2fsecret.txt",
            "/..%5csecret.txt",
            "/%00",
            "/./index.html",
        ):
            head, body = self.fetch(path)
            self.assertEqual(head.split(b" ")[1], b"400", path)
            self.assertNotIn(b"secret", body)

    def test_symbolic_links_out_of_the_root_are_404(self) -> None:
        self.assertEqual(self.status("/link.txt"), 404)
        self.assertEqual(self.status("/up/secret.txt"), 404)
        self.assertEqual(self.fetch("/inside.css")[1], b"body{}")  # a link that stays inside is served

    def test_double_encoding_is_a_file_name_not_a_dot_segment(self) -> None:
        self.assertEqual(self.status("/%252e%252e/secret.txt"), 404)

    def test_if_modified_since(self) -> None:
        mtime = os.stat(os.path.join(self.root, "style.css")).st_mtime
        later = formatdate(mtime + 10, usegmt=True)
        head, body = self.fetch("/style.css", extra=f"If-Modified-Since: {later}\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 304 Not Modified"))
        self.assertEqual(body, b"")
        earlier = formatdate(mtime - 10, usegmt=True)
        head, _ = self.fetch("/style.css", extra=f"If-Modified-Since: {earlier}\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK"))
        self.assertIn(b"Last-Modified: ", head)

    def test_static_file_directly(self) -> None:
        self.assertEqual(
            static_file(self.root, b"/", ("missing", "index.html")), os.path.join(self.root, "index.html")
        )
        with self.assertRaises(HttpError) as caught:
            static_file(self.root, b"/\xff", ())
        self.assertEqual(caught.exception.status, 400)


class Greeter(Protocol):
    """A server-first protocol, as SMTP is: it speaks at once and echoes what it gets."""

    def __init__(self, context: RouteContext) -> None:
        self.context = context
        self.received = b""
        self.lost = False

    def connectionMade(self) -> None:
        self.transport.write(b"220 hello " + self.context.client_ip.encode() + b"\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.transport.write(data.upper())

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class SocketHandlerTests(SessionTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.made: list[Greeter] = []

    def handler(self, context: RouteContext) -> Greeter:
        greeter = Greeter(context)
        self.made.append(greeter)
        return greeter

    def test_the_handler_gets_the_connection_and_its_context(self) -> None:
        ctx = self.context(acting(RouteAction("socket-handler", handler="greet"), ports=(25,)))
        ctx.handlers.register("greet", self.handler)
        session, client = self.connect(port=25)
        (greeter,) = self.made
        self.assertEqual(client.value(), b"220 hello 192.0.2.1\r\n")  # it spoke first: nothing was awaited
        self.assertEqual((greeter.context.route_name, greeter.context.port), ("r", 25))
        session.dataReceived(b"ehlo x\r\n")
        self.assertEqual(greeter.received, b"ehlo x\r\n")
        self.assertTrue(client.value().endswith(b"EHLO X\r\n"))
        self.assertEqual(self.ctx.counters["r"].active, 1)
        session.connectionLost(None)  # type: ignore[arg-type]
        self.assertTrue(greeter.lost)
        self.assertEqual(self.ctx.counters["r"].active, 0)

    def test_peeked_bytes_are_replayed_to_the_handler(self) -> None:
        ctx = self.context(
            acting(RouteAction("socket-handler", handler="greet"), ports=(443,), domains=("a.test",))
        )
        ctx.handlers.register("greet", self.handler)
        _session, _client = self.connect(port=443, data=HELLO_A)
        self.assertEqual(self.made[0].received, HELLO_A)
        self.assertEqual(self.made[0].context.server_name, "a.test")

    def test_ip_rules_and_caps_apply_before_the_handler(self) -> None:
        ctx = self.context(
            acting(RouteAction("socket-handler", handler="greet"), ports=(25,), block=["192.0.2.0/24"])
        )
        ctx.handlers.register("greet", self.handler)
        session, client = self.connect(port=25)
        self.assertRefused(client, session)
        self.assertEqual(self.made, [])

    def test_an_unknown_handler_refuses_the_connection(self) -> None:
        self.context(acting(RouteAction("socket-handler", handler="no.such.module:handler"), ports=(25,)))
        session, client = self.connect(port=25)
        self.assertRefused(client, session)
        self.assertIn("cannot be loaded", session.refused or "")

    def test_dotted_path(self) -> None:
        self.assertIs(resolve("tests.test_proxy_actions:Greeter"), Greeter)
        self.assertIs(resolve("tests.test_proxy_actions.Greeter"), Greeter)
        with self.assertRaises(SocketHandlerError):
            resolve("smtp")


class HostTests(SessionTestCase):
    def test_an_address_as_host_is_served_where_no_name_was_asked_for(self) -> None:
        action = RouteAction("redirect", redirect=Redirect("https://{domain}:8443{path}"))
        self.context(acting(action))
        for host, expected in (("127.0.0.1:8080", b"127.0.0.1"), ("[::1]:8080", b"[::1]")):
            _session, client = self.connect(port=8080, data=get(host=host))
            self.assertIn(b"Location: https://" + expected + b":8443/\r\n", client.value())
        _session, client = self.connect(port=8080, data=get(host="bad host"))
        self.assertTrue(client.value().startswith(b"HTTP/1.1 400 "))


class HeaderChangeTests(SessionTestCase):
    def test_request_and_response_fields_changed(self) -> None:
        from dcrouter.proxy.routes import FieldChanges

        forward = dataclasses.replace(
            route("r", ports=(8080,), port=9000),
            request_fields=FieldChanges(((b"X-Env", b"prod"),), frozenset({b"cookie"})),
            response_fields=FieldChanges(((b"X-Frame-Options", b"DENY"),), frozenset({b"server"})),
        )
        self.context(forward)
        self.assertTrue(self.ctx.peeks(8080))
        request = b"GET / HTTP/1.1\r\nHost: a.test\r\nCookie: secret=1\r\nX-Env: dev\r\n\r\n"
        _session, client = self.connect(port=8080, data=request)
        backend, backend_transport = self.accept()
        sent = backend_transport.value()
        self.assertNotIn(b"Cookie", sent)
        self.assertNotIn(b"X-Env: dev", sent)
        self.assertIn(b"\r\nX-Env: prod\r\n", sent)
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nServer: internal/1.0\r\nContent-Length: 0\r\n\r\n")
        answer = client.value()
        self.assertNotIn(b"Server:", answer)
        self.assertIn(b"\r\nX-Frame-Options: DENY\r\n", answer)

    def test_answers_get_the_response_fields_set(self) -> None:
        from dcrouter.proxy.routes import FieldChanges

        static = acting(RouteAction("static", static=StaticContent(content=b"x")))
        self.context(
            dataclasses.replace(static, response_fields=FieldChanges(((b"Cache-Control", b"no-store"),)))
        )
        _session, client = self.connect(port=8080, data=get())
        self.assertIn(b"\r\nCache-Control: no-store\r\n", client.value())


class PortTemplateTests(SessionTestCase):
    def test_the_port_connected_to_moved(self) -> None:
        from dcrouter.proxy.routes import ProxyTarget

        self.context(
            dataclasses.replace(route("r", ports=(8443,)), target=ProxyTarget(("10.0.0.1",), None, 1000))
        )
        self.connect(port=8443, data=b"x")
        self.assertEqual(self.attempts(), [("10.0.0.1", 9443)])

    def test_out_of_range_is_refused(self) -> None:
        from dcrouter.proxy.routes import ProxyTarget

        self.context(
            dataclasses.replace(route("r", ports=(65000,)), target=ProxyTarget(("10.0.0.1",), None, 1000))
        )
        session, client = self.connect(port=65000, data=b"x")
        self.assertEqual(self.attempts(), [])
        self.assertRefused(client, session)
