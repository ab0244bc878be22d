"""Webhooks: events POSTed as JSON to a URL, signed, retried, never in the mail path's way.

Each configured webhook (``events.webhooks[]``) is one :class:`WebhookSink` subscribed to the bus for its
``types``. What a receiver and an operator may rely on:

- **One event per request**: ``POST <url>`` with ``Content-Type: application/json``, the body the event's
  JSON form (:meth:`dcrouter.events.Event.to_json`), ``X-Dcrouter-Event: <type>`` and, when a ``secret`` is
  set, ``X-Dcrouter-Signature: sha256=<hex HMAC-SHA256 of the body with the secret>`` (compare it in constant
  time). A 2xx reply is success; anything else, a timeout or a connection failure is retried.
- **In order, one at a time**: a webhook has at most one request in flight; the next event waits.
- **Retries with backoff**: ``RETRY_BASE`` seconds doubling up to ``RETRY_MAX`` (with jitter), until
  ``maxAttempts`` tries, after which the event is dropped and counted (``failed``).
- **Bounded memory**: events waiting behind a receiver that is slow or down are kept up to ``bufferSize``;
  past it the oldest is dropped and counted (``dropped``). :meth:`WebhookSink.receive` only appends to that
  buffer, so emitting never waits for the network.
- **Not durable**: waiting events live in memory; a restart loses them (the log has every event).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random as random_module
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from dcrouter.events import Event, IEventSink
from dcrouter.log import logger

log = logger(__name__)

RETRY_BASE = 1.0
RETRY_MAX = 60.0
SIGNATURE_HEADER = b"X-Dcrouter-Signature"
EVENT_HEADER = b"X-Dcrouter-Event"

#: ``post(url, body, headers, timeout)`` → Deferred firing with the response's status code.
Post = Callable[[str, bytes, dict[bytes, list[bytes]], float], "Deferred[int]"]


def signature(secret: str, body: bytes) -> str:
    """The ``X-Dcrouter-Signature`` value for ``body``: ``sha256=<hex>``."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def treq_post(reactor: Any) -> Post:
    """A :data:`Post` over treq, with a connection pool of its own on ``reactor`` (not treq's global one)."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.http_headers import Headers

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 1
    client = HTTPClient(Agent(reactor, pool=pool, connectTimeout=10))

    async def post(url: str, body: bytes, headers: dict[bytes, list[bytes]], timeout: float) -> int:
        response = await client.post(
            url, data=body, headers=Headers(dict(headers)), timeout=timeout, reactor=reactor
        )
        await response.content()  # read to the end so the connection returns to the pool
        return int(response.code)

    def start(url: str, body: bytes, headers: dict[bytes, list[bytes]], timeout: float) -> Deferred[int]:
        return Deferred.fromCoroutine(post(url, body, headers, timeout))

    start.pool = pool  # type: ignore[attr-defined]
    return start


@implementer(IEventSink)
class WebhookSink:
    """Posts events to ``url`` as the module docstring says. ``post`` sends one request (tests pass their
    own or :func:`treq_post`); ``clock`` runs the retry timers.

    Counters callers may read: ``sent``, ``dropped`` (buffer overflow), ``failed`` (out of attempts),
    ``retries``; ``pending`` is the number of events waiting (in flight included)."""

    def __init__(
        self,
        url: str,
        *,
        post: Post,
        clock: IReactorTime,
        types: Sequence[str] = ("*",),
        secret: str | None = None,
        timeout: float = 10.0,
        buffer_size: int = 1000,
        max_attempts: int = 10,
        random: Callable[[], float] = random_module.random,
    ) -> None:
        self.url = url
        self.name = f"webhook {url}"
        self.types = tuple(types)
        self._post = post
        self._clock = clock
        self._secret = secret
        self._timeout = timeout
        self._buffer: deque[Event] = deque()
        self._buffer_size = buffer_size
        self._max_attempts = max_attempts
        self._random = random
        self._current: Event | None = None
        self._attempt = 0
        self._in_flight: Deferred[int] | None = None
        self._retry: IDelayedCall | None = None
        self._running = True
        self.sent = 0
        self.dropped = 0
        self.failed = 0
        self.retries = 0

    @property
    def pending(self) -> int:
        return len(self._buffer) + (self._current is not None)

    def receive(self, event: Event) -> None:
        """Buffer ``event`` (dropping the oldest waiting one when full) and start sending if idle."""
        if not self._running:
            return
        if len(self._buffer) >= self._buffer_size:
            self._buffer.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warn(
                    "webhook {url}: buffer full ({size} events), dropping the oldest ({dropped} so far)",
                    url=self.url,
                    size=self._buffer_size,
                    dropped=self.dropped,
                )
        self._buffer.append(event)
        if self._current is None:
            self._next()

    def stop(self) -> None:
        """Stop sending: cancel the retry timer and the request in flight; waiting events are discarded."""
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._in_flight is not None:
            self._in_flight.cancel()
        self._buffer.clear()
        self._current = None

    def _next(self) -> None:
        if not self._running or not self._buffer:
            self._current = None
            return
        self._current = self._buffer.popleft()
        self._attempt = 0
        self._send()

    def _send(self) -> None:
        self._retry = None
        event = self._current
        assert event is not None
        self._attempt += 1
        body = json.dumps(event.to_json(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        headers = {
            b"Content-Type": [b"application/json"],
            EVENT_HEADER: [event.type.encode("ascii")],
            b"User-Agent": [b"dcrouter-webhook"],
        }
        if self._secret:
            headers[SIGNATURE_HEADER] = [signature(self._secret, body).encode("ascii")]
        try:
            sending = self._post(self.url, body, headers, self._timeout)
        except Exception as error:  # noqa: BLE001 (a bad URL fails here; retried and counted like any failure)
            self._failed(repr(error))
            return
        self._in_flight = sending
        sending.addCallbacks(self._answered, lambda failure: self._failed(failure.getErrorMessage()))

    def _answered(self, code: int) -> None:
        self._in_flight = None
        if 200 <= code < 300:
            self.sent += 1
            self._next()
            return
        self._failed(f"HTTP {code}")

    def _failed(self, why: str) -> None:
        self._in_flight = None
        if not self._running:
            return
        event = self._current
        assert event is not None
        if self._attempt >= self._max_attempts:
            self.failed += 1
            log.warn(
                "webhook {url}: {event_type} dropped after {attempts} attempts ({error})",
                url=self.url,
                event_type=event.type,
                queue_id=event.queue_id,
                attempts=self._attempt,
                error=why,
            )
            self._next()
            return
        delay = min(RETRY_MAX, RETRY_BASE * 2 ** (self._attempt - 1)) * (0.5 + self._random() / 2)
        self.retries += 1
        if self._attempt == 1:
            log.info(
                "webhook {url}: {error}; retrying with backoff",
                url=self.url,
                error=why,
                queue_id=event.queue_id,
            )
        self._retry = self._clock.callLater(delay, self._send)
