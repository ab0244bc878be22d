"""h2c to a backend on real sockets (127.0.0.1): a terminating route with ``action.target.protocol =
"h2c"`` in front of a tiny HTTP/2 cleartext server (the ``h2`` library's server side over Twisted, in this
fixture), reached by real clients — ``curl --http1.1`` and ``httpx`` over HTTP/2 (``h2``) — and a plain-HTTP
route by curl. Requests of several clients share one backend connection, as streams."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
from typing import Any

import httpx
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, RequestReceived, StreamEnded
from h2.settings import SettingCodes
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from dcrouter.net.certstore import CertificateStore
from dcrouter.proxy.routes import CertificateFiles, PortRange, ProxyRoute, ProxyTarget
from dcrouter.proxy.service import ProxyService
from dcrouter.proxy.session import ProxySettings
from tests.integration import write_self_signed

LOCAL = "127.0.0.1"


class H2cServer(Protocol):
    """Answers every stream with JSON of what it got: headers, body length, the connection's number."""

    def __init__(self, factory: H2cFactory) -> None:
        self.factory = factory
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.requests: dict[int, tuple[dict[str, str], int]] = {}

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.number = self.factory.connections
        self.h2.initiate_connection()
        if self.factory.max_streams is not None:
            self.h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: self.factory.max_streams})
        self.transport.write(self.h2.data_to_send())

    def dataReceived(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, RequestReceived):
                headers = {k.decode(): v.decode() for k, v in event.headers}
                self.requests[event.stream_id] = (headers, 0)
            elif isinstance(event, DataReceived):
                headers, size = self.requests[event.stream_id]
                self.requests[event.stream_id] = (headers, size + len(event.data))
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                headers, size = self.requests.pop(event.stream_id)
                self.factory.streams += 1
                body = json.dumps({"headers": headers, "body": size, "connection": self.number}).encode()
                self.h2.send_headers(
                    event.stream_id,
                    [(b":status", b"200"), (b"content-type", b"application/json"), (b"x-backend", b"h2c")],
                )
                self.h2.send_data(event.stream_id, body, end_stream=True)
        self.transport.write(self.h2.data_to_send())


class Http1Upgrade(Protocol):
    """The same port's HTTP/1.1 side: a WebSocket upgrade answered 101, then every byte echoed."""

    def __init__(self, factory: H2cFactory) -> None:
        self.factory = factory
        self.upgraded = False
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        if self.upgraded:
            self.transport.write(data)
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            self.factory.upgrades.append(head)
            self.upgraded = True
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n" + rest
            )


class Either(Protocol):
    """h2c by its preface, else HTTP/1.1 (as h2c servers commonly take both on one port)."""

    def __init__(self, factory: H2cFactory) -> None:
        self.factory = factory
        self.inner: Protocol | None = None
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self.buffer += data
        if len(self.buffer) < 3:
            return
        self.inner = H2cServer(self.factory) if self.buffer.startswith(b"PRI") else Http1Upgrade(self.factory)
        self.inner.makeConnection(self.transport)
        self.inner.dataReceived(self.buffer)


class H2cFactory(Factory):
    def __init__(self) -> None:
        self.connections = 0
        self.streams = 0
        self.upgrades: list[bytes] = []
        self.max_streams: int | None = None

    def buildProtocol(self, addr: Any) -> Protocol:
        return Either(self)


