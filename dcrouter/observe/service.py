"""ObserveService: the router's outputs of events and metrics, as one child service.

It owns the webhooks (``events.webhooks``), the periodic performance events (``events.performanceInterval``)
and, with ``metricsConfig.enabled``, a listener of its own without authentication serving ``GET /metrics``
(and ``GET /api/v1/events`` with ``metricsConfig.eventStream``, loopback only). The management API mounts
the same resources (:class:`~dcrouter.observe.metrics.MetricsResource`,
:class:`~dcrouter.observe.stream.EventStreamResource`) behind its own authentication.

The listener binds in ``privilegedStartService`` (a port below 1024 needs it) and is closed in
``stopService``, with every event stream ended first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from dcrouter.config import plugins
from dcrouter.config.observe import EventsConfig, MetricsConfig
from dcrouter.events import Event, EventBus, IEventSink
from dcrouter.log import logger
from dcrouter.net.listen import ListenError, format_address
from dcrouter.net.reactor import IRouterReactor
from dcrouter.observe.metrics import MetricsResource, QueueCollector, RouterMetrics
from dcrouter.observe.stream import EventStreamResource
from dcrouter.observe.webhooks import WebhookSink, treq_post

log = logger(__name__)
#: Not a class attribute: a Logger there renames itself after the class (it is a descriptor).
_event_log = logger("dcrouter.events")


@implementer(IEventSink)
class EventLog:
    """Writes each event it receives as one log line (``events.log``), at info level in the namespace
    ``dcrouter.events``, with the correlation ids as ``queue_id``/``session_id`` (so JSON logs carry them)
    and the event's fields."""

    name = "log"

    def receive(self, event: Event) -> None:
        _event_log.info(
            "event {event_type}",
            event_type=event.type,
            queue_id=event.queue_id,
            session_id=event.session_id,
            event=dict(event.fields),
        )


@implementer(IEventSink)
class PerformanceReporter:
    """Every ``interval`` seconds: ``performance.queue`` (from the queue's status summary) and
    ``performance.processing`` (the messages processed since the last report). It listens to
    ``message.processed`` to count them; nothing is read when nobody subscribes to the reports."""

    name = "performance"
    LIVE = QueueCollector.LIVE

    def __init__(
        self,
        bus: EventBus,
        *,
        summary: Callable[[], Deferred[Any]] | None,
        in_flight: Callable[[], int],
        clock_seconds: Callable[[], float],
    ) -> None:
        self._bus = bus
        self._summary = summary
        self._in_flight = in_flight
        self._now = clock_seconds
        self._count = 0
        self._total = 0.0
        self._max = 0.0
        self._reading = False

    def receive(self, event: Event) -> None:
        duration = event.fields.get("duration")
        if isinstance(duration, int | float):
            self._count += 1
            self._total += duration
            self._max = max(self._max, duration)

    def report(self) -> None:
        bus = self._bus
        if bus.wants("performance.processing"):
            bus.emit(
                "performance.processing",
                messages=self._count,
                meanDuration=self._total / self._count if self._count else 0.0,
                maxDuration=self._max,
                inFlight=self._in_flight(),
            )
        self._count, self._total, self._max = 0, 0.0, 0.0
        if self._summary is not None and bus.wants("performance.queue") and not self._reading:
            self._reading = True
            reading = maybeDeferred(self._summary)
            reading.addCallbacks(self._queue_read, self._queue_failed)

    def _queue_read(self, summary: dict[str, tuple[int, float | None]]) -> None:
        self._reading = False
        now = self._now()
        oldest = [t for s, (n, t) in summary.items() if s in self.LIVE and n and t is not None]
        self._bus.emit(
            "performance.queue",
            byStatus={status: count for status, (count, _) in summary.items()},
            total=sum(count for status, (count, _) in summary.items() if status in self.LIVE),
            oldestAge=max(0.0, now - min(oldest)) if oldest else 0.0,
        )

    def _queue_failed(self, failure: Any) -> None:
        self._reading = False
        log.debug("queue summary for performance.queue failed: {error}", error=failure.getErrorMessage())


