"""HTTP/2 framing and protections in memory: ``h2``'s client-side connection object talks to
:class:`Http2Connection` over a StringTransport; each stream is served by a small HTTP/1.1 front that
records the request it was given and answers what the test says. Abuse (rapid reset, CONTINUATION floods,
PING and SETTINGS floods, too many streams, oversized header lists) is crafted with the same client."""

from __future__ import annotations

from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from hyperframe.frame import ContinuationFrame, HeadersFrame
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from dcrouter.proxy.forward import RouteCounters
from dcrouter.proxy.http import BackendPool, ForwardingPolicy, HttpBackend, HttpForwarder
from dcrouter.proxy.http2 import HeaderBlockMeter, Http2Connection, Http2Limits, request_head
from dcrouter.proxy.httpmessage import HttpError
from dcrouter.proxy.routes import FieldChanges

REQUEST = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"), (b":path", b"/x")]


class Front(Protocol):
    """An HTTP/1.1 front: keeps what it is given, answers ``answer`` once the request head is in (and, with
    ``wait_body``, once a chunked body ended), then closes as a ``Connection: close`` exchange does."""

    def __init__(self, answer: bytes, wait_body: bool = False) -> None:
        self.answer = answer
        self.wait_body = wait_body
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        done = b"0\r\n\r\n" in self.received if self.wait_body else b"\r\n\r\n" in self.received
        if done and self.answer:
            answer, self.answer = self.answer, b""
            self.transport.write(answer)
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class Exchange:
    """An h2 client and the proxy's HTTP/2 connection over in-memory transports."""

    def __init__(
        self,
        answer: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        *,
        websockets: bool = True,
        **limits: Any,
    ) -> None:
        self.clock = Clock()
        self.fronts: list[Front] = []
        self.answer = answer
        self.wait_body = False
        self.server = Http2Connection(
            self._front, clock=self.clock, limits=Http2Limits(**limits), websockets=websockets
        )
        self.transport = StringTransport()
        self.server.makeConnection(self.transport)
        self.client = H2Connection(config=H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        self.events: list[Any] = []
        self.pump()

    def _front(self) -> Front:
        front = Front(self.answer, self.wait_body)
        self.fronts.append(front)
        return front

    def pump(self, raw: bytes = b"") -> list[Any]:
        """Send the client's pending bytes (and ``raw``), deliver the server's; the client's new events."""
        for _ in range(5):
            data = self.client.data_to_send() + raw
            raw = b""
            if data and not self.server.closed:
                self.server.dataReceived(data)
            self.clock.advance(0)
            out = self.transport.value()
            self.transport.clear()
            if not out and not data:
                break
            if out:
                self.events += self.client.receive_data(out)
        return self.events

    def of(self, kind: type) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]


