"""The in-process event bus (seed §8.2): what happened in the router, as small values, for whoever listens.

Every layer emits through an :class:`EventBus` it was handed (one per router, never a global); subscribers
implement :class:`IEventSink`: the metrics, the webhooks, the Server-Sent Events stream, plugins.

What emitters and subscribers may rely on:

- **Cheap when nobody listens.** :meth:`EventBus.emit` returns at once when no subscriber's pattern matches
  the type (a dictionary look-up); emitters that would compute fields call :meth:`EventBus.wants` first.
  A subscription may be narrowed to events of some ``protocol`` field values (the metrics take connects and
  disconnects of SMTP only), so ``wants(type, protocol)`` can say no to the proxy's per-connection events.
- **Subscribers cannot hurt the mail path.** Each sink is called in the reactor thread, synchronously, and
  must not block; an exception from one is logged (once per sink and type, then counted) and dropped, never
  raised to the emitter, and the other sinks still get the event.
- **Small, safe fields.** An event carries its type, a timestamp, the correlation ids (``queue_id``, the
  SMTP ``session_id``) when it has them, and a few JSON-serialisable fields: counts, durations, route names,
  reply codes. Never a message body, a header value, a password or an AUTH exchange.

Event types are ``<family>.<name>``; :data:`EVENT_TYPES` lists each with its fields (docs/operations.md
shows the same table). A subscriber names what it wants with patterns: an exact type, ``family.*`` or
``*`` (:func:`parse_patterns`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from zope.interface import Attribute, Interface, implementer

from dcrouter.log import logger

log = logger(__name__)

# -- the catalogue ---------------------------------------------------------------------------------------

#: type → (what it means, its fields). docs/operations.md is checked against this table.
EVENT_TYPES: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "config.reloaded": (
            "a configuration reload was applied (SIGHUP, POST /api/v1/reload)",
            "source (signal|api), path, changes (list of what changed)",
        ),
        "config.reload_failed": (
            "a configuration reload was refused; nothing changed",
            "source (signal|api), path, errors (list, each starting with its key path)",
        ),
        "connection.connect": (
            "a client connection was admitted",
            "protocol (smtp|proxy), port, peer, tls (implicit TLS port)",
        ),
        "connection.disconnect": (
            "a client connection ended",
            "protocol, port, duration (s); proxy: route",
        ),
        "connection.error": (
            "a connection was refused or failed",
            "protocol, port, peer, reason (short text), tls (true: the TLS handshake failed); proxy: route",
        ),
        "connection.tls": ("a TLS handshake completed", "protocol, port, version"),
        "connection.authenticated": ("SMTP AUTH succeeded", "port, mechanism"),
        "connection.command_refused": (
            "an SMTP command was answered 4xx or 5xx",
            "port, code, replyClass (4xx|5xx)",
        ),
        "message.received": ("the end of DATA arrived", "port, size, recipients"),
        "message.accepted": ("a message got its 250 (queued, quarantined or discarded)", "port, size"),
        "message.refused": ("a message was refused at the end of DATA", "port, code, reason (enhanced code)"),
        "message.processed": (
            "the processing chain finished with a message",
            "outcome (queued|quarantined|discarded|refused|tempfailed), duration (s), stages ({stage: s})",
        ),
        "message.queued": ("a message is durable in the queue", "size, recipients, local (a DSN), status"),
        "message.delivered": ("recipients were delivered", "route, recipients, duration (s)"),
        "message.deferred": (
            "an attempt left recipients pending",
            "destination, attempts, pending, nextAttemptIn (s), error",
        ),
        "message.bounced": (
            "a message finished with failed recipients",
            "status (bounced|failed), recipients",
        ),
        "message.scanned": ("a scanner gave its verdict", "scanner, verdict, action"),
        "message.dsn_sent": ("a DSN was queued", "action (failed|delayed)"),
        "delivery.attempt": (
            "one route group of one delivery attempt ended",
            "route, duration (s), delivered, failed, deferred",
        ),
        "error.delivery": (
            "recipients failed (for good or for now)",
            "route, recipients, permanent, reply (code)",
        ),
        "error.processing": ("the chain failed or timed out (4xx to the client)", "reason"),
        "certificate.issued": (
            "ACME issued a certificate",
            "name (the order's first name), renewal, notAfter (Unix time)",
        ),
        "certificate.order_failed": (
            "an ACME order failed (retried with backoff)",
            "name, renewal, failures (in a row), error",
        ),
        "performance.queue": (
            "periodic: the queue's size",
            "byStatus ({status: count}), total, oldestAge (s)",
        ),
        "performance.processing": (
            "periodic: processing since the last report",
            "messages, meanDuration (s), maxDuration (s), inFlight",
        ),
        "proxy.target_down": (
            "a proxy target failed its health checks (no new connection until it recovers)",
            "route, target (host:port), reason",
        ),
        "proxy.target_up": ("a proxy target passed its health checks again", "route, target, reason"),
        "security.auth_failure": ("SMTP AUTH failed", "port, peer, mechanism, code"),
        "security.policy_violation": (
            "a client broke a session rule",
            "port, peer, rule (sender|pregreet|non_smtp|too_many_errors|ip), code",
        ),
        "security.relay_refused": ("a recipient was refused as relaying", "port, peer, code"),
        "security.rate_limit": (
            "a rate limit alert (deduplicated per limit and key): refusals in a window, nearly full, full",
            "protocol (smtp|proxy), kind, limit, key (the counted IP or address), count, window (s)",
        ),
    }
)

FAMILIES = frozenset(name.split(".", 1)[0] for name in EVENT_TYPES)


class UnknownEventType(ValueError):
    """A type pattern that names no event type."""


def parse_patterns(patterns: Iterable[str]) -> tuple[str, ...]:
    """Validated type patterns: an exact type, ``family.*`` or ``*``. Raises UnknownEventType naming the
    first that matches nothing (a misspelt filter would otherwise stay silent for ever)."""
    result = []
    for raw in patterns:
        pattern = raw.strip()
        known = pattern == "*" or pattern in EVENT_TYPES
        if known or (pattern.endswith(".*") and pattern[:-2] in FAMILIES):
            result.append(pattern)
        else:
            raise UnknownEventType(f"{pattern!r} is not an event type, a family.* pattern or *")
    return tuple(result)


def matches(pattern: str, event_type: str) -> bool:
    """Whether ``pattern`` (as :func:`parse_patterns` accepts) selects ``event_type``."""
    if pattern == "*" or pattern == event_type:
        return True
    return pattern.endswith(".*") and event_type.startswith(pattern[:-1])


# -- the value -------------------------------------------------------------------------------------------

_NO_FIELDS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened. ``time`` is seconds since the epoch (the bus's clock)."""

    type: str
    time: float
    queue_id: str | None = None
    session_id: str | None = None
    fields: Mapping[str, Any] = field(default_factory=lambda: _NO_FIELDS)

    def to_json(self) -> dict[str, Any]:
        """The form the webhooks, the event stream and the log write: camelCase ids, fields flattened."""
        record: dict[str, Any] = {"type": self.type, "time": self.time}
        if self.queue_id is not None:
            record["queueId"] = self.queue_id
        if self.session_id is not None:
            record["sessionId"] = self.session_id
        record.update(self.fields)
        return record


