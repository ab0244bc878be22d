"""The router's Prometheus metrics: a registry per router (never prometheus_client's global one, so several
routers, and tests, do not share counters), fed by the event bus, plus collectors that read state at scrape
time (queue, proxy routes, certificates). :class:`MetricsResource` renders it in the text exposition format
with ``prometheus_client.generate_latest``; nothing here writes the format by hand.

Label values are bounded (docs/operations.md lists every metric with its labels):

- ``route``/``destination``: delivery route names from the configuration (``rule:<name>``,
  ``domain:<pattern>``, ``default``); delivery by MX (``mx:<recipient domain>``, one per domain mailed) is
  counted under ``mx``.
- ``port``: the configured listening ports. ``stage`` and ``scanner``: names from the configuration.
- ``reason`` (refused messages): the enhanced status code of the reply (``5.6.0``), ``other`` when there is
  none. Never an address, a host name from a client, or free text.

Scrapes never wait: the queue collector reports the last reading of the queue's
:meth:`~dcrouter.interfaces.IDeliveryQueue.status_summary` (taken in the background, at most once per
``QUEUE_READ_INTERVAL`` seconds, and refreshed when a scrape finds it older), since the disk and Redis
backends answer through a Deferred.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from dcrouter.events import Event, EventBus, IEventSink
from dcrouter.log import logger
from dcrouter.queue.contract import is_live
from dcrouter.queue.item import QueueItemStatus

log = logger(__name__)

#: Seconds between two readings of the queue's status summary.
QUEUE_READ_INTERVAL = 5.0

#: Counted from events for SMTP only (the SMTP sessions gauge and connections counter).
_SESSION_TYPES = frozenset({"connection.connect", "connection.disconnect"})
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_DELIVERY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def route_label(name: object) -> str:
    """A delivery route's name as a label value: bounded (``mx:<domain>`` routes are one label, ``mx``)."""
    if not isinstance(name, str) or not name:
        return "none"
    return "mx" if name.startswith("mx:") else name


def reason_label(enhanced: object) -> str:
    return enhanced if isinstance(enhanced, str) and _ENHANCED.match(enhanced) else "other"


