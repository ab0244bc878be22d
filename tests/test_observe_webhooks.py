"""Webhooks (dcrouter.observe.webhooks): signing, order, retries with backoff on a Clock, the bounded buffer;
then over real HTTP on 127.0.0.1 (a twisted.web receiver checking the signature, and one that is down)."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from dcrouter.events import Event, EventBus
from dcrouter.observe.webhooks import RETRY_BASE, RETRY_MAX, WebhookSink, signature, treq_post
from tests.downstream import closed_port

SECRET = "s3cret"


def event(n: int, event_type: str = "message.queued") -> Event:
    return Event(event_type, 1000.0 + n, queue_id=f"Q{n}", fields={"size": n})


class Posts:
    """Requests a sink made, each answered when the test says (a Deferred per request)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes, dict[bytes, list[bytes]], float, Deferred[int]]] = []

    def __call__(
        self, url: str, body: bytes, headers: dict[bytes, list[bytes]], timeout: float
    ) -> Deferred[int]:
        answer: Deferred[int] = Deferred()
        self.requests.append((url, body, headers, timeout, answer))
        return answer

    def answer(self, code: int) -> None:
        pending = [r for r in self.requests if not r[4].called]
        pending[0][4].callback(code)

    def fail(self, error: Exception) -> None:
        pending = [r for r in self.requests if not r[4].called]
        pending[0][4].errback(error)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r[1]) for r in self.requests]


class WebhookSinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.posts = Posts()

    def sink(self, **kwargs: Any) -> WebhookSink:
        kwargs.setdefault("secret", SECRET)
        return WebhookSink(
            "http://127.0.0.1:1/hook", post=self.posts, clock=self.clock, random=lambda: 1.0, **kwargs
        )

    def test_signed_json_one_at_a_time_in_order(self) -> None:
        sink = self.sink(timeout=2.5)
        sink.receive(event(1))
        sink.receive(event(2))
        self.assertEqual(len(self.posts.requests), 1)  # one request in flight
        url, body, headers, timeout, _ = self.posts.requests[0]
        self.assertEqual((url, timeout), ("http://127.0.0.1:1/hook", 2.5))
        self.assertEqual(headers[b"Content-Type"], [b"application/json"])
        self.assertEqual(headers[b"X-Dcrouter-Event"], [b"message.queued"])
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        self.assertEqual(headers[b"X-Dcrouter-Signature"], [expected.encode()])
        self.posts.answer(204)
        self.posts.answer(200)
        self.assertEqual([b["queueId"] for b in self.posts.bodies()], ["Q1", "Q2"])
        self.assertEqual((sink.sent, sink.pending), (2, 0))

    def test_no_secret_no_signature(self) -> None:
        sink = self.sink(secret=None)
        sink.receive(event(1))
        self.assertNotIn(b"X-Dcrouter-Signature", self.posts.requests[0][2])

    def test_retried_with_backoff_then_dropped_and_counted(self) -> None:
        sink = self.sink(max_attempts=4)
        sink.receive(event(1))
        self.posts.answer(500)
        for delay in (RETRY_BASE, RETRY_BASE * 2, RETRY_BASE * 4):
            count = len(self.posts.requests)
            self.clock.advance(delay - 0.01)
            self.assertEqual(len(self.posts.requests), count)  # not yet
            self.clock.advance(0.01)
            self.assertEqual(len(self.posts.requests), count + 1)
            self.posts.fail(ConnectionRefusedError())
        self.assertEqual((sink.failed, sink.retries, sink.pending), (1, 3, 0))
        sink.receive(event(2))  # the next event is sent at once
        self.assertEqual(self.posts.bodies()[-1]["queueId"], "Q2")

    def test_backoff_is_capped(self) -> None:
        sink = self.sink(max_attempts=20)
        sink.receive(event(1))
        for _ in range(10):
            self.posts.answer(503)
            self.clock.advance(RETRY_MAX)
        self.assertEqual(len(self.posts.requests), 11)

    def test_buffer_is_bounded_oldest_dropped(self) -> None:
        sink = self.sink(buffer_size=3)
        for n in range(10):
            sink.receive(event(n))
        # Q0 is in flight; of the nine behind it only the last three are kept.
        self.assertEqual((sink.dropped, sink.pending), (6, 4))
        for _ in range(4):
            self.posts.answer(200)
        self.assertEqual([b["queueId"] for b in self.posts.bodies()], ["Q0", "Q7", "Q8", "Q9"])

    def test_stop_cancels_and_forgets(self) -> None:
        sink = self.sink()
        sink.receive(event(1))
        sink.receive(event(2))
        sink.stop()
        self.assertTrue(self.posts.requests[0][4].called)  # cancelled
        self.flushLoggedErrors()
        sink.receive(event(3))
        self.assertEqual((len(self.posts.requests), sink.pending), (1, 0))

    def test_emitting_never_waits_for_the_receiver(self) -> None:
        bus = EventBus()
        sink = self.sink(buffer_size=100)
        bus.subscribe(sink, ["message.*"])
        for n in range(1000):
            bus.emit("message.queued", queue_id=f"Q{n}")
        bus.emit("connection.connect")
        self.assertEqual(len(self.posts.requests), 1)
        self.assertEqual((sink.pending, sink.dropped), (101, 899))


