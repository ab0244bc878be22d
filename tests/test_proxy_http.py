"""HTTP/1.1 on terminated routes, without sockets: the strict head parser and body framing
(dcrouter.proxy.httpmessage: byte-exact, hostile inputs, Hypothesis for splits), the forwarder's request
cycle (dcrouter.proxy.http.HttpForwarder on StringTransports: keep-alive, 421, 400 and close, 502, HEAD,
WebSocket upgrade, flow control) and the plain-HTTP side (redirects and ACME challenges)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.acme.challenges import ChallengeResponder
from dcrouter.proxy.forward import RouteCounters
from dcrouter.proxy.http import ForwardingPolicy, HttpBackend, HttpForwarder, HttpRedirect, PauseGate
from dcrouter.proxy.httpmessage import (
    ChunkedBody,
    HeadBuffer,
    HttpError,
    LengthBody,
    forwarded_request_head,
    parse_request_head,
    parse_response_head,
    request_framing,
    response_framing,
)


def request(raw: bytes) -> Any:
    return parse_request_head(raw)


class HeadBufferTests(SynchronousTestCase):
    def test_byte_by_byte(self) -> None:
        raw = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\nNEXT"
        buffer = HeadBuffer()
        results = [buffer.feed(raw[i : i + 1]) for i in range(len(raw) - 4)]
        self.assertEqual(results[:-1], [None] * (len(results) - 1))
        self.assertEqual(results[-1], (raw[:-4], b""))

    def test_rest_is_kept(self) -> None:
        self.assertEqual(
            HeadBuffer().feed(b"GET / HTTP/1.1\r\n\r\nbody"), (b"GET / HTTP/1.1\r\n\r\n", b"body")
        )

    def test_leading_empty_lines_are_skipped(self) -> None:
        buffer = HeadBuffer()
        self.assertIsNone(buffer.feed(b"\r"))
        self.assertEqual(buffer.feed(b"\n\r\nGET / HTTP/1.1\r\n\r\n"), (b"GET / HTTP/1.1\r\n\r\n", b""))

    def test_bare_line_ends_refused_at_once(self) -> None:
        for raw in (b"GET / HTTP/1.1\nHost: a", b"GET / HTTP/1.1\r\nHost: a\rX: b", b"GET /\n"):
            with self.assertRaises(HttpError) as caught:
                HeadBuffer().feed(raw)
            self.assertEqual(caught.exception.status, 400, raw)

    def test_too_long(self) -> None:
        buffer = HeadBuffer(max_bytes=64)
        with self.assertRaises(HttpError) as caught:
            buffer.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 100)
        self.assertEqual(caught.exception.status, 431)


class RequestHeadTests(SynchronousTestCase):
    def test_parses(self) -> None:
        head = request(b"POST /x?y HTTP/1.1\r\nHost: a.test\r\nX-A:  v 1 \r\nx-a: v2\r\n\r\n")
        self.assertEqual((head.method, head.target, head.version), (b"POST", b"/x?y", b"HTTP/1.1"))
        self.assertEqual(head.fields.get_all(b"x-a"), [b"v 1", b"v2"])
        self.assertTrue(head.keep_alive)

    def test_hostile_heads(self) -> None:
        cases = {
            b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n": 400,  # obs-fold
            b"GET / HTTP/1.1\r\nHost : a\r\n\r\n": 400,  # whitespace before the colon
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n": 400,
            b"GET / HTTP/1.1\r\nX: y\r\n\r\n": 400,  # no Host
            b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n": 400,
            b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n": 400,
            b"GET / HTTP/2.0\r\nHost: a\r\n\r\n": 505,
            b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n": 400,
            b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n": 405,
        }
        for raw, status in cases.items():
            with self.assertRaises(HttpError, msg=raw) as caught:
                request(raw)
            self.assertEqual(caught.exception.status, status, raw)


class FramingTests(SynchronousTestCase):
    def framing(self, fields: bytes, version: bytes = b"HTTP/1.1") -> Any:
        return request_framing(request(b"POST / " + version + b"\r\nHost: a\r\n" + fields + b"\r\n"))

    def test_request_framing(self) -> None:
        self.assertEqual(self.framing(b"").kind, "none")
        self.assertEqual(self.framing(b"Content-Length: 12\r\n").length, 12)
        self.assertEqual(self.framing(b"Transfer-Encoding: Chunked\r\n").kind, "chunked")

    def test_smuggling_shapes_refused(self) -> None:
        cases = {
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n": 400,
            b"Content-Length: 5\r\nContent-Length: 5\r\n": 400,
            b"Content-Length: 5\r\nContent-Length: 6\r\n": 400,
            b"Content-Length: 5, 5\r\n": 400,
            b"Content-Length: +5\r\n": 400,
            b"Content-Length: 0x5\r\n": 400,
            b"Transfer-Encoding: chunked, gzip\r\n": 400,
            b"Transfer-Encoding: gzip, chunked\r\n": 501,
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n": 400,
        }
        for fields, status in cases.items():
            with self.assertRaises(HttpError, msg=fields) as caught:
                self.framing(fields)
            self.assertEqual(caught.exception.status, status, fields)
        with self.assertRaises(HttpError):
            self.framing(b"Transfer-Encoding: chunked\r\n", b"HTTP/1.0")

    def test_response_framing(self) -> None:
        def framing(method: bytes, raw: bytes) -> str:
            return response_framing(method, parse_response_head(raw)).kind

        self.assertEqual(framing(b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"), "none")
        self.assertEqual(framing(b"GET", b"HTTP/1.1 204 No Content\r\n\r\n"), "none")
        self.assertEqual(framing(b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"), "none")
        self.assertEqual(framing(b"GET", b"HTTP/1.1 100 Continue\r\n\r\n"), "none")
        self.assertEqual(framing(b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"), "chunked")
        self.assertEqual(framing(b"GET", b"HTTP/1.0 200 OK\r\n\r\n"), "close")
        with self.assertRaises(HttpError) as caught:
            framing(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(caught.exception.status, 502)

    def test_length_body(self) -> None:
        body = LengthBody(5)
        self.assertEqual(body.feed(b"abc"), (b"abc", b""))
        self.assertEqual(body.feed(b"deGET"), (b"de", b"GET"))
        self.assertTrue(body.done)


def chunked(pieces: list[bytes], trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n" + trailer + b"\r\n"


def decode(encoded: bytes) -> tuple[bytes, bytes]:
    """Reference decoder of canonical chunked bytes: (data, rest)."""
    data, i = b"", 0
    while True:
        end = encoded.index(b"\r\n", i)
        size = int(encoded[i:end], 16)
        i = end + 2
        if size == 0:
            assert encoded[i : i + 2] == b"\r\n"
            return data, encoded[i + 2 :]
        data += encoded[i : i + size]
        assert encoded[i + size : i + size + 2] == b"\r\n"
        i += size + 2


class ChunkedBodyTests(SynchronousTestCase):
    def test_canonical_output_and_rest(self) -> None:
        body = ChunkedBody()
        out, rest = body.feed(b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\nGET /")
        self.assertEqual((out, rest, body.done), (b"5\r\nhello\r\n0\r\n\r\n", b"GET /", True))

    def test_hostile_chunks(self) -> None:
        for raw in (
            b"0x5\r\nhello\r\n",
            b" 5\r\nhello\r\n",
            b"5 \r\nhello\r\n",
            b"-1\r\n",
            b"g\r\n",
            b"1000000000000000\r\n",  # 16 hex digits: more than any body
            b"5\nhello\r\n",
            b"5\r\nhelloXX\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"0\r\nbad trailer\r\n\r\n",
            b"5;\x00\r\nhello\r\n",
        ):
            with self.assertRaises(HttpError, msg=raw) as caught:
                ChunkedBody().feed(raw)
            self.assertEqual(caught.exception.status, 400, raw)

    def test_long_size_line_refused_before_its_end(self) -> None:
        with self.assertRaises(HttpError):
            ChunkedBody().feed(b"5;" + b"x" * 5000)

    @given(
        st.lists(st.binary(min_size=1, max_size=40), max_size=8),
        st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=50),
        st.binary(max_size=10),
    )
    def test_any_split_decodes_the_same(self, pieces: list[bytes], cuts: list[int], after: bytes) -> None:
        wire = chunked(pieces) + after
        body, out, rest, i = ChunkedBody(), b"", b"", 0
        for cut in cuts * (len(wire) // len(cuts) + 1):
            if i >= len(wire):
                break
            piece, rest = body.feed(wire[i : i + cut])
            out += piece
            i += cut
            if body.done:
                rest += wire[i:]
                break
        self.assertTrue(body.done)
        self.assertEqual(decode(out), (b"".join(pieces), b""))
        self.assertEqual(rest, after)


class ForwardedHeadTests(SynchronousTestCase):
    raw = (
        b"GET /p HTTP/1.1\r\nHost: a.test:443\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: http\r\n"
        b"Connection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\nAccept: */*\r\n\r\n"
    )

    def test_untrusted(self) -> None:
        out = forwarded_request_head(request(self.raw), client_ip="192.0.2.7", trust_forwarded=False)
        self.assertEqual(
            out,
            b"GET /p HTTP/1.1\r\nHost: a.test:443\r\nAccept: */*\r\nX-Forwarded-For: 192.0.2.7\r\n"
            b"X-Forwarded-Proto: https\r\n\r\n",
        )

    def test_trusted_appends(self) -> None:
        out = forwarded_request_head(request(self.raw), client_ip="192.0.2.7", trust_forwarded=True)
        self.assertIn(b"X-Forwarded-For: 6.6.6.6, 192.0.2.7\r\n", out)

    def test_websocket_keeps_upgrade(self) -> None:
        raw = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        out = forwarded_request_head(request(raw), client_ip="::1", trust_forwarded=False)
        self.assertTrue(out.endswith(b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"), out)


# --- the forwarder -----------------------------------------------------------------------------------------


class Harness:
    """A forwarder on a StringTransport whose backends are StringTransports too, connected on demand."""

    def __init__(self, *, sni: str | None = "a.test", reachable: bool = True, **options: Any) -> None:
        self.clock = Clock()
        self.counters = RouteCounters()
        self.backends: list[tuple[HttpBackend, StringTransport]] = []
        self.reachable = reachable
        policy = ForwardingPolicy(
            client_ip="192.0.2.7", trust_forwarded=False, host_allowed=lambda host: host == sni, **options
        )
        self.forwarder = HttpForwarder(policy, connect=self.connect, counters=self.counters, clock=self.clock)
        self.client = StringTransport()
        self.forwarder.makeConnection(self.client)

    def connect(self, factory: Any) -> Deferred[Any]:
        if not self.reachable:
            return succeed(None)
        backend = factory()
        transport = StringTransport()
        backend.makeConnection(transport)
        self.backends.append((backend, transport))
        return succeed(backend)

    def send(self, data: bytes) -> None:
        self.forwarder.dataReceived(data)

    def answer(self, data: bytes, index: int = -1) -> None:
        self.backends[index][0].dataReceived(data)

    def to_backend(self, index: int = -1) -> bytes:
        value = self.backends[index][1].value()
        self.backends[index][1].clear()
        return bytes(value)

    def to_client(self) -> bytes:
        value = self.client.value()
        self.client.clear()
        return bytes(value)


GET = b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class ForwarderTests(SynchronousTestCase):
    def test_reading_pauses_only_for_a_pipelined_request(self) -> None:
        h = Harness()
        h.send(GET)
        self.assertEqual(h.client.producerState, "producing", "no pause and resume per request")
        h.send(b"GET /two HTTP/1.1\r\n")
        self.assertEqual(h.client.producerState, "paused", "a next request waits, and nothing more is read")
        self.assertTrue(h.to_backend().startswith(b"GET /one "))
        h.answer(OK)
        self.assertEqual(h.to_client(), OK)
        self.assertEqual(h.client.producerState, "producing")
        h.send(b"Host: a.test\r\n\r\n")
        self.assertTrue(h.to_backend().startswith(b"GET /two HTTP/1.1\r\nHost: a.test\r\n"))

    def test_response_head_and_body_in_one_write(self) -> None:
        h = Harness()
        h.send(GET)
        h.client.clear()
        writes: list[bytes] = []
        original = h.client.write
        h.client.write = lambda data: (writes.append(data), original(data))  # type: ignore[method-assign]
        h.answer(OK)
        self.assertEqual(writes, [OK])

    def test_two_requests_on_one_connection(self) -> None:
        h = Harness()
        h.send(GET + b"GET /two HTTP/1.1\r\nHost: A.TEST.\r\n\r\n")
        self.assertEqual(
            h.to_backend(),
            b"GET /one HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 192.0.2.7\r\n"
            b"X-Forwarded-Proto: https\r\n\r\n",
        )
        self.assertEqual(h.client.producerState, "paused", "nothing more is read until the response")
        h.answer(OK)
        self.assertEqual(h.to_client(), OK)
        self.assertTrue(h.to_backend().startswith(b"GET /two HTTP/1.1\r\nHost: A.TEST.\r\n"))
        h.answer(OK)
        self.assertEqual(h.to_client(), OK)
        self.assertEqual(len(h.backends), 1)
        self.assertEqual(h.client.producerState, "producing")
        self.assertEqual(h.forwarder.requests, 2)
        self.assertFalse(h.client.disconnecting)

    def test_misdirected(self) -> None:
        h = Harness()
        h.send(b"GET / HTTP/1.1\r\nHost: b.test\r\n\r\n")
        response = h.to_client()
        self.assertTrue(response.startswith(b"HTTP/1.1 421 Misdirected Request\r\n"), response)
        self.assertTrue(h.client.disconnecting)
        self.assertEqual(h.backends, [])

    def test_cl_and_te_refused_and_closed(self) -> None:
        h = Harness()
        h.send(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(
            h.to_client(),
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 12\r\n"
            b"Connection: close\r\n\r\nBad Request\n",
        )
        self.assertTrue(h.client.disconnecting)
        self.assertEqual(h.backends, [])

    def test_chunked_request_streams_and_is_reencoded(self) -> None:
        h = Harness()
        h.send(b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n4;x\r\nab")
        self.assertTrue(h.to_backend().endswith(b"\r\n\r\n2\r\nab\r\n"))
        h.send(b"cd\r\n0\r\n\r\n")
        self.assertEqual(h.to_backend(), b"2\r\ncd\r\n0\r\n\r\n")
        h.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n")
        self.assertEqual(
            h.to_client(), b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n"
        )

    def test_bad_chunk_after_the_head_went_out(self) -> None:
        h = Harness()
        h.send(b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        self.assertTrue(h.to_client().startswith(b"HTTP/1.1 400 "))
        self.assertTrue(h.backends[0][1].disconnecting, "the half-sent request is dropped with its backend")

    def test_head_and_no_content(self) -> None:
        h = Harness()
        h.send(b"HEAD / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        self.assertEqual(h.to_client(), b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        h.send(GET)
        h.answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(h.to_client(), b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
        self.assertFalse(h.client.disconnecting)

    def test_response_until_close(self) -> None:
        h = Harness()
        h.send(GET)
        h.answer(b"HTTP/1.0 200 OK\r\n\r\npart")
        h.backends[0][0].connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(h.to_client(), b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\npart")
        self.assertTrue(h.client.disconnecting)

    def test_backend_not_persistent_reconnects(self) -> None:
        h = Harness()
        h.send(GET)
        h.answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(h.to_client(), OK)
        self.assertTrue(h.backends[0][1].disconnecting)
        h.send(GET)
        self.assertEqual(len(h.backends), 2)

    def test_no_target(self) -> None:
        h = Harness(reachable=False)
        h.send(GET)
        self.assertTrue(h.to_client().startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
        self.assertTrue(h.client.disconnecting)

    def test_backend_drops_before_answering(self) -> None:
        h = Harness()
        h.send(GET)
        h.backends[0][0].connectionLost(None)  # type: ignore[arg-type]
        self.assertTrue(h.to_client().startswith(b"HTTP/1.1 502 "))

    def test_websocket_upgrade_becomes_a_splice(self) -> None:
        h = Harness()
        h.send(b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        h.to_backend()
        switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        h.answer(switch + b"\x81\x02hi")
        self.assertEqual(h.to_client(), switch + b"\x81\x02hi")
        h.send(b"\x81\x82raw bytes, not HTTP\r\n\n")
        self.assertEqual(h.to_backend(), b"\x81\x82raw bytes, not HTTP\r\n\n")
        self.assertEqual(h.client.producerState, "producing")

    def upgraded(self, **options: Any) -> Harness:
        h = Harness(**options)
        h.send(b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        h.answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        h.to_client()
        h.to_backend()
        return h

    def test_websocket_outlives_every_default(self) -> None:
        """No idle or age limit applies to an upgraded connection unless the route sets one: silent for
        ten days (beyond the 300 s idle default and the 24 h maxConnectionLifetime default), still open,
        and the session was told (it lifts maxConnectionLifetime)."""
        told: list[bool] = []
        h = self.upgraded(on_upgrade=lambda: told.append(True))
        self.assertEqual(told, [True])
        for _ in range(10 * 24):
            h.clock.advance(3600)
        self.assertFalse(h.client.disconnecting)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.send(b"\x81\x00")
        self.assertEqual(h.to_backend(), b"\x81\x00")

    def test_websocket_idle_limit(self) -> None:
        h = self.upgraded(websocket_idle=60.0)
        for _ in range(10):
            h.clock.advance(50)
            h.answer(b"\x81\x00")  # traffic from either side counts
        self.assertFalse(h.client.disconnecting)
        h.clock.advance(61)
        self.assertTrue(h.client.disconnected)

    def test_websocket_age_limit(self) -> None:
        h = self.upgraded(websocket_max_age=3600.0)
        for _ in range(70):
            h.clock.advance(50)
            h.send(b"\x81\x00")
        self.assertFalse(h.client.disconnecting)  # 3500 s, busy
        h.clock.advance(100)
        self.assertTrue(h.client.disconnecting)

    def test_unasked_101_is_a_bad_gateway(self) -> None:
        h = Harness()
        h.send(GET)
        h.answer(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        self.assertTrue(h.to_client().startswith(b"HTTP/1.1 502 "))

    def test_a_full_backend_pauses_the_client(self) -> None:
        h = Harness()
        h.send(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\n\r\nabc")
        backend_transport = h.backends[0][1]
        backend_transport.producer.pauseProducing()  # what a full write buffer does
        self.assertEqual(h.client.producerState, "paused")
        backend_transport.producer.resumeProducing()
        self.assertEqual(h.client.producerState, "producing")

    def test_idle_timeout(self) -> None:
        h = Harness()
        h.clock.advance(299)
        h.send(b"G")
        h.clock.advance(299)
        self.assertFalse(h.client.disconnecting)
        h.clock.advance(2)
        self.assertTrue(h.client.disconnected)


class PauseGateTests(SynchronousTestCase):
    def test_reasons_do_not_undo_each_other(self) -> None:
        transport = StringTransport()
        gate = PauseGate(transport)
        gate.pause("response")
        gate.pauseProducing()
        gate.resumeProducing()
        self.assertEqual(transport.producerState, "paused")
        gate.resume("response")
        self.assertEqual(transport.producerState, "producing")


class RedirectTests(SynchronousTestCase):
    def answer(self, raw: bytes, challenges: Any = None) -> bytes:
        redirect = HttpRedirect(challenges)
        transport = StringTransport()
        redirect.makeConnection(transport)
        for i in range(len(raw)):
            redirect.dataReceived(raw[i : i + 1])
        self.assertTrue(transport.disconnecting)
        return bytes(transport.value())

    def test_redirects_to_https(self) -> None:
        self.assertEqual(
            self.answer(b"GET /a/b?c=d HTTP/1.1\r\nHost: WWW.A.test:80\r\n\r\n"),
            b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://www.a.test/a/b?c=d\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )

    def test_redirect_keeps_the_https_port(self) -> None:
        ports = {"www.a.test": 31081, "b.test": 443, "c.test": None}
        locations = []
        for host in ports:
            transport = StringTransport()
            redirect = HttpRedirect(None, https_port=ports.get)
            redirect.makeConnection(transport)
            redirect.dataReceived(b"GET /p HTTP/1.1\r\nHost: %s:31080\r\n\r\n" % host.encode())
            locations.append(transport.value().split(b"\r\n")[1])
        self.assertEqual(
            locations,
            [
                b"Location: https://www.a.test:31081/p",
                b"Location: https://b.test/p",
                b"Location: https://c.test/p",
            ],
        )

    def test_challenge(self) -> None:
        responder = ChallengeResponder()
        responder.add("tok_en-1", "tok_en-1.thumb")
        self.assertEqual(
            self.answer(
                b"GET /.well-known/acme-challenge/tok_en-1 HTTP/1.1\r\nHost: a.test\r\n\r\n", responder
            ),
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 14\r\n"
            b"Connection: close\r\n\r\ntok_en-1.thumb",
        )
        unknown = self.answer(
            b"GET /.well-known/acme-challenge/other HTTP/1.1\r\nHost: a.test\r\n\r\n", responder
        )
        self.assertTrue(unknown.startswith(b"HTTP/1.1 404 Not Found\r\n"))
        self.assertTrue(
            self.answer(b"GET /.well-known/acme-challenge/x HTTP/1.1\r\nHost: a\r\n\r\n").startswith(
                b"HTTP/1.1 404 "
            )
        )

    def test_malformed(self) -> None:
        self.assertTrue(self.answer(b"GET / HTTP/1.1\nHost: a\n\n").startswith(b"HTTP/1.1 400 "))


class BackendProtocolTests(SynchronousTestCase):
    def test_backend_is_a_protocol(self) -> None:
        self.assertIsInstance(HttpBackend(None), Protocol)  # type: ignore[arg-type]
