"""h2c to backends (dcrouter.proxy.h2c), without sockets: forwarders on StringTransports whose requests go
over an H2cPool to a fake backend built from h2's server side, in memory — translation both ways, streams
multiplexed on one connection, SETTINGS_MAX_CONCURRENT_STREAMS (a second connection), flow control both
ways, GOAWAY, RST_STREAM before and after the response head, and the config checks."""

from __future__ import annotations

from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, RequestReceived, StreamEnded
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.proxy.forward import RouteCounters
from dcrouter.proxy.h2c import ChunkDecoder, H2cConnection, H2cPool, request_headers, response_head
from dcrouter.proxy.http import ForwardingPolicy, HttpBackend, HttpForwarder
from dcrouter.proxy.httpmessage import parse_request_head


class FakeBackend:
    """An h2 server on the far side of one H2cConnection's StringTransport."""

    def __init__(
        self, connection: H2cConnection, transport: StringTransport, settings: dict[int, int]
    ) -> None:
        self.connection = connection
        self.transport = transport
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings(settings)
        self.requests: dict[int, list[tuple[bytes, bytes]]] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.received = 0

    def pump(self) -> None:
        """Bytes both ways until neither side has more."""
        for _ in range(20):
            out = bytes(self.transport.value())
            self.transport.clear()
            if out:
                for event in self.h2.receive_data(out):
                    if isinstance(event, RequestReceived):
                        self.requests[event.stream_id] = list(event.headers)
                        self.bodies[event.stream_id] = b""
                    elif isinstance(event, DataReceived):
                        self.bodies[event.stream_id] += event.data
                        self.received += event.flow_controlled_length
                    elif isinstance(event, StreamEnded):
                        self.ended.add(event.stream_id)
            back = self.h2.data_to_send()
            if back:
                self.connection.dataReceived(back)
            if not out and not back:
                return

    def respond(self, stream_id: int, status: int = 200, body: bytes = b"", **fields: str) -> None:
        headers = [(b":status", str(status).encode())] + [
            (k.replace("_", "-").encode(), v.encode()) for k, v in fields.items()
        ]
        self.h2.send_headers(stream_id, headers, end_stream=not body)
        if body:
            self.h2.send_data(stream_id, body, end_stream=True)
        self.pump()


class Harness:
    def __init__(self, settings: dict[int, int] | None = None, reachable: bool = True) -> None:
        self.clock = Clock()
        self.pool = H2cPool(self.clock)
        self.settings = settings or {}
        self.reachable = reachable
        self.backends: list[FakeBackend] = []
        self.settle = True  # the backend's SETTINGS arrive as the connection opens

    def opener(self, factory: Any) -> Deferred[Any]:
        if not self.reachable:
            return succeed(None)
        connection = factory()
        connection.target = "t1"
        transport = StringTransport()
        connection.makeConnection(transport)
        backend = FakeBackend(connection, transport, self.settings)
        self.backends.append(backend)
        if self.settle:
            backend.pump()
        return succeed(connection)

    def client(self) -> tuple[HttpForwarder, StringTransport]:
        def acquire(forwarder: HttpForwarder) -> Any:
            return self.pool.stream(("t1", 80), HttpBackend(forwarder), self.opener)

        policy = ForwardingPolicy(
            client_ip="192.0.2.7",
            trust_forwarded=False,
            host_allowed=lambda h: h == "a.test",
            acquire=acquire,
        )
        forwarder = HttpForwarder(policy, connect=self.opener, counters=RouteCounters(), clock=self.clock)
        transport = StringTransport()
        forwarder.makeConnection(transport)
        return forwarder, transport


GET = (
    b"GET /one?x=1 HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
    b"Accept: */*\r\n\r\n"
)


def taken(transport: StringTransport) -> bytes:
    value = bytes(transport.value())
    transport.clear()
    return value