class Receiver(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict[str, Any]] = []
        self.refused = 0
        self.arrived: Deferred[None] = Deferred()

    def render_POST(self, request: Any) -> bytes:
        body = request.content.read()
        given = request.getHeader("X-Dcrouter-Signature") or ""
        if not hmac.compare_digest(given, signature(SECRET, body)):
            self.refused += 1
            request.setResponseCode(401)
            return b""
        self.bodies.append(json.loads(body))
        if len(self.bodies) == 2 and not self.arrived.called:
            self.arrived.callback(None)
        return b""


class WebhookHttpTests(TestCase):
    """Real HTTP over treq on 127.0.0.1."""

    timeout = 30

    def post(self) -> Any:
        post = treq_post(reactor)
        self.addCleanup(post.pool.closeCachedConnections)
        return post

    def test_receiver_verifies_the_signature(self) -> Deferred[None]:
        async def go() -> None:
            receiver = Receiver()
            port = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            sink = WebhookSink(
                f"http://127.0.0.1:{port.getHost().port}/hook", post=self.post(), clock=reactor, secret=SECRET
            )
            self.addCleanup(sink.stop)
            sink.receive(event(1, "message.delivered"))
            sink.receive(event(2, "message.bounced"))
            await receiver.arrived.addTimeout(10, reactor)
            self.assertEqual(receiver.refused, 0)
            self.assertEqual([b["type"] for b in receiver.bodies], ["message.delivered", "message.bounced"])
            self.assertEqual(
                receiver.bodies[0], {"type": "message.delivered", "time": 1001.0, "queueId": "Q1", "size": 1}
            )

            # A wrong secret is what the receiver refuses: the signature is checked for real.
            wrong = WebhookSink(
                f"http://127.0.0.1:{port.getHost().port}/hook",
                post=self.post(),
                clock=reactor,
                secret="other",
                max_attempts=1,
            )
            self.addCleanup(wrong.stop)
            wrong.receive(event(3))
            while wrong.failed == 0:
                await deferLater(reactor, 0.02, lambda: None)
            self.assertEqual(receiver.refused, 1)

        return Deferred.fromCoroutine(go())

    def test_a_receiver_that_is_down_costs_bounded_memory(self) -> Deferred[None]:
        async def go() -> None:
            port = await closed_port(reactor)
            clock = Clock()  # the retries wait on it: only the connection attempts are real
            sink = WebhookSink(
                f"http://127.0.0.1:{port}/hook", post=self.post(), clock=clock, buffer_size=5, max_attempts=3
            )
            self.addCleanup(sink.stop)
            for n in range(50):
                sink.receive(event(n))
            self.assertEqual((sink.pending, sink.dropped), (6, 44))
            for _ in range(3 * 6):
                while clock.getDelayedCalls() == [] and sink.pending:
                    await deferLater(reactor, 0.01, lambda: None)  # the refused connection
                clock.advance(RETRY_MAX)
                if not sink.pending:
                    break
            self.assertEqual((sink.sent, sink.failed, sink.dropped, sink.pending), (0, 6, 44, 0))
            self.assertGreater(sink.retries, 0)

        return Deferred.fromCoroutine(go())
