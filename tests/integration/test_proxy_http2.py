"""HTTP/2 through a terminating route on real sockets (127.0.0.1), with real clients: ``curl --http2`` and
``httpx`` (HTTP/2 by ``h2``), the certificate generated here, the backend a twisted.web server speaking
HTTP/1.1. A route with ``tls.http2 = false`` offers only ``http/1.1`` by ALPN; a route that answers
(``static``) answers each stream; a route with basicAuth asks each stream for credentials."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
from typing import Any

import httpx
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from dcrouter.net.certstore import CertificateStore
from dcrouter.proxy.routes import (
    CertificateFiles,
    PortRange,
    ProxyRoute,
    ProxyTarget,
    RouteAction,
    StaticContent,
)
from dcrouter.proxy.service import ProxyService
from dcrouter.proxy.session import ProxySettings
from tests.integration import write_self_signed

LOCAL = "127.0.0.1"


class Echo(Resource):
    """Answers every request with what it was: method, path, protocol, header fields, body length."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[int] = []

    def render(self, request: Any) -> bytes:
        self.sources.append(request.getClientAddress().port)
        body = request.content.read()
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-backend", b"echo")
        return json.dumps(
            {
                "method": request.method.decode(),
                "path": request.uri.decode(),
                "version": request.clientproto.decode(),
                "headers": {
                    k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()
                },
                "body": len(body),
            }
        ).encode()


class Http2Tests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.cert, self.key = write_self_signed(self.directory)
        self.echo = Echo()
        site = Site(self.echo)
        port = reactor.listenTCP(0, site, interface=LOCAL)
        self.addCleanup(port.stopListening)
        self.backend = int(port.getHost().port)

    def proxy(self, *, http2: bool = True, action: RouteAction | None = None, **extra: Any) -> int:
        route = ProxyRoute(
            name="a",
            priority=0,
            ports=(PortRange(0, 0),),
            domains=("a.test",),
            client_ips=None,
            allow=None,
            block=None,
            target=ProxyTarget((LOCAL,), self.backend),
            tls_mode="terminate",
            max_connections=None,
            connection_timeout_ms=None,
            source="a",
            certificate=CertificateFiles(self.cert, self.key),
            http2=http2,
            **({"action": action} if action is not None else {}),
            **extra,
        )
        service = ProxyService(
            [route],
            ProxySettings(),
            reactor=reactor,
            bind_address=LOCAL,
            ports=[0],
            drain_timeout=0.5,
            certificates=CertificateStore(clock=reactor),
        )
        service.startService()
        self.addCleanup(service.stopService)
        return service.ports[0]

    def client(self, port: int) -> httpx.Client:
        transport = httpx.HTTPTransport(http2=True, verify=ssl.create_default_context(cafile=self.cert))
        # httpx resolves names itself: a.test is mapped onto 127.0.0.1 by connecting there with SNI a.test.
        return httpx.Client(
            http2=True,
            transport=transport,
            base_url=f"https://a.test:{port}",
        )

    def fetch_all(self, port: int, requests: list[tuple[str, str, bytes | None]]) -> list[httpx.Response]:
        """Requests over one HTTP/2 connection (httpx with its h2 backend), a.test resolved to 127.0.0.1."""
        original = socket.getaddrinfo

        def local(host: Any, *args: Any, **kwargs: Any) -> Any:
            return original(LOCAL if host == "a.test" else host, *args, **kwargs)

        socket.getaddrinfo = local
        try:
            with self.client(port) as client:
                return [client.request(method, path, content=body) for method, path, body in requests]
        finally:
            socket.getaddrinfo = original

    async def test_httpx_over_h2(self) -> None:
        port = self.proxy()
        responses = await deferToThread(
            self.fetch_all,
            port,
            [("GET", "/one?x=1", None), ("POST", "/two", b"b" * 100_000), ("GET", "/three", None)],
        )
        self.assertEqual([r.http_version for r in responses], ["HTTP/2"] * 3)
        self.assertEqual([r.status_code for r in responses], [200] * 3)
        first, second, _ = (r.json() for r in responses)
        self.assertEqual(first["path"], "/one?x=1")
        self.assertEqual(first["version"], "HTTP/1.1")  # the backend speaks HTTP/1.1
        self.assertEqual(first["headers"]["host"], f"a.test:{port}")
        self.assertEqual(first["headers"]["x-forwarded-proto"], "https")
        self.assertEqual(first["headers"]["x-forwarded-for"], LOCAL)
        self.assertEqual((second["method"], second["body"]), ("POST", 100_000))
        self.assertEqual(responses[0].headers["x-backend"], "echo")
        # One after the other, the streams shared one keep-alive backend connection (the pool).
        self.assertEqual(len(self.echo.sources), 3)
        self.assertEqual(len(set(self.echo.sources)), 1, self.echo.sources)

    async def test_curl_http2(self) -> None:
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl is not installed")
        port = self.proxy()
        out, err, code = await getProcessOutputAndValue(
            curl,
            [
                "-sS",
                "--http2",
                "--cacert",
                self.cert,
                "--resolve",
                f"a.test:{port}:{LOCAL}",
                "-H",
                "Cookie: a=1",
                "-H",
                "Cookie: b=2",
                "-w",
                "\n%{http_version}",
                f"https://a.test:{port}/curl",
            ],
            env=dict(os.environ),
        )
        self.assertEqual(code, 0, err)
        body, _, version = out.rpartition(b"\n")
        self.assertEqual(version, b"2")
        seen = json.loads(body)
        self.assertEqual(seen["path"], "/curl")
        self.assertIn("a=1", seen["headers"]["cookie"])

    async def test_http2_off_offers_http11_only(self) -> None:
        port = self.proxy(http2=False)

        def negotiate() -> str | None:
            context = ssl.create_default_context(cafile=self.cert)
            context.set_alpn_protocols(["h2", "http/1.1"])
            with (
                socket.create_connection((LOCAL, port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname="a.test") as sock,
            ):
                return sock.selected_alpn_protocol()

        self.assertEqual(await deferToThread(negotiate), "http/1.1")

    async def test_static_answered_per_stream(self) -> None:
        action = RouteAction(
            type="static", static=StaticContent(content=b"hello\n", content_type="text/plain")
        )
        port = self.proxy(action=action)
        responses = await deferToThread(self.fetch_all, port, [("GET", "/a", None), ("GET", "/b", None)])
        self.assertEqual(
            [(r.http_version, r.status_code, r.text) for r in responses], [("HTTP/2", 200, "hello\n")] * 2
        )

    async def test_h2load(self) -> None:
        """nghttp2's load generator: 400 requests over 4 connections, 10 streams each, none failed."""
        h2load = shutil.which("h2load")
        if h2load is None:
            raise SkipTest("h2load is not installed (Debian: nghttp2-client)")
        port = self.proxy()
        out, err, code = await getProcessOutputAndValue(
            h2load,
            ["-n", "400", "-c", "4", "-m", "10", f"--connect-to={LOCAL}:{port}", f"https://a.test:{port}/"],
            env=dict(os.environ),
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"400 succeeded, 0 failed, 0 errored", out, out)
        self.assertIn(b"Application protocol: h2", out, out)
