"""WebSockets through a terminating route on real sockets, with short configured limits so that the test
is quick: an upgraded connection outlives the route's ``connectionTimeout`` and the proxy's
``maxConnectionLifetime`` (neither applies once upgraded) and still echoes; ``action.websocket.maxAge``
ends it; without an upgrade the same caps (1 s each here) still apply.

The same over HTTP/2 (RFC 8441), the client ``h2`` over an ``ssl`` socket in a thread: the extended CONNECT
stream outlives those caps and the HTTP/2 ``idleTimeout`` (1 s here too), echoes, and ends cleanly when the
client ends it; ``maxAge`` ends it; a connection without a stream is still closed when idle."""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from dcrouter.net.certstore import CertificateStore
from dcrouter.proxy.http2 import Http2Limits
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
            ProxySettings(max_connection_lifetime=1.0, http2=Http2Limits(idle_timeout=1.0)),
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


#: Events that end what a WebSocket stream waits for.
_ENDED = (StreamEnded, StreamReset, ConnectionTerminated)


class H2Client:
    """An ``h2`` client connection over a TLS socket that offered only ``h2`` by ALPN (blocking; a thread)."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.h2 = H2Connection(config=H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def events(self) -> list[Any]:
        """The events of one read ([] when the connection closed); DATA acknowledged as it is read."""
        data = self.sock.recv(65536)
        if not data:
            return []
        events = self.h2.receive_data(data)
        for event in events:
            if isinstance(event, DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.flush()
        return events

    def until(self, kinds: tuple[type, ...]) -> list[Any]:
        """Read until an event of ``kinds`` came, or the connection closed: every event read."""
        seen: list[Any] = []
        while True:
            events = self.events()
            seen += events
            if not events or any(isinstance(event, kinds) for event in events):
                return seen


class Http2WebsocketTests(TestCase):
    timeout = 60
    setUp = terminate.TerminateTests.setUp
    pem = terminate.TerminateTests.pem
    listen = terminate.TerminateTests.listen
    start = WebsocketLimitTests.start

    def connect(self, port: int) -> tuple[socket.socket, ssl.SSLSocket]:
        context = ssl.create_default_context(cafile=self.cert)
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection((LOCAL, port), timeout=10)
        sock = context.wrap_socket(raw, server_hostname="a.test")
        assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
        return raw, sock

    def session(self, port: int, quiet_for: float) -> dict[str, Any]:
        """Open a WebSocket over HTTP/2, stay quiet for ``quiet_for`` seconds (returning early if anything
        comes), send one frame and read its echo, then end the stream: what happened, step by step."""
        raw, sock = self.connect(port)
        with raw, sock:
            client = H2Client(sock)
            while client.h2.remote_settings.enable_connect_protocol != 1:
                if not client.events():
                    return {"settings": client.h2.remote_settings.enable_connect_protocol}
            client.h2.send_headers(
                1,
                [
                    (b":method", b"CONNECT"),
                    (b":protocol", b"websocket"),
                    (b":scheme", b"https"),
                    (b":path", b"/chat"),
                    (b":authority", b"a.test"),
                    (b"sec-websocket-version", b"13"),
                ],
            )
            client.flush()
            opened = client.until((ResponseReceived, *_ENDED))
            responses = [e for e in opened if isinstance(e, ResponseReceived)]
            result: dict[str, Any] = {"status": dict(responses[0].headers)[b":status"] if responses else None}
            started = time.monotonic()
            sock.settimeout(quiet_for)
            try:
                while True:
                    events = client.events()
                    if not events or any(isinstance(e, (DataReceived, *_ENDED)) for e in events):
                        result["early"] = events
                        result["elapsed"] = time.monotonic() - started
                        return result
            except TimeoutError:
                pass
            sock.settimeout(10)
            client.h2.send_data(1, frame(b"still here"))
            client.flush()
            echoed = b""
            while len(echoed) < 12:
                events = client.events()
                echoed += b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream_id == 1)
                if not events or any(isinstance(e, _ENDED) for e in events):
                    break
            result["echoed"] = echoed
            # The client's END_STREAM half-closes the backend connection, which then closes: the stream ends.
            client.h2.end_stream(1)
            client.flush()
            ended = client.until(_ENDED)
            result["ended"] = [type(e).__name__ for e in ended if isinstance(e, _ENDED)]
            return result

    def idle_connection(self, port: int, quiet_for: float) -> tuple[bool, float]:
        """An HTTP/2 connection with no stream, quiet: whether the proxy ended it (GOAWAY or closed), and
        when."""
        raw, sock = self.connect(port)
        with raw, sock:
            client = H2Client(sock)
            started = time.monotonic()
            sock.settimeout(quiet_for)
            try:
                client.until((ConnectionTerminated,))
            except TimeoutError:
                return False, time.monotonic() - started
            return True, time.monotonic() - started

    def advertised(self, port: int) -> int:
        """The server's SETTINGS_ENABLE_CONNECT_PROTOCOL, from its first SETTINGS frame."""
        raw, sock = self.connect(port)
        with raw, sock:
            client = H2Client(sock)
            client.until((RemoteSettingsChanged,))
            return int(client.h2.remote_settings.enable_connect_protocol)

    async def test_advertised_only_where_a_route_forwards(self) -> None:
        self.assertEqual(await deferToThread(self.advertised, self.start()), 1)
        static = RouteAction(type="static", static=StaticContent(content=b"hi\n", content_type="text/plain"))
        self.assertEqual(await deferToThread(self.advertised, self.start(action=static)), 0)

    async def test_outlives_every_default_cap(self) -> None:
        port = self.start()
        result = await deferToThread(self.session, port, 2.5)
        self.assertEqual(result["status"], b"200", result)
        self.assertNotIn("early", result)
        self.assertEqual(result["echoed"], b"\x81\x0astill here")
        self.assertEqual(result["ended"], ["StreamEnded"])

    async def test_max_age_ends_it(self) -> None:
        port = self.start(websocket_max_age=1.5)
        result = await deferToThread(self.session, port, 5.0)
        self.assertEqual(result["status"], b"200", result)
        self.assertEqual([type(e) for e in result["early"] if isinstance(e, _ENDED)], [StreamEnded])
        self.assertGreater(result["elapsed"], 1.0)
        self.assertLess(result["elapsed"], 4.0)

    async def test_without_a_stream_the_idle_cap_applies(self) -> None:
        port = self.start()
        ended, elapsed = await deferToThread(self.idle_connection, port, 5.0)
        self.assertTrue(ended)
        self.assertLess(elapsed, 4.0)