class FramingTests(TestCase):
    def test_get(self) -> None:
        exchange = Exchange()
        exchange.client.send_headers(1, [*REQUEST, (b"cookie", b"a=1"), (b"cookie", b"b=2")], end_stream=True)
        exchange.pump()
        (front,) = exchange.fronts
        self.assertEqual(
            front.received,
            b"GET /x HTTP/1.1\r\nHost: a.test\r\nCookie: a=1; b=2\r\nConnection: close\r\n\r\n",
        )
        (response,) = exchange.of(ResponseReceived)
        self.assertEqual(dict(response.headers)[b":status"], b"200")
        self.assertEqual(b"".join(e.data for e in exchange.of(DataReceived)), b"ok")
        self.assertEqual([e.stream_id for e in exchange.of(StreamEnded)], [1])
        self.assertTrue(front.lost)
        self.assertEqual(exchange.server.streams, {})

    def test_chunked_response_and_connection_fields(self) -> None:
        exchange = Exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\n"
            b"Keep-Alive: 5\r\nX-Kept: yes\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        exchange.client.send_headers(1, REQUEST, end_stream=True)
        exchange.pump()
        (response,) = exchange.of(ResponseReceived)
        self.assertEqual(response.headers, [(b":status", b"200"), (b"x-kept", b"yes")])
        self.assertEqual(b"".join(e.data for e in exchange.of(DataReceived)), b"abcde")
        self.assertEqual(len(exchange.of(StreamEnded)), 1)

    def test_request_body_chunked(self) -> None:
        exchange = Exchange()
        exchange.wait_body = True
        post = [(b":method", b"POST"), *REQUEST[1:]]
        exchange.client.send_headers(1, post)
        exchange.client.send_data(1, b"hello")
        exchange.client.send_data(1, b" world", end_stream=True)
        exchange.pump()
        (front,) = exchange.fronts
        self.assertTrue(front.received.startswith(b"POST /x HTTP/1.1\r\n"), front.received)
        self.assertIn(b"Transfer-Encoding: chunked\r\n", front.received)
        self.assertTrue(front.received.endswith(b"\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"))
        self.assertEqual(len(exchange.of(StreamEnded)), 1)

    def test_streams_concurrently(self) -> None:
        exchange = Exchange()
        for stream in (1, 3, 5):
            exchange.client.send_headers(stream, REQUEST, end_stream=True)
        exchange.pump()
        self.assertEqual(len(exchange.fronts), 3)
        self.assertEqual(sorted(e.stream_id for e in exchange.of(StreamEnded)), [1, 3, 5])

    def test_large_response_respects_flow_control(self) -> None:
        body = b"x" * 200_000
        exchange = Exchange(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        exchange.client.send_headers(1, REQUEST, end_stream=True)
        exchange.pump()
        received = b"".join(e.data for e in exchange.of(DataReceived))
        # The client's default window is 65535: no more until it acknowledges.
        self.assertEqual(len(received), 65_535)
        for _ in range(10):
            for event in exchange.of(DataReceived):
                if not getattr(event, "acked", False):
                    exchange.client.acknowledge_received_data(event.flow_controlled_length, 1)
                    event.acked = True
            exchange.pump()
        self.assertEqual(b"".join(e.data for e in exchange.of(DataReceived)), body)
        self.assertEqual(len(exchange.of(StreamEnded)), 1)

    def test_malformed_fields_answered_400(self) -> None:
        for headers in (
            [*REQUEST, (b"x-bad", b"a\r\nX-Injected: 1")],
            [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/x")],
        ):
            with self.assertRaises(HttpError):
                request_head(headers, ended=True)
        exchange = Exchange()
        exchange.client.send_headers(1, [*REQUEST, (b"x-bad", b"a\nb")], end_stream=True)
        exchange.pump()
        self.assertEqual(exchange.fronts, [])
        # h2 itself refuses such a field (a stream error) or we answer 400: no front sees it either way.
        statuses = [dict(e.headers)[b":status"] for e in exchange.of(ResponseReceived)]
        ended = exchange.of(StreamReset) or exchange.of(ConnectionTerminated)
        self.assertTrue(statuses == [b"400"] or ended, exchange.events)

    def test_what_h2_would_have_refused_is_refused_here(self) -> None:
        # h2's own header validation is off (for speed): request_head is the whole check.
        get, scheme, authority, path = REQUEST
        for headers in (
            [*REQUEST, (b"X-Upper", b"1")],
            [*REQUEST, (b"x-space", b" padded")],
            [*REQUEST, (b"x-space", b"padded\t")],
            [*REQUEST, (b"x-nul", b"a\x00b")],
            [*REQUEST, (b"connection", b"close")],
            [*REQUEST, (b"transfer-encoding", b"chunked")],
            [*REQUEST, (b"upgrade", b"websocket")],
            [*REQUEST, (b"te", b"gzip")],
            [*REQUEST, (b"host", b"a.test"), (b"host", b"a.test")],
            [*REQUEST, (b"host", b"b.test")],
            [get, scheme, authority, path, (b":path", b"/y")],
            [get, scheme, authority, (b"x-a", b"1"), path],
            [*REQUEST, (b":protocol", b"websocket")],
            [get, authority, path],
            [get, scheme, authority, (b":path", b"")],
        ):
            with self.assertRaises(HttpError, msg=repr(headers)):
                request_head(headers, ended=True)
        head, _, _ = request_head([*REQUEST, (b"te", b"trailers"), (b"host", b"a.test")], ended=True)
        self.assertEqual(head, b"GET /x HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")

    def test_a_malformed_stream_leaves_the_others(self) -> None:
        exchange = Exchange()
        exchange.client.config.validate_outbound_headers = False  # a client sending what h2 would not
        exchange.client.config.normalize_outbound_headers = False
        exchange.client.send_headers(1, [*REQUEST, (b"x-space", b" padded")], end_stream=True)
        exchange.client.send_headers(3, REQUEST, end_stream=True)
        exchange.pump()
        statuses = sorted(dict(e.headers)[b":status"] for e in exchange.of(ResponseReceived))
        self.assertEqual(statuses, [b"200", b"400"])
        self.assertEqual(len(exchange.fronts), 1)

    def test_connect_refused(self) -> None:
        with self.assertRaises(HttpError) as caught:
            request_head([(b":method", b"CONNECT"), (b":authority", b"a.test:443")], ended=False)
        self.assertEqual(caught.exception.status, 501)

    def test_backend_closing_early_resets_the_stream(self) -> None:
        exchange = Exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        exchange.client.send_headers(1, REQUEST, end_stream=True)
        exchange.pump()
        (reset,) = exchange.of(StreamReset)
        self.assertEqual(reset.error_code, ErrorCodes.INTERNAL_ERROR)

    def test_idle_connection_goes_away(self) -> None:
        exchange = Exchange(idle_timeout=30.0)
        exchange.clock.advance(31)
        exchange.pump()
        (gone,) = exchange.of(ConnectionTerminated)
        self.assertEqual(gone.error_code, ErrorCodes.NO_ERROR)
        self.assertTrue(exchange.transport.disconnecting)


class ProtectionTests(TestCase):
    def assertCalmed(self, exchange: Exchange) -> None:
        terminated = exchange.of(ConnectionTerminated)
        self.assertEqual([t.error_code for t in terminated], [ErrorCodes.ENHANCE_YOUR_CALM], exchange.events)
        self.assertTrue(exchange.transport.disconnecting)

    def test_rapid_reset(self) -> None:
        exchange = Exchange(answer=b"", max_resets=10, window=10.0)
        for i in range(11):
            stream = 1 + 2 * i
            exchange.client.send_headers(stream, REQUEST, end_stream=True)
            exchange.client.reset_stream(stream)
        exchange.pump()
        self.assertCalmed(exchange)
        self.assertIn("reset", exchange.server.goaway or "")
        exchange.server.connectionLost()
        self.assertTrue(all(front.lost for front in exchange.fronts))

    def test_resets_spread_over_time_are_fine(self) -> None:
        exchange = Exchange(answer=b"", max_resets=10, window=10.0)
        for i in range(30):
            stream = 1 + 2 * i
            exchange.client.send_headers(stream, REQUEST, end_stream=True)
            exchange.client.reset_stream(stream)
            exchange.pump()
            exchange.clock.advance(2)
        self.assertEqual(exchange.of(ConnectionTerminated), [])

    def test_ping_flood(self) -> None:
        exchange = Exchange(max_control_frames=20)
        for i in range(25):
            exchange.client.ping(b"%08d" % i)
        exchange.pump()
        self.assertCalmed(exchange)

    def test_settings_flood(self) -> None:
        exchange = Exchange(max_control_frames=20)
        for _ in range(25):
            exchange.client.update_settings({4: 65535})
        exchange.pump()
        self.assertCalmed(exchange)

    def test_continuation_flood(self) -> None:
        exchange = Exchange(max_header_block_bytes=4096)
        frames = HeadersFrame(1, flags=["END_STREAM"])
        frames.data = exchange.client.encoder.encode(REQUEST)
        raw = frames.serialize()
        for _ in range(10):
            continuation = ContinuationFrame(1)
            continuation.data = b"\x00" * 1000  # never ends the block
            raw += continuation.serialize()
        exchange.pump(raw)
        self.assertCalmed(exchange)
        self.assertEqual(exchange.fronts, [])

    def test_header_block_meter_counts_across_reads(self) -> None:
        meter = HeaderBlockMeter(100)
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        headers = (60).to_bytes(3, "big") + bytes([1, 0]) + (1).to_bytes(4, "big") + b"h" * 60
        continuation = (50).to_bytes(3, "big") + bytes([9, 4]) + (1).to_bytes(4, "big") + b"c" * 50
        stream = preface + headers + continuation
        with self.assertRaises(ValueError):
            for byte in range(len(stream)):
                meter.feed(stream[byte : byte + 1])
        # Ended within the bound, the next block starts from zero.
        meter = HeaderBlockMeter(100)
        ended = (60).to_bytes(3, "big") + bytes([1, 4]) + (1).to_bytes(4, "big") + b"h" * 60
        meter.feed(preface + ended + ended)

    def test_too_many_concurrent_streams(self) -> None:
        exchange = Exchange(answer=b"", max_concurrent_streams=5)
        exchange.pump()
        for i in range(6):  # crafted: h2's client would itself refuse a sixth stream
            frame = HeadersFrame(1 + 2 * i, flags=["END_STREAM", "END_HEADERS"])
            frame.data = exchange.client.encoder.encode(REQUEST)
            exchange.server.dataReceived(frame.serialize())
        self.assertEqual(len(exchange.fronts), 5)
        self.assertTrue(exchange.server.closed or exchange.transport.disconnecting)

    def test_header_list_size(self) -> None:
        exchange = Exchange(max_header_list_size=1024, max_header_block_bytes=64 * 1024)
        exchange.pump()
        exchange.client.remote_settings.max_header_list_size = 10**6  # a client ignoring our setting
        exchange.client.send_headers(1, [*REQUEST, (b"x-big", b"v" * 4000)], end_stream=True)
        exchange.pump()
        self.assertEqual(exchange.fronts, [])
        self.assertTrue(exchange.of(ConnectionTerminated) or exchange.of(StreamReset), exchange.events)

    def test_receive_windows(self) -> None:
        exchange = Exchange(initial_window_size=200_000)
        self.assertEqual(exchange.client.outbound_flow_control_window, 65_535 + 200_000)
        self.assertEqual(exchange.client.remote_settings.initial_window_size, 200_000)


class ForwarderTests(TestCase):
    """Streams served by the real HTTP/1.1 forwarder (sharing a backend pool): it takes the request head
    parsed and gives the response head parsed, and what reaches the backend and the client is what the
    HTTP/1.1 bytes would have given."""

    def exchange(self, **options: Any) -> tuple[Exchange, list[tuple[HttpBackend, StringTransport]]]:
        backends: list[tuple[HttpBackend, StringTransport]] = []

        def connect(factory: Any) -> Deferred[Any]:
            backend = factory()
            transport = StringTransport()
            backend.makeConnection(transport)
            backends.append((backend, transport))
            return succeed(backend)

        exchange = Exchange()
        pool = BackendPool(connect)
        policy = ForwardingPolicy(
            client_ip="192.0.2.7",
            trust_forwarded=False,
            host_allowed=lambda host: host == "a.test",
            pool=pool,
            **options,
        )
        clock = exchange.clock

        def front() -> HttpForwarder:
            forwarder = HttpForwarder(policy, connect=pool.connector, counters=RouteCounters(), clock=clock)
            exchange.fronts.append(forwarder)  # type: ignore[arg-type]
            return forwarder

        exchange.server._make_front = front
        return exchange, backends

    def test_request_and_response_through_the_forwarder(self) -> None:
        exchange, backends = self.exchange(
            request_fields=FieldChanges(set_fields=((b"X-Added", b"1"),), remove=frozenset({b"x-drop"})),
            response_fields=FieldChanges(set_fields=((b"X-Resp", b"2"),), remove=frozenset({b"server"})),
        )
        exchange.client.send_headers(
            1,
            [*REQUEST, (b"cookie", b"a=1"), (b"x-drop", b"1"), (b"cookie", b"b=2"), (b"accept", b"*/*")],
            end_stream=True,
        )
        exchange.pump()
        ((backend, transport),) = backends
        self.assertEqual(
            transport.value(),
            b"GET /x HTTP/1.1\r\nHost: a.test\r\naccept: */*\r\nCookie: a=1; b=2\r\nX-Added: 1\r\n"
            b"X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: https\r\n\r\n",
        )
        backend.dataReceived(
            b"HTTP/1.1 200 OK\r\nServer: x\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\n"
            b"Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        exchange.pump()
        (response,) = exchange.of(ResponseReceived)
        self.assertEqual(
            response.headers, [(b":status", b"200"), (b"content-type", b"text/plain"), (b"x-resp", b"2")]
        )
        self.assertEqual(b"".join(e.data for e in exchange.of(DataReceived)), b"abc")
        self.assertEqual(len(exchange.of(StreamEnded)), 1)
        # The backend connection went back to the pool: the next stream takes it.
        exchange.client.send_headers(3, REQUEST, end_stream=True)
        exchange.pump()
        self.assertEqual(len(backends), 1)

    def test_refusals_as_over_http1(self) -> None:
        exchange, backends = self.exchange()
        exchange.client.send_headers(
            1, [*REQUEST[:2], (b":authority", b"b.test"), REQUEST[3]], end_stream=True
        )
        many = [*REQUEST, *((b"x-f%d" % i, b"v") for i in range(120))]
        exchange.client.send_headers(3, many, end_stream=True)
        exchange.pump()
        statuses = sorted(dict(e.headers)[b":status"] for e in exchange.of(ResponseReceived))
        self.assertEqual(statuses, [b"421", b"431"])
        self.assertEqual(backends, [])

    def test_request_body_and_interim_response(self) -> None:
        exchange, backends = self.exchange()
        exchange.client.send_headers(1, [*REQUEST[:1], *REQUEST[1:]], end_stream=False)
        exchange.client.send_data(1, b"hello", end_stream=True)
        exchange.pump()
        ((backend, transport),) = backends
        self.assertTrue(transport.value().endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), transport.value())
        self.assertIn(b"Transfer-Encoding: chunked\r\n", transport.value())
        backend.dataReceived(b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n")
        backend.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        exchange.pump()
        heads = [e.headers for e in exchange.of(ResponseReceived)] + [
            e.headers for e in exchange.of(InformationalResponseReceived)
        ]
        self.assertIn([(b":status", b"204")], heads)
        self.assertIn([(b":status", b"103"), (b"link", b"</s>")], heads)
        self.assertEqual(len(exchange.of(StreamEnded)), 1)
