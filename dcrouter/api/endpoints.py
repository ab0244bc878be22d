"""The management API's endpoints: the table :mod:`dcrouter.api.root` dispatches and
:mod:`dcrouter.api.openapi` documents. Every handler goes through the queue interface and the delivery
manager, never a backend's insides; see docs/api.md for each one's contract."""

from __future__ import annotations

from functools import partial
from typing import Any
from urllib.parse import unquote

from dcrouter import log as dclog
from dcrouter.api.http import ApiError, Call, Endpoint, Field, Stream
from dcrouter.api.ratelimits import endpoints as rate_limit_endpoints
from dcrouter.api.view import RouterView, iso_time, item_detail, item_summary
from dcrouter.config import ConfigError
from dcrouter.delivery.manager import DeliveryManager
from dcrouter.interfaces import (
    HeldByOtherWorker,
    IDeliveryQueue,
    ISuppressionList,
    QueueUnavailable,
    Suppression,
)
from dcrouter.log import LEVEL_NAMES, logger
from dcrouter.quarantine import HEAD_LIMIT, header_block
from dcrouter.queue import operations
from dcrouter.queue import quarantine as quarantined
from dcrouter.queue.contract import MAX_PAGE, QueueFilter, check_item_id
from dcrouter.queue.files import message_reader
from dcrouter.queue.item import QueueItemStatus
from dcrouter.queue.suppression import normalize

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


