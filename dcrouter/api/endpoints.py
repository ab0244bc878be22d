"""The management API's endpoints: the table :mod:`dcrouter.api.root` dispatches and
:mod:`dcrouter.api.openapi` documents. Every handler goes through the queue interface and the delivery
manager, never a backend's insides; see docs/api.md for each one's contract."""

from __future__ import annotations

from functools import partial
from typing import Any

from dcrouter import log as dclog
from dcrouter.api.http import ApiError, Call, Endpoint, Field, Stream
from dcrouter.api.ratelimits import endpoints as rate_limit_endpoints
from dcrouter.api.view import RouterView, iso_time, item_detail, item_summary
from dcrouter.delivery.manager import DeliveryManager
from dcrouter.interfaces import IDeliveryQueue, QueueUnavailable
from dcrouter.log import LEVEL_NAMES, logger
from dcrouter.queue import operations
from dcrouter.queue.contract import MAX_PAGE, QueueFilter, check_item_id
from dcrouter.queue.files import message_reader
from dcrouter.queue.item import QueueItemStatus

log = logger(__name__)

#: Items per page of ``GET /api/v1/queue`` when ``limit`` is not given.
DEFAULT_PAGE = 100

_STATUSES = tuple(s.value for s in QueueItemStatus)
_DESTINATION = Field(
    "destination",
    "string",
    "A route name (`domain:example.com`, `mx:example.org`, ...); omitted: every destination.",
)
_ID = {400: "bad id", 404: "no such message"}
_WRITE = {**_ID, 409: "the message is not in a status this applies to"}


#: Most messages one bulk request acts on (the rest: ask again).
BULK_LIMIT = 10_000

_BULK_APPLIES = {
    "retry": "queued or deferred",
    "hold": "queued or deferred",
    "release": "held",
    "delete": "any status but delivering",
}
_BULK_BODY = (
    Field("status", "string", "Only messages in this status.", enum=_STATUSES),
    _DESTINATION,
    Field("sender", "string", "Case-insensitive part of the envelope sender."),
    Field("recipient", "string", "Case-insensitive part of any envelope recipient."),
    Field("dryRun", "boolean", "Change nothing; answer which messages would be affected."),
    Field("limit", "integer", f"Act on at most this many (default and most: {BULK_LIMIT})."),
)


