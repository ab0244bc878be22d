"""Metrics, events and webhooks end to end, in process: a DcRouter on 127.0.0.1 (disk queue) takes a message
from smtplib (in a thread), delivers it to a scripted downstream, and then

- ``GET /metrics`` on the ``metricsConfig`` port (fetched with treq, parsed with prometheus_client's own text
  parser, ``text_string_to_metric_families``: the same format a Prometheus server scrapes) shows the
  counters moved;
- a webhook receiver (twisted.web on 127.0.0.1:0) got the message's events, signed;
- the event stream on the same port (``/api/v1/events``, loopback) sent them as Server-Sent Events.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from dcrouter import DcRouter
from dcrouter.queue.item import QueueItemStatus
from tests.downstream import start_downstream
from tests.integration import free_ports
from tests.integration.test_delivery import MESSAGE, WAIT, smtp_send, wait_for_item

SECRET = "webhook-secret"


class Receiver(Resource):
    """A webhook receiver that checks each signature and keeps the events."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []
        self.bad_signatures = 0

    def render_POST(self, request: Any) -> bytes:
        body = request.content.read()
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        given = (request.getHeader("X-Dcrouter-Signature") or "").strip()
        if not hmac.compare_digest(given, expected):
            self.bad_signatures += 1
            request.setResponseCode(401)
            return b"bad signature"
        self.events.append(json.loads(body))
        return b"ok"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def until(condition: Any, what: str) -> None:
    deadline = reactor.seconds() + WAIT
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)


