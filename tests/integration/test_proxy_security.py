"""Per-route security on every kind of route, on real sockets: ``ipBlockList``, ``ipAllowList`` and
``maxConnections`` on a plain TCP route, a TLS passthrough route (by SNI), a terminating route (real TLS)
and a plain-HTTP route. Clients connect from 127.0.0.1, .2, .3 and .5 (all loopback) with Python sockets
in threads; a refused client reads nothing and sees the connection end.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from dcrouter import DcRouter
from dcrouter.net.certfiles import generate_self_signed
from dcrouter.passwords import hash_password
from tests.integration import free_ports
from tests.tls_hellos import real_client_hello

LOCAL = "127.0.0.1"
KINDS = ("tcp", "passthrough", "terminate", "http")


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"echo:" + data)


def exchange(kind: str, port: int, source: str, *, hold: list[Any] | None = None) -> bytes:
    """One client of ``kind`` from ``source``: what it got back (b"" when refused). With ``hold``, the
    connection is left open (appended to it) once it is known to be served."""
    sock = socket.create_connection((LOCAL, port), timeout=10, source_address=(source, 0))
    try:
        if kind == "terminate":
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            try:
                conn: Any = context.wrap_socket(sock, server_hostname="secure.test")
            except (ssl.SSLError, ConnectionError, OSError):
                return b""
            if hold is not None:
                hold.append(conn)
                return b"handshake done"
            conn.sendall(b"GET / HTTP/1.1\r\nHost: secure.test\r\n\r\n")
        else:
            conn = sock
            first = {"tcp": b"hello", "passthrough": real_client_hello("pass.test"), "http": b"GET / HT"}[
                kind
            ]
            conn.sendall(first)
            if hold is not None:
                conn.settimeout(0.5)
                try:
                    data = conn.recv(100)  # served: an echo (tcp, passthrough); refused: EOF
                except TimeoutError:
                    data = b"open"  # plain HTTP waits for the rest of the request
                if data:
                    hold.append(conn)
                return data
            if kind == "http":
                conn.sendall(b"TP/1.1\r\nHost: web.test\r\n\r\n")
            else:
                try:
                    return bytes(conn.recv(100))  # the echo (the backend never closes); b"": refused
                except ConnectionError:
                    return b""
        received = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except (ConnectionError, ssl.SSLError):
                break
            if not chunk:
                break
            received += chunk
        return received
    finally:
        if hold is None or not hold or hold[-1] is not sock:
            sock.close()


class SecurityOnEveryKindTests(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert_pem, key_pem = generate_self_signed("secure.test")
        files = {"certPath": os.path.join(directory, "c.pem"), "keyPath": os.path.join(directory, "k.pem")}
        for path, data in zip(files.values(), (cert_pem, key_pem), strict=True):
            with open(path, "wb") as handle:
                handle.write(data)
        backend = reactor.listenTCP(0, Factory.forProtocol(Echo), interface=LOCAL)
        self.addCleanup(backend.stopListening)
        target = {"host": LOCAL, "port": backend.getHost().port}
        self.ports = dict(zip(KINDS, free_ports(len(KINDS)), strict=True))
        security = {"ipBlockList": ["127.0.0.2/32"], "ipAllowList": ["127.0.0.0/30"], "maxConnections": 1}
        routes = [
            {
                "name": "tcp",
                "match": {"ports": self.ports["tcp"]},
                "action": {"type": "forward", "target": target},
            },
            {
                "name": "passthrough",
                "match": {"ports": self.ports["passthrough"], "domains": "pass.test"},
                "action": {"type": "forward", "target": target},
            },
            {
                "name": "terminate",
                "match": {"ports": self.ports["terminate"]},
                "action": {
                    "type": "static",
                    "static": {"content": "secure"},
                    "tls": {"mode": "terminate", "certificate": files},
                },
            },
            {
                "name": "http",
                "match": {"ports": self.ports["http"]},
                "action": {"type": "static", "static": {"content": "plain"}},
            },
        ]
        for entry in routes:
            entry["security"] = security
        self.router = DcRouter(
            {"smartProxyConfig": {"bindAddress": LOCAL, "routes": routes}}, reactor=reactor
        )
        self.router.privilegedStartService()
        self.router.startService()
        self.addCleanup(self.router.stopService)
        return self.router.when_ready()

    async def fetch(self, kind: str, source: str, hold: list[Any] | None = None) -> bytes:
        return await deferToThread(exchange, kind, self.ports[kind], source, hold=hold)

    async def test_allowed_client_is_served(self) -> None:
        expected = {"tcp": b"echo:hello", "terminate": b"secure", "http": b"plain"}
        for kind in KINDS:
            got = await self.fetch(kind, "127.0.0.1")
            if kind == "passthrough":
                self.assertTrue(got.startswith(b"echo:\x16\x03"), kind)
            else:
                self.assertTrue(got.endswith(expected[kind]), (kind, got))

    async def test_block_list(self) -> None:
        for kind in KINDS:
            self.assertEqual(await self.fetch(kind, "127.0.0.2"), b"", kind)

    async def test_allow_list(self) -> None:
        for kind in KINDS:
            self.assertEqual(await self.fetch(kind, "127.0.0.5"), b"", kind)  # outside 127.0.0.0/30

    async def test_max_connections(self) -> None:
        for kind in KINDS:
            held: list[Any] = []
            self.assertNotEqual(await self.fetch(kind, "127.0.0.1", held), b"", kind)
            self.assertEqual(len(held), 1, kind)
            try:
                self.assertEqual(await self.fetch(kind, "127.0.0.3"), b"", f"{kind}: a second connection")
            finally:
                for conn in held:
                    conn.close()


class BasicAuthWithCurlTests(TestCase):
    """``security.basicAuth`` on a terminated route and on a plain-HTTP route, checked by curl; the
    password check runs in the reactor's thread pool."""

    timeout = 60

    def setUp(self) -> Deferred[None]:
        if shutil.which("curl") is None:
            raise SkipTest("curl is not installed")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert_pem, key_pem = generate_self_signed("secure.test")
        files = {"certPath": os.path.join(directory, "c.pem"), "keyPath": os.path.join(directory, "k.pem")}
        for path, data in zip(files.values(), (cert_pem, key_pem), strict=True):
            with open(path, "wb") as handle:
                handle.write(data)
        self.https, self.http = free_ports(2)
        auth = {
            "realm": "staff",
            "users": [{"username": "ann", "password": hash_password("s3cret", log2_n=10)}],
        }
        routes = [
            {
                "name": "https",
                "match": {"ports": self.https},
                "action": {
                    "type": "static",
                    "static": {"content": "secure"},
                    "tls": {"mode": "terminate", "certificate": files},
                },
                "security": {"basicAuth": auth},
            },
            {
                "name": "http",
                "match": {"ports": self.http},
                "action": {"type": "static", "static": {"content": "plain"}},
                "security": {"basicAuth": auth},
            },
        ]
        self.router = DcRouter(
            {"smartProxyConfig": {"bindAddress": LOCAL, "routes": routes}}, reactor=reactor
        )
        self.router.privilegedStartService()
        self.router.startService()
        self.addCleanup(self.router.stopService)
        return self.router.when_ready()

    async def curl(self, url: str, *args: str) -> tuple[str, bytes]:
        out, err, code = await getProcessOutputAndValue(
            "curl",
            [
                "-sSk",
                "--resolve",
                f"secure.test:{self.https}:{LOCAL}",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                *args,
                url,
            ],
            env=os.environ,
        )
        self.assertEqual(code, 0, err)
        body, _, status = out.rpartition(b"\n")
        return status.decode(), body

    async def test_credentials_required(self) -> None:
        for url, body in (
            (f"https://secure.test:{self.https}/", b"secure"),
            (f"http://{LOCAL}:{self.http}/", b"plain"),
        ):
            self.assertEqual((await self.curl(url))[0], "401", url)
            self.assertEqual((await self.curl(url, "-u", "ann:wrong"))[0], "401", url)
            self.assertEqual((await self.curl(url, "-u", "bob:s3cret"))[0], "401", url)
            self.assertEqual(await self.curl(url, "-u", "ann:s3cret"), ("200", body), url)
        out, _, _ = await getProcessOutputAndValue(
            "curl", ["-sSk", "-D", "-", f"http://{LOCAL}:{self.http}/"]
        )
        self.assertIn(b'WWW-Authenticate: Basic realm="staff", charset="UTF-8"', out)


