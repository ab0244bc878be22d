"""Redis Sentinel failover under load, with real processes: a ``twistd dcrouter`` whose ``redisUrl`` names
three ``redis-sentinel`` processes watching a master and two replicas (``appendfsync always``,
``min-replicas-to-write 1``; tests/redis_sentinel.py). While mail streams in, the master is killed with
SIGKILL: ingress answers ``451`` during the switch, the sentinels promote a replica, dcrouter finds the new
master by itself, and every message that got a ``250`` reaches the downstream SMTP server.
"""

from __future__ import annotations

import collections
import email
import email.policy
import os
import smtplib
import sys
import threading

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from dcrouter.net.redis_url import parse_redis_url
from tests.downstream import Downstream, ReceivedMessage, start_downstream
from tests.integration import TwistdProcess, free_ports
from tests.redis_sentinel import SKIP_REASON, start_sentinel_cluster

READY = "dcrouter ready"
WAIT = 60.0
#: Messages the sender gets acknowledged in all; the master dies after KILL_AFTER of them.
TOTAL = 60
KILL_AFTER = 15


def message(number: int) -> bytes:
    return (
        b"From: sender@sender.test\r\nTo: sink@example.test\r\n"
        b"Message-ID: <ha-%d@sender.test>\r\nSubject: %d\r\n\r\nbody %d\r\n" % (number, number, number)
    )


class Sender:
    """Sends TOTAL messages (call :meth:`run` in a thread), each again after a 4xx or a broken session, until
    it gets a 250. Records what was acknowledged and every temporary refusal."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.accepted: list[str] = []
        self.refusals: list[tuple[int, bytes]] = []
        self.halfway = threading.Event()
        self.killed = threading.Event()

    def run(self) -> None:
        number = 0
        smtp: smtplib.SMTP | None = None
        while number < TOTAL:
            try:
                if smtp is None:
                    smtp = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=WAIT)
                    smtp.ehlo()
                smtp.mail("sender@sender.test")
                smtp.rcpt("sink@example.test")
                code, text = smtp.data(message(number))
            except (OSError, smtplib.SMTPException) as e:
                self.refusals.append((0, repr(e).encode()))
                smtp = None
                continue
            if code == 250:
                self.accepted.append(f"<ha-{number}@sender.test>")
                number += 1
                if number == KILL_AFTER:
                    self.halfway.set()
                    self.killed.wait(WAIT)  # the next message meets the dead master
            else:
                self.refusals.append((code, text))
                smtp.rset()
        if smtp is not None:
            smtp.quit()


def message_id(received: ReceivedMessage) -> str:
    parsed = email.message_from_bytes(received.data, policy=email.policy.compat32)
    return str(parsed["Message-ID"])


class SentinelFailoverTests(TestCase):
    timeout = 240
    skip = SKIP_REASON

    async def test_master_killed_under_load_loses_nothing_acknowledged(self) -> None:
        cluster = start_sentinel_cluster(self)
        self.assertEqual(parse_redis_url(cluster.url).wait_replicas, 1)
        downstream: Downstream = start_downstream(reactor=reactor)
        self.addCleanup(downstream.stop)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        (port,) = free_ports(1)
        config = os.path.join(directory, "router.toml")
        with open(config, "w") as f:
            f.write(
                "[smtpConfig]\n"
                f"ports = [{port}]\n"
                'bindAddress = "127.0.0.1"\n'
                'hostname = "mx.test"\n'
                "implicitTlsPorts = []\n"
                "submissionPorts = []\n"
                'queueStorage = "redis"\n'
                f'redisUrl = "{cluster.url}"\n'
                f'persistentPath = "{os.path.join(directory, "queue")}"\n'
                "[[smtpConfig.domainConfigs]]\n"
                'domains = ["example.test"]\n'
                'targetIPs = ["127.0.0.1"]\n'
                f"port = {downstream.port}\n"
            )
        process = TwistdProcess.spawn(
            reactor, ["-n", "--pidfile=", "dcrouter", "--config", config], directory
        )
        self.addCleanup(process.kill_on_cleanup)
        await process.seen(READY).addTimeout(WAIT, reactor)

        sender = Sender(port)
        sending = deferToThread(sender.run)
        await deferToThread(sender.halfway.wait, WAIT)
        old_master = cluster.master.port
        cluster.master.kill()
        sender.killed.set()
        await sending.addTimeout(WAIT * 2, reactor)
        self.assertTrue(
            await deferToThread(cluster.promoted_from, old_master), "the sentinels promoted a replica"
        )
        self.assertEqual(len(sender.accepted), TOTAL)
        self.assertTrue(
            any(code == 451 for code, _ in sender.refusals), f"no 451 during the switch: {sender.refusals}"
        )
        await downstream.wait_for_messages(TOTAL).addTimeout(WAIT, reactor)
        process.signal("TERM")
        await process.ended.addTimeout(WAIT, reactor)
        delivered = {message_id(r) for r in downstream.messages}
        self.assertLessEqual(set(sender.accepted), delivered)
        # The switch is an outage (logged once as such), not a command refused for a bug (with a traceback).
        output = process.output.decode("utf-8", "replace")
        self.assertNotIn("command refused", output)
        self.assertIn("Redis queue unavailable", output)
        self.assertIn("answers again", output)
        refusals = collections.Counter(code for code, _ in sender.refusals)
        sys.stderr.write(
            f"\nSentinel failover: {TOTAL} acknowledged, all delivered ({len(downstream.messages)} "
            f"deliveries); refusals during the switch by code (0: session broken): {dict(refusals)}\n"
        )