class ObserveIntegrationTests(TestCase):
    timeout = 60

    def test_metrics_webhook_and_stream_see_a_delivered_message(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._go())

    async def _go(self) -> None:
        downstream = start_downstream(reactor=reactor)
        self.addCleanup(downstream.stop)
        receiver = Receiver()
        hook_port = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")
        self.addCleanup(hook_port.stopListening)
        hook_url = f"http://127.0.0.1:{hook_port.getHost().port}/hook"

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        smtp_port, metrics_port = free_ports(2)
        router = DcRouter(
            {
                "smtpConfig": {
                    "ports": [smtp_port],
                    "bindAddress": "127.0.0.1",
                    "hostname": "mx.test",
                    "implicitTlsPorts": [],
                    "submissionPorts": [],
                    "queueStorage": "disk",
                    "persistentPath": os.path.join(directory, "queue"),
                    "domainConfigs": [
                        {"domains": ["example.test"], "targetIPs": ["127.0.0.1"], "port": downstream.port}
                    ],
                },
                "metricsConfig": {"enabled": True, "port": metrics_port, "eventStream": True},
                "events": {"webhooks": [{"url": hook_url, "types": ["message.*"], "secret": SECRET}]},
            },
            reactor=reactor,
        )
        router.privilegedStartService()
        router.startService()
        self.addCleanup(router.stopService)
        await router.when_ready().addTimeout(WAIT, reactor)
        base = f"http://127.0.0.1:{metrics_port}"

        # The stream, opened before the message: it sees the message's events as they happen.
        stream_response = await treq.get(
            f"{base}/api/v1/events?types=message.*", reactor=reactor, persistent=False
        )
        self.assertEqual(stream_response.code, 200)
        self.assertEqual(
            stream_response.headers.getRawHeaders("content-type"), ["text/event-stream; charset=utf-8"]
        )
        streamed: list[bytes] = []
        stream_done = treq.collect(stream_response, streamed.append)
        stream_done.addErrback(lambda _: None)  # cut when the router stops

        [queue_id] = await deferToThread(
            smtp_send, smtp_port, "alice@sender.test", ["bob@example.test"], [MESSAGE]
        )
        await wait_for_item(router.queue, queue_id, [QueueItemStatus.DELIVERED])

        await until(
            lambda: any(e["type"] == "message.delivered" for e in receiver.events), "the webhook's delivery"
        )
        self.assertEqual(receiver.bad_signatures, 0)
        types = [e["type"] for e in receiver.events if e.get("queueId") == queue_id]
        for wanted in ("message.received", "message.accepted", "message.queued", "message.delivered"):
            self.assertIn(wanted, types)
        self.assertTrue(all(t.startswith("message.") for t in types), types)
        received = next(e for e in receiver.events if e["type"] == "message.received")
        self.assertEqual(received["port"], smtp_port)
        self.assertTrue(received["sessionId"])
        self.assertNotIn("first line", json.dumps(receiver.events))  # no body in an event

        await until(lambda: b"event: message.delivered" in b"".join(streamed), "the streamed delivery")
        self.assertIn(f'"queueId":"{queue_id}"'.encode(), b"".join(streamed))

        async def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            response = await treq.get(f"{base}/metrics", reactor=reactor, persistent=False)
            self.assertEqual(response.code, 200)
            self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith("text/plain"))
            return samples((await response.content()).decode("utf-8"))

        # The queue's figures are read in the background when a scrape asks (a scrape never waits for the
        # queue): the first scrape starts the reading, a later one shows it.
        found = await scrape()
        while found[("dcrouter_queue_items", (("status", "delivered"),))] != 1.0:
            await deferLater(reactor, 0.05, lambda: None)
            found = await scrape()
        port = str(smtp_port)
        self.assertEqual(found[("dcrouter_smtp_connections_total", (("port", port), ("tls", "no")))], 1.0)
        self.assertEqual(found[("dcrouter_messages_received_total", (("port", port),))], 1.0)
        self.assertEqual(found[("dcrouter_messages_accepted_total", (("port", port),))], 1.0)
        self.assertEqual(found[("dcrouter_received_bytes_total", (("port", port),))], len(MESSAGE))
        self.assertEqual(found[("dcrouter_messages_queued_total", (("kind", "received"),))], 1.0)
        route = (("outcome", "delivered"), ("route", "domain:example.test"))
        self.assertEqual(found[("dcrouter_deliveries_total", route)], 1.0)
        self.assertEqual(
            found[("dcrouter_delivery_duration_seconds_count", (("route", "domain:example.test"),))], 1.0
        )
        self.assertEqual(found[("dcrouter_queue_items", (("status", "delivered"),))], 1.0)
        self.assertEqual(found[("dcrouter_queue_items", (("status", "queued"),))], 0.0)
        self.assertIn(("dcrouter_smtp_sessions", (("port", port),)), found)
        self.assertEqual(
            found[
                (
                    "dcrouter_webhook_events_dropped_total",
                    (("reason", "overflow"), ("webhook", "events.webhooks[0]")),
                )
            ],
            0.0,
        )

        # Unknown types are a 400 with a JSON error.
        bad = await treq.get(f"{base}/api/v1/events?types=message.nope", reactor=reactor, persistent=False)
        self.assertEqual(bad.code, 400)
        self.assertEqual((await bad.json())["error"]["code"], "bad_event_type")


class MetricsListenerTests(TestCase):
    def test_a_port_in_use_is_a_startup_error_naming_the_key(self) -> None:
        from dcrouter.router import StartupError

        taken = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        port = taken.getHost().port
        router = DcRouter(
            {"metricsConfig": {"enabled": True, "port": port}, "smartProxyConfig": {"routes": []}},
            reactor=reactor,
        )
        error = self.assertRaises(StartupError, router.privilegedStartService)
        self.assertIn(f"metricsConfig.port) on 127.0.0.1:{port}", str(error))


