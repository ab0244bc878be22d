"""WebSockets through a terminating route on real sockets, with short configured limits so that the test
is quick: an upgraded connection outlives the route's ``connectionTimeout`` and the proxy's
``maxConnectionLifetime`` (neither applies once upgraded) and still echoes; ``action.websocket.maxAge``
ends it; without an upgrade the same caps (1 s each here) still apply."""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from dcrouter.net.certstore import CertificateStore
from dcrouter.proxy.routes import CertificateFiles, PortRange, ProxyRoute, ProxyTarget
from dcrouter.proxy.service import ProxyService
from dcrouter.proxy.session import ProxySettings
from tests.integration import test_proxy_terminate as terminate
from tests.integration.test_proxy_terminate import LOCAL, backend, read_response

UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def frame(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class WebsocketLimitTests(TestCase):
    timeout = 60
    setUp = terminate.TerminateTests.setUp
    pem = terminate.TerminateTests.pem
    listen = terminate.TerminateTests.listen

    def start(self, **route: Any) -> int:
        target = self.listen(backend(b"ws"))
        proxy_route = ProxyRoute(
            name="a",
            priority=0,
            ports=(PortRange(0, 0),),
            domains=("a.test",),
            client_ips=None,
            allow=None,
            block=None,
            target=ProxyTarget((LOCAL,), target),
            tls_mode="terminate",
            max_connections=None,
            connection_timeout_ms=1000,
            source="a",
            certificate=CertificateFiles(self.cert, self.key),
            **route,
        )
        service = ProxyService(
            [proxy_route],
            ProxySettings(max_connection_lifetime=1.0),
            reactor=reactor,
            bind_address=LOCAL,
            ports=[0],
            drain_timeout=0.5,
            certificates=CertificateStore(clock=reactor),
        )
        service.startService()
        self.addCleanup(service.stopService)
        return service.ports[0]

    def session(self, port: int, upgrade: bool, quiet_for: float) -> tuple[bytes, bytes, float]:
        """Upgrade (or not), stay quiet for ``quiet_for`` seconds (waiting on recv, which returns early only
        if the proxy closes), then send one frame: (head, what came back, seconds until it came)."""
        context = ssl.create_default_context(cafile=self.cert)
        with (
            socket.create_connection((LOCAL, port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="a.test") as sock,
        ):
            head = read_response(sock) if upgrade and not sock.sendall(UPGRADE) else b""
            started = time.monotonic()
            sock.settimeout(quiet_for)
            try:
                early = sock.recv(4096)
                return head, early, time.monotonic() - started  # closed (b"") or unasked bytes
            except TimeoutError:
                pass
            sock.settimeout(10)
            sock.sendall(frame(b"still here"))
            echoed = b""
            while len(echoed) < 12:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                echoed += chunk
            return head, echoed, time.monotonic() - started

    async def test_outlives_connection_timeout_and_lifetime(self) -> None:
        port = self.start()
        head, echoed, _ = await deferToThread(self.session, port, True, 2.5)
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        self.assertEqual(echoed, b"\x81\x0astill here")

    async def test_without_upgrade_the_limits_apply(self) -> None:
        port = self.start()
        _, early, elapsed = await deferToThread(self.session, port, False, 5.0)
        self.assertEqual(early, b"")
        self.assertLess(elapsed, 4.0)

    async def test_max_age_ends_it(self) -> None:
        port = self.start(websocket_max_age=1.5)
        head, early, elapsed = await deferToThread(self.session, port, True, 5.0)
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        self.assertEqual(early, b"")
        self.assertGreater(elapsed, 1.0)
        self.assertLess(elapsed, 4.0)
