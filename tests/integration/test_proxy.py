"""The proxy on real sockets (127.0.0.1): SNI passthrough to two TLS backends with their own certificates,
HTTP by Host, IP rules by client source address (127.0.0.2 / 127.0.0.3), a connection cap, failover, a
PROXY v1 header, flow control against a client that stops reading, and the proxy run from DcRouter.

Backends are Twisted servers in this process; clients are Python's ``ssl`` module (in a thread), Twisted
client protocols, and ``curl`` when installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from dcrouter import DcRouter
from dcrouter.net.certfiles import generate_self_signed
from dcrouter.net.cidr import CidrSet
from dcrouter.proxy.routes import PortRange, ProxyRoute, ProxyTarget
from dcrouter.proxy.service import ProxyService
from dcrouter.proxy.session import ProxySettings
from dcrouter.router import StartupError
from tests.integration import free_ports

LOCAL = "127.0.0.1"


class HttpBackend(Protocol):
    """Answers one request head with ``HTTP/1.1 200`` and its name as the body, then closes. Everything it
    received is kept on the factory (to check what the proxy sent first)."""

    def connectionMade(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.factory.received.append(self.received)  # type: ignore[attr-defined]
        if b"\r\n\r\n" in self.received:
            body = self.factory.name  # type: ignore[attr-defined]
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            self.transport.loseConnection()


def backend_factory(name: bytes) -> Factory:
    factory = Factory.forProtocol(HttpBackend)
    factory.name = name  # type: ignore[attr-defined]
    factory.received = []  # type: ignore[attr-defined]
    return factory


class Client(Protocol):
    """A Twisted client: keeps what it receives; ``closed`` fires with it when the connection ends."""

    def __init__(self, send: bytes = b"") -> None:
        self.send = send
        self.received = b""
        self.closed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        if self.send:
            self.transport.write(self.send)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(self.received)


def route(name: str, port: int, *, domains: tuple[str, ...] = (), **extra: Any) -> ProxyRoute:
    values: dict[str, Any] = {
        "name": name,
        "priority": 0,
        "ports": (PortRange(0, 0),),
        "domains": domains,
        "client_ips": None,
        "allow": None,
        "block": None,
        "target": ProxyTarget((LOCAL,), port),
        "tls_mode": "passthrough",
        "max_connections": None,
        "connection_timeout_ms": None,
        "source": name,
    }
    values.update(extra)
    return ProxyRoute(**values)


async def until(predicate: Any, what: str, timeout: float = 10.0) -> None:
    """Poll the reactor until ``predicate()`` holds (real sockets take real time)."""
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


class ProxyIntegrationTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def listen(self, factory: Factory, tls_name: str | None = None) -> int:
        if tls_name is None:
            port = reactor.listenTCP(0, factory, interface=LOCAL)
        else:
            cert, key = generate_self_signed(tls_name)
            with open(os.path.join(self.directory, f"{tls_name}.pem"), "wb") as handle:
                handle.write(cert)
            loaded = PrivateCertificate.loadPEM(cert + key)
            # With no ALPN list of its own, pyOpenSSL's server answers curl's ALPN offer with an alert.
            options = CertificateOptions(
                privateKey=loaded.privateKey.original,
                certificate=loaded.original,
                acceptableProtocols=[b"http/1.1"],
            )
            port = reactor.listenSSL(0, factory, options, interface=LOCAL)
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def proxy(self, *routes: ProxyRoute, **settings: Any) -> int:
        service = ProxyService(
            routes,
            ProxySettings(**settings),
            reactor=reactor,
            bind_address=LOCAL,
            ports=[0],
            drain_timeout=0.5,
        )
        service.startService()
        self.service = service
        self.addCleanup(service.stopService)
        return service.ports[0]

    def connect(self, port: int, client: Client, source: str | None = None) -> Deferred[Any]:
        bind = (source, 0) if source else None
        return connectProtocol(TCP4ClientEndpoint(reactor, LOCAL, port, bindAddress=bind), client)

    def pem(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.pem")

    async def test_sni_reaches_the_backend_with_that_certificate(self) -> None:
        port_a = self.listen(backend_factory(b"backend-a"), tls_name="a.test")
        port_b = self.listen(backend_factory(b"backend-b"), tls_name="b.test")
        proxy = self.proxy(
            route("a", port_a, domains=("a.test",)), route("b", port_b, domains=("*.b.test", "b.test"))
        )

        def fetch(name: str) -> tuple[bytes, bytes]:
            context = ssl.create_default_context(cafile=self.pem(name))
            raw = socket.create_connection((LOCAL, proxy), timeout=10)
            with context.wrap_socket(raw, server_hostname=name) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % name.encode())
                der = tls.getpeercert(binary_form=True)
                data = b""
                while chunk := tls.recv(4096):
                    data += chunk
            return der, data

        for name, body in (("a.test", b"backend-a"), ("b.test", b"backend-b")):
            der, response = await deferToThread(fetch, name)
            with open(self.pem(name), "rb") as handle:
                self.assertEqual(der, ssl.PEM_cert_to_DER_cert(handle.read().decode()))
            self.assertTrue(response.endswith(body), response)
        self.assertEqual(self.service.counters["a"].connections, 1)
        self.assertGreater(self.service.counters["b"].bytes_out, 0)

    async def test_curl_resolve(self) -> None:
        curl = shutil.which("curl")
        if curl is None:
            self.skipTest("curl is not installed")
        port_a = self.listen(backend_factory(b"backend-a"), tls_name="a.test")
        port_b = self.listen(backend_factory(b"backend-b"), tls_name="b.test")
        proxy = self.proxy(route("a", port_a, domains=("a.test",)), route("b", port_b, domains=("b.test",)))
        for name, body in (("a.test", b"backend-a"), ("b.test", b"backend-b")):
            args = [
                "-sS",
                "--max-time",
                "10",
                "--resolve",
                f"{name}:{proxy}:{LOCAL}",
                "--cacert",
                self.pem(name),
            ]
            out, err, code = await getProcessOutputAndValue(curl, [*args, f"https://{name}:{proxy}/"], env={})
            self.assertEqual((code, out), (0, body), err)

    async def test_http_by_host(self) -> None:
        www = self.listen(backend_factory(b"www"))
        api = self.listen(backend_factory(b"api"))
        proxy = self.proxy(route("www", www, domains=("www.test",)), route("api", api, domains=("api.test",)))
        for host, body in ((b"www.test", b"www"), (b"API.test:8080", b"api")):
            client = Client(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
            await self.connect(proxy, client)
            self.assertTrue((await client.closed).endswith(body))

    async def test_blocked_source_refused_other_served(self) -> None:
        backend = self.listen(backend_factory(b"ok"))
        proxy = self.proxy(route("r", backend, block=CidrSet(["127.0.0.2/32"])))
        refused = Client(b"GET / HTTP/1.1\r\nHost: x.test\r\n\r\n")
        await self.connect(proxy, refused, source="127.0.0.2")
        self.assertEqual(await refused.closed, b"")
        served = Client(b"GET / HTTP/1.1\r\nHost: x.test\r\n\r\n")
        await self.connect(proxy, served, source="127.0.0.3")
        self.assertTrue((await served.closed).endswith(b"ok"))

    async def test_max_connections_refuses_the_next(self) -> None:
        backend = self.listen(backend_factory(b"ok"))
        proxy = self.proxy(route("r", backend, max_connections=2))
        held = [Client(), Client()]
        for client in held:
            await self.connect(proxy, client)
        await until(lambda: self.service.counters["r"].active == 2, "two connections spliced")
        third = Client()
        await self.connect(proxy, third)
        self.assertEqual(await third.closed, b"")
        self.assertEqual(self.service.counters["r"].refused, 1)
        held[0].transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await held[0].closed
        await until(lambda: self.service.counters["r"].active == 1, "one connection released")
        fourth = Client(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await self.connect(proxy, fourth)
        self.assertTrue((await fourth.closed).endswith(b"ok"))
        held[1].transport.loseConnection()
        await held[1].closed

    async def test_dead_first_target_fails_over(self) -> None:
        backend = self.listen(backend_factory(b"alive"))
        # Nothing listens on 127.0.0.2 (loopback): the connection is refused at once.
        proxy = self.proxy(route("r", backend, target=ProxyTarget(("127.0.0.2", LOCAL), backend)))
        client = Client(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await self.connect(proxy, client)
        self.assertTrue((await client.closed).endswith(b"alive"))

    async def test_proxy_v1_header_seen_by_backend(self) -> None:
        factory = backend_factory(b"ok")
        backend = self.listen(factory)
        proxy = self.proxy(route("r", backend, domains=("h.test",)), proxy_protocol="v1")
        request = b"GET / HTTP/1.1\r\nHost: h.test\r\n\r\n"
        client = Client(request)
        await self.connect(proxy, client, source="127.0.0.3")
        await client.closed
        received = factory.received[-1]
        header, _, rest = received.partition(b"\r\n")
        self.assertEqual(header.split()[:4], [b"PROXY", b"TCP4", b"127.0.0.3", b"127.0.0.1"])
        self.assertEqual(header.split()[5], str(proxy).encode())
        self.assertEqual(rest, request)

    async def test_a_clients_own_proxy_header_on_a_port_not_peeked(self) -> None:
        # The hardening issue's case: a route for any name (nothing peeked), v1 towards the backend, and a
        # client that is not a trusted proxy opening with a PROXY header of its own.
        factory = backend_factory(b"ok")
        backend = self.listen(factory)
        proxy = self.proxy(
            route("r", backend), proxy_protocol="v1", trusted_proxies=CidrSet(["127.0.0.25/32"])
        )
        client = Client(b"PROXY TCP4 203.0.113.8 127.0.0.1 5555 443\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await self.connect(proxy, client)
        self.assertEqual(await client.closed, b"")
        await until(lambda: self.service.counters["r"].active == 0, "the backend connection to close")
        self.assertEqual(self.service.counters["r"].refused, 1)
        for received in factory.received:  # at most dcrouter's own header got there
            self.assertNotIn(b"203.0.113.8", received)

    async def test_a_server_that_speaks_first_on_a_port_not_peeked(self) -> None:
        factory = Factory.forProtocol(GreetingServer)
        factory.received = []  # type: ignore[attr-defined]
        backend = self.listen(factory)
        proxy = self.proxy(route("r", backend), proxy_protocol="v1")
        client = GreetedClient()
        await self.connect(proxy, client)
        self.assertEqual(await client.closed, b"220 ready\r\n250 ok\r\n")
        (received,) = factory.received
        self.assertTrue(received.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 "), received)
        self.assertTrue(received.endswith(b"\r\nEHLO client.test\r\n"), received)

    def half_close_backend(self, first: bool) -> tuple[int, list[HalfCloseServer]]:
        factory = Factory.forProtocol(lambda: HalfCloseServer(first))
        factory.servers = []  # type: ignore[attr-defined]
        return self.listen(factory), factory.servers  # type: ignore[attr-defined]

    async def test_client_half_close_passes_through_and_the_answer_comes_back(self) -> None:
        backend, servers = self.half_close_backend(first=False)
        proxy = self.proxy(route("r", backend))

        def client() -> bytes:
            with socket.create_connection((LOCAL, proxy), timeout=10) as sock:
                sock.sendall(b"hello")
                sock.shutdown(socket.SHUT_WR)  # the backend must see EOF, and may still answer
                return read_all(sock)

        self.assertEqual(await deferToThread(client), b"got:hello")
        self.assertEqual(await servers[0].eof, b"hello")
        await servers[0].lost
        await until(lambda: self.service.counters["r"].active == 0, "the spliced pair to close")

    async def test_backend_half_close_passes_through_and_the_client_may_still_send(self) -> None:
        backend, servers = self.half_close_backend(first=True)
        proxy = self.proxy(route("r", backend))

        def client() -> bytes:
            with socket.create_connection((LOCAL, proxy), timeout=10) as sock:
                banner = read_all(sock)  # the backend's EOF reaches the client
                sock.sendall(b"late")  # and the client's direction stays open
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(10)
                self.assertEqual(sock.recv(10), b"")  # closed once both sides ended
                return banner

        self.assertEqual(await deferToThread(client), b"banner")
        self.assertEqual(await servers[0].eof, b"late")
        await servers[0].lost
        await until(lambda: self.service.counters["r"].active == 0, "the spliced pair to close")

    async def test_accepted_sockets_inherit_nodelay_and_keep_alive_from_the_listener(self) -> None:
        backend, _ = self.half_close_backend(first=True)
        for keep_alive in (True, False):
            proxy = self.proxy(route("r", backend), keep_alive=keep_alive)
            self.assertTrue(self.service.context.listeners_tuned)
            sock = socket.create_connection((LOCAL, proxy))
            self.addCleanup(sock.close)
            await until(lambda: len(self.service.context.sessions) == 1, "the connection to be accepted")
            session = next(iter(self.service.context.sessions))
            accepted = session.transport.socket
            self.assertEqual(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
            self.assertEqual(bool(accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)), keep_alive)
            await until(lambda s=session: s.splice is not None, "the backend connection")
            towards = session.splice.backend_transport.socket
            self.assertEqual(towards.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
            self.assertEqual(bool(towards.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)), keep_alive)
            sock.close()
            await until(lambda: not self.service.context.sessions, "the connection to close")
            await self.service.stopService()

    async def test_a_client_that_stops_reading_pauses_the_backend(self) -> None:
        producer = FloodProducer()
        backend = self.listen(Factory.forProtocol(lambda: FloodServer(producer)))
        proxy = self.proxy(route("r", backend))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.connect((LOCAL, proxy))
        self.addCleanup(sock.close)
        await until(lambda: producer.paused, "the backend to be paused")
        await deferLater(reactor, 0.3, lambda: None)
        written = producer.written
        # Kernel buffers of two connections plus the proxy's bounded buffer: far below the 64 MiB on offer.
        self.assertLess(written, 16 * 1024 * 1024)
        (session,) = self.service.context.sessions
        self.assertLess(len(session.transport.dataBuffer) + session.transport._tempDataLen, 4 * 1024 * 1024)
        sock.setblocking(False)
        total = 0
        for _ in range(500):
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                await deferLater(reactor, 0.01, lambda: None)
                continue
            total += len(chunk)
            if producer.written > written and not producer.paused:
                break
        self.assertGreater(producer.written, written, "reading again must resume the backend")


@implementer(IHalfCloseableProtocol)
class HalfCloseServer(Protocol):
    """Keeps what it reads and notes its EOF. ``first``: it sends a banner and shuts its write side at
    once; else it answers ``got:<what it read>`` once it reads EOF, then closes."""

    def __init__(self, first: bool) -> None:
        self.first = first
        self.received = b""
        self.eof: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.factory.servers.append(self)  # type: ignore[attr-defined]
        if self.first:
            self.transport.write(b"banner")
            self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        if not self.first:
            self.transport.write(b"got:" + self.received)
        self.transport.loseConnection()  # both directions are done (a half-closed one needs this too)
        self.eof.callback(self.received)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


def read_all(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


class GreetingServer(Protocol):
    """Speaks first (as SMTP does), answers one line, then closes; what it read is kept on the factory."""

    def connectionMade(self) -> None:
        self.received = b""
        self.transport.write(b"220 ready\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received.endswith(b"EHLO client.test\r\n"):
            self.factory.received.append(self.received)  # type: ignore[attr-defined]
            self.transport.write(b"250 ok\r\n")
            self.transport.loseConnection()


class GreetedClient(Client):
    """Says nothing until the server's greeting came."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.received == b"220 ready\r\n":
            self.transport.write(b"EHLO client.test\r\n")