class JwtAuthWithCurlTests(TestCase):
    """``security.jwtAuth`` on a plain-HTTP forward route: curl with and without a bearer token; the
    target sees only requests that carried a good one."""

    timeout = 60

    def setUp(self) -> Deferred[None]:
        if shutil.which("curl") is None:
            raise SkipTest("curl is not installed")
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from joserfc import jwt
        from joserfc.jwk import ECKey

        key = ec.generate_private_key(ec.SECP256R1())
        pem = os.path.abspath(self.mktemp())
        with open(pem, "wb") as handle:
            handle.write(
                key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        signer = ECKey.import_key(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self.good = jwt.encode(
            {"alg": "ES256"}, {"sub": "ann", "exp": int(time.time()) + 300}, signer, algorithms=["ES256"]
        )
        self.requests: list[bytes] = []
        requests = self.requests

        class Backend(Protocol):
            def dataReceived(self, data: bytes) -> None:
                requests.append(data)
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nbackend")

        backend = reactor.listenTCP(0, Factory.forProtocol(Backend), interface=LOCAL)
        self.addCleanup(backend.stopListening)
        (self.port,) = free_ports(1)
        routes = [
            {
                "name": "api",
                "match": {"ports": self.port},
                "action": {"type": "forward", "target": {"host": LOCAL, "port": backend.getHost().port}},
                "security": {"jwtAuth": {"keyFile": pem, "algorithms": ["ES256"]}},
            }
        ]
        self.router = DcRouter(
            {"smartProxyConfig": {"bindAddress": LOCAL, "routes": routes}}, reactor=reactor
        )
        self.router.privilegedStartService()
        self.router.startService()
        self.addCleanup(self.router.stopService)
        return self.router.when_ready()

    async def curl(self, *args: str) -> tuple[str, bytes]:
        out, err, code = await getProcessOutputAndValue(
            "curl",
            ["-sS", "-o", "-", "-w", "\n%{http_code}", *args, f"http://{LOCAL}:{self.port}/"],
            env=os.environ,
        )
        self.assertEqual(code, 0, err)
        body, _, status = out.rpartition(b"\n")
        return status.decode(), body

    async def test_bearer_required(self) -> None:
        self.assertEqual((await self.curl())[0], "401")
        self.assertEqual((await self.curl("-H", "Authorization: Bearer x.y.z"))[0], "401")
        self.assertEqual(self.requests, [])
        self.assertEqual(await self.curl("-H", f"Authorization: Bearer {self.good}"), ("200", b"backend"))
        self.assertEqual(len(self.requests), 1)


class RateLimitWithCurlTests(TestCase):
    """``security.rateLimit`` on a plain-HTTP route, on real sockets: the third request in a minute is
    answered 429 with Retry-After."""

    timeout = 60

    def setUp(self) -> Deferred[None]:
        if shutil.which("curl") is None:
            raise SkipTest("curl is not installed")
        (self.port,) = free_ports(1)
        routes = [
            {
                "name": "limited",
                "match": {"ports": self.port},
                "action": {"type": "static", "static": {"content": "ok"}},
                "security": {"rateLimit": {"count": 2, "window": 60_000}},
            }
        ]
        self.router = DcRouter(
            {"smartProxyConfig": {"bindAddress": LOCAL, "routes": routes}}, reactor=reactor
        )
        self.router.privilegedStartService()
        self.router.startService()
        self.addCleanup(self.router.stopService)
        return self.router.when_ready()

    async def test_429_past_the_rate(self) -> None:
        url = f"http://{LOCAL}:{self.port}/"
        statuses = []
        for _ in range(3):
            out, err, code = await getProcessOutputAndValue(
                "curl", ["-sS", "-D", "-", "-o", os.devnull, url], env=os.environ
            )
            self.assertEqual(code, 0, err)
            statuses.append(out.split(b" ")[1])
        self.assertEqual(statuses, [b"200", b"200", b"429"])
        self.assertIn(b"Retry-After: 30", out)