class H2cTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.cert, self.key = write_self_signed(self.directory)
        self.backend = H2cFactory()
        port = reactor.listenTCP(0, self.backend, interface=LOCAL)
        self.addCleanup(port.stopListening)
        self.backend_port = int(port.getHost().port)

    def proxy(self, *, terminate: bool = True) -> int:
        route = ProxyRoute(
            name="a",
            priority=0,
            ports=(PortRange(0, 0),),
            domains=("a.test",),
            client_ips=None,
            allow=None,
            block=None,
            target=ProxyTarget((LOCAL,), self.backend_port, protocol="h2c"),
            tls_mode="terminate" if terminate else "passthrough",
            max_connections=None,
            connection_timeout_ms=None,
            source="a",
            certificate=CertificateFiles(self.cert, self.key) if terminate else None,
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

    async def curl(self, *args: str) -> bytes:
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl is not installed")
        out, err, code = await getProcessOutputAndValue(curl, ["-sS", *args], env=dict(os.environ))
        self.assertEqual(code, 0, err)
        return out

    async def test_curl_http11_through_terminating_route(self) -> None:
        port = self.proxy()
        out = await self.curl(
            "--http1.1",
            "--cacert",
            self.cert,
            "--resolve",
            f"a.test:{port}:{LOCAL}",
            "--data-binary",
            "x" * 70_000,
            "-H",
            "Content-Type: text/plain",
            "-w",
            "\n%{http_version}",
            f"https://a.test:{port}/up?q=1",
            f"https://a.test:{port}/again",
        )
        first, second, rest = out.split(b"\n1.1")  # -w after each response
        self.assertEqual(rest, b"")
        seen = json.loads(first)
        self.assertEqual(seen["headers"][":path"], "/up?q=1")
        self.assertEqual(seen["headers"][":authority"], f"a.test:{port}")
        self.assertEqual(seen["headers"][":method"], "POST")
        self.assertEqual(seen["headers"]["x-forwarded-proto"], "https")
        self.assertEqual(seen["body"], 70_000)
        self.assertEqual(json.loads(second)["headers"][":path"], "/again")
        self.assertEqual(json.loads(second)["body"], 70_000)
        self.assertEqual(self.backend.connections, 1, "both requests as streams of one connection")

    async def test_plain_http_route(self) -> None:
        port = self.proxy(terminate=False)
        out = await self.curl("--http1.1", "-H", "Host: a.test", f"http://{LOCAL}:{port}/plain")
        seen = json.loads(out)
        self.assertEqual(seen["headers"][":path"], "/plain")
        self.assertEqual(seen["headers"]["x-forwarded-proto"], "http")

    async def test_http2_client_streams_share_one_backend_connection(self) -> None:
        port = self.proxy()
        original = socket.getaddrinfo

        def fetch() -> list[httpx.Response]:
            def local(host: Any, *args: Any, **kwargs: Any) -> Any:
                return original(LOCAL if host == "a.test" else host, *args, **kwargs)

            socket.getaddrinfo = local
            try:
                context = ssl.create_default_context(cafile=self.cert)
                with httpx.Client(http2=True, verify=context, base_url=f"https://a.test:{port}") as client:
                    return [
                        client.get("/one"),
                        client.post("/two", content=b"b" * 200_000),
                        client.get("/three"),
                    ]
            finally:
                socket.getaddrinfo = original

        responses = await deferToThread(fetch)
        self.assertEqual([r.http_version for r in responses], ["HTTP/2"] * 3)
        self.assertEqual([r.status_code for r in responses], [200] * 3)
        self.assertEqual(responses[0].headers["x-backend"], "h2c")
        bodies = [r.json() for r in responses]
        self.assertEqual([b["headers"][":path"] for b in bodies], ["/one", "/two", "/three"])
        self.assertEqual(bodies[1]["body"], 200_000)
        self.assertEqual({b["connection"] for b in bodies}, {1})
        self.assertEqual(self.backend.streams, 3)

    async def test_websocket_upgrade_goes_over_http11(self) -> None:
        port = self.proxy()

        def talk() -> tuple[bytes, bytes]:
            context = ssl.create_default_context(cafile=self.cert)
            with (
                socket.create_connection((LOCAL, port)) as raw,
                context.wrap_socket(raw, server_hostname="a.test") as tls,
            ):
                tls.sendall(
                    b"GET /chat HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                )
                head = b""
                while b"\r\n\r\n" not in head:
                    head += tls.recv(4096)
                tls.sendall(b"ping")
                echoed = b""
                while len(echoed) < 4:
                    echoed += tls.recv(4096)
                return head, echoed

        head, echoed = await deferToThread(talk)
        self.assertTrue(head.startswith(b"HTTP/1.1 101"), head)
        self.assertEqual(echoed, b"ping")
        self.assertEqual(len(self.backend.upgrades), 1)
        self.assertIn(b"GET /chat HTTP/1.1", self.backend.upgrades[0])
        self.assertEqual(self.backend.connections, 0, "no h2c connection for it")

    async def h2load(self, port: int) -> None:
        """1000 requests over 4 client connections, 20 streams each."""
        h2load = shutil.which("h2load")
        if h2load is None:
            raise SkipTest("h2load is not installed (Debian: nghttp2-client)")
        out, err, code = await getProcessOutputAndValue(
            h2load,
            ["-n", "1000", "-c", "4", "-m", "20", f"--connect-to={LOCAL}:{port}", f"https://a.test:{port}/"],
            env=dict(os.environ),
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"1000 succeeded, 0 failed, 0 errored", out, out)
        self.assertEqual(self.backend.streams, 1000)

    async def test_h2load_many_streams_over_few_backend_connections(self) -> None:
        await self.h2load(self.proxy())
        # 80 streams at most in flight: within one connection's 100 (the backend's default limit).
        self.assertLessEqual(self.backend.connections, 2, self.backend.connections)

    async def test_backend_stream_limit_spreads_over_more_connections(self) -> None:
        self.backend.max_streams = 5
        await self.h2load(self.proxy())
        self.assertGreater(self.backend.connections, 1)
        self.assertLessEqual(self.backend.connections, 16, "80 in flight, 5 per connection")
