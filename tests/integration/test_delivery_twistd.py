"""Delivery through real ``twistd -n dcrouter`` processes (from this checkout): mail in over SMTP from
smtplib, out to a scripted downstream server in the test's reactor, with the disk queue and with the Redis
queue (a real redis-server from ``tests.redis_server``); and two processes sharing one Redis, where every
message must reach the downstream exactly once.
"""

from __future__ import annotations

import collections
import email
import email.policy
import os
import re
import smtplib
import sys
from collections.abc import Sequence

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.downstream import Downstream, ReceivedMessage, start_downstream
from tests.integration import TwistdProcess, free_ports
from tests.redis_server import SKIP_REASON as REDIS_SKIP
from tests.redis_server import start_redis

READY = "dcrouter ready"
HOSTNAME = "mx.test"
#: Seconds any one wait may take (a twistd start, a batch of deliveries) before the test fails.
WAIT = 30.0
#: Messages sent to the two processes sharing one Redis.
SHARED_MESSAGES = 60


def message(tag: str, number: int) -> bytes:
    return (
        b"From: sender@sender.test\r\n"
        b"To: sink@example.test\r\n"
        b"Message-ID: <%s-%d@sender.test>\r\n"
        b"Subject: %s %d\r\n"
        b"\r\n"
        b"body of %s %d\r\n"
        b".\r\n"
        b"..x\r\n" % (tag.encode(), number, tag.encode(), number, tag.encode(), number)
    )


def send_all(port: int, messages: Sequence[bytes]) -> list[str]:
    """Send ``messages`` in one smtplib session (call in a thread); the queue ids from the 250 replies."""
    ids = []
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=WAIT) as smtp:
        smtp.ehlo()
        for body in messages:
            smtp.mail("sender@sender.test")
            code, text = smtp.rcpt("sink@example.test")
            if code != 250:
                raise AssertionError(f"RCPT: {code} {text!r}")
            code, text = smtp.data(body)
            if code != 250 or not text.startswith(b"2.0.0 Ok: queued as "):
                raise AssertionError(f"DATA: {code} {text!r}")
            ids.append(text.split()[-1].decode("ascii"))
    return ids


def message_id(received: ReceivedMessage) -> str:
    parsed = email.message_from_bytes(received.data, policy=email.policy.compat32)
    return str(parsed["Message-ID"])


class TwistdDeliveryTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.downstream: Downstream = start_downstream(reactor=reactor)
        self.addCleanup(self.downstream.stop)

    def write_config(self, name: str, port: int, queue: str) -> str:
        """A config file for a router on ``port`` whose queue settings are the TOML lines ``queue``."""
        path = os.path.join(self.directory, f"{name}.toml")
        with open(path, "w") as handle:
            handle.write(
                "[smtpConfig]\n"
                f"ports = [{port}]\n"
                'bindAddress = "127.0.0.1"\n'
                f'hostname = "{HOSTNAME}"\n'
                "implicitTlsPorts = []\n"
                "submissionPorts = []\n"
                f"{queue}"
                "[[smtpConfig.domainConfigs]]\n"
                'domains = ["example.test"]\n'
                'targetIPs = ["127.0.0.1"]\n'
                f"port = {self.downstream.port}\n"
            )
        return path

    def disk_queue(self) -> str:
        return f'queueStorage = "disk"\npersistentPath = "{os.path.join(self.directory, "queue")}"\n'

    def redis_queue(self, url: str) -> str:
        # Bodies over the inline limit would go to persistentPath: every process sharing the Redis shares it.
        path = os.path.join(self.directory, "shared")
        return f'queueStorage = "redis"\nredisUrl = "{url}"\npersistentPath = "{path}"\n'

    async def start_twistd(self, config: str) -> TwistdProcess:
        process = TwistdProcess.spawn(
            reactor, ["-n", "--pidfile=", "dcrouter", "--config", config], self.directory
        )
        self.addCleanup(process.kill_on_cleanup)
        await process.seen(READY).addTimeout(WAIT, reactor)
        return process

    async def stop_twistd(self, process: TwistdProcess) -> None:
        process.signal("TERM")
        code = await process.ended.addTimeout(WAIT, reactor)
        # twistd re-raises the signal it stopped on once shut down, so a clean stop exits by SIGTERM.
        self.assertIn(code, (0, -15), process.output.decode("utf-8", "replace")[-3000:])
        self.assertIn(b"dcrouter stopped", process.output)

    async def in_and_out(self, queue: str) -> None:
        """Three messages in over SMTP, out at the downstream with their envelope and their exact text."""
        (port,) = free_ports(1)
        process = await self.start_twistd(self.write_config("router", port, queue))
        originals = [message("single", n) for n in range(3)]
        ids = await deferToThread(send_all, port, originals)
        self.assertEqual(len(set(ids)), 3)
        received = await self.downstream.wait_for_messages(3).addTimeout(WAIT, reactor)
        await self.stop_twistd(process)
        self.assertEqual(len(self.downstream.messages), 3)
        by_id = {message_id(r): r for r in received}
        for number, original in enumerate(originals):
            arrived = by_id[f"<single-{number}@sender.test>"]
            self.assertEqual(arrived.mail_from, "sender@sender.test")
            self.assertEqual(arrived.recipients, ["sink@example.test"])
            self.assertTrue(arrived.reply.startswith("250"), arrived.reply)
            self.assertTrue(arrived.data.startswith(b"Received: "), arrived.data[:200])
            self.assertIn(f"by {HOSTNAME}".encode(), arrived.data.split(b"\r\n\r\n", 1)[0])
            self.assertTrue(arrived.data.endswith(original), arrived.data)
            added = arrived.data[: len(arrived.data) - len(original)]
            self.assertNotIn(b"\r\n\r\n", added)

    def test_disk_queue(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.in_and_out(self.disk_queue()))

    def test_redis_queue(self) -> Deferred[None]:
        redis = start_redis(self)
        return Deferred.fromCoroutine(self.in_and_out(self.redis_queue(redis.url)))

    test_redis_queue.skip = REDIS_SKIP  # type: ignore[attr-defined]

    def test_two_processes_one_redis_deliver_each_message_once(self) -> Deferred[None]:
        redis = start_redis(self)
        return Deferred.fromCoroutine(self._two_processes(redis.url))

    test_two_processes_one_redis_deliver_each_message_once.skip = REDIS_SKIP  # type: ignore[attr-defined]

    async def _two_processes(self, url: str) -> None:
        ports = free_ports(2)
        configs = [
            self.write_config(f"router{n}", port, self.redis_queue(url)) for n, port in enumerate(ports)
        ]
        processes = list(await gatherResults([Deferred.fromCoroutine(self.start_twistd(c)) for c in configs]))
        # Two sessions per process, all four at once, each message to one process only.
        batches = [[message("shared", n) for n in range(k, SHARED_MESSAGES, 4)] for k in range(4)]
        sent = await gatherResults(
            [deferToThread(send_all, ports[k % 2], batch) for k, batch in enumerate(batches)]
        )
        ids = [queue_id for batch in sent for queue_id in batch]
        self.assertEqual(len(set(ids)), SHARED_MESSAGES)
        await self.downstream.wait_for_messages(SHARED_MESSAGES).addTimeout(WAIT, reactor)
        # A clean stop waits for deliveries in flight: whatever either process was going to deliver twice
        # has arrived by the time both have exited.
        for process in processes:
            await self.stop_twistd(process)

        counts = collections.Counter(message_id(r) for r in self.downstream.messages)
        expected = {f"<shared-{n}@sender.test>" for n in range(SHARED_MESSAGES)}
        duplicates = {mid: n for mid, n in counts.items() if n != 1}
        self.assertEqual(duplicates, {}, "delivered more than once")
        self.assertEqual(set(counts), expected)
        for received in self.downstream.messages:
            self.assertTrue(received.reply.startswith("250"), received.reply)
            self.assertEqual(received.recipients, ["sink@example.test"])
        # Which process delivered what, from their logs (informative: either may claim the other's mail).
        delivered = [
            len(re.findall(rb"via domain:example\.test to [^:]+:\d+: 1 delivered", process.output))
            for process in processes
        ]
        sys.stderr.write(f"\ntwo processes on one Redis: deliveries per process {delivered}\n")
