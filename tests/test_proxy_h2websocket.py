"""WebSockets over HTTP/2 (RFC 8441) in memory: ``h2``'s client-side connection object opens extended
CONNECT streams on :class:`Http2Connection`, each served by the real HTTP/1.1 forwarder, whose backend
connections are StringTransports the test answers for. The setting is advertised; CONNECT with
``:protocol websocket`` becomes the HTTP/1.1 handshake (fresh key) and the backend's ``101`` the stream's
``200``; bytes go both ways under flow control; END_STREAM and RST_STREAM reach the backend; no idle or age
cap the operator did not set ends an open WebSocket; refusals (plain CONNECT, ``:protocol`` elsewhere, a
backend that does not switch, the route's credentials) are answered on the stream."""

from __future__ import annotations

from typing import Any

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from dcrouter.passwords import hash_password
from dcrouter.proxy.basicauth import BasicAuth
from dcrouter.proxy.dispatch import RequestDispatcher
from dcrouter.proxy.forward import RouteCounters
from dcrouter.proxy.gate import RequestGate
from dcrouter.proxy.h2websocket import accept_for, handshake_fields, opened_fields
from dcrouter.proxy.http import BackendPool, ForwardingPolicy, HttpBackend, HttpForwarder
from dcrouter.proxy.http2 import request_fields, request_head
from dcrouter.proxy.httpmessage import Fields, HttpError, RequestHead, ResponseHead, parse_request_head
from dcrouter.proxy.routes import BasicAuthRule, FieldChanges
from tests.fuzzing import examples
from tests.test_proxy_basicauth import Runner, basic
from tests.test_proxy_http2 import Exchange

CONNECT = [
    (b":method", b"CONNECT"),
    (b":protocol", b"websocket"),
    (b":scheme", b"https"),
    (b":path", b"/chat?room=1"),
    (b":authority", b"a.test"),
    (b"sec-websocket-version", b"13"),
]


class Backend(StringTransport):
    """A backend connection's transport that records a half-close."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


def switching(head: bytes, *extra: bytes, accept: bytes | None = None) -> bytes:
    """The backend's 101 for the handshake ``head`` (the right accept unless ``accept`` says otherwise)."""
    key = parse_request_head(head).fields.get(b"sec-websocket-key")
    assert key is not None
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + (accept if accept is not None else accept_for(key)),
        *extra,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class WebSocketExchange(Exchange):
    """An h2 client and the proxy's HTTP/2 connection, each stream served by an HttpForwarder."""

    def __init__(self, limits: dict[str, Any] | None = None, dispatch: bool = False, **options: Any) -> None:
        super().__init__(**(limits or {}))
        self.backends: list[tuple[HttpBackend, Backend]] = []
        self.upgrades = 0

        def connect(factory: Any) -> Deferred[Any]:
            backend = factory()
            transport = Backend()
            backend.makeConnection(transport)
            self.backends.append((backend, transport))
            return succeed(backend)

        def upgraded() -> None:
            self.upgrades += 1

        pool = BackendPool(connect)
        policy = ForwardingPolicy(
            client_ip="192.0.2.7",
            trust_forwarded=False,
            host_allowed=lambda host: host == "a.test",
            pool=pool,
            on_upgrade=upgraded,
            **options,
        )

        def front() -> HttpForwarder:
            forwarder = HttpForwarder(
                policy, connect=pool.connector, counters=RouteCounters(), clock=self.clock
            )
            self.fronts.append(forwarder)  # type: ignore[arg-type]
            return forwarder

        def dispatcher() -> RequestDispatcher:
            # A port that routes by request: the head reaches the forwarder as bytes, after the choice.
            def choose(head: RequestHead) -> HttpForwarder:
                self.chosen.append(head)
                return front()

            return RequestDispatcher(choose)

        self.chosen: list[RequestHead] = []
        self.server._make_front = dispatcher if dispatch else front

    def open(
        self, stream: int = 1, extra: tuple[tuple[bytes, bytes], ...] = ()
    ) -> tuple[HttpBackend, Backend]:
        """Send an extended CONNECT and answer its handshake with a 101: the backend connection."""
        self.client.send_headers(stream, [*CONNECT, *extra])
        self.pump()
        backend, transport = self.backends[-1]
        head = transport.value()
        transport.clear()
        backend.dataReceived(switching(head))
        self.pump()
        return backend, transport

    def statuses(self) -> list[bytes]:
        return [dict(e.headers)[b":status"] for e in self.of(ResponseReceived)]

    def received(self, stream: int = 1) -> bytes:
        return b"".join(e.data for e in self.of(DataReceived) if e.stream_id == stream)