class IEventSink(Interface):
    """Receives events from an :class:`EventBus` (metrics, webhooks, the event stream, plugins)."""

    name = Attribute("A short name for logs.")

    def receive(event):  # type: ignore[no-untyped-def]
        """Called in the reactor thread for each event the sink subscribed to. Must return quickly and not
        block (queue work for later); an exception is logged and dropped."""


# -- the bus ---------------------------------------------------------------------------------------------


@implementer(IEventSink)
class CallableSink:
    """A sink from a plain function (tests, small plugins)."""

    def __init__(self, function: Callable[[Event], object], name: str = "callable") -> None:
        self._function = function
        self.name = name

    def receive(self, event: Event) -> None:
        self._function(event)


#: Generation numbers of every bus (see ``EventBus.generation``).
_GENERATIONS = itertools.count(1)


class EventBus:
    """Delivers events to the sinks subscribed to their type. One per router; see the module docstring.

    ``clock_seconds`` timestamps events (the reactor's ``seconds``; by default wall time).
    ``failures`` counts exceptions raised by sinks (they are logged once per sink and type)."""

    def __init__(self, clock_seconds: Callable[[], float] = time.time) -> None:
        self._now = clock_seconds
        #: (sink, patterns, protocols: None for every event, else only events with one of these ``protocol``).
        self._subscriptions: list[tuple[IEventSink, tuple[str, ...], frozenset[str] | None]] = []
        #: The sinks by type (events without a ``protocol`` field), or by (type, protocol).
        self._by_type: dict[Any, tuple[IEventSink, ...]] = {}
        #: Types some sink takes (for some protocol, or all): what ``wants`` without a protocol answers.
        self._wanted: dict[str, bool] = {}
        self._reported: set[tuple[int, str]] = set()
        self.failures = 0
        #: A new value with every subscribe and unsubscribe, never shared with another bus: what a caller
        #: caching ``wants`` answers compares.
        self.generation = next(_GENERATIONS)

    def subscribe(
        self, sink: IEventSink, patterns: Iterable[str] = ("*",), *, protocols: Iterable[str] | None = None
    ) -> None:
        """Deliver to ``sink`` every event whose type one of ``patterns`` selects (validated); with
        ``protocols``, only the events whose ``protocol`` field is one of them (the metrics count SMTP
        sessions from events and read the proxy's open connections at scrape time: a proxy connection
        then builds no event unless something else listens)."""
        self._subscriptions.append(
            (sink, parse_patterns(patterns), None if protocols is None else frozenset(protocols))
        )
        self._by_type.clear()
        self._wanted.clear()
        self.generation = next(_GENERATIONS)

    def unsubscribe(self, sink: IEventSink) -> None:
        """Stop delivering to ``sink`` (no error when it was not subscribed)."""
        self._subscriptions = [s for s in self._subscriptions if s[0] is not sink]
        self._by_type.clear()
        self._wanted.clear()
        self.generation = next(_GENERATIONS)

    def _sinks(self, event_type: str, protocol: Any = None) -> tuple[IEventSink, ...]:
        key = event_type if protocol is None else (event_type, protocol)
        sinks = self._by_type.get(key)
        if sinks is None:
            sinks = tuple(
                sink
                for sink, patterns, protocols in self._subscriptions
                if (protocols is None or protocol in protocols)
                and any(matches(pattern, event_type) for pattern in patterns)
            )
            self._by_type[key] = sinks
        return sinks

    def wants(self, event_type: str, protocol: str | None = None) -> bool:
        """Whether an event of this type would reach any sink (skip computing its fields, or the event,
        when not): with ``protocol``, an event with that ``protocol`` field; without, any event of the type
        (a sink narrowed to some protocols counts)."""
        if protocol is not None:
            sinks = self._by_type.get((event_type, protocol))
            if sinks is None:
                sinks = self._sinks(event_type, protocol)
            return bool(sinks)
        wanted = self._wanted.get(event_type)
        if wanted is None:
            wanted = self._wanted[event_type] = any(
                matches(pattern, event_type) for _, patterns, _ in self._subscriptions for pattern in patterns
            )
        return wanted

    def emit(
        self,
        event_type: str,
        *,
        queue_id: str | None = None,
        session_id: str | None = None,
        **fields: Any,
    ) -> None:
        """Build the event and hand it to each sink subscribed to its type; never raises."""
        if not self._subscriptions:
            return
        sinks = self._sinks(event_type, fields.get("protocol"))
        if not sinks:
            return
        event = Event(event_type, self._now(), queue_id, session_id, MappingProxyType(fields))
        for sink in sinks:
            try:
                sink.receive(event)
            except Exception:  # noqa: BLE001 (a subscriber's bug must never reach the mail path)
                self._sink_failed(sink, event)

    def _sink_failed(self, sink: IEventSink, event: Event) -> None:
        self.failures += 1
        key = (id(sink), event.type)
        if key in self._reported:
            return
        self._reported.add(key)
        log.failure(
            "event subscriber {sink} failed on {event_type}; further failures of it are only counted",
            sink=getattr(sink, "name", repr(sink)),
            event_type=event.type,
        )


#: A bus nobody listens to, for components built without one (tests, embedding). Subscribing to it is
#: refused: it is shared.
class _SilentBus(EventBus):
    def subscribe(
        self, sink: IEventSink, patterns: Iterable[str] = ("*",), *, protocols: Iterable[str] | None = None
    ) -> None:
        raise TypeError("NO_EVENTS is shared and silent; give the component an EventBus of its own")


NO_EVENTS: EventBus = _SilentBus()