class FloodProducer:
    """Writes 64 KiB chunks to a transport as fast as it is allowed, up to 64 MiB; records pauses."""

    def __init__(self) -> None:
        self.paused = False
        self.written = 0
        self.transport: Any = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._write()

    def stopProducing(self) -> None:
        self.paused = True
        self.written = 1 << 40  # stopped: nothing more will be written

    def _write(self) -> None:
        while not self.paused and self.written < 64 * 1024 * 1024:
            self.transport.write(b"\0" * 65536)
            self.written += 65536


class FloodServer(Protocol):
    def __init__(self, producer: FloodProducer) -> None:
        self.producer = producer

    def connectionMade(self) -> None:
        self.producer.transport = self.transport
        self.transport.registerProducer(self.producer, True)
        self.producer.resumeProducing()


class DcRouterProxyTests(TestCase):
    timeout = 30

    def test_bind_failure_names_address_and_port(self) -> None:
        (port,) = free_ports(1)
        occupied = reactor.listenTCP(port, Factory.forProtocol(Protocol), interface=LOCAL)
        self.addCleanup(occupied.stopListening)
        router = DcRouter(
            {"smartProxyConfig": {"bindAddress": LOCAL, "fromPort": port, "targetIP": LOCAL}}, reactor=reactor
        )
        error = self.assertRaises(StartupError, router.privilegedStartService)
        self.assertIn(f"{LOCAL}:{port}", str(error))

    async def test_runs_from_the_config_and_logs_its_ports(self) -> None:
        backend_port = reactor.listenTCP(0, backend_factory(b"via-config"), interface=LOCAL)
        self.addCleanup(backend_port.stopListening)
        (port,) = free_ports(1)
        lines: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if "proxy listening" in event.get("log_format", ""):
                lines.append(event["log_format"].format(**event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        options = {
            "smartProxyConfig": {
                "bindAddress": LOCAL,
                "routes": [
                    {
                        "name": "web",
                        "match": {"ports": port, "domains": "web.test"},
                        "action": {
                            "type": "forward",
                            "target": {"host": LOCAL, "port": backend_port.getHost().port},
                        },
                    }
                ],
            }
        }
        router = DcRouter(options, reactor=reactor)
        router.privilegedStartService()
        router.startService()
        self.addCleanup(router.stopService)
        await router.when_ready()
        self.assertEqual(lines, [f"proxy listening on {LOCAL}:{port} (1 routes)"])
        client = Client(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
        await connectProtocol(TCP4ClientEndpoint(reactor, LOCAL, port), client)
        self.assertTrue((await client.closed).endswith(b"via-config"))
        await router.stopService()
        with self.assertRaises(ConnectionRefusedError):
            await connectProtocol(TCP4ClientEndpoint(reactor, LOCAL, port), Client())
