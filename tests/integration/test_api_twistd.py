"""The management API through a real ``twistd -n dcrouter`` process and the real ``dcrouter`` command: mail
sent by smtplib is seen in ``dcrouter queue list``, held, released and delivered to a downstream server; a
message for a destination that is down is deferred, with the connection error shown by ``dcrouter queue
list``."""

from __future__ import annotations

import hashlib
import os
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from dcrouter.ctl import ApiClient
from tests.downstream import Downstream, closed_port, start_downstream
from tests.integration import TwistdProcess, free_ports, twistd_environment
from tests.integration.test_delivery_twistd import HOSTNAME, READY, WAIT, message, send_all

TOKEN = "twistd-admin-token"


class TwistdApiTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.downstream: Downstream = start_downstream(reactor=reactor)
        self.addCleanup(self.downstream.stop)

    async def start(self) -> None:
        smtp_port, api_port = free_ports(2)
        down = await closed_port(reactor)
        self.config = os.path.join(self.directory, "router.toml")
        token_hash = "sha256$" + hashlib.sha256(TOKEN.encode()).hexdigest()
        with open(self.config, "w") as handle:
            handle.write(
                "[smtpConfig]\n"
                f"ports = [{smtp_port}]\n"
                'bindAddress = "127.0.0.1"\n'
                f'hostname = "{HOSTNAME}"\n'
                "implicitTlsPorts = []\n"
                "submissionPorts = []\n"
                'queueStorage = "disk"\n'
                f'persistentPath = "{os.path.join(self.directory, "queue")}"\n'
                "[smtpConfig.delivery]\n"
                "paused = true\n"
                "[[smtpConfig.domainConfigs]]\n"
                'domains = ["example.test"]\n'
                'targetIPs = ["127.0.0.1"]\n'
                f"port = {self.downstream.port}\n"
                "[[smtpConfig.domainConfigs]]\n"
                'domains = ["down.test"]\n'
                'targetIPs = ["127.0.0.1"]\n'
                f"port = {down}\n"
                "[apiConfig]\n"
                "enabled = true\n"
                f"port = {api_port}\n"
                "[[apiConfig.tokens]]\n"
                'name = "test"\n'
                f'tokenHash = "{token_hash}"\n'
                'scope = "admin"\n'
            )
        process = TwistdProcess.spawn(
            reactor, ["-n", "--pidfile=", "dcrouter", "--config", self.config], self.directory
        )
        self.addCleanup(process.kill_on_cleanup)
        await process.seen(READY).addTimeout(WAIT, reactor)
        self.process = process
        self.smtp_port = smtp_port
        self.api = ApiClient(f"http://127.0.0.1:{api_port}", TOKEN)

    async def dcrouter(self, *argv: str) -> tuple[int, str]:
        """The ``dcrouter`` command, in a process of its own, with the token in its environment."""
        env = dict(twistd_environment(), DCROUTER_TOKEN=TOKEN)
        words = 1 if argv[0] == "stats" else 2
        args = [
            "-c",
            "import sys; from dcrouter.cli import main; sys.exit(main())",
            *argv[:words],
            "--config",
            self.config,
            *argv[words:],
        ]
        out, err, code = await getProcessOutputAndValue(sys.executable, args, env=env, path=self.directory)
        self.assertEqual(err, b"", f"dcrouter {' '.join(argv)}: {err!r}")
        return code, out.decode()

    async def queue_item(self, queue_id: str) -> dict[str, object]:
        """Polled often: the client in this process rather than a ``dcrouter`` process each time."""
        item: dict[str, object] = await deferToThread(self.api.call, "GET", f"/api/v1/queue/{queue_id}")
        return item

    async def wait_status(self, queue_id: str, status: str) -> dict[str, object]:
        deadline = reactor.seconds() + WAIT
        while True:
            item = await self.queue_item(queue_id)
            if item["status"] == status:
                return item
            if reactor.seconds() > deadline:
                raise AssertionError(f"{queue_id} did not become {status}: {item}")
            await deferLater(reactor, 0.1, lambda: None)

    async def send(self, rcpt_domain: str, number: int) -> str:
        def one() -> list[str]:
            import smtplib

            with smtplib.SMTP(
                "127.0.0.1", self.smtp_port, local_hostname="client.test", timeout=WAIT
            ) as smtp:
                smtp.ehlo()
                smtp.mail("sender@sender.test")
                smtp.rcpt(f"sink@{rcpt_domain}")
                code, text = smtp.data(message("api", number))
                assert code == 250, (code, text)
                return [text.split()[-1].decode("ascii")]

        [queue_id] = await deferToThread(one)
        return queue_id

    def test_list_hold_release_deliver_and_a_deferral(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._scenario())

    async def _scenario(self) -> None:
        await self.start()
        [held] = await deferToThread(send_all, self.smtp_port, [message("api", 0)])

        code, out = await self.dcrouter("queue", "list")
        self.assertEqual(code, 0)
        self.assertIn(held, out)
        self.assertIn("sink@example.test", out)

        code, out = await self.dcrouter("queue", "hold", held)
        self.assertEqual((code, out), (0, f"{held}: hold done, now held\n"))
        code, out = await self.dcrouter("delivery", "resume")
        self.assertEqual(code, 0)

        other = await self.send("example.test", 1)
        failing = await self.send("down.test", 2)
        await self.wait_status(other, "delivered")
        item = await self.wait_status(failing, "deferred")
        self.assertIn("4.4.1", str(item["lastError"]))
        self.assertEqual((await self.queue_item(held))["status"], "held")
        self.assertEqual(len(self.downstream.messages), 1)

        code, out = await self.dcrouter("queue", "list", "--status", "deferred")
        self.assertIn(failing, out)
        # The last error, in parentheses under the message, as mailq shows it.
        self.assertIn(f"({' '.join(str(item['lastError']).split())})", out)

        code, out = await self.dcrouter("queue", "release", held)
        self.assertEqual(code, 0)
        await self.wait_status(held, "delivered")
        received = await self.downstream.wait_for_messages(2).addTimeout(WAIT, reactor)
        self.assertTrue(received[1].data.endswith(message("api", 0)))

        code, out = await self.dcrouter("stats")
        self.assertEqual(code, 0)
        self.assertIn("2 delivered", out)

        self.process.signal("TERM")
        await self.process.ended.addTimeout(WAIT, reactor)