class Endpoints:
    """Builds the endpoint table over ``view``."""

    def __init__(self, view: RouterView) -> None:
        self.view = view

    def table(self) -> list[Endpoint]:
        E = Endpoint
        return [
            E("GET", "/health", self.health, "public", "Liveness: 200 while the process answers."),
            E(
                "GET",
                "/api/v1/ready",
                self.ready,
                "read",
                "Readiness: 200 once the queue is loaded and the listeners accept connections, else 503.",
                responses={503: "not ready"},
            ),
            E(
                "GET",
                "/api/v1/stats",
                self.stats,
                "read",
                "Queue counts by status, messages since start, sessions, connections, uptime, version.",
            ),
            E(
                "GET",
                "/api/v1/queue",
                self.queue_list,
                "read",
                "Queued messages, newest first, one page at a time (follow `nextCursor`).",
                query=(
                    Field("status", "string", "Only messages in this status.", enum=_STATUSES),
                    _DESTINATION,
                    Field("sender", "string", "Case-insensitive part of the envelope sender."),
                    Field("recipient", "string", "Case-insensitive part of any envelope recipient."),
                    Field("limit", "integer", f"Items per page, 1 to {MAX_PAGE} (default {DEFAULT_PAGE})."),
                    Field("cursor", "string", "`nextCursor` of the previous page."),
                ),
                responses={400: "bad parameter"},
            ),
            E(
                "GET",
                "/api/v1/queue/{id}",
                self.queue_show,
                "read",
                "One message: envelope, status, attempts with target and reply, next attempt, route.",
                responses=_ID,
            ),
            E(
                "GET",
                "/api/v1/queue/{id}/message",
                self.queue_message,
                "read",
                "The message as it will be relayed (message/rfc822), streamed.",
                responses=_ID,
                produces="message/rfc822",
            ),
            E(
                "POST",
                "/api/v1/queue/{id}/retry",
                self.queue_retry,
                "admin",
                "Make a queued or deferred message due now.",
                body=(),
                responses=_WRITE,
            ),
            E(
                "POST",
                "/api/v1/queue/{id}/hold",
                self.queue_hold,
                "admin",
                "Hold a queued or deferred message: never delivered until released.",
                body=(),
                responses=_WRITE,
            ),
            E(
                "POST",
                "/api/v1/queue/{id}/release",
                self.queue_release,
                "admin",
                "Release a held message (due at its next attempt time, at once if passed).",
                body=(),
                responses=_WRITE,
            ),
            E(
                "POST",
                "/api/v1/queue/{id}/bounce",
                self.queue_bounce,
                "admin",
                "Fail every pending recipient now with a reason and send the sender a bounce.",
                body=(Field("reason", "string", "Said in the bounce (default: no reason given)."),),
                responses=_WRITE,
            ),
            *(
                E(
                    "POST",
                    f"/api/v1/queue/{name}",
                    partial(self.queue_bulk, name),
                    "admin",
                    f"{name.capitalize()} every message a filter matches ({_BULK_APPLIES[name]}); with "
                    "`dryRun`, only say which.",
                    body=_BULK_BODY,
                    responses={400: "no filter, or a bad one"},
                )
                for name in ("retry", "hold", "release", "delete")
            ),
            E(
                "DELETE",
                "/api/v1/queue/{id}",
                self.queue_delete,
                "admin",
                "Remove a message and its body; no bounce is sent (logged).",
                responses=_WRITE,
            ),
            E(
                "GET",
                "/api/v1/delivery",
                self.delivery_show,
                "read",
                "Whether delivery is paused (globally, per destination), deliveries in flight, and the last "
                "failure per destination.",
            ),
            E(
                "POST",
                "/api/v1/delivery/pause",
                self.delivery_pause,
                "admin",
                "Pause delivery, globally or for one destination; mail is still accepted and queued.",
                body=(_DESTINATION,),
            ),
            E(
                "POST",
                "/api/v1/delivery/resume",
                self.delivery_resume,
                "admin",
                "Resume delivery, globally or for one destination.",
                body=(_DESTINATION,),
            ),
            E(
                "GET",
                "/api/v1/log-level",
                self.log_level_show,
                "read",
                "The log level, global (`dcrouter`) and per namespace.",
            ),
            E(
                "PUT",
                "/api/v1/log-level",
                self.log_level_set,
                "admin",
                "Set the log level of `dcrouter` or of a namespace under it, effective at once.",
                body=(
                    Field("level", "string", "The lowest level written.", required=True, enum=LEVEL_NAMES),
                    Field(
                        "namespace",
                        "string",
                        "`dcrouter` (default) or a namespace under it, e.g. `dcrouter.delivery`.",
                    ),
                ),
                responses={400: "bad level or namespace"},
            ),
            *rate_limit_endpoints(lambda: self.view.rate_limits),
        ]

    # -- helpers ---------------------------------------------------------------------------------------

    def _queue(self) -> IDeliveryQueue:
        if self.view.queue is None:
            raise ApiError(404, "no_queue", "this router has no smtpConfig, so no queue")
        return self.view.queue

    def _delivery(self) -> DeliveryManager:
        if self.view.delivery is None:
            raise ApiError(404, "no_delivery", "this router has no smtpConfig, so no delivery")
        return self.view.delivery

    @staticmethod
    def _id(call: Call) -> str:
        item_id = call.params["id"]
        try:
            check_item_id(item_id)
        except ValueError:
            raise ApiError(400, "bad_id", f"not a queue id (1-64 of A-Z a-z 0-9 _ -): {item_id!r}") from None
        return item_id

    @staticmethod
    def _who(call: Call) -> str:
        return call.token.name if call.token is not None else "-"

    async def _operate(self, call: Call, operation: str, run: Any) -> dict[str, Any]:
        item_id = self._id(call)
        try:
            item = await run(item_id)
        except operations.NotFound:
            raise ApiError(404, "not_found", f"no message {item_id} in the queue") from None
        except operations.WrongStatus as e:
            raise ApiError(409, "wrong_status", str(e)) from None
        except QueueUnavailable as e:
            raise ApiError(503, "queue_unavailable", str(e)) from None
        log.info(
            "{queue_id}: {operation} by API token {token}",
            queue_id=item_id,
            operation=operation,
            token=self._who(call),
        )
        return {"item": item_summary(item)}

    # -- handlers --------------------------------------------------------------------------------------

    async def health(self, call: Call) -> Any:
        return {"status": "ok"}

    async def ready(self, call: Call) -> Any:
        if self.view.ready():
            return {"ready": True}
        return 503, {"ready": False}

    async def stats(self, call: Call) -> Any:
        view = self.view
        counts = await view.queue.count_by_status() if view.queue is not None else {}
        processing = view.processing_stats()
        delivery = view.delivery.get_delivery_stats() if view.delivery is not None else {}
        now = view.clock.seconds()
        return {
            "version": view.version,
            "startedAt": iso_time(view.started_at),
            "uptime": round(max(0.0, now - view.started_at), 3),
            "queue": counts,
            "messages": {
                "received": sum(
                    processing.get(k, 0) for k in ("processed", "refused", "discarded", "tempfailed")
                ),
                "accepted": processing.get("processed", 0),
                "refused": processing.get("refused", 0),
                "quarantined": processing.get("quarantined", 0),
                "delivered": delivery.get("delivered", 0),
                "bounced": delivery.get("bounced", 0),
                "deferred": delivery.get("deferred", 0),
                "failed": delivery.get("failed", 0),
            },
            "smtpSessions": view.smtp_sessions(),
            "proxyConnections": view.proxy_connections(),
            "processingInFlight": view.processing_in_flight(),
            "deliveriesInFlight": delivery.get("in_flight", 0),
        }

    async def queue_list(self, call: Call) -> Any:
        q = call.query
        status = QueueItemStatus(q["status"]) if "status" in q else None
        limit = int(q.get("limit", DEFAULT_PAGE))
        if not 1 <= limit <= MAX_PAGE:
            raise ApiError(400, "bad_parameter", f"limit: 1 to {MAX_PAGE}, got {limit}")
        criteria = QueueFilter(status, q.get("destination"), q.get("sender"), q.get("recipient"))
        try:
            page = await self._queue().list_items(criteria, limit, q.get("cursor"))
        except ValueError as e:
            raise ApiError(400, "bad_parameter", str(e)) from None
        except QueueUnavailable as e:
            raise ApiError(503, "queue_unavailable", str(e)) from None
        return {"items": [item_summary(i) for i in page.items], "nextCursor": page.next_cursor}

    async def queue_show(self, call: Call) -> Any:
        item_id = self._id(call)
        item = await self._queue().get(item_id)
        if item is None:
            raise ApiError(404, "not_found", f"no message {item_id} in the queue")
        return item_detail(item)

    async def queue_message(self, call: Call) -> Any:
        item_id = self._id(call)
        queue = self._queue()
        item = await queue.get(item_id)
        if item is None:
            raise ApiError(404, "not_found", f"no message {item_id} in the queue")
        if item.status is QueueItemStatus.DELIVERING:
            # For the queue, opening a claimed item's body is where its delivery starts (the Redis queue lets
            # go of a claim whose lease it cannot vouch for there): never do that beside a delivery.
            raise ApiError(
                409, "wrong_status", f"message {item_id} is being delivered; try again in a moment"
            )
        try:
            stream = await queue.open_body(item_id)
        except KeyError:
            raise ApiError(404, "not_found", f"no message {item_id} in the queue") from None
        return Stream(message_reader(item.head, stream, item.body_offset), "message/rfc822")

    async def queue_retry(self, call: Call) -> Any:
        queue, now = self._queue(), self.view.clock.seconds()
        result = await self._operate(call, "retry", lambda i: operations.retry(queue, i, now))
        if self.view.delivery is not None:
            self.view.delivery.wake()
        return result

    async def queue_hold(self, call: Call) -> Any:
        queue = self._queue()
        return await self._operate(call, "hold", lambda i: operations.hold(queue, i))

    async def queue_release(self, call: Call) -> Any:
        queue = self._queue()
        result = await self._operate(call, "release", lambda i: operations.release(queue, i))
        if self.view.delivery is not None:
            self.view.delivery.wake()
        return result

    async def queue_delete(self, call: Call) -> Any:
        queue = self._queue()
        return await self._operate(call, "delete (no bounce)", lambda i: operations.delete(queue, i))

    async def queue_bulk(self, name: str, call: Call) -> Any:
        """One operation on every message matching a filter, newest first, up to ``limit``."""
        body = call.body
        criteria = {k: body[k] for k in ("status", "destination", "sender", "recipient") if k in body}
        if not criteria:
            raise ApiError(
                400,
                "missing_filter",
                "give a filter (status, destination, sender or recipient); a bulk operation never applies to "
                "the whole queue by default",
            )
        limit = body.get("limit", BULK_LIMIT)
        if not 1 <= limit <= BULK_LIMIT:
            raise ApiError(400, "bad_field", f"limit: 1 to {BULK_LIMIT}, got {limit}")
        queue, now = self._queue(), self.view.clock.seconds()
        run = {
            "retry": lambda i: operations.retry(queue, i, now),
            "hold": lambda i: operations.hold(queue, i),
            "release": lambda i: operations.release(queue, i),
            "delete": lambda i: operations.delete(queue, i),
        }[name]
        applies = operations.APPLIES[name]
        status = criteria.get("status")
        wanted = QueueFilter(
            QueueItemStatus(status) if status else None,
            criteria.get("destination"),
            criteria.get("sender"),
            criteria.get("recipient"),
        )
        matched: list[str] = []
        cursor: str | None = None
        while len(matched) < limit:
            page = await queue.list_items(wanted, MAX_PAGE, cursor)
            matched += [i.id for i in page.items if applies(i.status)]
            cursor = page.next_cursor
            if cursor is None:
                break
        truncated = len(matched) > limit or cursor is not None
        matched = matched[:limit]
        if body.get("dryRun"):
            return {"dryRun": True, "matched": matched, "done": [], "skipped": [], "truncated": truncated}
        done, skipped = [], []
        for item_id in matched:
            try:
                await run(item_id)
            except (operations.NotFound, operations.WrongStatus) as e:
                skipped.append({"id": item_id, "reason": str(e)})  # changed since it was listed
            else:
                done.append(item_id)
        log.info(
            "{operation} of {count} messages by API token {token} (filter {criteria})",
            operation=name,
            count=len(done),
            token=self._who(call),
            criteria=criteria,
        )
        if name in ("retry", "release") and self.view.delivery is not None:
            self.view.delivery.wake()
        return {"dryRun": False, "matched": matched, "done": done, "skipped": skipped, "truncated": truncated}

    async def queue_bounce(self, call: Call) -> Any:
        delivery = self._delivery()
        reason = call.body.get("reason") or "no reason given"
        if len(reason) > 200 or any(ord(c) < 32 for c in reason):
            raise ApiError(400, "bad_field", "reason: one line of at most 200 characters")
        return await self._operate(call, f"bounce ({reason})", lambda i: delivery.bounce_now(i, reason))

    async def delivery_show(self, call: Call) -> Any:
        delivery = self._delivery()
        stats = delivery.get_delivery_stats()
        return {
            "paused": delivery.paused,
            "pausedDestinations": delivery.paused_destinations,
            "inFlight": stats["in_flight"],
            "inFlightByDestination": delivery.in_flight_by_destination(),
            "lastErrors": {
                route: {"reply": reply, "at": iso_time(at)}
                for route, (reply, at) in sorted(delivery.last_errors().items())
            },
        }

    async def delivery_pause(self, call: Call) -> Any:
        delivery = self._delivery()
        destination = call.body.get("destination")
        delivery.pause_deliveries(destination)
        log.warn(
            "delivery paused ({what}) by API token {token}",
            what=destination or "everything",
            token=self._who(call),
        )
        return await self.delivery_show(call)

    async def delivery_resume(self, call: Call) -> Any:
        delivery = self._delivery()
        destination = call.body.get("destination")
        delivery.resume_deliveries(destination)
        log.info(
            "delivery resumed ({what}) by API token {token}",
            what=destination or "everything",
            token=self._who(call),
        )
        return await self.delivery_show(call)

    async def log_level_show(self, call: Call) -> Any:
        settings = dclog.level_settings()
        return {
            "level": dclog.level_for("dcrouter"),
            "namespaces": {k: v for k, v in sorted(settings.items()) if k != "dcrouter"},
        }

    async def log_level_set(self, call: Call) -> Any:
        namespace = call.body.get("namespace", "dcrouter")
        parts = namespace.split(".")
        if parts[0] != "dcrouter" or not all(p.isidentifier() for p in parts):
            raise ApiError(
                400, "bad_field", f"namespace: `dcrouter` or a dotted name under it, got {namespace!r}"
            )
        dclog.set_level(call.body["level"], namespace)
        log.info(
            "log level of {namespace} set to {new_level} by API token {token}",
            namespace=namespace,
            new_level=call.body["level"],
            token=self._who(call),
        )
        return await self.log_level_show(call)