class ObserveService(Service):
    """See the module docstring. ``bus`` and ``metrics`` are the router's; ``summary`` is the queue's
    ``status_summary`` (None without a queue); ``in_flight`` counts messages in the processing chain."""

    name = "observe"  # type: ignore[assignment]

    def __init__(
        self,
        *,
        bus: EventBus,
        metrics: RouterMetrics,
        reactor: IRouterReactor,
        metrics_config: MetricsConfig | None,
        events_config: EventsConfig | None,
        summary: Callable[[], Deferred[Any]] | None = None,
        in_flight: Callable[[], int] = lambda: 0,
        post: Any = None,
    ) -> None:
        self.bus = bus
        self.metrics = metrics
        self._reactor = reactor
        self.metrics_config = metrics_config
        self.events_config = events_config or EventsConfig()
        self.stream = EventStreamResource(bus, clock=reactor)
        self.port: IListeningPort | None = None
        self.webhooks: list[WebhookSink] = []
        self._pool: Any = None
        if self.events_config.webhooks:
            if post is None:
                post = treq_post(reactor)
                self._pool = post.pool
            for hook in self.events_config.webhooks:
                sink = WebhookSink(
                    hook.url,
                    post=post,
                    clock=reactor,
                    types=hook.types,
                    secret=hook.secret,
                    timeout=hook.timeout / 1000.0,
                    buffer_size=self.events_config.buffer_size,
                    max_attempts=hook.max_attempts,
                )
                self.webhooks.append(sink)
        webhooks = self.webhooks
        metrics.watch(
            "dcrouter_webhook_events_dropped",
            "Events a webhook dropped: buffer full (overflow) or out of attempts (failed)",
            # Labelled by position in the configuration: a URL may carry a token.
            lambda: {
                (f"events.webhooks[{i}]", kind): n for i, w in enumerate(webhooks) for kind, n in _drops(w)
            },
            ("webhook", "reason"),
        )
        metrics.watch(
            "dcrouter_event_subscriber_failures",
            "Exceptions raised by event subscribers (logged once per subscriber and type)",
            lambda: {(): bus.failures},
            (),
        )
        self.performance = PerformanceReporter(
            bus, summary=summary, in_flight=in_flight, clock_seconds=reactor.seconds
        )
        self._loop: LoopingCall | None = None
        self.event_log = EventLog()
        #: Subscriber plugins (events.subscribers), with the types each receives.
        self.subscribers: list[tuple[IEventSink, list[str]]] = [
            (plugins.instantiate("subscriber", entry, reactor), list(entry.types))
            for entry in self.events_config.subscribers
        ]

    def root(self) -> Resource:
        """The listener's resource tree: ``/metrics`` and, when configured, ``/api/v1/events``."""
        root = Resource()
        root.putChild(b"metrics", MetricsResource(self.metrics))
        if self.metrics_config is not None and self.metrics_config.event_stream:
            api, v1 = Resource(), Resource()
            root.putChild(b"api", api)
            api.putChild(b"v1", v1)
            v1.putChild(b"events", self.stream)
        return root

    def bind(self) -> None:
        """Bind the metrics listener (once); raises ListenError naming the address and port."""
        config = self.metrics_config
        if self.port is not None or config is None or not config.enabled:
            return
        site = Site(self.root())
        site.noisy = False
        try:
            self.port = self._reactor.listenTCP(config.port, cast(Any, site), interface=config.bind_address)
        except Exception as error:
            raise ListenError(
                "metrics (metricsConfig.port)", config.bind_address, config.port, error
            ) from error
        log.info(
            "metrics on http://{address}/metrics",
            address=format_address(config.bind_address, getattr(self.port.getHost(), "port", config.port)),
        )

    def privilegedStartService(self) -> None:
        self.bind()
        super().privilegedStartService()

    def startService(self) -> None:
        self.bind()
        super().startService()
        for sink in self.webhooks:
            self.bus.subscribe(sink, sink.types)
        self.bus.subscribe(self.performance, ["message.processed"])
        if self.events_config.log:
            self.bus.subscribe(self.event_log, self.events_config.log)
        for plugin, types in self.subscribers:
            self.bus.subscribe(plugin, types)
        self._loop = LoopingCall(self.performance.report)
        self._loop.clock = self._reactor
        self._loop.start(self.events_config.performance_interval / 1000.0, now=False)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self.bus.unsubscribe(self.performance)
        self.bus.unsubscribe(self.event_log)
        for plugin, _ in self.subscribers:
            self.bus.unsubscribe(plugin)
        for sink in self.webhooks:
            self.bus.unsubscribe(sink)
            sink.stop()
        self.stream.close_all()
        closing = []
        if self._pool is not None:
            closing.append(self._pool.closeCachedConnections())
        port, self.port = self.port, None
        if port is not None:
            closing.append(maybeDeferred(port.stopListening))
        return DeferredList(closing).addCallback(lambda _: None) if closing else None


def _drops(sink: WebhookSink) -> list[tuple[str, int]]:
    return [("overflow", sink.dropped), ("failed", sink.failed)]
