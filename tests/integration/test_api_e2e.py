"""The management API end to end: a DcRouter in process with a disk queue, mail sent by smtplib, seen in
``dcrouter queue list`` (the CLI, over HTTP), held, released and delivered to a real downstream server."""

from __future__ import annotations

import hashlib
import io
import os

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from dcrouter import DcRouter
from dcrouter.cli import parse_args
from dcrouter.ctl import run
from dcrouter.interfaces import IDeliveryQueue
from dcrouter.queue.item import QueueItemStatus
from tests.downstream import start_downstream
from tests.integration import free_ports
from tests.integration.test_delivery import MESSAGE, WAIT, smtp_send, wait_for_item

TOKEN = "e2e-admin-token"


class ApiEndToEndTests(TestCase):
    timeout = 60

    async def start(self) -> None:
        self.downstream = start_downstream(reactor=reactor)
        self.addCleanup(self.downstream.stop)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        (smtp_port,) = free_ports(1)
        options = {
            "smtpConfig": {
                "ports": [smtp_port],
                "bindAddress": "127.0.0.1",
                "hostname": "mx.test",
                "implicitTlsPorts": [],
                "submissionPorts": [],
                "queueStorage": "disk",
                "persistentPath": os.path.join(directory, "queue"),
                "domainConfigs": [
                    {"domains": ["example.test"], "targetIPs": ["127.0.0.1"], "port": self.downstream.port}
                ],
            },
            "apiConfig": {
                "enabled": True,
                "port": 0,
                "tokens": [
                    {
                        "name": "e2e",
                        "tokenHash": "sha256$" + hashlib.sha256(TOKEN.encode()).hexdigest(),
                        "scope": "admin",
                    }
                ],
            },
        }
        router = DcRouter(options, reactor=reactor)
        assert router.delivery is not None and router.api is not None and router.queue is not None
        router.delivery.pause_deliveries()
        router.privilegedStartService()
        router.startService()
        self.addCleanup(router.stopService)
        await router.when_ready().addTimeout(WAIT, reactor)
        self.router = router
        self.queue: IDeliveryQueue = router.queue
        self.smtp_port = router.smtp_ports[smtp_port]
        self.url = f"http://127.0.0.1:{router.api.port}"

    async def cli(self, *argv: str) -> tuple[int, str, str]:
        """``dcrouter ARGV`` against the router's API, in a thread (the CLI blocks)."""
        words = 1 if argv[0] == "stats" else 2  # options go after the (sub)command
        args = parse_args([*argv[:words], "--url", self.url, *argv[words:]])
        out, err = io.StringIO(), io.StringIO()
        status = await deferToThread(run, args, out, err, {"DCROUTER_TOKEN": TOKEN})
        return status, out.getvalue(), err.getvalue()

    async def send(self, rcpt: str) -> str:
        [queue_id] = await deferToThread(smtp_send, self.smtp_port, "alice@sender.test", [rcpt], [MESSAGE])
        return str(queue_id)

    async def test_send_list_hold_release_deliver(self) -> None:
        await self.start()
        held = await self.send("bob@example.test")

        status, out, err = await self.cli("queue", "list")
        self.assertEqual(status, 0, err)
        self.assertIn(held, out)
        self.assertIn("alice@sender.test", out)
        self.assertIn("bob@example.test", out)

        status, out, err = await self.cli("queue", "hold", held)
        self.assertEqual((status, out), (0, f"{held}: hold done, now held\n"), err)
        status, out, _ = await self.cli("queue", "list", "--status", "held", "--json")
        self.assertIn(f'"id": "{held}"', out)

        # Delivery runs again; a second message goes through while the held one stays.
        status, out, err = await self.cli("delivery", "resume")
        self.assertEqual(status, 0, err)
        other = await self.send("carol@example.test")
        await wait_for_item(self.queue, other, [QueueItemStatus.DELIVERED])
        self.assertEqual((await self.queue.get(held)).status, QueueItemStatus.HELD)
        self.assertEqual([m.recipients for m in self.downstream.messages], [["carol@example.test"]])

        status, out, err = await self.cli("queue", "release", held)
        self.assertEqual(status, 0, err)
        await wait_for_item(self.queue, held, [QueueItemStatus.DELIVERED])
        received = await self.downstream.wait_for_messages(2).addTimeout(WAIT, reactor)
        self.assertEqual(received[1].recipients, ["bob@example.test"])
        self.assertTrue(received[1].data.endswith(MESSAGE))

        status, out, err = await self.cli("queue", "show", held)
        self.assertEqual(status, 0, err)
        self.assertIn("status:         delivered", out)
        self.assertIn("bob@example.test: delivered", out)
        status, out, _ = await self.cli("stats")
        self.assertIn("2 delivered", out)

    async def test_cli_errors(self) -> None:
        await self.start()
        status, out, err = await self.cli("queue", "hold", "NOSUCHID")
        self.assertEqual((status, out), (1, ""))
        self.assertIn("no message NOSUCHID in the queue (404 not_found)", err)
        args = parse_args(["queue", "list", "--url", self.url])
        err_io = io.StringIO()
        status = await deferToThread(run, args, io.StringIO(), err_io, {})
        self.assertEqual(status, 2)
        self.assertIn("no token", err_io.getvalue())
        status = await deferToThread(run, args, io.StringIO(), err_io, {"DCROUTER_TOKEN": "wrong"})
        self.assertEqual(status, 1)
        self.assertIn("401 unauthorized", err_io.getvalue())

    async def test_message_download_streams_the_stored_message(self) -> None:
        import treq
        from twisted.web.client import HTTPConnectionPool

        await self.start()
        queue_id = await self.send("bob@example.test")
        response = await treq.get(
            f"{self.url}/api/v1/queue/{queue_id}/message",
            headers={"Authorization": f"Bearer {TOKEN}"},
            pool=HTTPConnectionPool(reactor, persistent=False),
        )
        body = await treq.content(response)
        self.assertEqual(response.code, 200)
        self.assertTrue(body.startswith(b"Received: "))
        self.assertTrue(body.endswith(MESSAGE))