class TwistdJsonLogTests(TestCase):
    """`logFormat = "json"` under a real `twistd -n dcrouter`: standard output is JSON lines (twistd's own
    too), a session's lines with its id at the top."""

    timeout = 60

    def test_json_lines_on_stdout(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._go())

    async def _go(self) -> None:
        from tests.integration import TwistdProcess

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        (smtp_port,) = free_ports(1)
        config = os.path.join(directory, "dcrouter.json")
        with open(config, "w") as handle:
            json.dump(
                {
                    "logFormat": "json",
                    "smtpConfig": {
                        "ports": [smtp_port],
                        "bindAddress": "127.0.0.1",
                        "hostname": "mx.test",
                        "implicitTlsPorts": [],
                        "submissionPorts": [],
                        "queueStorage": "memory",
                    },
                },
                handle,
            )
        process = TwistdProcess.spawn(
            reactor, ["-n", "--pidfile=", "dcrouter", "--config", config], directory
        )
        self.addCleanup(process.kill_on_cleanup)
        await process.seen('"dcrouter ready"').addTimeout(WAIT, reactor)
        await deferToThread(_connect_and_quit, smtp_port)
        await process.seen("Disconnected from").addTimeout(WAIT, reactor)
        process.signal("TERM")
        await process.ended.addTimeout(WAIT, reactor)
        lines = [line for line in process.output.decode().splitlines() if line.startswith("{")]
        records = [json.loads(line) for line in lines]
        rest = [line for line in process.output.decode().splitlines() if line and not line.startswith("{")]
        self.assertEqual([r for r in rest if not r.startswith("warning: ")], [])  # everything else is JSON
        session = [r for r in records if r["namespace"] == "dcrouter.smtp.protocol"]
        self.assertEqual(len({r["sessionId"] for r in session}), 1, session)
        self.assertTrue(any("starting up" in r["message"] for r in records))  # twistd's own line


def _connect_and_quit(port: int) -> None:
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=WAIT) as smtp:
        smtp.noop()


class ApiMountTests(TestCase):
    """`/metrics` and `/api/v1/events` on the management API, behind its tokens."""

    timeout = 60

    def test_metrics_and_stream_need_a_token(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._go())

    async def _go(self) -> None:
        token = "observe-test-token"
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        (smtp_port,) = free_ports(1)
        router = DcRouter(
            {
                "smtpConfig": {
                    "ports": [smtp_port],
                    "bindAddress": "127.0.0.1",
                    "hostname": "mx.test",
                    "implicitTlsPorts": [],
                    "submissionPorts": [],
                    "queueStorage": "memory",
                },
                "apiConfig": {
                    "enabled": True,
                    "port": 0,
                    "tokens": [
                        {
                            "name": "viewer",
                            "tokenHash": "sha256$" + hashlib.sha256(token.encode()).hexdigest(),
                            "scope": "read",
                        }
                    ],
                },
            },
            reactor=reactor,
        )
        assert router.api is not None
        router.privilegedStartService()
        router.startService()
        self.addCleanup(router.stopService)
        await router.when_ready().addTimeout(WAIT, reactor)
        base = f"http://127.0.0.1:{router.api.port}"
        bearer = {"Authorization": [f"Bearer {token}"]}

        anonymous = await treq.get(f"{base}/metrics", reactor=reactor, persistent=False)
        self.assertEqual(anonymous.code, 401)
        await anonymous.content()

        stream = await treq.get(
            f"{base}/api/v1/events?types=connection.*", headers=bearer, reactor=reactor, persistent=False
        )
        self.assertEqual(stream.code, 200)
        streamed: list[bytes] = []
        treq.collect(stream, streamed.append).addErrback(lambda _: None)
        await deferToThread(_connect_and_quit, smtp_port)
        await until(lambda: b"event: connection.disconnect" in b"".join(streamed), "the streamed disconnect")

        response = await treq.get(f"{base}/metrics", headers=bearer, reactor=reactor, persistent=False)
        self.assertEqual(response.code, 200)
        found = samples((await response.content()).decode("utf-8"))
        port = str(smtp_port)
        self.assertEqual(found[("dcrouter_smtp_connections_total", (("port", port), ("tls", "no")))], 1.0)
