"""The schema of what operators watch the router through: ``metricsConfig`` (the metrics listener) and
``events`` (webhooks, periodic performance events). ``logFormat`` is a top-level key (options.py)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from dcrouter.config import plugins, values
from dcrouter.config.schema import Report, block_check, checked, join, option
from dcrouter.events import UnknownEventType, parse_patterns


def http_url(value: str) -> str | None:
    """An absolute ``http://`` or ``https://`` URL with a host."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number or out of range)
    except ValueError as error:
        return f"not a URL: {value!r} ({error})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"not an http:// or https:// URL with a host: {value!r}"
    return None


def event_pattern(value: str) -> str | None:
    try:
        parse_patterns([value])
    except UnknownEventType as error:
        return str(error)
    return None


@block_check("bind_address", "event_stream")
def stream_only_on_loopback(metrics: MetricsConfig, path: str, report: Report) -> None:
    """The listener has no authentication: the event stream (who mails whom, when) is served on it only
    when it listens on loopback."""
    if metrics.event_stream and not ipaddress.ip_address(metrics.bind_address).is_loopback:
        report.error(
            join(path, "eventStream"),
            f"served without authentication, so only on a loopback bindAddress (not {metrics.bind_address}); "
            "use the management API for remote access",
        )


@checked(stream_only_on_loopback)
@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = option(
        False, doc="Serve `GET /metrics` (Prometheus text format) on a listener of its own."
    )
    bind_address: str = option(
        "127.0.0.1",
        doc="Address of the metrics listener. It has no authentication: keep it on loopback or a private "
        "network.",
        check=values.ip_address,
    )
    port: int = option(9025, doc="Port of the metrics listener.", check=values.port)
    event_stream: bool = option(
        False,
        doc="Also serve the event stream (`GET /api/v1/events`, Server-Sent Events) on this listener; only "
        "with a loopback bindAddress.",
    )


@dataclass(frozen=True)
class WebhookConfig:
    url: str = option(doc="Where events are POSTed (http:// or https://).", check=http_url)
    types: list[str] = option(
        factory=lambda: ["*"],
        doc="Event types sent: exact types (`message.bounced`), families (`security.*`) or `*`.",
        check=values.not_empty,
        each=event_pattern,
    )
    secret: str | None = option(
        None,
        doc="Key of the HMAC-SHA256 signature of each body, sent as `X-Dcrouter-Signature: sha256=<hex>`.",
    )
    timeout: int = option(10_000, doc="Milliseconds one request may take.", check=values.duration)
    max_attempts: int = option(
        10,
        doc="Tries per event (with backoff from 1 s doubling to 60 s) before it is dropped.",
        check=values.positive,
    )


@block_check("type", "options")
def subscriber_plugin(entry: SubscriberConfig, path: str, report: Report) -> None:
    """The type must name a loadable IEventSink whose options pass its own schema."""
    plugins.check_config("subscriber", entry, path, report)


@checked(subscriber_plugin)
@dataclass(frozen=True)
class SubscriberConfig:
    type: str = option(
        doc="The subscriber plugin: an entry point of group `dcrouter.event_subscribers`, or a dotted path "
        "`package.module:Class` of a class implementing `dcrouter.events.IEventSink` (docs/plugins.md).",
        check=values.not_empty,
    )
    types: list[str] = option(
        factory=lambda: ["*"],
        doc="Event types it receives: exact types, families (`message.*`) or `*`.",
        check=values.not_empty,
        each=event_pattern,
    )
    options: dict[str, Any] = option(factory=dict, doc="The plugin's own options (its `options_schema`).")


@dataclass(frozen=True)
class EventsConfig:
    webhooks: list[WebhookConfig] = option(factory=list, doc="Receivers of events, each with its types.")
    subscribers: list[SubscriberConfig] = option(
        factory=list, doc="Event subscriber plugins, built at start-up and subscribed to their types."
    )
    buffer_size: int = option(
        1000,
        doc="Events kept per webhook while its receiver is slow or down; past it the oldest is dropped and "
        "counted.",
        check=values.positive,
    )
    log: list[str] = option(
        factory=list,
        doc="Event types also written to the log, one line each at info level in namespace "
        '`dcrouter.events` (`["security.*"]`, `["*"]`); empty: none (the mail path logs its own lines).',
        each=event_pattern,
    )
    performance_interval: int = option(
        60_000,
        doc="Milliseconds between the periodic `performance.queue` and `performance.processing` events.",
        check=values.duration,
    )
