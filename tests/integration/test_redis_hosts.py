"""Three ``twistd dcrouter`` processes standing in for three hosts: bound to 127.0.0.2, .3 and .4, each with
its own ``persistentPath`` and consumer name, sharing nothing but one real redis-server (started per test on a
free port). Big bodies (over the 1 MiB inline limit) travel in Redis in chunks, so a host delivers mail
another host received without any shared directory. Counted at a real downstream SMTP server (test reactor):

- normal operation: every message delivered exactly once;
- ``kill -9`` of one process mid-load, then its restart: every message that got a ``250`` delivered (at least
  once; a delivery in flight at the kill may be repeated).
"""

from __future__ import annotations

import collections
import email
import email.policy
import os
import smtplib
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.downstream import Downstream, ReceivedMessage, start_downstream
from tests.integration import TwistdProcess, free_ports
from tests.redis_server import SKIP_REASON, start_redis

READY = "dcrouter ready"
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
#: Seconds any one wait may take before the test fails (a restart and a lease included).
WAIT = 60.0
#: Messages sent to each host; every BIG_EVERY-th is over the inline limit (Redis chunks).
PER_HOST = 30
BIG_EVERY = 10
BIG_SIZE = 1_300_000


def message(host: int, number: int) -> bytes:
    filler = b""
    if number % BIG_EVERY == 0:
        line = b"x" * 76 + b"\r\n"
        filler = line * (BIG_SIZE // len(line))
    return (
        b"From: sender@sender.test\r\nTo: sink@example.test\r\n"
        b"Message-ID: <h%d-%d@sender.test>\r\nSubject: %d %d\r\n\r\n"
        % (host, number, host, number)
        + filler
        + b"end\r\n"
    )


def send_until_refused(address: str, port: int, host: int) -> list[str]:
    """Send this host's messages in one session (call in a thread); the Message-IDs that got a 250. Stops at
    the first broken connection (the process was killed): those after it were never acknowledged."""
    accepted = []
    try:
        with smtplib.SMTP(address, port, local_hostname="client.test", timeout=WAIT) as smtp:
            smtp.ehlo()
            for number in range(PER_HOST):
                smtp.mail("sender@sender.test")
                smtp.rcpt("sink@example.test")
                code, _ = smtp.data(message(host, number))
                if code == 250:
                    accepted.append(f"<h{host}-{number}@sender.test>")
    except (OSError, smtplib.SMTPException):
        pass
    return accepted


def message_id(received: ReceivedMessage) -> str:
    parsed = email.message_from_bytes(received.data, policy=email.policy.compat32)
    return str(parsed["Message-ID"])


class ThreeHostsTests(TestCase):
    timeout = 240
    skip = SKIP_REASON

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.downstream: Downstream = start_downstream(reactor=reactor)
        self.addCleanup(self.downstream.stop)
        self.redis = start_redis(self)
        (self.port,) = free_ports(1, HOSTS)  # the same port on every "host", free on each

    def write_config(self, host: int) -> str:
        path = os.path.join(self.directory, f"host{host}.toml")
        with open(path, "w") as handle:
            handle.write(
                "[smtpConfig]\n"
                f"ports = [{self.port}]\n"
                f'bindAddress = "{HOSTS[host]}"\n'
                f'hostname = "mx{host}.test"\n'
                "implicitTlsPorts = []\n"
                "submissionPorts = []\n"
                "maxMessageSize = 5000000\n"
                'queueStorage = "redis"\n'
                f'redisUrl = "{self.redis.url}"\n'
                f'persistentPath = "{os.path.join(self.directory, f"host{host}")}"\n'
                f'redisConsumerName = "mx{host}"\n'
                "[[smtpConfig.domainConfigs]]\n"
                'domains = ["example.test"]\n'
                'targetIPs = ["127.0.0.1"]\n'
                f"port = {self.downstream.port}\n"
            )
        return path

    async def start(self, host: int) -> TwistdProcess:
        process = TwistdProcess.spawn(
            reactor, ["-n", "--pidfile=", "dcrouter", "--config", self.write_config(host)], self.directory
        )
        self.addCleanup(process.kill_on_cleanup)
        await process.seen(READY).addTimeout(WAIT, reactor)
        return process

    async def start_all(self) -> list[TwistdProcess]:
        return list(await gatherResults([Deferred.fromCoroutine(self.start(h)) for h in range(3)]))

    def send_all(self) -> Deferred[list[list[str]]]:
        return gatherResults(
            [deferToThread(send_until_refused, HOSTS[h], self.port, h) for h in range(len(HOSTS))]
        )

    async def stop(self, process: TwistdProcess) -> None:
        process.signal("TERM")
        await process.ended.addTimeout(WAIT, reactor)

    def counts(self) -> collections.Counter[str]:
        return collections.Counter(message_id(r) for r in self.downstream.messages)

    async def test_each_message_delivered_once(self) -> None:
        processes = await self.start_all()
        accepted = [mid for batch in await self.send_all() for mid in batch]
        self.assertEqual(len(accepted), 3 * PER_HOST)
        await self.downstream.wait_for_messages(len(accepted)).addTimeout(WAIT, reactor)
        for process in processes:  # a clean stop lets deliveries in flight finish
            await self.stop(process)
        counts = self.counts()
        self.assertEqual({mid: n for mid, n in counts.items() if n != 1}, {}, "delivered more than once")
        self.assertEqual(set(counts), set(accepted))
        big = [r for r in self.downstream.messages if len(r.data) > BIG_SIZE]
        self.assertEqual(len(big), 3 * PER_HOST // BIG_EVERY)
        for received in big:
            self.assertTrue(received.data.endswith(message(0, 0)[-1000:]))
        delivered_by = [p.output.count(b"1 delivered") for p in processes]
        sys.stderr.write(f"\nthree hosts on one Redis: deliveries per process {delivered_by}\n")

    async def test_kill_9_mid_load_loses_nothing_acknowledged(self) -> None:
        processes = await self.start_all()
        sending = self.send_all()
        await self.downstream.wait_for_messages(5).addTimeout(WAIT, reactor)
        processes[1].signal("KILL")
        await processes[1].ended.addTimeout(WAIT, reactor)
        accepted = {mid for batch in await sending for mid in batch}
        # Restarted with the same persistentPath and name, it takes back its claims at once.
        processes[1] = await self.start(1)
        while not accepted <= set(self.counts()):
            more = self.downstream.wait_for_messages(len(self.downstream.messages) + 1)
            await more.addTimeout(WAIT, reactor)
        for process in processes:
            await self.stop(process)
        counts = self.counts()
        self.assertLessEqual(accepted, set(counts))
        repeated = {mid: n for mid, n in counts.items() if n > 1}
        sys.stderr.write(
            f"\nkill -9 mid-load: {len(accepted)} acknowledged, all delivered; repeated {repeated}\n"
        )
