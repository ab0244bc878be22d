"""The management API over a real listening port on 127.0.0.1: a DcRouter with a memory queue, delivery
paused so that queue states stay as the test leaves them, and treq as the client."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
from typing import Any

import treq
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from dcrouter import DcRouter, passwords
from dcrouter.api.openapi import document
from dcrouter.api.root import ApiRoot
from dcrouter.api.service import build_root
from dcrouter.api.tokens import TokenVerifier
from dcrouter.api.view import RouterView
from dcrouter.config.api import ApiConfig, ApiToken
from dcrouter.log import level_for, set_level
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.queue.item import QueueItemStatus
from dcrouter.queue.partitions import PartitionedQueue
from tests.integration import CHECKOUT, free_ports
from tests.test_queue_contract import make_item

ADMIN, READER = "admin-token-for-tests", "read-token-for-tests"


def sha(token: str) -> str:
    return "sha256$" + hashlib.sha256(token.encode()).hexdigest()


TOKENS = [
    {"name": "ops", "tokenHash": sha(ADMIN), "scope": "admin"},
    {"name": "viewer", "tokenHash": sha(READER), "scope": "read"},
]


def router_options(smtp: dict[str, Any] | None = None, **api: Any) -> dict[str, Any]:
    """A DcRouter's options for the API tests: SMTP on a free port of 127.0.0.1 with a memory queue and mail
    for example.com routed to a closed port, ``smtp`` laid over that, and the API on port 0 with the two
    tokens (``api`` laid over its section)."""
    (smtp_port,) = free_ports(1)
    return {
        "smtpConfig": {
            "ports": [smtp_port],
            "bindAddress": "127.0.0.1",
            "hostname": "mx.test",
            "implicitTlsPorts": [],
            "submissionPorts": [],
            "queueStorage": "memory",
            "domainConfigs": [{"domains": ["example.com"], "targetIPs": ["127.0.0.1"], "port": 9}],
            **(smtp or {}),
        },
        "apiConfig": {"enabled": True, "port": 0, "tokens": TOKENS, **api},
    }


class ApiTestBase(TestCase):
    timeout = 20

    async def start_router(self, options: Any, *, paused: bool = False, worker: int = 0) -> DcRouter:
        """Start a DcRouter (worker ``worker``) on the real reactor (stopped at cleanup), with deliveries
        paused if asked, and point :meth:`call` at its API."""
        router = DcRouter(options, reactor=reactor, worker=worker)
        assert router.delivery is not None and router.api is not None
        if paused:
            router.delivery.pause_deliveries()
        router.privilegedStartService()
        router.startService()
        self.addCleanup(router.stopService)
        await router.when_ready()
        self.router = router
        self.base = f"http://127.0.0.1:{router.api.port}"
        return router

    async def start(self, **api: Any) -> DcRouter:
        return await self.start_router(router_options(**api), paused=True)

    def smtp_port(self) -> int:
        return next(iter(self.router.smtp_ports.values()))

    async def call(
        self, method: str, path: str, *, token: str | None = ADMIN, body: Any = None, **kw: Any
    ) -> tuple[int, Any, Any]:
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = kw.pop("data", None)
        if body is not None:
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        pool = HTTPConnectionPool(reactor, persistent=False)  # no connection outlives the test
        response = await treq.request(method, self.base + path, headers=headers, data=data, pool=pool, **kw)
        raw = await treq.content(response)
        ctype = response.headers.getRawHeaders("content-type", [""])[0]
        parsed = json.loads(raw) if ctype.startswith("application/json") else raw
        return response.code, parsed, response.headers

    async def enqueue(self, *items: Any) -> None:
        assert self.router.queue is not None
        for item in items:
            await self.router.queue.enqueue(item, SpooledMessage(11, data=b"Subject: x\r\n"))


class WorkerPartitionsTests(ApiTestBase):
    """Worker 0 of two on the disk queue: the API covers worker 1's partition (dcrouter.queue.partitions),
    held here by a PartitionedQueue of the test's own as worker 1 would hold it."""

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp())

    async def start(self, **api: Any) -> DcRouter:
        options = router_options({"queueStorage": "disk", "persistentPath": self.path}, **api)
        return await self.start_router({**options, "workers": 2}, paused=True, worker=0)

    async def worker_one(self, *items: Any) -> PartitionedQueue:
        queue = PartitionedQueue(self.path, reactor=reactor, clock=reactor, worker=1, workers=2)
        await queue.load()
        self.addCleanup(queue.save)
        for item in items:
            await queue.enqueue(item, SpooledMessage(11, data=b"Subject: y\r\n"))
        return queue

    async def test_every_partition_listed_and_counted(self) -> None:
        await self.worker_one(
            make_item("W1A", created_at=1_700_000_001), make_item("W1B", created_at=1_700_000_003)
        )
        await self.start()
        assert isinstance(self.router.queue, PartitionedQueue)
        await self.enqueue(make_item("W0A", created_at=1_700_000_002))
        code, body, _ = await self.call("GET", "/api/v1/queue?limit=2")
        self.assertEqual((code, [i["id"] for i in body["items"]]), (200, ["W1B", "W0A"]))
        code, body, _ = await self.call("GET", f"/api/v1/queue?limit=2&cursor={body['nextCursor']}")
        self.assertEqual(([i["id"] for i in body["items"]], body["nextCursor"]), (["W1A"], None))
        _, counts, _ = await self.call("GET", "/api/v1/stats")
        self.assertEqual(counts["queue"]["queued"], 3)
        code, raw, _ = await self.call("GET", "/api/v1/queue/W1A/message")
        self.assertEqual((code, raw), (200, b"Subject: y\r\n"))

    async def test_hold_and_delete_there_but_not_bounce(self) -> None:
        one = await self.worker_one(
            make_item("W1A", next_attempt_at=4e9), make_item("W1B", next_attempt_at=4e9)
        )
        await self.start()
        code, body, _ = await self.call("POST", "/api/v1/queue/W1A/hold")
        self.assertEqual((code, body["item"]["status"]), (200, "held"))
        self.assertEqual((await one.get("W1A")).status, QueueItemStatus.HELD)  # type: ignore[union-attr]
        code, body, _ = await self.call("POST", "/api/v1/queue/W1A/bounce", body={"reason": "spam run"})
        self.assertEqual((code, body["error"]["code"]), (409, "held_by_other_worker"))
        self.assertIn("Hold or delete the message instead", body["error"]["message"])
        self.assertEqual((await one.get("W1A")).status, QueueItemStatus.HELD)  # type: ignore[union-attr]
        code, body, _ = await self.call("DELETE", "/api/v1/queue/W1B")
        self.assertEqual(code, 200)
        self.assertIsNone(await one.get("W1B"))
        # Worker 0's own mail: bounced as ever.
        await self.enqueue(make_item("W0A"))
        code, body, _ = await self.call("POST", "/api/v1/queue/W0A/bounce", body={"reason": "spam run"})
        self.assertEqual((code, body["item"]["status"]), (200, "bounced"))