class TranslationTests(SynchronousTestCase):
    def test_request_headers(self) -> None:
        head = parse_request_head(GET + b"")
        headers = request_headers(head)
        self.assertEqual(
            headers[:4],
            [
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", b"a.test"),
                (b":path", b"/one?x=1"),
            ],
        )
        names = [name for name, _ in headers]
        self.assertIn(b"accept", names)
        for dropped in (b"host", b"connection", b"x-hop"):
            self.assertNotIn(dropped, names)

    def test_absolute_form(self) -> None:
        head = parse_request_head(b"GET http://b.test/p HTTP/1.1\r\nHost: a.test\r\nTE: trailers\r\n\r\n")
        headers = request_headers(head)
        self.assertIn((b":authority", b"b.test"), headers)
        self.assertIn((b":path", b"/p"), headers)
        self.assertIn((b"te", b"trailers"), headers)

    def test_response_head(self) -> None:
        head, chunked = response_head(200, [(b":status", b"200"), (b"x-a", b"1")], no_body=False)
        self.assertTrue(chunked)
        self.assertEqual(
            head, b"HTTP/1.1 200 OK\r\nx-a: 1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        head, chunked = response_head(204, [(b"content-length", b"0")], no_body=True)
        self.assertFalse(chunked)

    def test_chunk_decoder_byte_by_byte(self) -> None:
        decoder = ChunkDecoder()
        raw = b"3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n"
        out = b"".join(decoder.feed(raw[i : i + 1]) for i in range(len(raw)))
        self.assertEqual(out, b"abcd")
        self.assertTrue(decoder.done)


class ForwardingTests(SynchronousTestCase):
    def test_get_and_keep_alive_share_one_connection(self) -> None:
        h = Harness()
        forwarder, client = h.client()
        forwarder.dataReceived(GET)
        backend = h.backends[0]
        backend.pump()
        self.assertEqual(list(backend.requests), [1])
        headers = dict(backend.requests[1])
        self.assertEqual(headers[b":authority"], b"a.test")
        self.assertEqual(headers[b"x-forwarded-for"], b"192.0.2.7")
        self.assertIn(1, backend.ended)
        backend.respond(1, 200, b"hello", content_type="text/plain")
        out = taken(client)
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"), out)
        self.assertIn(b"content-type: text/plain", out.lower())
        self.assertTrue(out.endswith(b"5\r\nhello\r\n0\r\n\r\n"), out)
        self.assertNotIn(b"connection: close", out.lower())
        self.assertFalse(client.disconnecting)
        # The next request of the client, and another client's, go to the same backend connection.
        forwarder.dataReceived(GET)
        other, other_client = h.client()
        other.dataReceived(GET)
        backend.pump()
        self.assertEqual(len(h.backends), 1)
        self.assertEqual(sorted(backend.requests), [1, 3, 5])
        backend.respond(5, 200, b"x", content_length="1")
        self.assertTrue(taken(other_client).endswith(b"\r\n\r\nx"))
        backend.respond(3, 404)
        self.assertIn(b"404", taken(client))

    def test_chunked_request_body_and_flow_control(self) -> None:
        h = Harness({SettingCodes.INITIAL_WINDOW_SIZE: 10})
        forwarder, client = h.client()
        forwarder.dataReceived(b"POST /u HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n")
        backend = h.backends[0]
        forwarder.dataReceived(b"14\r\n" + b"a" * 20 + b"\r\n0\r\n\r\n")
        backend.pump()
        self.assertEqual(backend.bodies[1], b"a" * 10, "no more than the backend's window")
        self.assertNotIn(1, backend.ended)
        backend.h2.acknowledge_received_data(10, 1)
        backend.pump()
        self.assertEqual(backend.bodies[1], b"a" * 20)
        self.assertIn(1, backend.ended)
        backend.respond(1, 201)
        self.assertIn(b"201", taken(client))

    def test_response_acknowledged_as_the_client_takes_it(self) -> None:
        h = Harness()
        forwarder, client = h.client()
        forwarder.dataReceived(GET)
        backend = h.backends[0]
        backend.pump()
        stream = next(iter(h.backends[0].connection.streams.values()))
        stream.pauseProducing()  # what the forwarder does for a slow client
        window = backend.h2.local_flow_control_window(1)
        backend.h2.send_headers(1, [(b":status", b"200")])
        for _ in range(40):  # over half the window: h2 acknowledges from there
            backend.h2.send_data(1, b"z" * 16384)
        backend.pump()
        sent = 40 * 16384
        self.assertEqual(backend.h2.local_flow_control_window(1), window - sent, "not acknowledged")
        self.assertEqual(len(taken(client)) > sent, True)
        stream.resumeProducing()
        backend.pump()
        self.assertEqual(backend.h2.local_flow_control_window(1), window)

    def test_max_concurrent_streams_opens_another_connection(self) -> None:
        h = Harness({SettingCodes.MAX_CONCURRENT_STREAMS: 1})
        first, _ = h.client()
        second, second_client = h.client()
        first.dataReceived(GET)
        second.dataReceived(GET)
        self.assertEqual(len(h.backends), 2)
        for backend in h.backends:
            backend.pump()
            self.assertEqual(list(backend.requests), [1])
        h.backends[1].respond(1, 200, b"ok")
        self.assertIn(b"ok", taken(second_client))

    def test_goaway_finishes_in_flight_and_new_requests_get_a_new_connection(self) -> None:
        h = Harness()
        first, first_client = h.client()
        second, second_client = h.client()
        first.dataReceived(GET)
        second.dataReceived(GET)
        backend = h.backends[0]
        backend.pump()
        # Written by hand: h2's own server side sends nothing more after its GOAWAY, real servers do.
        goaway = GoAwayFrame(0)
        goaway.last_stream_id = 1
        goaway.error_code = 0
        backend.connection.dataReceived(goaway.serialize())
        self.assertIn(b"502", taken(second_client), "stream 3 was not processed")
        backend.respond(1, 200, b"fine")
        self.assertIn(b"fine", taken(first_client))
        self.assertTrue(backend.transport.disconnecting, "closed once its streams were done")
        third, _third_client = h.client()
        third.dataReceived(GET)
        self.assertEqual(len(h.backends), 2)

    def test_reset_before_head_is_502_after_is_abort(self) -> None:
        h = Harness()
        first, first_client = h.client()
        second, second_client = h.client()
        first.dataReceived(GET)
        second.dataReceived(GET)
        backend = h.backends[0]
        backend.pump()
        backend.h2.reset_stream(1, ErrorCodes.INTERNAL_ERROR)
        backend.pump()
        self.assertIn(b"HTTP/1.1 502", taken(first_client))
        backend.h2.send_headers(3, [(b":status", b"200")])
        backend.h2.send_data(3, b"part")
        backend.pump()
        backend.h2.reset_stream(3, ErrorCodes.INTERNAL_ERROR)
        backend.pump()
        self.assertIn(b"part", taken(second_client))
        self.assertTrue(second_client.disconnecting or second_client.disconnected)

    def test_client_leaving_cancels_the_stream(self) -> None:
        h = Harness()
        forwarder, _client = h.client()
        forwarder.dataReceived(GET)
        backend = h.backends[0]
        backend.pump()
        forwarder.connectionLost()
        backend.pump()
        self.assertEqual(backend.h2.open_inbound_streams, 0)
        self.assertFalse(backend.transport.disconnecting, "the connection stays for others")

    def test_unreachable_is_502(self) -> None:
        h = Harness(reachable=False)
        forwarder, client = h.client()
        forwarder.dataReceived(GET)
        self.assertIn(b"502", taken(client))

    def test_idle_connection_closed(self) -> None:
        h = Harness()
        forwarder, _client = h.client()
        forwarder.dataReceived(GET)
        backend = h.backends[0]
        backend.pump()
        backend.respond(1, 200, b"ok")
        h.clock.advance(h.pool.idle_timeout + 1)
        self.assertTrue(backend.transport.disconnecting)

    def test_requests_wait_for_the_first_settings_on_one_connection(self) -> None:
        h = Harness()
        h.settle = False
        clients = [h.client() for _ in range(3)]
        for forwarder, _ in clients:
            forwarder.dataReceived(GET)
        self.assertEqual(len(h.backends), 1, "no second connection while the first settles")
        backend = h.backends[0]
        backend.pump()
        self.assertEqual(sorted(backend.requests), [1, 3, 5])

    def test_no_settings_is_502(self) -> None:
        h = Harness()
        h.settle = False
        forwarder, client = h.client()
        forwarder.dataReceived(GET)
        connection = h.backends[0].connection
        h.clock.advance(10)
        self.assertTrue(h.backends[0].transport.disconnecting)
        connection.connectionLost()
        self.assertIn(b"HTTP/1.1 502", taken(client))

    def test_response_before_the_request_body_ended_closes_the_stream(self) -> None:
        h = Harness()
        forwarder, client = h.client()
        forwarder.dataReceived(b"POST /u HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\n\r\nabc")
        backend = h.backends[0]
        backend.pump()
        backend.respond(1, 413, b"no")
        self.assertIn(b"413", taken(client))
        connection = backend.connection
        self.assertEqual(connection.h2.open_outbound_streams, 0, "not left counting against the limit")

    def test_limits_in_a_later_settings_frame_of_the_same_read_apply(self) -> None:
        h = Harness({SettingCodes.MAX_CONCURRENT_STREAMS: 1})
        h.settle = False
        clients = [h.client() for _ in range(2)]
        for forwarder, _ in clients:
            forwarder.dataReceived(GET)
        first = h.backends[0]
        first.pump()  # its initial SETTINGS and then one with the limit, in one read
        self.assertEqual(first.connection.h2.open_outbound_streams, 1)
        self.assertEqual(len(h.backends), 2, "the second request on a second connection")


class PoolOpenerTests(SynchronousTestCase):
    """A connection opened with one waiting request's opener that fails fails that request only."""

    def test_a_failed_opener_fails_its_own_request_not_the_next(self) -> None:
        pool = H2cPool(Clock())
        opened: dict[str, Deferred[Any]] = {}

        def opener(name: str) -> Any:
            def open_(factory: Any) -> Deferred[Any]:
                opened[name] = Deferred()
                return opened[name]

            return open_

        first = pool.stream(("a", 80), object(), opener("first"))
        second = pool.stream(("a", 80), object(), opener("second"))
        self.assertEqual(list(opened), ["first"])  # one connection opening at a time
        # The first request is served elsewhere meanwhile (say, its client left and it was dropped): only its
        # own entry may fail, and here it is gone, so the second goes on with its own opener.
        waiting = pool._waiting[("a", 80)]
        del waiting[0]
        opened["first"].callback(None)
        self.assertFalse(second.called)
        self.assertEqual(list(opened), ["first", "second"])
        opened["second"].callback(None)
        self.assertIsNone(self.successResultOf(second))
        self.assertNoResult(first)