class TranslationTests(TestCase):
    def test_extended_connect_becomes_the_http1_handshake(self) -> None:
        translation = request_fields(
            [
                *CONNECT,
                (b"sec-websocket-protocol", b"chat, superchat"),
                (b"sec-websocket-extensions", b"permessage-deflate"),
                (b"sec-websocket-key", b"from-the-client"),
                (b"origin", b"https://a.test"),
                (b"cookie", b"a=1"),
            ],
            ended=False,
            extended_connect=True,
        )
        self.assertEqual((translation.method, translation.path), (b"GET", b"/chat?room=1"))
        self.assertFalse(translation.chunked)
        key = translation.websocket_key
        assert key is not None
        self.assertEqual(len(key), 24)
        self.assertEqual(
            translation.lines,
            [
                (b"Host", b"a.test"),
                (b"sec-websocket-protocol", b"chat, superchat"),
                (b"sec-websocket-extensions", b"permessage-deflate"),
                (b"origin", b"https://a.test"),
                (b"Upgrade", b"websocket"),
                (b"Connection", b"Upgrade, close"),
                (b"Sec-WebSocket-Key", key),
                (b"Sec-WebSocket-Version", b"13"),
                (b"Cookie", b"a=1"),
            ],
        )
        # A fresh key each time.
        again = request_fields(CONNECT, ended=False, extended_connect=True)
        self.assertNotEqual(again.websocket_key, key)

    def test_refusals(self) -> None:
        get = [(b":method", b"GET"), *CONNECT[1:]]
        cases = [
            (CONNECT, False, 400),  # :protocol is unknown where the setting is off
            (get, True, 400),  # :protocol without CONNECT
            ([CONNECT[0], *CONNECT[2:]], True, 501),  # plain CONNECT: no tunnels
            ([(b":method", b"CONNECT"), (b":authority", b"a.test:443")], True, 501),
            ([CONNECT[0], (b":protocol", b"h3-datagram"), *CONNECT[2:]], True, 501),
            ([*CONNECT[:3], *CONNECT[4:]], True, 400),  # no :path
            ([*CONNECT[:5], (b"sec-websocket-version", b"8")], True, 400),
            ([*CONNECT, (b"upgrade", b"websocket")], True, 400),
        ]
        for headers, extended, status in cases:
            with self.assertRaises(HttpError, msg=repr(headers)) as caught:
                request_head(headers, ended=False, extended_connect=extended)
            self.assertEqual(caught.exception.status, status, repr(headers))

    def test_opened_fields(self) -> None:
        def head(status: int, *lines: tuple[bytes, bytes]) -> ResponseHead:
            return ResponseHead(b"HTTP/1.1", status, b"", Fields(lines))

        _, key = handshake_fields([])
        good = (
            (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Accept", accept_for(key)),
            (b"Sec-WebSocket-Protocol", b"chat"),
            (b"Set-Cookie", b"s=1"),
        )
        self.assertEqual(
            opened_fields(head(101, *good), key),
            [(b":status", b"200"), (b"sec-websocket-protocol", b"chat"), (b"set-cookie", b"s=1")],
        )
        for bad in (
            head(200, *good),
            head(101, *good[:2]),
            head(101, good[0], good[1], (b"Sec-WebSocket-Accept", accept_for(b"another key"))),
            head(101, (b"Upgrade", b"h2c"), *good[1:]),
        ):
            with self.assertRaises(HttpError) as caught:
                opened_fields(bad, key)
            self.assertEqual(caught.exception.status, 502)


@st.composite
def _pseudo(draw: Any) -> list[tuple[bytes, bytes]]:
    """Pseudo-header fields, mostly those of an extended CONNECT or a GET, sometimes reordered, one
    missing or repeated."""
    fields = [(b":method", draw(st.sampled_from([b"CONNECT", b"GET"])))]
    protocol = draw(st.sampled_from([b"websocket", b"WebSocket", None]))
    if protocol is not None:
        fields.append((b":protocol", protocol))
    for field in ((b":scheme", b"https"), (b":path", b"/chat"), (b":authority", b"a.test")):
        if draw(st.integers(0, 9)):
            fields.append(field)
    if draw(st.booleans()):
        fields = draw(st.permutations(fields))
    if not draw(st.integers(0, 9)):
        fields.append(draw(st.sampled_from(fields)))
    return list(fields)


_regular = st.sampled_from(
    [
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-version", b"8"),
        (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"sec-websocket-protocol", b"chat"),
        (b"upgrade", b"websocket"),
        (b"connection", b"upgrade"),
        (b"content-length", b"5"),
        (b"host", b"a.test"),
        (b"cookie", b"a=1"),
        (b"x-a", b"1"),
    ]
)


class FuzzTests(TestCase):
    @examples(2)
    @given(
        _pseudo(),
        st.lists(_regular, max_size=5),
        st.booleans(),
        st.booleans(),
    )
    def test_only_an_extended_connect_becomes_an_upgrade(
        self,
        pseudo: list[tuple[bytes, bytes]],
        regular: list[tuple[bytes, bytes]],
        ended: bool,
        extended: bool,
    ) -> None:
        """Whatever the header list: a refusal with a status, or a head that parses back strictly, which
        is a WebSocket handshake exactly when the stream was an extended CONNECT (so no other stream can
        smuggle an upgrade), with one key, the proxy's, and no body framing."""
        try:
            translation = request_fields([*pseudo, *regular], ended=ended, extended_connect=extended)
        except HttpError as error:
            self.assertIn(error.status, (400, 501))
            return
        head, _, _ = request_head([*pseudo, *regular], ended=ended, extended_connect=extended)
        parsed = parse_request_head(head)
        key = translation.websocket_key
        self.assertEqual(parsed.upgrade_websocket, key is not None)
        self.assertEqual(key is not None, extended and (b":protocol", b"websocket") in pseudo)
        if key is None:
            self.assertFalse(parsed.fields.has(b"upgrade"))
            return
        self.assertEqual(parsed.method, b"GET")
        self.assertEqual(len(parsed.fields.get_all(b"sec-websocket-key")), 1)
        self.assertEqual(parsed.fields.get_all(b"sec-websocket-version"), [b"13"])
        self.assertFalse(parsed.fields.has(b"content-length") or parsed.fields.has(b"transfer-encoding"))


class SettingTests(TestCase):
    def test_advertised(self) -> None:
        exchange = Exchange()
        self.assertEqual(exchange.client.remote_settings.enable_connect_protocol, 1)

    def test_not_advertised_where_nothing_forwards(self) -> None:
        exchange = Exchange(websockets=False)
        self.assertEqual(exchange.client.remote_settings.enable_connect_protocol, 0)
        exchange.client.send_headers(1, CONNECT)
        exchange.pump()
        self.assertEqual([dict(e.headers)[b":status"] for e in exchange.of(ResponseReceived)], [b"400"])
        self.assertEqual(exchange.fronts, [])

    def test_plain_connect_and_misplaced_protocol(self) -> None:
        exchange = Exchange()
        exchange.client.config.validate_outbound_headers = False  # a client sending what h2 would not
        exchange.client.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"a.test:443")])
        exchange.client.send_headers(3, [(b":method", b"GET"), *CONNECT[1:]], end_stream=True)
        exchange.pump()
        statuses = {e.stream_id: dict(e.headers)[b":status"] for e in exchange.of(ResponseReceived)}
        self.assertEqual(statuses, {1: b"501", 3: b"400"})
        self.assertEqual(exchange.fronts, [])