class AccessTests(ApiTestBase):
    async def test_health_needs_no_token(self) -> None:
        await self.start()
        code, body, _ = await self.call("GET", "/health", token=None)
        self.assertEqual((code, body), (200, {"status": "ok"}))

    async def test_tokens(self) -> None:
        await self.start()
        code, body, headers = await self.call("GET", "/api/v1/ready", token=None)
        self.assertEqual((code, body["error"]["code"]), (401, "unauthorized"))
        self.assertEqual(headers.getRawHeaders("www-authenticate"), ["Bearer"])
        code, body, _ = await self.call("GET", "/api/v1/ready", token="wrong")
        self.assertEqual(code, 401)
        code, body, _ = await self.call("GET", "/api/v1/ready", token=READER)
        self.assertEqual((code, body), (200, {"ready": True}))
        code, body, _ = await self.call("POST", "/api/v1/delivery/pause", token=READER)
        self.assertEqual((code, body["error"]["code"]), (403, "forbidden"))

    async def test_host_allowlist(self) -> None:
        await self.start()
        code, body, _ = await self.call("GET", "/health", headers={"Host": "attacker.example:8025"})
        self.assertEqual((code, body["error"]["code"]), (403, "host_not_allowed"))
        code, _, _ = await self.call("GET", "/health", headers={"Host": "localhost:8025"})
        self.assertEqual(code, 200)

    async def test_unix_socket(self) -> None:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        sock_path = os.path.join(path, "api.sock")
        await self.start(socket=sock_path)
        self.assertEqual(stat.S_IMODE(os.stat(sock_path).st_mode), 0o600)

        def ask() -> bytes:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock_path)
                s.sendall(
                    f"GET /api/v1/ready HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {READER}"
                    "\r\n\r\n".encode()
                )
                chunks = []
                while chunk := s.recv(65536):
                    chunks.append(chunk)
                return b"".join(chunks)

        answer = await deferToThread(ask)
        self.assertTrue(answer.startswith(b"HTTP/1.0 200"), answer)
        self.assertTrue(answer.endswith(b'{"ready":true}\n'), answer)
        await self.router.stopService()
        self.assertFalse(os.path.exists(sock_path))

    async def test_no_cors_unless_configured(self) -> None:
        await self.start()
        _, _, headers = await self.call("GET", "/health", headers={"Origin": "https://evil.example"})
        self.assertFalse(headers.hasHeader("access-control-allow-origin"))

    async def test_errors(self) -> None:
        await self.start()
        code, body, _ = await self.call("GET", "/api/v1/nothing")
        self.assertEqual((code, body["error"]["code"]), (404, "not_found"))
        code, body, _ = await self.call("GET", "/api/v1/nothing", token=None)
        self.assertEqual(code, 401)  # what exists is told only to callers with a token
        code, body, headers = await self.call("DELETE", "/api/v1/stats")
        self.assertEqual((code, body["error"]["code"]), (405, "method_not_allowed"))
        self.assertEqual(headers.getRawHeaders("allow"), ["GET"])
        code, body, _ = await self.call(
            "POST",
            "/api/v1/delivery/pause",
            data=b"x" * (2 << 20),
            headers={"Content-Type": "application/json"},
        )
        self.assertEqual((code, body["error"]["code"]), (413, "too_large"))
        code, body, _ = await self.call(
            "POST",
            "/api/v1/delivery/pause",
            data=b"destination=x",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        self.assertEqual(code, 415)
        code, body, _ = await self.call(
            "POST", "/api/v1/delivery/pause", body={"destination": "x", "bogus": 1, "also": 2}
        )
        self.assertEqual((code, body["error"]["message"]), (400, "unknown fields: also, bogus"))
        code, body, _ = await self.call(
            "POST", "/api/v1/delivery/pause", data=b"{nope", headers={"Content-Type": "application/json"}
        )
        self.assertEqual((code, body["error"]["code"]), (400, "bad_json"))
        code, body, _ = await self.call("GET", "/api/v1/queue?colour=red")
        self.assertEqual((code, body["error"]["message"]), (400, "unknown query parameters: colour"))
        code, body, _ = await self.call("GET", "/api/v1/queue/bad.id")
        self.assertEqual((code, body["error"]["code"]), (400, "bad_id"))
        code, body, _ = await self.call("GET", "/api/v1/queue/" + "A" * 65)
        self.assertEqual((code, body["error"]["code"]), (400, "bad_id"))
        code, body, _ = await self.call("GET", "/api/v1/queue?limit=0")
        self.assertEqual(code, 400)
        code, body, _ = await self.call("GET", "/api/v1/queue?status=lost")
        self.assertEqual(code, 400)
        code, body, _ = await self.call("GET", "/api/v1/queue?cursor=abc")
        self.assertEqual(code, 400)


class QueueEndpointTests(ApiTestBase):
    async def test_list_pages_and_filters(self) -> None:
        await self.start()
        await self.enqueue(*(make_item(f"Q{n}", destination="domain:example.com") for n in range(5)))
        code, body, _ = await self.call("GET", "/api/v1/queue?limit=2", token=READER)
        self.assertEqual(code, 200)
        self.assertEqual([i["id"] for i in body["items"]], ["Q4", "Q3"])
        seen = [i["id"] for i in body["items"]]
        while body["nextCursor"]:
            _, body, _ = await self.call("GET", f"/api/v1/queue?limit=2&cursor={body['nextCursor']}")
            seen += [i["id"] for i in body["items"]]
        self.assertEqual(seen, ["Q4", "Q3", "Q2", "Q1", "Q0"])
        first = (await self.call("GET", "/api/v1/queue?limit=1"))[1]["items"][0]
        self.assertEqual(
            set(first),
            {
                "id",
                "status",
                "size",
                "createdAt",
                "sender",
                "recipients",
                "destination",
                "attempts",
                "nextAttemptAt",
                "lastError",
            },
        )
        await self.call("POST", "/api/v1/queue/Q1/hold")
        _, body, _ = await self.call("GET", "/api/v1/queue?status=held&recipient=RCPT@")
        self.assertEqual([i["id"] for i in body["items"]], ["Q1"])
        _, body, _ = await self.call("GET", "/api/v1/queue?sender=nobody")
        self.assertEqual(body, {"items": [], "nextCursor": None})

    async def test_show_and_message(self) -> None:
        await self.start()
        await self.enqueue(
            make_item("S1", history=[{"at": 1.0, "route": "r", "tried": ["t"], "results": []}])
        )
        code, body, _ = await self.call("GET", "/api/v1/queue/S1")
        self.assertEqual((code, body["id"], body["envelope"]["sender"]), (200, "S1", "sender@example.org"))
        self.assertEqual(body["history"][0]["route"], "r")
        code, raw, headers = await self.call("GET", "/api/v1/queue/S1/message")
        self.assertEqual((code, raw), (200, b"Subject: x\r\n"))
        self.assertEqual(headers.getRawHeaders("content-type"), ["message/rfc822"])
        code, body, _ = await self.call("GET", "/api/v1/queue/NOPE")
        self.assertEqual((code, body["error"]["code"]), (404, "not_found"))
        code, body, _ = await self.call("GET", "/api/v1/queue/NOPE/message")
        self.assertEqual(code, 404)
        await self.enqueue(make_item("S2", status=QueueItemStatus.DELIVERING))
        code, body, _ = await self.call("GET", "/api/v1/queue/S2/message")
        self.assertEqual((code, body["error"]["code"]), (409, "wrong_status"))

    async def test_hold_release_retry_delete(self) -> None:
        router = await self.start()
        assert router.queue is not None
        await self.enqueue(make_item("H1", next_attempt_at=4e9))
        code, body, _ = await self.call("POST", "/api/v1/queue/H1/hold")
        self.assertEqual((code, body["item"]["status"]), (200, "held"))
        code, body, _ = await self.call("POST", "/api/v1/queue/H1/hold")
        self.assertEqual((code, body["error"]["code"]), (409, "wrong_status"))
        code, body, _ = await self.call("POST", "/api/v1/queue/H1/retry")
        self.assertEqual(code, 409)
        code, body, _ = await self.call("POST", "/api/v1/queue/H1/release")
        self.assertEqual((code, body["item"]["status"]), (200, "queued"))
        code, body, _ = await self.call("POST", "/api/v1/queue/H1/retry")
        self.assertEqual(code, 200)
        self.assertLessEqual((await router.queue.get("H1")).next_attempt_at, reactor.seconds())
        code, body, _ = await self.call("DELETE", "/api/v1/queue/H1")
        self.assertEqual(code, 200)
        self.assertIsNone(await router.queue.get("H1"))
        code, body, _ = await self.call("DELETE", "/api/v1/queue/H1")
        self.assertEqual(code, 404)
        code, body, _ = await self.call("POST", "/api/v1/queue/H1/hold", token=READER)
        self.assertEqual(code, 403)

    async def test_bulk_operations(self) -> None:
        router = await self.start()
        assert router.queue is not None
        items = [make_item(f"K{n}", destination=f"domain:{'a' if n % 2 else 'b'}.example") for n in range(6)]
        await self.enqueue(*items)
        code, body, _ = await self.call("POST", "/api/v1/queue/hold", body={})
        self.assertEqual((code, body["error"]["code"]), (400, "missing_filter"))
        code, body, _ = await self.call(
            "POST", "/api/v1/queue/hold", body={"destination": "domain:a.example", "dryRun": True}
        )
        self.assertEqual((code, body["matched"], body["done"]), (200, ["K5", "K3", "K1"], []))
        self.assertEqual((await router.queue.get("K5")).status, QueueItemStatus.QUEUED)
        code, body, _ = await self.call(
            "POST", "/api/v1/queue/hold", body={"destination": "domain:a.example"}
        )
        self.assertEqual((body["done"], body["skipped"], body["truncated"]), (["K5", "K3", "K1"], [], False))
        _, counts, _ = await self.call("GET", "/api/v1/stats")
        self.assertEqual((counts["queue"]["held"], counts["queue"]["queued"]), (3, 3))
        code, body, _ = await self.call("POST", "/api/v1/queue/release", body={"status": "held", "limit": 2})
        self.assertEqual((body["done"], body["truncated"]), (["K5", "K3"], True))
        code, body, _ = await self.call(
            "POST", "/api/v1/queue/delete", body={"destination": "domain:b.example"}
        )
        self.assertEqual(body["done"], ["K4", "K2", "K0"])
        self.assertIsNone(await router.queue.get("K0"))
        code, body, _ = await self.call("POST", "/api/v1/queue/retry", body={"status": "held"}, token=READER)
        self.assertEqual(code, 403)

    async def test_bounce(self) -> None:
        router = await self.start()
        assert router.queue is not None
        await self.enqueue(make_item("B1"))
        code, body, _ = await self.call("POST", "/api/v1/queue/B1/bounce", body={"reason": "spam run"})
        self.assertEqual((code, body["item"]["status"]), (200, "bounced"))
        item = await router.queue.get("B1")
        self.assertIn("spam run", item.outcomes["rcpt@example.com"]["reply"])
        dsn = await router.queue.get(item.bounce_id)
        self.assertEqual(dsn.envelope.recipients, ["sender@example.org"])
        code, body, _ = await self.call("POST", "/api/v1/queue/B1/bounce")
        self.assertEqual(code, 409)

    async def test_stats(self) -> None:
        await self.start()
        await self.enqueue(make_item("T1"), make_item("T2", status=QueueItemStatus.HELD))
        code, body, _ = await self.call("GET", "/api/v1/stats", token=READER)
        self.assertEqual(code, 200)
        self.assertEqual((body["queue"]["queued"], body["queue"]["held"]), (1, 1))
        for key in (
            "version",
            "uptime",
            "messages",
            "smtpSessions",
            "proxyConnections",
            "processingInFlight",
            "deliveriesInFlight",
        ):
            self.assertIn(key, body)
        self.assertEqual(set(body["messages"]) >= {"received", "delivered", "bounced", "deferred"}, True)


class ControlEndpointTests(ApiTestBase):
    async def test_delivery_pause_resume(self) -> None:
        router = await self.start()
        assert router.delivery is not None
        code, body, _ = await self.call("GET", "/api/v1/delivery")
        self.assertEqual((code, body["paused"]), (200, True))
        code, body, _ = await self.call("POST", "/api/v1/delivery/resume")
        self.assertEqual(body["paused"], False)
        _, body, _ = await self.call(
            "POST", "/api/v1/delivery/pause", body={"destination": "domain:example.com"}
        )
        self.assertEqual((body["paused"], body["pausedDestinations"]), (False, ["domain:example.com"]))
        _, body, _ = await self.call(
            "POST", "/api/v1/delivery/resume", body={"destination": "domain:example.com"}
        )
        self.assertEqual(body["pausedDestinations"], [])
        _, body, _ = await self.call("POST", "/api/v1/delivery/pause")
        self.assertTrue(router.delivery.paused)

    async def test_delivery_counts_queued_and_deferred_per_destination(self) -> None:
        await self.start()  # delivery paused: nothing is claimed while we look
        await self.enqueue(
            make_item("P1", destination="domain:example.com"),
            make_item("P2", destination="domain:example.com"),
            make_item("P3", destination="domain:example.com", status=QueueItemStatus.DEFERRED),
            make_item("P4", destination="smarthost:relay", status=QueueItemStatus.DEFERRED),
            make_item("P5", destination="smarthost:relay", status=QueueItemStatus.HELD),
        )
        code, body, _ = await self.call("GET", "/api/v1/delivery")
        self.assertEqual(code, 200)
        self.assertEqual(
            body["queuedByDestination"],
            {
                "domain:example.com": {"queued": 2, "deferred": 1},
                "smarthost:relay": {"queued": 0, "deferred": 1},
            },
        )
        self.assertEqual(body["queuedOther"], {"destinations": 0, "queued": 0, "deferred": 0})
        self.assertIs(body["queuedComplete"], True)

    async def test_log_level(self) -> None:
        await self.start()
        self.addCleanup(set_level, "info", "dcrouter.delivery")
        code, body, _ = await self.call(
            "PUT", "/api/v1/log-level", body={"level": "debug", "namespace": "dcrouter.delivery"}
        )
        self.assertEqual((code, body["namespaces"]["dcrouter.delivery"]), (200, "debug"))
        self.assertEqual(level_for("dcrouter.delivery.pool"), "debug")
        code, body, _ = await self.call("GET", "/api/v1/log-level", token=READER)
        self.assertEqual(body["level"], "info")
        code, body, _ = await self.call(
            "PUT", "/api/v1/log-level", body={"level": "debug", "namespace": "twisted"}
        )
        self.assertEqual(code, 400)
        code, body, _ = await self.call("PUT", "/api/v1/log-level", body={"level": "loud"})
        self.assertEqual(code, 400)
        code, body, _ = await self.call("PUT", "/api/v1/log-level", body={})
        self.assertEqual((code, body["error"]["code"]), (400, "missing_field"))

    async def test_openapi_lists_every_route(self) -> None:
        router = await self.start()
        assert router.api is not None
        code, doc, _ = await self.call("GET", "/api/v1/openapi.json", token=READER)
        self.assertEqual((code, doc["openapi"]), (200, "3.1.0"))
        routes = {(e.method.lower(), e.path) for e in router.api.root.endpoints}
        documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
        self.assertEqual(routes, documented)
        self.assertGreaterEqual(len(routes), 17)


class InMemoryTests(TestCase):
    """The resource without a listener (treq's StubTreq): CORS, scrypt tokens and their cache, mounts."""

    def root(self, tokens: list[ApiToken], **config: Any) -> tuple[ApiRoot, TokenVerifier]:
        view = RouterView(clock=reactor, version="test")
        root = build_root(
            ApiConfig(enabled=True, tokens=tokens, **config),
            view,
            defer_to_thread=lambda work: succeed(work()),
        )
        return root, root._verifier

    async def test_scrypt_token_checked_once_then_cached(self) -> None:
        hashed = passwords.hash_password("slow-token", log2_n=10)
        root, verifier = self.root([ApiToken("slow", hashed, "read")])
        client = StubTreq(root)
        for _ in range(3):
            response = await client.get(
                "http://localhost/api/v1/ready", headers={"Authorization": "Bearer slow-token"}
            )
            self.assertEqual(response.code, 200)
        self.assertEqual(verifier.slow_checks, 1)
        response = await client.get("http://localhost/api/v1/ready", headers={"Authorization": "Bearer nope"})
        self.assertEqual(response.code, 401)

    async def test_cors_when_configured(self) -> None:
        root, _ = self.root([ApiToken("a", sha("t"), "read")], cors=["https://ops.example"])
        client = StubTreq(root)
        response = await client.request(
            "OPTIONS", "http://localhost/api/v1/stats", headers={"Origin": "https://ops.example"}
        )
        self.assertEqual(response.code, 204)
        self.assertEqual(
            response.headers.getRawHeaders("access-control-allow-origin"), ["https://ops.example"]
        )
        response = await client.get("http://localhost/health", headers={"Origin": "https://other.example"})
        self.assertFalse(response.headers.hasHeader("access-control-allow-origin"))

    async def test_mount_point_behind_tokens(self) -> None:
        from twisted.web.resource import Resource

        class Metrics(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                return b"metric 1\n"

        root, _ = self.root([ApiToken("a", sha("t"), "read")])
        root.mount("/metrics", Metrics())
        client = StubTreq(root)
        self.assertEqual((await client.get("http://localhost/metrics")).code, 401)
        response = await client.get("http://localhost/metrics", headers={"Authorization": "Bearer t"})
        self.assertEqual(await response.content(), b"metric 1\n")

    def test_every_endpoint_has_a_curl_line_in_the_docs(self) -> None:
        root, _ = self.root([])
        with open(os.path.join(CHECKOUT, "docs", "api.md"), encoding="utf-8") as f:
            curl_lines = [line for line in f if line.startswith("curl ")]
        missing = []
        for endpoint in root.endpoints:
            path = re.sub(r"\\\{\w+\\\}", "[^/ ]+", re.escape(endpoint.path))
            method = "" if endpoint.method == "GET" else f"-X {endpoint.method} "
            pattern = re.compile(re.escape(method) + r".*\$A" + path + r"([?\" ]|$)")
            if not any(pattern.search(line.rstrip()) for line in curl_lines):
                missing.append(f"{endpoint.method} {endpoint.path}")
        self.assertEqual(missing, [])

    def test_document_is_openapi_3_1(self) -> None:
        root, _ = self.root([])
        doc = document(root.endpoints, "1")
        self.assertEqual(doc["paths"]["/health"]["get"]["security"], [])
        body = doc["paths"]["/api/v1/queue/{id}/bounce"]["post"]["requestBody"]
        self.assertFalse(body["content"]["application/json"]["schema"]["additionalProperties"])