@implementer(IEventSink)
class RouterMetrics:
    """The metrics of one router in ``registry`` (a new CollectorRegistry by default). Subscribe it to the
    router's bus (:meth:`subscribe`); add collectors for state read at scrape time with :meth:`watch_queue`,
    :meth:`watch_proxy` and :meth:`watch_certificates`."""

    name = "metrics"

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.smtp_connections = Counter(
            "dcrouter_smtp_connections", "SMTP connections admitted", ["port", "tls"], registry=r
        )
        self.smtp_sessions = Gauge("dcrouter_smtp_sessions", "SMTP sessions open now", ["port"], registry=r)
        self.connections_refused = Counter(
            "dcrouter_connections_refused",
            "Connections refused or failed (SMTP: session policy; proxy: IP rules, caps, no route/backend)",
            ["protocol"],
            registry=r,
        )
        self.commands_refused = Counter(
            "dcrouter_smtp_commands_refused", "SMTP commands answered 4xx/5xx", ["reply_class"], registry=r
        )
        self.auth = Counter("dcrouter_smtp_auth", "SMTP AUTH attempts by result", ["result"], registry=r)
        self.received = Counter(
            "dcrouter_messages_received", "Messages whose DATA ended", ["port"], registry=r
        )
        self.received_bytes = Counter(
            "dcrouter_received_bytes", "Octets of message data received", ["port"], registry=r
        )
        self.accepted = Counter(
            "dcrouter_messages_accepted", "Messages answered 250 at the end of DATA", ["port"], registry=r
        )
        self.refused = Counter(
            "dcrouter_messages_refused",
            "Messages refused at the end of DATA, by enhanced status code",
            ["reason"],
            registry=r,
        )
        self.queued = Counter(
            "dcrouter_messages_queued", "Messages made durable in the queue", ["kind"], registry=r
        )
        self.processing = Histogram(
            "dcrouter_processing_duration_seconds",
            "Time in the processing chain, per stage (total: the whole chain)",
            ["stage"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.processed = Counter(
            "dcrouter_messages_processed", "Messages through the processing chain", ["outcome"], registry=r
        )
        self.processing_errors = Counter(
            "dcrouter_processing_errors", "Processing failures (timeouts, errors)", ["reason"], registry=r
        )
        self.verdicts = Counter(
            "dcrouter_scanner_verdicts", "Scanner verdicts", ["scanner", "verdict"], registry=r
        )
        self.deliveries = Counter(
            "dcrouter_deliveries",
            "Recipients per delivery outcome (delivered, failed: for good, deferred: for now)",
            ["route", "outcome"],
            registry=r,
        )
        self.delivery_duration = Histogram(
            "dcrouter_delivery_duration_seconds",
            "Time of one route group's delivery attempt",
            ["route"],
            buckets=_DELIVERY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "dcrouter_delivery_retries", "Attempts that left a message deferred", ["destination"], registry=r
        )
        self.bounced = Counter(
            "dcrouter_messages_bounced",
            "Messages that finished with failed recipients",
            ["status"],
            registry=r,
        )
        self.dsn_sent = Counter("dcrouter_dsn_sent", "DSNs queued", ["action"], registry=r)
        self.tls_handshakes = Counter(
            "dcrouter_tls_handshakes", "Inbound TLS handshakes by result", ["protocol", "result"], registry=r
        )
        self.security = Counter(
            "dcrouter_security_events",
            "Security events (auth_failure, policy_violation, relay_refused, rate_limit)",
            ["type", "rule"],
            registry=r,
        )
        self.acme_orders = Counter(
            "dcrouter_acme_orders",
            "ACME certificate orders by result (issued, failed) and kind (new, renewal)",
            ["result", "kind"],
            registry=r,
        )
        #: Read at scrape time (:meth:`watch_proxy_clients`): no event per proxy connection for it.
        self.proxy_connections_open = Gauge(
            "dcrouter_proxy_client_connections", "Proxy client connections open now", registry=r
        )
        self.limits = LimitsCollector()
        r.register(self.limits)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._handlers: Mapping[str, Callable[[Event], None]] = {
            "connection.connect": self._connect,
            "connection.disconnect": self._disconnect,
            "connection.error": self._connection_error,
            "connection.tls": self._tls,
            "connection.authenticated": lambda e: self._with(self.auth, "success").inc(),
            "connection.command_refused": self._command_refused,
            "message.received": self._received,
            "message.accepted": lambda e: self._with(self.accepted, _port(e)).inc(),
            "message.refused": lambda e: self._with(self.refused, reason_label(e.fields.get("reason"))).inc(),
            "message.processed": self._processed,
            "message.scanned": self._scanned,
            "message.queued": self._queued,
            "delivery.attempt": self._attempt,
            "message.deferred": lambda e: self._with(
                self.retries, route_label(e.fields.get("destination"))
            ).inc(),
            "message.bounced": lambda e: self._with(self.bounced, str(e.fields.get("status"))).inc(),
            "message.dsn_sent": lambda e: self._with(self.dsn_sent, str(e.fields.get("action"))).inc(),
            "error.processing": self._processing_error,
            "certificate.issued": lambda e: self._acme(e, "issued"),
            "certificate.order_failed": lambda e: self._acme(e, "failed"),
            "security.auth_failure": self._auth_failure,
            "security.policy_violation": lambda e: self._security(e, str(e.fields.get("rule", ""))),
            "security.relay_refused": lambda e: self._security(e, ""),
            "security.rate_limit": lambda e: self._security(e, str(e.fields.get("kind", ""))),
        }

    def accepted_total(self) -> int:
        """Messages answered 250 since start, over every port (a worker logs it as it stops)."""
        return int(
            sum(
                sample.value
                for family in self.accepted.collect()
                for sample in family.samples
                if sample.name.endswith("_total")
            )
        )

    def _with(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, kept: the label sets are bounded, and prometheus_client's look-up
        (validation, a lock) is most of the cost of counting an event."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def subscribe(self, bus: EventBus) -> None:
        """Receive the events the metrics are made of from ``bus``: connects and disconnects of SMTP only
        (the proxy's open connections are read at scrape time, so a proxy connection makes no event
        unless another subscriber wants it)."""
        bus.subscribe(self, sorted(set(self._handlers) - _SESSION_TYPES))
        bus.subscribe(self, sorted(_SESSION_TYPES), protocols=("smtp",))

    def receive(self, event: Event) -> None:
        handler = self._handlers.get(event.type)
        if handler is not None:
            handler(event)

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return bytes(generate_latest(self.registry))

    # -- collectors for state read at scrape time --

    def watch_queue(self, summary: Callable[[], Deferred[Any]], clock_seconds: Callable[[], float]) -> None:
        """Queue size by status and the oldest live item's age, from ``summary`` (the queue's
        ``status_summary``)."""
        self.registry.register(QueueCollector(summary, clock_seconds))

    def watch_proxy(self, counters: Mapping[str, Any]) -> None:
        """Connections and bytes per proxy route, from the proxy's RouteCounters by route name."""
        self.registry.register(ProxyCollector(counters))

    def watch_proxy_clients(self, count: Callable[[], int]) -> None:
        """``dcrouter_proxy_client_connections`` from ``count()`` (the proxy's open client connections, its
        ``ProxyContext.sessions``), read at scrape time."""
        self.proxy_connections_open.set_function(count)

    def watch_proxy_targets(self, states: Callable[[], Mapping[tuple[str, str], bool]]) -> None:
        """``dcrouter_proxy_target_up{route,target}``: 1 while a health-checked target is up, 0 while its
        checks hold it down; ``states()`` maps (route name, ``host:port``) to up."""
        self.registry.register(TargetCollector(states))

    def watch_certificates(self, certificates: Callable[[], Iterable[tuple[str, float]]]) -> None:
        """Expiry of every certificate: ``certificates()`` yields ``(name, not_after as a timestamp)``;
        ``now`` is wall time, as certificates expire in it."""
        self.registry.register(CertificateCollector(certificates))

    def watch_limits(self, protocol: str, stats: Callable[[], Mapping[str, Any] | None]) -> None:
        """The rate limiter of ``protocol`` (``smtp``, ``proxy``): ``stats()`` is its
        :meth:`~dcrouter.limits.limiter.Limiter.stats` (None while it has no limiter)."""
        self.limits.sources[protocol] = stats

    def watch(
        self,
        name: str,
        documentation: str,
        read: Callable[[], Mapping[tuple[str, ...], float]],
        labels: Sequence[str],
    ) -> None:
        """A counter family read at scrape time: ``read()`` maps label values (in ``labels`` order) to
        totals."""
        self.registry.register(_ReadCounter(name, documentation, read, labels))

    # -- event handlers --

    def _connect(self, event: Event) -> None:
        if event.fields.get("protocol") == "smtp":
            port = _port(event)
            self._with(self.smtp_connections, port, "implicit" if event.fields.get("tls") else "no").inc()
            self._with(self.smtp_sessions, port).inc()

    def _disconnect(self, event: Event) -> None:
        if event.fields.get("protocol") == "smtp":
            self._with(self.smtp_sessions, _port(event)).dec()

    def _connection_error(self, event: Event) -> None:
        protocol = str(event.fields.get("protocol", "smtp"))
        if event.fields.get("tls"):
            self._with(self.tls_handshakes, protocol, "failed").inc()
        else:
            self._with(self.connections_refused, protocol).inc()

    def _tls(self, event: Event) -> None:
        self._with(self.tls_handshakes, str(event.fields.get("protocol", "smtp")), "ok").inc()

    def _command_refused(self, event: Event) -> None:
        self._with(self.commands_refused, str(event.fields.get("replyClass", "5xx"))).inc()

    def _received(self, event: Event) -> None:
        port = _port(event)
        self._with(self.received, port).inc()
        size = event.fields.get("size")
        if isinstance(size, int) and size > 0:
            self._with(self.received_bytes, port).inc(size)

    def _processed(self, event: Event) -> None:
        self._with(self.processed, str(event.fields.get("outcome"))).inc()
        duration = event.fields.get("duration")
        if isinstance(duration, int | float):
            self._with(self.processing, "total").observe(duration)
        stages = event.fields.get("stages")
        if isinstance(stages, Mapping):
            for stage, seconds in stages.items():
                self._with(self.processing, str(stage)).observe(seconds)

    def _scanned(self, event: Event) -> None:
        self._with(self.verdicts, str(event.fields.get("scanner")), str(event.fields.get("verdict"))).inc()

    def _queued(self, event: Event) -> None:
        self._with(self.queued, "local" if event.fields.get("local") else "received").inc()

    def _attempt(self, event: Event) -> None:
        route = route_label(event.fields.get("route"))
        for outcome in ("delivered", "failed", "deferred"):
            count = event.fields.get(outcome)
            if isinstance(count, int) and count:
                self._with(self.deliveries, route, outcome).inc(count)
        duration = event.fields.get("duration")
        if isinstance(duration, int | float):
            self._with(self.delivery_duration, route).observe(duration)

    def _acme(self, event: Event, result: str) -> None:
        self._with(self.acme_orders, result, "renewal" if event.fields.get("renewal") else "new").inc()

    def _processing_error(self, event: Event) -> None:
        self._with(self.processing_errors, str(event.fields.get("reason", "error"))).inc()

    def _auth_failure(self, event: Event) -> None:
        self._with(self.auth, "failure").inc()
        self._security(event, "")

    def _security(self, event: Event, rule: str) -> None:
        self._with(self.security, event.type.split(".", 1)[1], rule).inc()


def _port(event: Event) -> str:
    return str(event.fields.get("port", ""))


class QueueCollector(Collector):
    """``dcrouter_queue_items{status}`` and ``dcrouter_queue_oldest_age_seconds`` from the last reading of
    the queue's status summary (see the module docstring: a scrape never waits for the queue)."""

    LIVE = frozenset(s.value for s in QueueItemStatus if is_live(s))

    def __init__(self, summary: Callable[[], Deferred[Any]], clock_seconds: Callable[[], float]) -> None:
        self._summary = summary
        self._now = clock_seconds
        self._last: dict[str, tuple[int, float | None]] | None = None
        self._read_at: float | None = None
        self._reading = False

    def refresh(self) -> None:
        """Start a reading unless one is under way or the last one is fresh."""
        now = self._now()
        if self._reading or (self._read_at is not None and now - self._read_at < QUEUE_READ_INTERVAL):
            return
        self._reading = True
        try:
            reading = self._summary()
        except Exception:  # noqa: BLE001 (a queue that is not open yet; the next scrape tries again)
            self._reading = False
            return
        reading.addCallbacks(self._read, self._failed)

    def _read(self, summary: dict[str, tuple[int, float | None]]) -> None:
        self._reading = False
        self._last = dict(summary)
        self._read_at = self._now()

    def _failed(self, failure: Any) -> None:
        self._reading = False
        self._read_at = self._now()  # not again at once: a queue that is down would be asked every scrape
        log.debug("queue summary for metrics failed: {error}", error=failure.getErrorMessage())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self.refresh()
        items = GaugeMetricFamily("dcrouter_queue_items", "Queue items by status", labels=["status"])
        age = GaugeMetricFamily(
            "dcrouter_queue_oldest_age_seconds", "Age of the oldest item not yet finished (0: none)"
        )
        last = self._last or {}
        for status in (s.value for s in QueueItemStatus):
            items.add_metric([status], last.get(status, (0, None))[0])
        oldest = [t for s, (n, t) in last.items() if s in self.LIVE and n and t is not None]
        age.add_metric([], max(0.0, self._now() - min(oldest)) if oldest else 0.0)
        yield items
        yield age


class ProxyCollector(Collector):
    """Per proxy route: connections, open connections, refusals and bytes, read from its RouteCounters."""

    def __init__(self, counters: Mapping[str, Any]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        connections = CounterMetricFamily(
            "dcrouter_proxy_connections", "Proxy connections routed", labels=["route"]
        )
        active = GaugeMetricFamily(
            "dcrouter_proxy_active_connections", "Open proxy connections", labels=["route"]
        )
        refused = CounterMetricFamily(
            "dcrouter_proxy_refused", "Proxy connections a route turned away", labels=["route"]
        )
        octets = CounterMetricFamily(
            "dcrouter_proxy_bytes", "Octets forwarded (in: from clients)", labels=["route", "direction"]
        )
        for name, c in self._counters.items():
            connections.add_metric([name], c.connections)
            active.add_metric([name], c.active)
            refused.add_metric([name], c.refused)
            octets.add_metric([name, "in"], c.bytes_in)
            octets.add_metric([name, "out"], c.bytes_out)
        yield connections
        yield active
        yield refused
        yield octets


class TargetCollector(Collector):
    """``dcrouter_proxy_target_up{route,target}`` for the proxy's health-checked targets."""

    def __init__(self, states: Callable[[], Mapping[tuple[str, str], bool]]) -> None:
        self._states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "dcrouter_proxy_target_up",
            "1: the health-checked proxy target takes connections; 0: its checks hold it down",
            labels=["route", "target"],
        )
        for (route, target), state in sorted(self._states().items()):
            up.add_metric([route, target], 1.0 if state else 0.0)
        yield up


class CertificateCollector(Collector):
    """``dcrouter_certificate_expiry_days{name}`` and ``dcrouter_certificate_not_after_timestamp{name}``."""

    def __init__(self, certificates: Callable[[], Iterable[tuple[str, float]]]) -> None:
        self._certificates = certificates

    def collect(self) -> Iterator[GaugeMetricFamily]:
        days = GaugeMetricFamily(
            "dcrouter_certificate_expiry_days", "Days until the certificate expires", labels=["name"]
        )
        not_after = GaugeMetricFamily(
            "dcrouter_certificate_not_after_timestamp", "End of validity (Unix time)", labels=["name"]
        )
        now = time.time()
        for name, end in self._certificates():
            days.add_metric([name], (end - now) / 86400.0)
            not_after.add_metric([name], end)
        yield days
        yield not_after


class LimitsCollector(Collector):
    """The rate limiters' figures, read at scrape time from each one's ``stats()`` (no event per check:
    a check is on every command's path, a scrape once in a while). Labels: ``protocol`` (``smtp``,
    ``proxy``); for refusals ``tier`` (a tier name from the configuration, ``domain`` for the domainConfigs
    rules, ``proxy``), ``thing`` (what the limit counts) and ``phase`` (``connect``, ``auth``, ``mail``,
    ``rcpt``)."""

    def __init__(self) -> None:
        self.sources: dict[str, Callable[[], Mapping[str, Any] | None]] = {}

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        hits = CounterMetricFamily(
            "dcrouter_rate_limit_hits",
            "Commands and connections a rate limit refused or held back",
            labels=["protocol", "tier", "thing", "phase"],
        )
        tarpits = CounterMetricFamily(
            "dcrouter_rate_limit_tarpits", "Replies held back by a tarpit", labels=["protocol"]
        )
        tarpit_seconds = CounterMetricFamily(
            "dcrouter_rate_limit_tarpit_seconds", "Seconds of tarpit delay imposed", labels=["protocol"]
        )
        keys = GaugeMetricFamily(
            "dcrouter_rate_limit_keys", "Counter keys held in this process", labels=["protocol"]
        )
        evictions = CounterMetricFamily(
            "dcrouter_rate_limit_evictions",
            "Counter keys evicted while holding state (the store at maxKeys)",
            labels=["protocol"],
        )
        fallback = GaugeMetricFamily(
            "dcrouter_rate_limit_redis_fallback",
            "1 while the limits count in this process because Redis cannot answer",
            labels=["protocol"],
        )
        for protocol, read in self.sources.items():
            stats = read()
            if stats is None:
                continue
            for (tier, thing, phase), count in stats["hits"].items():
                hits.add_metric([protocol, tier, thing, phase], count)
            tarpits.add_metric([protocol], stats["tarpits"])
            tarpit_seconds.add_metric([protocol], stats["tarpitSeconds"])
            keys.add_metric([protocol], stats["keys"])
            evictions.add_metric([protocol], stats["evictions"])
            fallback.add_metric([protocol], 1.0 if stats["fallback"] else 0.0)
        yield from (hits, tarpits, tarpit_seconds, keys, evictions, fallback)


class _ReadCounter(Collector):
    def __init__(
        self,
        name: str,
        documentation: str,
        read: Callable[[], Mapping[tuple[str, ...], float]],
        labels: Sequence[str],
    ) -> None:
        self._name, self._doc, self._read, self._labels = name, documentation, read, list(labels)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labels)
        for values, total in self._read().items():
            family.add_metric(list(values), total)
        yield family


class MetricsResource(Resource):
    """``GET /metrics``: ``metrics`` (a :class:`RouterMetrics`) in the text exposition format. No state is
    changed and nothing is read from a request, so it needs no children; mount it as a leaf."""

    isLeaf = True

    def __init__(self, metrics: RouterMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return self._metrics.render()

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)