class WebSocketTests(TestCase):
    def test_opened_and_bytes_both_ways(self) -> None:
        exchange = WebSocketExchange(
            request_fields=FieldChanges(set_fields=((b"X-Added", b"1"),), remove=frozenset())
        )
        exchange.client.send_headers(
            1, [*CONNECT, (b"sec-websocket-protocol", b"chat"), (b"origin", b"https://a.test")]
        )
        exchange.pump()
        ((backend, transport),) = exchange.backends
        head = transport.value()
        request = parse_request_head(head[: head.index(b"\r\n\r\n") + 4])
        self.assertEqual((request.method, request.target), (b"GET", b"/chat?room=1"))
        self.assertTrue(request.upgrade_websocket)
        fields = request.fields
        self.assertEqual(fields.get(b"host"), b"a.test")
        self.assertEqual(fields.get(b"connection"), b"Upgrade")  # the backend sees no "close"
        self.assertEqual(fields.get(b"sec-websocket-version"), b"13")
        self.assertEqual(fields.get(b"sec-websocket-protocol"), b"chat")
        self.assertEqual(fields.get(b"origin"), b"https://a.test")
        self.assertEqual(fields.get(b"x-added"), b"1")
        self.assertEqual(fields.get(b"x-forwarded-for"), b"192.0.2.7")
        self.assertEqual(exchange.statuses(), [])  # nothing before the backend's answer
        transport.clear()
        backend.dataReceived(switching(head, b"Sec-WebSocket-Protocol: chat") + b"\x81\x02hi")
        exchange.pump()
        (response,) = exchange.of(ResponseReceived)
        self.assertEqual(response.headers, [(b":status", b"200"), (b"sec-websocket-protocol", b"chat")])
        self.assertEqual(exchange.received(), b"\x81\x02hi")  # what the backend sent with its 101
        self.assertEqual(exchange.upgrades, 1)
        exchange.client.send_data(1, b"client bytes")
        exchange.pump()
        self.assertEqual(transport.value(), b"client bytes")
        backend.dataReceived(b"backend bytes")
        exchange.pump()
        self.assertEqual(exchange.received(), b"\x81\x02hibackend bytes")
        self.assertEqual(exchange.of(StreamEnded), [])
        self.assertIn(1, exchange.server.streams)

    def test_on_a_port_that_routes_by_request(self) -> None:
        exchange = WebSocketExchange(dispatch=True)
        backend, transport = exchange.open()
        (head,) = exchange.chosen
        self.assertEqual((head.method, head.target), (b"GET", b"/chat?room=1"))
        self.assertTrue(head.upgrade_websocket)
        self.assertEqual(exchange.statuses(), [b"200"])
        exchange.client.send_data(1, b"both")
        backend.dataReceived(b"ways")
        exchange.pump()
        self.assertEqual((transport.value(), exchange.received()), (b"both", b"ways"))

    def test_client_bytes_sent_early_wait_for_the_switch(self) -> None:
        exchange = WebSocketExchange()
        exchange.client.send_headers(1, CONNECT)
        exchange.client.send_data(1, b"early")
        exchange.pump()
        ((backend, transport),) = exchange.backends
        head = transport.value()
        self.assertTrue(head.endswith(b"\r\n\r\n"), head)  # the handshake only
        transport.clear()
        backend.dataReceived(switching(head))
        exchange.pump()
        self.assertEqual(exchange.statuses(), [b"200"])
        self.assertEqual(transport.value(), b"early")

    def test_end_stream_half_closes_and_backend_close_ends_the_stream(self) -> None:
        exchange = WebSocketExchange()
        backend, transport = exchange.open()
        exchange.client.send_data(1, b"last words", end_stream=True)
        exchange.pump()
        self.assertEqual(transport.value(), b"last words")
        self.assertTrue(transport.write_closed)
        self.assertFalse(transport.disconnecting)
        backend.dataReceived(b"reply after the client's FIN")
        exchange.pump()
        self.assertEqual(exchange.received(), b"reply after the client's FIN")
        backend.connectionLost()
        exchange.pump()
        self.assertEqual([e.stream_id for e in exchange.of(StreamEnded)], [1])
        self.assertEqual(exchange.of(StreamReset), [])
        self.assertEqual(exchange.server.streams, {})

    def test_end_stream_before_the_switch_is_passed_on_after_it(self) -> None:
        exchange = WebSocketExchange()
        exchange.client.send_headers(1, CONNECT)
        exchange.client.send_data(1, b"bye", end_stream=True)
        exchange.pump()
        ((backend, transport),) = exchange.backends
        head = transport.value()
        self.assertFalse(transport.write_closed)
        transport.clear()
        backend.dataReceived(switching(head))
        exchange.pump()
        self.assertEqual(transport.value(), b"bye")
        self.assertTrue(transport.write_closed)

    def test_backend_close_first(self) -> None:
        exchange = WebSocketExchange()
        backend, _ = exchange.open()
        backend.dataReceived(b"\x88\x00")  # a close frame, then the backend's FIN
        backend.connectionLost()
        exchange.pump()
        self.assertEqual(exchange.received(), b"\x88\x00")
        self.assertEqual([e.stream_id for e in exchange.of(StreamEnded)], [1])
        # What the client still sends goes nowhere, and its flow-control credit comes back.
        exchange.client.send_data(1, b"x" * 1000, end_stream=True)
        exchange.pump()
        self.assertEqual(exchange.of(StreamReset), [])
        self.assertEqual(exchange.of(ConnectionTerminated), [])

    def test_reset_closes_the_backend(self) -> None:
        exchange = WebSocketExchange()
        _, transport = exchange.open()
        exchange.client.reset_stream(1, ErrorCodes.CANCEL)
        exchange.pump()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(exchange.server.streams, {})

    def test_other_streams_go_on(self) -> None:
        exchange = WebSocketExchange()
        _, ws_transport = exchange.open(1)
        exchange.client.send_headers(
            3,
            [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"), (b":path", b"/")],
            end_stream=True,
        )
        exchange.pump()
        backend, transport = exchange.backends[-1]
        self.assertIsNot(transport, ws_transport)  # the upgraded connection is never reused
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        exchange.pump()
        self.assertEqual(exchange.statuses(), [b"200", b"200"])
        self.assertEqual(exchange.received(3), b"ok")
        self.assertIn(1, exchange.server.streams)


class FlowControlTests(TestCase):
    def test_backend_paused_while_the_client_window_is_spent(self) -> None:
        exchange = WebSocketExchange()
        backend, transport = exchange.open()
        backend.dataReceived(b"x" * 200_000)
        exchange.pump()
        # The client's stream window (65535 by default) is spent; the rest is buffered and the backend
        # connection no longer read.
        self.assertEqual(len(exchange.received()), 65_535)
        self.assertEqual(transport.producerState, "paused")
        for _ in range(10):
            for event in exchange.of(DataReceived):
                if not getattr(event, "acked", False):
                    exchange.client.acknowledge_received_data(event.flow_controlled_length, 1)
                    event.acked = True
            exchange.pump()
        self.assertEqual(len(exchange.received()), 200_000)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(exchange.of(StreamEnded), [])

    def test_client_data_acknowledged_as_the_backend_takes_it(self) -> None:
        exchange = WebSocketExchange(limits={"initial_window_size": 65_535})
        _, transport = exchange.open()
        self.assertEqual(exchange.client.local_flow_control_window(1), 65_535)
        transport.producer.pauseProducing()  # the backend connection's send buffer is full
        for _ in range(4):
            exchange.client.send_data(1, b"y" * 16_000)
        exchange.client.send_data(1, b"y" * 1_535)
        exchange.pump()
        self.assertEqual(len(transport.value()), 65_535)  # written, but not yet taken by the kernel
        # Nothing acknowledged: the client may send no more on this stream.
        self.assertEqual(exchange.client.local_flow_control_window(1), 0)
        self.assertEqual(exchange.server.streams[1].unacknowledged, 65_535)
        transport.producer.resumeProducing()
        exchange.pump()
        self.assertEqual(exchange.server.streams[1].unacknowledged, 0)
        self.assertEqual(exchange.client.local_flow_control_window(1), 65_535)


class LimitTests(TestCase):
    """Caps set short here (30 s); an open WebSocket outlives them all unless ``websocket_*`` is set."""

    def test_no_cap_the_operator_did_not_set(self) -> None:
        exchange = WebSocketExchange(limits={"idle_timeout": 30.0}, idle_timeout=30.0)
        _, transport = exchange.open()
        for _ in range(100):
            exchange.clock.advance(3600)
            exchange.pump()
        self.assertFalse(transport.disconnecting)
        self.assertEqual(exchange.of(StreamReset) + exchange.of(StreamEnded), [])
        self.assertEqual(exchange.of(ConnectionTerminated), [])
        exchange.client.send_data(1, b"after 100 hours")
        exchange.pump()
        self.assertEqual(transport.value(), b"after 100 hours")

    def test_the_route_idle_cap_applies_before_the_switch(self) -> None:
        exchange = WebSocketExchange(idle_timeout=30.0)
        exchange.client.send_headers(1, CONNECT)
        exchange.pump()
        ((_, transport),) = exchange.backends
        exchange.clock.advance(31)
        exchange.pump()
        self.assertTrue(transport.disconnecting)
        self.assertEqual([e.stream_id for e in exchange.of(StreamReset)], [1])

    def test_websocket_idle_and_age(self) -> None:
        exchange = WebSocketExchange(websocket_idle=60.0)
        backend, transport = exchange.open()
        exchange.clock.advance(50)
        backend.dataReceived(b"ping")
        exchange.clock.advance(50)
        exchange.pump()
        self.assertFalse(transport.disconnecting)
        exchange.clock.advance(11)
        exchange.pump()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(exchange.of(StreamReset)), 1)
        exchange = WebSocketExchange(websocket_max_age=100.0)
        backend, transport = exchange.open()
        for _ in range(9):
            exchange.clock.advance(10)
            backend.dataReceived(b"busy")
        exchange.pump()
        self.assertFalse(transport.disconnecting)
        exchange.clock.advance(11)
        exchange.pump()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(exchange.of(StreamEnded)), 1)


