"""The Server-Sent Events resource (dcrouter.observe.stream) on twisted.web's in-memory request, time on a
Clock; and the metrics resource and the metricsConfig listener wiring."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from dcrouter.config import load_options
from dcrouter.events import EventBus, IEventSink
from dcrouter.observe.metrics import MetricsResource, RouterMetrics
from dcrouter.observe.service import ObserveService
from dcrouter.observe.stream import EventStreamResource


class StreamRequest(DummyRequest):
    """DummyRequest keeps a streaming producer as a transport does (its own pulls it in a loop)."""

    producer: object = None

    def registerProducer(self, producer: object, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


def get(
    resource: EventStreamResource, query: dict[bytes, list[bytes]] | None = None
) -> tuple[DummyRequest, object]:
    request = StreamRequest([b""])
    request.args = query or {}
    return request, resource.render(request)


def text(request: DummyRequest) -> str:
    return b"".join(request.written).decode("utf-8")


class EventStreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = EventBus(self.clock.seconds)
        self.resource = EventStreamResource(self.bus, clock=self.clock, heartbeat=15.0, buffer_size=3)

    def test_filtered_events_as_sse(self) -> None:
        request, result = get(self.resource, {b"types": [b"message.*,security.relay_refused"]})
        self.assertIs(result, NOT_DONE_YET)
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"), [b"text/event-stream; charset=utf-8"]
        )
        self.bus.emit("message.queued", queue_id="Q1", size=5)
        self.bus.emit("connection.connect", port=25)
        self.bus.emit("security.relay_refused", session_id="S1")
        self.assertEqual(
            text(request),
            ": connected\n\n"
            'id: 1\nevent: message.queued\ndata: {"type":"message.queued","time":0.0,"queueId":"Q1",'
            '"size":5}\n\n'
            'id: 2\nevent: security.relay_refused\ndata: {"type":"security.relay_refused","time":0.0,'
            '"sessionId":"S1"}\n\n',
        )

    def test_heartbeat_on_the_clock_until_the_client_goes(self) -> None:
        request, _ = get(self.resource)
        self.clock.advance(15)
        self.clock.advance(15)
        self.assertEqual(text(request).count(": keepalive\n\n"), 2)
        request.processingFailed(ConnectionError("client went away"))  # the connection is lost
        self.flushLoggedErrors(ConnectionError)
        self.assertEqual(self.resource.clients, set())
        self.assertFalse(self.bus.wants("message.queued"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_slow_client_is_buffered_then_dropped(self) -> None:
        request, _ = get(self.resource)
        [client] = self.resource.clients
        self.assertIs(request.producer, client)
        client.pauseProducing()  # the transport's buffer is full
        for n in range(3):
            self.bus.emit("message.queued", queue_id=f"Q{n}")
        self.assertNotIn("Q0", text(request))
        client.resumeProducing()
        self.assertIn("Q2", text(request))
        client.pauseProducing()
        for n in range(4):
            self.bus.emit("message.queued", queue_id=f"R{n}")
        self.assertTrue(client.dropped)
        self.assertTrue(request.finished)  # no transport here: the response is ended
        self.assertEqual(self.resource.slow_clients_dropped, 1)
        self.assertEqual(self.resource.clients, set())
        self.assertFalse(self.bus.wants("message.queued"))

    def test_unknown_type_is_400_json(self) -> None:
        request, body = get(self.resource, {b"types": [b"message.*", b"mesage.queued"]})
        self.assertEqual(request.responseCode, 400)
        assert isinstance(body, bytes)
        self.assertEqual(json.loads(body)["error"]["code"], "bad_event_type")
        self.assertIn("mesage.queued", json.loads(body)["error"]["message"])

    def test_stream_count_is_capped(self) -> None:
        resource = EventStreamResource(self.bus, clock=self.clock, max_clients=1)
        get(resource)
        request, _ = get(resource)
        self.assertEqual(request.responseCode, 503)


class MetricsResourceTests(SynchronousTestCase):
    def test_exposition_of_the_routers_registry(self) -> None:
        metrics = RouterMetrics()
        metrics.auth.labels("failure").inc()
        request = DummyRequest([b""])
        body = MetricsResource(metrics).render(request)
        assert isinstance(body, bytes)
        self.assertIn(b'dcrouter_smtp_auth_total{result="failure"} 1.0', body)
        content_type = request.responseHeaders.getRawHeaders(b"content-type")[0]
        self.assertTrue(content_type.startswith(b"text/plain; version="), content_type)


class ObserveConfigTests(SynchronousTestCase):
    def service(self, **options: object) -> ObserveService:
        result = load_options(options)
        return ObserveService(
            bus=EventBus(),
            metrics=RouterMetrics(),
            reactor=Clock(),  # type: ignore[arg-type]
            metrics_config=result.options.metrics_config,
            events_config=result.options.events,
            post=lambda *args: None,
        )

    def test_stream_is_on_the_listener_only_when_asked(self) -> None:
        without = self.service(metricsConfig={"enabled": True}).root()
        self.assertIn(b"metrics", without.children)
        self.assertNotIn(b"api", without.children)
        with_stream = self.service(metricsConfig={"enabled": True, "eventStream": True}).root()
        self.assertIn(b"events", with_stream.children[b"api"].children[b"v1"].children)

    def test_webhooks_from_config(self) -> None:
        service = self.service(
            events={
                "bufferSize": 7,
                "webhooks": [{"url": "https://hooks.example/x", "types": ["security.*"], "timeout": 2000}],
            }
        )
        [hook] = service.webhooks
        self.assertEqual(
            (hook.url, hook.types, hook._timeout, hook._buffer_size),
            ("https://hooks.example/x", ("security.*",), 2.0, 7),
        )


class PerformanceEventTests(SynchronousTestCase):
    """events.performanceInterval: queue size and processing time, on the reactor's clock."""

    def test_periodic_reports(self) -> None:
        from twisted.internet.defer import succeed

        from dcrouter.events import CallableSink

        clock = Clock()
        clock.advance(1000)
        bus = EventBus(clock.seconds)
        seen: list[Any] = []
        bus.subscribe(CallableSink(seen.append), ["performance.*"])
        summary = {"queued": (2, 940.0), "deferred": (1, 990.0), "delivered": (7, 100.0)}
        service = ObserveService(
            bus=bus,
            metrics=RouterMetrics(),
            reactor=clock,  # type: ignore[arg-type]
            metrics_config=None,
            events_config=load_options({"events": {"performanceInterval": 10_000}}).options.events,
            summary=lambda: succeed(summary),
            in_flight=lambda: 3,
        )
        service.startService()
        bus.emit("message.processed", duration=0.5)
        bus.emit("message.processed", duration=1.5)
        clock.advance(10)
        processing, queue = seen
        self.assertEqual(
            dict(processing.fields), {"messages": 2, "meanDuration": 1.0, "maxDuration": 1.5, "inFlight": 3}
        )
        self.assertEqual(
            dict(queue.fields),
            {"byStatus": {"queued": 2, "deferred": 1, "delivered": 7}, "total": 3, "oldestAge": 70.0},
        )
        clock.advance(10)
        self.assertEqual(seen[2].fields["messages"], 0)
        service.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])


