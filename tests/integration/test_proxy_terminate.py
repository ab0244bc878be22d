"""Terminating routes on real sockets (127.0.0.1): a client doing TLS with ``server_hostname=a.test`` gets the
configured certificate and the plain-HTTP backend sees Host, X-Forwarded-For and X-Forwarded-Proto;
Host ≠ SNI is 421; Content-Length with Transfer-Encoding is 400; two keep-alive requests share a connection;
a WebSocket echo works through the route; plain HTTP is redirected, and ACME challenges are answered;
``terminate-and-reencrypt`` reaches a TLS backend; the whole thing from a DcRouter config.

Clients are Python's ``ssl`` and ``socket`` modules in a thread; backends are Twisted servers here.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from dcrouter import DcRouter
from dcrouter.acme.challenges import ChallengeResponder
from dcrouter.net.certfiles import generate_self_signed
from dcrouter.net.certstore import CertificateStore
from dcrouter.proxy.httpmessage import HeadBuffer
from dcrouter.proxy.routes import (
    VERIFIED,
    BackendVerification,
    CertificateFiles,
    PortRange,
    ProxyRoute,
    ProxyTarget,
)
from dcrouter.proxy.service import ProxyService
from dcrouter.proxy.session import ProxySettings
from tests.ca import TestCA
from tests.integration import free_ports

LOCAL = "127.0.0.1"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class RecordingBackend(Protocol):
    """Plain HTTP/1.1 with keep-alive: answers every request head (bodies ignored but for Content-Length)
    with its name, and keeps each head on the factory. A WebSocket handshake is answered 101 and every
    later frame echoed (unmasked, as a server sends it)."""

    def connectionMade(self) -> None:
        self.buffer = HeadBuffer()
        self.websocket = False
        self.frames = b""
        self.factory.connections += 1  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.websocket:
            self.echo(data)
            return
        complete = self.buffer.feed(data)
        while complete is not None:
            head, rest = complete
            self.factory.heads.append(head)  # type: ignore[attr-defined]
            if b"upgrade: websocket" in head.lower():
                key = next(
                    line for line in head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key")
                )
                accept = base64.b64encode(hashlib.sha1(key.split(b":", 1)[1].strip() + WS_GUID).digest())
                self.transport.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                )
                self.websocket = True
                self.echo(rest)
                return
            body = self.factory.name  # type: ignore[attr-defined]
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            self.buffer = HeadBuffer()
            complete = self.buffer.feed(rest) if rest else None

    def echo(self, data: bytes) -> None:
        """One masked client frame of under 126 bytes at a time, echoed back unmasked."""
        self.frames += data
        while len(self.frames) >= 6 and len(self.frames) >= 6 + (self.frames[1] & 0x7F):
            length = self.frames[1] & 0x7F
            mask, payload = self.frames[2:6], self.frames[6 : 6 + length]
            self.frames = self.frames[6 + length :]
            plain = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            self.transport.write(bytes([0x81, len(plain)]) + plain)


def backend(name: bytes) -> Factory:
    factory = Factory.forProtocol(RecordingBackend)
    factory.name = name  # type: ignore[attr-defined]
    factory.heads = []  # type: ignore[attr-defined]
    factory.connections = 0  # type: ignore[attr-defined]
    return factory


def read_response(sock: Any) -> bytes:
    """One response with a Content-Length body (or none: 101, or closed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


class TerminateTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.cert, self.key = self.pem("a.test")
        self.challenges = ChallengeResponder()

    def pem(self, name: str) -> tuple[str, str]:
        cert, key = generate_self_signed(name)
        paths = os.path.join(self.directory, f"{name}.crt"), os.path.join(self.directory, f"{name}.key")
        for path, data in zip(paths, (cert, key), strict=True):
            with open(path, "wb") as handle:
                handle.write(data)
        return paths

    def listen(self, factory: Factory, tls: bool = False, pem: tuple[bytes, bytes] | None = None) -> int:
        if tls:
            cert, key = pem or generate_self_signed("backend.test")
            loaded = PrivateCertificate.loadPEM(cert + key)
            options = CertificateOptions(privateKey=loaded.privateKey.original, certificate=loaded.original)
            port = reactor.listenSSL(0, factory, options, interface=LOCAL)
        else:
            port = reactor.listenTCP(0, factory, interface=LOCAL)
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def proxy(
        self,
        target: int,
        mode: str = "terminate",
        ports: tuple[int, ...] = (0,),
        domains: tuple[str, ...] = ("a.test",),
        verification: BackendVerification = VERIFIED,
    ) -> int:
        """A proxy with one terminating route for ``domains`` on ``ports`` (0: one ephemeral port);
        returns the first port's number."""
        route = ProxyRoute(
            name="a",
            priority=0,
            ports=tuple(PortRange(p, p) for p in ports),
            domains=domains,
            client_ips=None,
            allow=None,
            block=None,
            target=ProxyTarget((LOCAL,), target, verification=verification),
            tls_mode=mode,
            max_connections=None,
            connection_timeout_ms=None,
            source="a",
            certificate=CertificateFiles(self.cert, self.key),
        )
        service = ProxyService(
            [route],
            ProxySettings(),
            reactor=reactor,
            bind_address=LOCAL,
            ports=list(ports),
            drain_timeout=0.5,
            certificates=CertificateStore(clock=reactor),
            challenges=self.challenges,
        )
        service.startService()
        self.service = service
        self.addCleanup(service.stopService)
        return service.ports[ports[0]]

    def tls(self, port: int) -> ssl.SSLSocket:
        context = ssl.create_default_context(cafile=self.cert)
        raw = socket.create_connection((LOCAL, port), timeout=10)
        return context.wrap_socket(raw, server_hostname="a.test")

    async def test_certificate_and_forwarded_fields(self) -> None:
        factory = backend(b"backend-a")
        proxy = self.proxy(self.listen(factory))

        def fetch() -> tuple[bytes, bytes]:
            with self.tls(proxy) as sock:
                sock.sendall(b"GET /x HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
                return sock.getpeercert(binary_form=True) or b"", read_response(sock)

        der, response = await deferToThread(fetch)
        with open(self.cert) as handle:
            self.assertEqual(der, ssl.PEM_cert_to_DER_cert(handle.read()))
        self.assertTrue(response.startswith(b"HTTP/1.1 200 OK\r\n"), response)
        self.assertTrue(response.endswith(b"backend-a"))
        (head,) = factory.heads
        self.assertIn(b"\r\nHost: a.test\r\n", head)
        self.assertIn(b"\r\nX-Forwarded-For: 127.0.0.1\r\n", head)
        self.assertIn(b"\r\nX-Forwarded-Proto: https\r\n", head)

    async def test_misdirected_and_smuggling(self) -> None:
        factory = backend(b"x")
        proxy = self.proxy(self.listen(factory))

        def send(request: bytes) -> bytes:
            with self.tls(proxy) as sock:
                sock.sendall(request)
                return read_response(sock)

        misdirected = await deferToThread(send, b"GET / HTTP/1.1\r\nHost: b.test\r\n\r\n")
        self.assertTrue(misdirected.startswith(b"HTTP/1.1 421 Misdirected Request\r\n"), misdirected)
        smuggled = await deferToThread(
            send,
            b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a.test\r\n\r\n",
        )
        self.assertTrue(smuggled.startswith(b"HTTP/1.1 400 Bad Request\r\n"), smuggled)
        self.assertEqual(factory.heads, [])

    async def test_two_requests_on_one_connection(self) -> None:
        factory = backend(b"same")
        proxy = self.proxy(self.listen(factory))

        def two() -> list[bytes]:
            with self.tls(proxy) as sock:
                responses = []
                for path in (b"/1", b"/2"):
                    sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: a.test\r\n\r\n")
                    responses.append(read_response(sock))
                return responses

        responses = await deferToThread(two)
        self.assertEqual([r.endswith(b"same") for r in responses], [True, True])
        self.assertEqual([h.split(b" ")[1] for h in factory.heads], [b"/1", b"/2"])
        self.assertEqual(factory.connections, 1)

    async def test_websocket_echo(self) -> None:
        proxy = self.proxy(self.listen(backend(b"ws")))

        def echo() -> tuple[bytes, bytes]:
            with self.tls(proxy) as sock:
                sock.sendall(
                    b"GET /chat HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                )
                head = read_response(sock)
                mask = b"\x01\x02\x03\x04"
                payload = b"hello through the proxy"
                masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
                frame = b""
                while len(frame) < 2 + len(payload):
                    frame += sock.recv(4096)
                return head, frame

        head, frame = await deferToThread(echo)
        self.assertTrue(head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), head)
        self.assertIn(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n", head)
        self.assertEqual(frame, b"\x81\x17hello through the proxy")

    async def test_plain_http_redirect_and_challenge(self) -> None:
        proxy = self.proxy(self.listen(backend(b"x")))
        self.challenges.add("token-1", "token-1.key-thumbprint")

        def plain(request: bytes) -> bytes:
            with socket.create_connection((LOCAL, proxy), timeout=10) as sock:
                sock.sendall(request)
                return read_response(sock)

        redirect = await deferToThread(plain, b"GET /p?q=1 HTTP/1.1\r\nHost: a.test\r\n\r\n")
        self.assertTrue(redirect.startswith(b"HTTP/1.1 301 Moved Permanently\r\n"), redirect)
        # The route's one port serves HTTPS too: the redirect names it.
        self.assertIn(b"\r\nLocation: https://a.test:%d/p?q=1\r\n" % proxy, redirect)
        challenge = await deferToThread(
            plain, b"GET /.well-known/acme-challenge/token-1 HTTP/1.1\r\nHost: a.test\r\n\r\n"
        )
        self.assertTrue(challenge.startswith(b"HTTP/1.1 200 OK\r\n"), challenge)
        self.assertTrue(challenge.endswith(b"\r\n\r\ntoken-1.key-thumbprint"))
        unknown = await deferToThread(
            plain, b"GET /.well-known/acme-challenge/token-2 HTTP/1.1\r\nHost: a.test\r\n\r\n"
        )
        self.assertTrue(unknown.startswith(b"HTTP/1.1 404 Not Found\r\n"), unknown)

    async def test_redirect_to_a_non_standard_https_port(self) -> None:
        http_port, https_port = free_ports(2)
        self.proxy(self.listen(backend(b"over https")), ports=(http_port, https_port))

        def follow() -> tuple[bytes, bytes]:
            with socket.create_connection((LOCAL, http_port), timeout=10) as sock:
                sock.sendall(b"GET /p HTTP/1.1\r\nHost: a.test:%d\r\n\r\n" % http_port)
                redirect = read_response(sock)
            with self.tls(https_port) as sock:
                sock.sendall(b"GET /p HTTP/1.1\r\nHost: a.test\r\n\r\n")
                return redirect, read_response(sock)

        redirect, response = await deferToThread(follow)
        self.assertIn(b"\r\nLocation: https://a.test:%d/p\r\n" % https_port, redirect)
        self.assertTrue(response.endswith(b"over https"), response)

    async def test_a_route_for_any_name(self) -> None:
        # Its port has no route that selects by name, and is peeked all the same (TLS or plain HTTP?).
        proxy = self.proxy(self.listen(backend(b"any name")), domains=())

        def fetch() -> bytes:
            with self.tls(proxy) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
                return read_response(sock)

        self.assertTrue((await deferToThread(fetch)).endswith(b"any name"))

    async def reencrypted(self, verification: BackendVerification, pem: Any = None) -> tuple[bytes, Factory]:
        factory = backend(b"over-tls")
        proxy = self.proxy(
            self.listen(factory, tls=True, pem=pem), mode="terminate-and-reencrypt", verification=verification
        )

        def fetch() -> bytes:
            with self.tls(proxy) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
                return read_response(sock)

        return await deferToThread(fetch), factory

    def ca_file(self, ca: TestCA) -> str:
        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(ca.cert_pem)
        return path

    async def test_terminate_and_reencrypt_verifies_the_backend(self) -> None:
        ca = TestCA()
        pem = ca.issue("backend.test")
        verified = BackendVerification(ca_file=self.ca_file(ca), server_name="backend.test")
        response, factory = await self.reencrypted(verified, pem)
        self.assertTrue(response.endswith(b"over-tls"), response)
        self.assertIn(b"X-Forwarded-Proto: https", factory.heads[0])

    async def test_reencrypt_refuses_a_wrong_name(self) -> None:
        ca = TestCA()
        wrong = BackendVerification(ca_file=self.ca_file(ca), server_name="other.test")
        response, factory = await self.reencrypted(wrong, ca.issue("backend.test"))
        self.assertTrue(response.startswith(b"HTTP/1.1 502 "), response)
        self.assertEqual(factory.heads, [])

    async def test_reencrypt_refuses_an_unknown_ca(self) -> None:
        unknown = BackendVerification(ca_file=self.ca_file(TestCA("another CA")), server_name="backend.test")
        response, factory = await self.reencrypted(unknown, TestCA().issue("backend.test"))
        self.assertTrue(response.startswith(b"HTTP/1.1 502 "), response)
        self.assertEqual(factory.heads, [])

    async def test_reencrypt_by_default_refuses_a_self_signed_backend(self) -> None:
        # No CA file: the system's trust store, which does not hold a self-signed test certificate.
        response, _ = await self.reencrypted(VERIFIED)
        self.assertTrue(response.startswith(b"HTTP/1.1 502 "), response)

    async def test_reencrypt_opted_out_takes_any_certificate(self) -> None:
        response, _ = await self.reencrypted(BackendVerification(verify=False))
        self.assertTrue(response.endswith(b"over-tls"), response)


class TerminateFromConfigTests(TestCase):
    timeout = 30

    async def test_route_from_the_config(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert, key = generate_self_signed("web.test")
        paths = {"certPath": os.path.join(directory, "c.pem"), "keyPath": os.path.join(directory, "k.pem")}
        for path, data in zip(paths.values(), (cert, key), strict=True):
            with open(path, "wb") as handle:
                handle.write(data)
        factory = backend(b"via-config")
        listening = reactor.listenTCP(0, factory, interface=LOCAL)
        self.addCleanup(listening.stopListening)
        (port,) = free_ports(1)
        options = {
            "smartProxyConfig": {
                "bindAddress": LOCAL,
                "routes": [
                    {
                        "name": "web",
                        "match": {"ports": port, "domains": "web.test"},
                        "action": {
                            "type": "forward",
                            "target": {"host": LOCAL, "port": listening.getHost().port},
                        },
                        "tls": {"mode": "terminate", "certificate": paths},
                    }
                ],
            }
        }
        router = DcRouter(options, reactor=reactor)
        router.privilegedStartService()
        router.startService()
        self.addCleanup(router.stopService)
        await router.when_ready()

        def fetch() -> bytes:
            context = ssl.create_default_context(cafile=paths["certPath"])
            with context.wrap_socket(
                socket.create_connection((LOCAL, port), timeout=10), server_hostname="web.test"
            ) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
                return read_response(sock)

        self.assertTrue((await deferToThread(fetch)).endswith(b"via-config"))
        self.assertIn(b"X-Forwarded-For: 127.0.0.1", factory.heads[0])
