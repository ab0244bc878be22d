"""What the management API sees of a running router: the parts it reads and steers, passed in by the router
(so the API imports no ingress or proxy module, and tests build it from the parts they have)."""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from dcrouter.api.ratelimits import RateLimitControl
from dcrouter.delivery.manager import DeliveryManager
from dcrouter.interfaces import IDeliveryQueue, ISuppressionList
from dcrouter.queue.item import QueueItem, QueueItemStatus


def _zero() -> int:
    return 0


@dataclass
class RouterView:
    """``queue`` and ``delivery`` are None without smtpConfig; the callables read live figures."""

    clock: IReactorTime
    version: str
    queue: IDeliveryQueue | None = None
    delivery: DeliveryManager | None = None
    #: True once the queue has loaded and the listeners accept connections.
    ready: Callable[[], bool] = lambda: True
    #: The processing chain's counters since start (``EmailProcessor.stats``) and messages in it now.
    processing_stats: Callable[[], dict[str, int]] = dict
    processing_in_flight: Callable[[], int] = _zero
    smtp_sessions: Callable[[], int] = _zero
    proxy_connections: Callable[[], int] = _zero
    started_at: float = field(default=0.0)
    #: The routing keys as configured (argument: show downstream AUTH passwords); None: not known.
    routing: Callable[[bool], dict[str, Any] | None] | None = None
    #: Replace the routing (raises dcrouter.config.ConfigError); answers ``persisted`` and ``warnings``.
    replace_routing: Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]] | None = None
    #: The route dry-run (dcrouter.routetest.dry_run): ValueError for bad input, LookupError for a part the
    #: router does not run.
    route_test: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    #: The queue's suppression list (None: suppression is off), its entries' lifetime in seconds, and the
    #: RCPTs it refused since start.
    suppressions: ISuppressionList | None = None
    suppression_ttl: float = 0.0
    suppressed_refusals: Callable[[], int] = _zero
    #: Reloads the configuration file (``source`` names who asked) and fires with a
    #: :class:`dcrouter.reload.ReloadOutcome`; None when the router was not started from a file.
    reload: Callable[[str], Deferred[Any]] | None = None
    #: The rate limits in force and how to change them (None without smtpConfig): /api/v1/rate-limits.
    rate_limits: RateLimitControl | None = None


def iso_time(when: float | None) -> str | None:
    """``when`` (seconds since the epoch) as ISO 8601 UTC, to the second; None for none (or 0: unset)."""
    if not when:
        return None
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def item_summary(item: QueueItem) -> dict[str, Any]:
    """The fields of one line of a queue listing (``mailq``'s, and a little more)."""
    return {
        "id": item.id,
        "status": QueueItemStatus(item.status).value,
        "size": item.size,
        "createdAt": iso_time(item.created_at),
        "sender": item.envelope.mail_from,
        "recipients": list(item.envelope.recipients),
        "destination": item.destination,
        "attempts": item.attempts,
        "nextAttemptAt": iso_time(item.next_attempt_at),
        "lastError": item.last_error,
    }


def item_detail(item: QueueItem) -> dict[str, Any]:
    """Everything about one message but its content: envelope, status, attempts with target and reply."""
    env = item.envelope
    detail = item_summary(item)
    detail.update(
        {
            "priority": int(item.priority),
            "pendingRecipients": item.pending_recipients(),
            "envelope": {
                "sender": env.mail_from,
                "recipients": list(env.recipients),
                "mailParams": dict(env.mail_params),
                "helo": env.helo,
                "peer": {"host": env.peer_host, "port": env.peer_port},
                "tls": env.tls,
                "authUser": env.auth_user,
                "receivedAt": iso_time(env.received_at),
            },
            "outcomes": {
                rcpt: {
                    "outcome": o.get("outcome"),
                    "reply": o.get("reply"),
                    "target": o.get("target"),
                    "at": iso_time(o.get("at")),
                }
                for rcpt, o in item.outcomes.items()
            },
            "history": [
                {
                    "at": iso_time(h.get("at")),
                    "route": h.get("route"),
                    "tried": list(h.get("tried") or []),
                    "results": [
                        {k: r.get(k) for k in ("recipient", "outcome", "reply", "target")}
                        for r in h.get("results") or []
                    ],
                }
                for h in item.history
            ],
            "bounceId": item.bounce_id,
            "warnedAt": iso_time(item.warned_at),
        }
    )
    return detail