class RefusalTests(TestCase):
    def answer(self, response: bytes) -> WebSocketExchange:
        exchange = WebSocketExchange()
        exchange.client.send_headers(1, CONNECT)
        exchange.client.send_data(1, b"\x81\x85frame")  # sent early: must never reach the backend
        exchange.pump()
        ((backend, transport),) = exchange.backends
        head = transport.value()
        transport.clear()
        backend.dataReceived(
            response if not response.startswith(b"switching") else switching(head, accept=b"x")
        )
        exchange.pump()
        self.assertEqual(transport.value(), b"")
        self.assertEqual([e.stream_id for e in exchange.of(StreamEnded)], [1])
        self.assertEqual(exchange.upgrades, 0)
        return exchange

    def test_a_backend_that_does_not_switch(self) -> None:
        exchange = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        self.assertEqual(exchange.statuses(), [b"502"])
        self.assertNotIn(b"hello", exchange.received())

    def test_a_wrong_accept(self) -> None:
        exchange = self.answer(b"switching")
        self.assertEqual(exchange.statuses(), [b"502"])
        ((_, transport),) = exchange.backends
        self.assertTrue(transport.disconnecting)

    def test_a_backend_refusal_is_relayed(self) -> None:
        exchange = self.answer(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope")
        self.assertEqual(exchange.statuses(), [b"403"])
        self.assertEqual(exchange.received(), b"nope")

    def test_interim_responses_are_not_relayed(self) -> None:
        exchange = WebSocketExchange()
        exchange.client.send_headers(1, CONNECT)
        exchange.pump()
        ((backend, transport),) = exchange.backends
        backend.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n" + switching(transport.value()))
        exchange.pump()
        self.assertEqual(exchange.statuses(), [b"200"])
        self.assertEqual(exchange.of(ResponseReceived)[0].stream_id, 1)

    def test_route_credentials_checked(self) -> None:
        rule = BasicAuthRule("ws", (("ann", hash_password("s3cret", log2_n=10)),))
        exchange = WebSocketExchange(gate=RequestGate(None, BasicAuth(rule, Runner())))
        exchange.client.send_headers(1, CONNECT)
        exchange.pump()
        self.assertEqual(exchange.statuses(), [b"401"])
        self.assertIn(b"www-authenticate", dict(exchange.of(ResponseReceived)[0].headers))
        self.assertEqual(exchange.backends, [])
        exchange.open(3, extra=((b"authorization", basic("ann", "s3cret")),))
        self.assertEqual(exchange.statuses(), [b"401", b"200"])

    def test_misdirected(self) -> None:
        exchange = WebSocketExchange()
        exchange.client.send_headers(1, [*CONNECT[:4], (b":authority", b"b.test"), CONNECT[5]])
        exchange.pump()
        self.assertEqual(exchange.statuses(), [b"421"])
        self.assertEqual(exchange.backends, [])