@implementer(IEventSink)
class RecordingSubscriber:
    """A subscriber plugin named by dotted path in the tests' configurations."""

    name = "recording"

    def __init__(self) -> None:
        self.events: list[Any] = []

    def receive(self, event: Any) -> None:
        self.events.append(event)


class SubscriberPluginTests(SynchronousTestCase):
    def test_named_by_dotted_path_and_subscribed_to_its_types(self) -> None:
        events = load_options(
            {
                "events": {
                    "subscribers": [
                        {"type": "tests.test_observe_stream:RecordingSubscriber", "types": ["security.*"]}
                    ]
                }
            }
        ).options.events
        bus = EventBus()
        service = ObserveService(
            bus=bus,
            metrics=RouterMetrics(),
            reactor=Clock(),  # type: ignore[arg-type]
            metrics_config=None,
            events_config=events,
        )
        [(plugin, types)] = service.subscribers
        self.assertEqual(types, ["security.*"])
        self.assertIsInstance(plugin, RecordingSubscriber)
        service.startService()
        bus.emit("message.queued", queue_id="Q")
        bus.emit("security.relay_refused", queue_id="Q")
        service.stopService()
        bus.emit("security.relay_refused", queue_id="R")
        self.assertEqual([e.type for e in plugin.events], ["security.relay_refused"])  # type: ignore[attr-defined]

    def test_bad_plugins_are_configuration_errors(self) -> None:
        from dcrouter.config import ConfigError

        for name, wanted in (
            ("tests.test_observe_stream:Missing", "cannot load subscriber plugin"),
            ("tests.test_observe_stream:EventStreamTests", "is not a class implementing IEventSink"),
            ("nothing", "unknown subscriber type 'nothing'"),
        ):
            error = self.assertRaises(
                ConfigError,
                load_options,
                {"events": {"subscribers": [{"type": name, "types": ["message.*"]}]}},
            )
            self.assertIn("events.subscribers[0].type: ", str(error))
            self.assertIn(wanted, str(error))