_ROUTING_BODY = (
    Field("domainConfigs", "array", "smtpConfig.domainConfigs entries (omitted: none).", nullable=True),
    Field("routingRules", "array", "smtpConfig.routingRules entries (omitted: none).", nullable=True),
    Field(
        "defaultServer",
        "string",
        "smtpConfig.defaultServer (omitted or null: delivery by MX).",
        nullable=True,
    ),
    Field("defaultPort", "integer", "smtpConfig.defaultPort (omitted: 25).", nullable=True),
    Field("useTls", "boolean", "smtpConfig.useTls (omitted: false).", nullable=True),
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
                "Whether delivery is paused (globally, per destination), deliveries in flight, the last "
                "failure per destination, and per destination how many messages are `queued` (waiting for a "
                "first attempt) and `deferred` (waiting for a retry): `queuedByDestination`, the 500 "
                "destinations with most, the rest summed in `queuedOther` (with no destination recorded "
                "too); `queuedComplete` is false when the queue (Redis) counted a bounded part only.",
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
                "/api/v1/routing",
                self.routing_show,
                "read",
                "smtpConfig's domainConfigs, routingRules and defaultServer (defaultPort, useTls) as "
                "configured; downstream AUTH passwords only to admin tokens.",
                responses={404: "no smtpConfig, or not built from a configuration"},
            ),
            E(
                "PUT",
                "/api/v1/routing",
                self.routing_replace,
                "admin",
                "Replace the routing after the configuration loader's checks; used from the next RCPT and "
                "delivery attempt on; written to the file with apiConfig.persist.",
                body=_ROUTING_BODY,
                responses={404: "no smtpConfig", 422: "the configuration with this routing is not valid"},
            ),
            E(
                "POST",
                "/api/v1/routing/test",
                self.routing_test,
                "read",
                "Dry-run a route, sending nothing: for mail (recipient, sender, clientIp, authenticated) the "
                "relay decision, the matching rule or domainConfigs entry, targets, TLS, limits and retry "
                "schedule; for the proxy (sni or host, port, clientIp) the route, action and target.",
                body=(
                    Field("recipient", "string", "Mail: the RCPT TO address."),
                    Field("sender", "string", "Mail: the MAIL FROM address (default: the null sender)."),
                    Field(
                        "clientIp", "string", "The client's address (default 192.0.2.1: no relay network)."
                    ),
                    Field("authenticated", "boolean", "Mail: the session authenticated (default false)."),
                    Field("sni", "string", "Proxy: the TLS server name asked for."),
                    Field("host", "string", "Proxy: the HTTP Host asked for."),
                    Field("port", "integer", "Proxy: the port connected to."),
                ),
                responses={404: "the router runs no SMTP (or no proxy)"},
            ),
            E(
                "GET",
                "/api/v1/suppression",
                self.suppression_list,
                "read",
                "Suppressed recipients (hard bounces, 5.1.x), the soonest to expire first, and the RCPTs "
                "refused for them since start.",
                query=(
                    Field(
                        "limit", "integer", f"At most this many, 1 to {MAX_PAGE} (default {DEFAULT_PAGE})."
                    ),
                ),
                responses={404: "suppression is off"},
            ),
            E(
                "GET",
                "/api/v1/suppression/{address}",
                self.suppression_show,
                "read",
                "One suppressed recipient: why, since and until when.",
                responses={400: "not an address", 404: "not suppressed"},
            ),
            E(
                "POST",
                "/api/v1/suppression",
                self.suppression_add,
                "admin",
                "Suppress a recipient: mail to it is refused at RCPT with 550 5.1.1.",
                body=(
                    Field("address", "string", "The recipient address.", required=True),
                    Field("reason", "string", "Why (default: added by the API token's name)."),
                    Field("ttl", "integer", "Milliseconds it stays suppressed (default: suppressionTtl)."),
                ),
                responses={404: "suppression is off"},
            ),
            E(
                "DELETE",
                "/api/v1/suppression/{address}",
                self.suppression_remove,
                "admin",
                "Take a recipient off the suppression list: mail to it is accepted again.",
                responses={400: "not an address", 404: "not suppressed"},
            ),
            E(
                "GET",
                "/api/v1/quarantine",
                self.quarantine_list,
                "read",
                "Quarantined messages, oldest first, each with the reason it was quarantined.",
            ),
            E(
                "GET",
                "/api/v1/quarantine/{id}",
                self.quarantine_show,
                "read",
                "One quarantined message: envelope, reason, and its header block as it will be relayed.",
                responses={400: "bad id", 404: "no such quarantined message"},
            ),
            E(
                "POST",
                "/api/v1/quarantine/{id}/release",
                self.quarantine_release,
                "admin",
                "Release a quarantined message: queued, due now.",
                body=(),
                responses={400: "bad id", 404: "no such message", 409: "the message is not quarantined"},
            ),
            E(
                "DELETE",
                "/api/v1/quarantine/{id}",
                self.quarantine_delete,
                "admin",
                "Delete a quarantined message and its body (no delivery, no bounce; logged).",
                responses={400: "bad id", 404: "no such message", 409: "the message is not quarantined"},
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
            E(
                "POST",
                "/api/v1/reload",
                self.reload,
                "admin",
                "Read the configuration file again and apply it at once (as SIGHUP does); answers what "
                "changed. An invalid file, or one changing a setting only a restart can, changes nothing.",
                body=(),
                responses={
                    404: "the router was not started from a configuration file",
                    422: "the file was refused; `error.errors` lists why, each starting with its key path",
                },
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
        except HeldByOtherWorker as e:
            raise ApiError(409, "held_by_other_worker", str(e)) from None
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
            except (operations.NotFound, operations.WrongStatus, HeldByOtherWorker) as e:
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
        counts = await self._queue().count_by_destination()
        return {
            "paused": delivery.paused,
            "pausedDestinations": delivery.paused_destinations,
            "inFlight": stats["in_flight"],
            "inFlightByDestination": delivery.in_flight_by_destination(),
            "lastErrors": {
                route: {"reply": reply, "at": iso_time(at)}
                for route, (reply, at) in sorted(delivery.last_errors().items())
            },
            "queuedByDestination": counts.by_destination,
            "queuedOther": counts.other,
            "queuedComplete": counts.complete,
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

    # -- quarantine (the operations of dcrouter.queue.quarantine, as `dcrouter quarantine` uses them) -------

    async def _quarantined(self, call: Call, operation: str, run: Any) -> Any:
        item_id = self._id(call)
        try:
            return await run(item_id)
        except quarantined.NotQuarantined as e:
            if e.item is None:
                raise ApiError(404, "not_found", str(e)) from None
            raise ApiError(409, "wrong_status", str(e)) from None
        except HeldByOtherWorker as e:
            raise ApiError(409, "held_by_other_worker", str(e)) from None
        except QueueUnavailable as e:
            raise ApiError(503, "queue_unavailable", str(e)) from None

    async def quarantine_list(self, call: Call) -> Any:
        try:
            items = await quarantined.quarantined(self._queue())
        except QueueUnavailable as e:
            raise ApiError(503, "queue_unavailable", str(e)) from None
        return {"items": [{**item_summary(i), "reason": i.last_error} for i in items]}

    async def quarantine_show(self, call: Call) -> Any:
        queue = self._queue()

        async def show(item_id: str) -> Any:
            item = await quarantined.get_quarantined(queue, item_id)
            lines, cut = header_block(await quarantined.read_head(queue, item, HEAD_LIMIT))
            return {**item_detail(item), "reason": item.last_error, "headers": lines, "headersCut": cut}

        return await self._quarantined(call, "show", show)

    async def quarantine_release(self, call: Call) -> Any:
        queue, now = self._queue(), self.view.clock.seconds()
        item = await self._quarantined(call, "release", lambda i: quarantined.release(queue, i, now))
        log.info(
            "{queue_id}: released from quarantine by API token {token}",
            queue_id=item.id,
            token=self._who(call),
        )
        if self.view.delivery is not None:
            self.view.delivery.wake()
        return {"item": item_summary(item)}

    async def quarantine_delete(self, call: Call) -> Any:
        queue = self._queue()
        item = await self._quarantined(call, "delete", lambda i: quarantined.delete(queue, i))
        log.info(
            "{queue_id}: deleted from quarantine by API token {token}",
            queue_id=item.id,
            token=self._who(call),
        )
        return {"item": item_summary(item)}

    # -- routing ------------------------------------------------------------------------------------------

    async def routing_show(self, call: Call) -> Any:
        routing = None
        if self.view.routing is not None:
            admin = call.token is not None and call.token.scope == "admin"
            routing = self.view.routing(admin)
        if routing is None:
            raise ApiError(404, "no_routing", "this router has no smtpConfig built from a configuration")
        return routing

    async def routing_replace(self, call: Call) -> Any:
        replace = self.view.replace_routing
        if replace is None:
            raise ApiError(404, "no_routing", "this router has no smtpConfig built from a configuration")
        try:
            answer = await replace(call.body)
        except ConfigError as error:
            count = len(error.errors)
            raise ApiError(
                422,
                "invalid_config",
                f"the configuration with this routing is not valid ({count} error{'s' * (count != 1)}); "
                "nothing changed",
                errors=error.errors,
            ) from None
        log.warn("routing replaced by API token {token}", token=self._who(call))
        routing = self.view.routing(True) if self.view.routing is not None else None
        return {**answer, "routing": routing}

    async def routing_test(self, call: Call) -> Any:
        if self.view.route_test is None:
            raise ApiError(404, "not_found", "this router cannot answer route tests")
        try:
            answer = self.view.route_test(call.body)
        except ValueError as error:
            raise ApiError(400, "bad_field", str(error)) from None
        except LookupError as error:
            raise ApiError(404, "not_running", str(error)) from None
        if answer["kind"] == "mail":
            # The suppression list, asked as RCPT asks it (after the relay decision).
            entry = None
            if self.view.suppressions is not None and answer["accepted"] and "@" in call.body["recipient"]:
                entry = await self._suppression_call(self.view.suppressions.get(call.body["recipient"]))
            answer["suppressed"] = None if entry is None else self._suppression(entry)
            if entry is not None:
                answer["accepted"] = False
                answer["reply"] = f"550 5.1.1 <{entry.address}>: Recipient address rejected (suppressed)"
        return answer

    # -- suppression list ------------------------------------------------------------------------------

    def _suppressions(self) -> ISuppressionList:
        if self.view.suppressions is None:
            raise ApiError(
                404, "suppression_off", "no suppression list (smtpConfig.delivery.suppressionTtl is 0)"
            )
        return self.view.suppressions

    @staticmethod
    def _address(call: Call) -> str:
        try:
            return normalize(unquote(call.params["address"], errors="strict"))
        except ValueError as error:  # UnicodeDecodeError included
            raise ApiError(400, "bad_address", str(error)) from None

    @staticmethod
    def _suppression(entry: Suppression) -> dict[str, Any]:
        return {
            "address": entry.address,
            "reason": entry.reason,
            "createdAt": iso_time(entry.created_at),
            "expiresAt": iso_time(entry.expires_at),
        }

    async def _suppression_call(self, work: Any) -> Any:
        try:
            return await work
        except QueueUnavailable as e:
            raise ApiError(503, "queue_unavailable", str(e)) from None

    async def suppression_list(self, call: Call) -> Any:
        suppressions = self._suppressions()
        limit = int(call.query.get("limit", DEFAULT_PAGE))
        if not 1 <= limit <= MAX_PAGE:
            raise ApiError(400, "bad_parameter", f"limit: 1 to {MAX_PAGE}, got {limit}")
        entries = await self._suppression_call(suppressions.entries(limit))
        return {
            "items": [self._suppression(e) for e in entries],
            "refusedSinceStart": self.view.suppressed_refusals(),
            "ttl": round(self.view.suppression_ttl * 1000),
        }

    async def suppression_show(self, call: Call) -> Any:
        address = self._address(call)
        entry = await self._suppression_call(self._suppressions().get(address))
        if entry is None:
            raise ApiError(404, "not_found", f"{address} is not suppressed")
        return self._suppression(entry)

    async def suppression_add(self, call: Call) -> Any:
        suppressions = self._suppressions()
        try:
            address = normalize(call.body["address"])
        except ValueError as error:
            raise ApiError(400, "bad_field", f"address: {error}") from None
        reason = call.body.get("reason") or f"added by API token {self._who(call)}"
        if len(reason) > 500 or any(ord(c) < 32 for c in reason):
            raise ApiError(400, "bad_field", "reason: one line of at most 500 characters")
        ttl_ms = call.body.get("ttl", round(self.view.suppression_ttl * 1000))
        if not 1 <= ttl_ms <= 10 * 365 * 86_400_000:
            raise ApiError(400, "bad_field", f"ttl: 1 ms to 10 years, got {ttl_ms}")
        entry = await self._suppression_call(suppressions.add(address, reason, ttl_ms / 1000.0))
        log.info("{address} suppressed by API token {token}", address=address, token=self._who(call))
        return self._suppression(entry)

    async def suppression_remove(self, call: Call) -> Any:
        address = self._address(call)
        if not await self._suppression_call(self._suppressions().remove(address)):
            raise ApiError(404, "not_found", f"{address} is not suppressed")
        log.info(
            "{address} taken off the suppression list by API token {token}",
            address=address,
            token=self._who(call),
        )
        return {"removed": address}

    async def reload(self, call: Call) -> Any:
        if self.view.reload is None:
            raise ApiError(404, "no_config_file", "this router was not started from a configuration file")
        log.info("configuration reload asked by API token {token}", token=self._who(call))
        outcome = await self.view.reload("api")
        if not outcome.applied:
            raise ApiError(
                422,
                "invalid_config",
                f"{outcome.path}: refused, nothing changed: " + "; ".join(outcome.errors),
                errors=outcome.errors,
            )
        return {"applied": True, "path": outcome.path, "changes": outcome.changes}
