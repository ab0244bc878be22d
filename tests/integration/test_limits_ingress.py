"""SMTP rate limits through a real DcRouter in-process on 127.0.0.1, driven by smtplib (in a thread, so the
reactor keeps serving): an anonymous limit of 100 messages a minute, an authenticated user on the same
address not held back by it, a domain's maxMessagesPerMinute, and its allowedIPs.

Time is real here, and GCRA pays back one message every 0.6 s of a 100-a-minute limit: a run that takes
``t`` seconds may accept ``t / 0.6`` more than the burst. The assertions allow exactly that margin; the
exact counts on a Clock are in tests/test_smtp_limits.py."""

from __future__ import annotations

import os
import smtplib
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from dcrouter import DcRouter
from dcrouter.passwords import hash_password
from tests.integration import free_ports

USER, PASSWORD = "alice", "correct horse"
MESSAGE = b"From: a@sender.test\r\nTo: b@example.test\r\nSubject: limits\r\n\r\nbody\r\n"


def transaction(smtp: smtplib.SMTP, rcpt: str) -> tuple[int, bytes]:
    """MAIL, RCPT, DATA on an open session; the first reply that is not a success (the session is reset),
    or DATA's."""
    code, text = smtp.mail("a@sender.test")
    if code != 250:
        return code, text
    code, text = smtp.rcpt(rcpt)
    if code != 250:
        smtp.rset()
        return code, text
    return smtp.data(MESSAGE)


class LimitsIngressTests(TestCase):
    timeout = 120

    def start(self, smtp_config: dict[str, Any]) -> Deferred[None]:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        (self.port,) = free_ports(1)
        config = {
            "ports": [self.port],
            "bindAddress": "127.0.0.1",
            "hostname": "localhost",
            "submissionPorts": [],
            "queueStorage": "memory",
            "persistentPath": os.path.join(directory, "queue"),
            "auth": {
                "users": [{"username": USER, "password": hash_password(PASSWORD, log2_n=10)}],
                "allowInsecure": True,
            },
            "domainConfigs": [{"domains": ["example.test"], "targetIPs": ["127.0.0.1"], "port": 2626}],
            "rateLimits": {"anonymous": {"messages": [{"count": 100, "window": 60000}]}},
            "maxConnectionsPerIP": 50,
        }
        config.update(smtp_config)
        self.router = DcRouter({"smtpConfig": config}, reactor=reactor)
        assert self.router.delivery is not None
        self.router.delivery.pause_deliveries()  # the test is about what ingress accepts
        self.router.privilegedStartService()
        self.router.startService()
        self.addCleanup(self.router.stopService)
        return self.router.when_ready()

    def session(self, *, login: bool = False) -> smtplib.SMTP:
        smtp = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=30)
        smtp.ehlo()
        if login:
            smtp.login(USER, PASSWORD)
        return smtp

    def run_messages(self, count: int, rcpt: str = "b@example.test", *, login: bool = False) -> Deferred:
        def client() -> tuple[list[tuple[int, bytes]], float]:
            started = time.monotonic()
            with self.session(login=login) as smtp:
                replies = [transaction(smtp, rcpt) for _ in range(count)]
            return replies, time.monotonic() - started

        return deferToThread(client)

    def assertLimited(
        self, replies: list[tuple[int, bytes]], burst: int, per_second: float, elapsed: float
    ) -> int:
        """The first ``burst`` accepted, at most what the rate paid back during the run on top, every other
        reply ``451 4.7.1``; the number accepted."""
        codes = [code for code, _ in replies]
        self.assertEqual(codes[:burst], [250] * burst)
        accepted = codes.count(250)
        self.assertLessEqual(accepted, burst + int(elapsed * per_second) + 1)
        refused = [(code, text) for code, text in replies if code != 250]
        self.assertTrue(refused)
        for code, text in refused:
            self.assertEqual(code, 451, text)
            self.assertTrue(text.startswith(b"4.7.1 "), text)
            self.assertNotIn(b"127.0.0.1", text)  # which limit, never the key
        return accepted

    async def test_anonymous_limit_then_authenticated_user_on_the_same_address(self) -> None:
        await self.start({})
        replies, elapsed = await self.run_messages(200)
        accepted = self.assertLimited(replies, 100, 100 / 60, elapsed)
        self.assertIn(b"messages per client address: 100 per minute", replies[-1][1])
        queue = self.router.queue
        assert queue is not None
        self.assertEqual(await queue.get_item_count(), accepted)
        # The same address, authenticated: the authenticated tier has no limit set.
        replies, _ = await self.run_messages(30, login=True)
        self.assertEqual([code for code, _ in replies], [250] * 30)

    async def test_domain_max_messages_per_minute(self) -> None:
        domains = [
            {"domains": ["example.test"], "targetIPs": ["127.0.0.1"]},
            {
                "domains": ["limited.test"],
                "targetIPs": ["127.0.0.1"],
                "rateLimits": {"maxMessagesPerMinute": 10},
            },
        ]
        await self.start({"domainConfigs": domains, "rateLimits": {}})
        replies, elapsed = await self.run_messages(25, "x@limited.test")
        self.assertLimited(replies, 10, 10 / 60, elapsed)
        self.assertIn(b"messages to limited.test: 10 per minute", replies[-1][1])
        # Other domains are not held back by it.
        replies, _ = await self.run_messages(5, "x@example.test")
        self.assertEqual([code for code, _ in replies], [250] * 5)

    async def test_allowed_ips(self) -> None:
        domains = [
            {"domains": ["example.test"], "targetIPs": ["127.0.0.1"]},
            {"domains": ["closed.test"], "targetIPs": ["127.0.0.1"], "allowedIPs": ["192.0.2.0/24"]},
            {"domains": ["open.test"], "targetIPs": ["127.0.0.1"], "allowedIPs": ["127.0.0.0/8"]},
        ]
        await self.start({"domainConfigs": domains, "rateLimits": {}})
        replies, _ = await self.run_messages(1, "x@closed.test")
        self.assertEqual(replies[0][0], 550)
        self.assertTrue(
            replies[0][1].startswith(b"5.7.1 <x@closed.test>: Client address not allowed"), replies
        )
        replies, _ = await self.run_messages(1, "x@open.test")
        self.assertEqual(replies[0][0], 250)
