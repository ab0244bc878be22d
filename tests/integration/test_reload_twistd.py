"""Configuration reload through a real ``twistd -n dcrouter`` process: a reload every second (SIGHUP and
``POST /api/v1/reload`` in turn) while several smtplib clients send 200 messages to a real downstream server
loses no message and drops no session; then a changed routing rule takes effect for the next message, an added
SMTP port starts listening and a removed one stops, and an invalid file leaves everything as it was."""

from __future__ import annotations

import hashlib
import json
import os
import smtplib
import urllib.error
import urllib.request
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.downstream import Downstream, start_downstream
from tests.integration import TwistdProcess, free_ports
from tests.integration.test_delivery_twistd import HOSTNAME, READY, WAIT, message, message_id, send_all

TOKEN = "twistd-reload-token"
CLIENTS = 4
PER_CLIENT = 50


def post_reload(api_port: int) -> tuple[int, dict[str, Any]]:
    """``POST /api/v1/reload`` (in a thread): the status and the JSON answer."""
    request = urllib.request.Request(f"http://127.0.0.1:{api_port}/api/v1/reload", data=b"{}", method="POST")
    request.add_header("Authorization", f"Bearer {TOKEN}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def send_one(port: int, number: int) -> str:
    [queue_id] = send_all(port, [message("after", number)])
    return queue_id


class TwistdReloadTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.first: Downstream = start_downstream(reactor=reactor)
        self.addCleanup(self.first.stop)
        self.second: Downstream = start_downstream(reactor=reactor)
        self.addCleanup(self.second.stop)
        self.path = os.path.join(self.directory, "router.toml")
        self.smtp_port, self.other_port, self.api_port = free_ports(3)

    def write(self, *, ports: list[int], downstream: Downstream, max_retries: int = 5) -> None:
        token_hash = "sha256$" + hashlib.sha256(TOKEN.encode()).hexdigest()
        with open(self.path, "w") as handle:
            handle.write(
                "[smtpConfig]\n"
                f"ports = {ports}\n"
                'bindAddress = "127.0.0.1"\n'
                f'hostname = "{HOSTNAME}"\n'
                "implicitTlsPorts = []\n"
                "submissionPorts = []\n"
                'queueStorage = "disk"\n'
                f'persistentPath = "{os.path.join(self.directory, "queue")}"\n'
                f"maxRetries = {max_retries}\n"
                "[[smtpConfig.domainConfigs]]\n"
                'domains = ["example.test"]\n'
                'targetIPs = ["127.0.0.1"]\n'
                f"port = {downstream.port}\n"
                "[apiConfig]\n"
                "enabled = true\n"
                f"port = {self.api_port}\n"
                "[[apiConfig.tokens]]\n"
                'name = "test"\n'
                f'tokenHash = "{token_hash}"\n'
                'scope = "admin"\n'
            )

    def reloads(self) -> int:
        return self.process.output.count(b"configuration reloaded (")

    async def until_reloads(self, count: int) -> None:
        deadline = reactor.seconds() + WAIT
        while self.reloads() < count:
            if reactor.seconds() > deadline:
                raise AssertionError(f"fewer than {count} reloads logged:\n{self.process.output.decode()}")
            await deferLater(reactor, 0.05, lambda: None)

    def test_reload_under_load(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._scenario())

    async def _scenario(self) -> None:
        self.write(ports=[self.smtp_port], downstream=self.first)
        process = TwistdProcess.spawn(
            reactor, ["-n", "--pidfile=", "dcrouter", "--config", self.path], self.directory
        )
        self.addCleanup(process.kill_on_cleanup)
        self.process = process
        await process.seen(READY).addTimeout(WAIT, reactor)

        # The load: each client one SMTP session for all its messages, so sessions span several reloads.
        sending = DeferredList(
            [
                deferToThread(send_all, self.smtp_port, [message(f"load{c}", n) for n in range(PER_CLIENT)])
                for c in range(CLIENTS)
            ],
            fireOnOneErrback=True,
            consumeErrors=True,
        )
        # A reload every second while it runs (a changed maxRetries rebuilds policy, chain and routing),
        # SIGHUP and the API in turn; at least three whatever the speed of the machine.
        reloads = 0
        while not sending.called or reloads < 3:
            reloads += 1
            self.write(ports=[self.smtp_port], downstream=self.first, max_retries=5 + reloads % 2)
            if reloads % 2:
                process.signal("HUP")
                await self.until_reloads(reloads)
            else:
                code, body = await deferToThread(post_reload, self.api_port)
                self.assertEqual(code, 200, body)
                self.assertIn("smtpConfig.maxRetries", body["changes"])
            await deferLater(reactor, 1.0, lambda: None)
        results = await sending
        ids = [queue_id for _, sent in results for queue_id in sent]
        self.assertEqual(
            len(set(ids)), CLIENTS * PER_CLIENT
        )  # every message answered 250, no session dropped
        received = await self.first.wait_for_messages(CLIENTS * PER_CLIENT).addTimeout(WAIT, reactor)
        expected = {f"<load{c}-{n}@sender.test>" for c in range(CLIENTS) for n in range(PER_CLIENT)}
        self.assertEqual({message_id(r) for r in received}, expected)
        self.assertEqual(self.reloads(), reloads)
        self.assertNotIn(b"reload refused", process.output)

        # A changed routing rule: the next message goes to the second server.
        self.write(ports=[self.smtp_port], downstream=self.second)
        code, body = await deferToThread(post_reload, self.api_port)
        self.assertEqual(code, 200, body)
        self.assertIn("smtpConfig.domainConfigs", body["changes"])
        await deferToThread(send_one, self.smtp_port, 1)
        [routed] = await self.second.wait_for_messages(1).addTimeout(WAIT, reactor)
        self.assertEqual(message_id(routed), "<after-1@sender.test>")

        # A port added listens; then the first one removed stops.
        self.write(ports=[self.smtp_port, self.other_port], downstream=self.second)
        code, body = await deferToThread(post_reload, self.api_port)
        self.assertEqual(code, 200, body)
        self.assertIn(f"smtpConfig.ports: listening on {self.other_port}", body["changes"])
        await deferToThread(send_one, self.other_port, 2)
        self.write(ports=[self.other_port], downstream=self.second)
        process.signal("HUP")
        await self.until_reloads(self.reloads() + 1)
        with self.assertRaises(ConnectionRefusedError):
            await deferToThread(smtplib.SMTP, "127.0.0.1", self.smtp_port, "client.test", WAIT)

        # An invalid file: refused with its key path, and everything stays as it was.
        with open(self.path, "a") as handle:
            handle.write("[smtpConfig.nonsense]\n")
        with open(self.path) as handle:
            content = handle.read().replace(f"ports = [{self.other_port}]", 'ports = ["x"]')
        with open(self.path, "w") as handle:
            handle.write(content)
        code, body = await deferToThread(post_reload, self.api_port)
        self.assertEqual(code, 422, body)
        self.assertTrue(any(e.startswith("smtpConfig.ports") for e in body["error"]["errors"]), body)
        await deferToThread(send_one, self.other_port, 3)
        received = await self.second.wait_for_messages(3).addTimeout(WAIT, reactor)
        self.assertEqual(
            {message_id(r) for r in received},
            {"<after-1@sender.test>", "<after-2@sender.test>", "<after-3@sender.test>"},
        )
