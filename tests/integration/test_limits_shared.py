"""Two dcrouter processes (``twistd dcrouter``) on one real redis-server with the Redis queue: a shared
anonymous limit of 100 messages is exceeded by nothing, however the clients split between them. (The
fallback to local counting while Redis is away is in tests/test_limits_redis.py: with the Redis queue, no
mail is accepted then anyway.)"""

from __future__ import annotations

import os
import smtplib

from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.threads import deferToThread

from tests.integration import TwistdProcess, free_ports
from tests.test_queue_redis import RedisQueueTestBase

READY = "dcrouter ready"
MESSAGE = b"Subject: shared\r\n\r\nbody\r\n"

CONFIG = """\
[smtpConfig]
ports = [{port}]
bindAddress = "127.0.0.1"
hostname = "mx.test"
implicitTlsPorts = []
submissionPorts = []
queueStorage = "redis"
redisUrl = "{redis}"
persistentPath = "{bodies}"

[smtpConfig.delivery]
paused = true

[[smtpConfig.domainConfigs]]
domains = ["example.test"]
targetIPs = ["127.0.0.1"]

# 100 a day: nothing is paid back during the test, so "at most 100" is exact.
[smtpConfig.rateLimits.anonymous]
messages = [{{ count = 100, window = 86400000 }}]
"""


def send_many(port: int, count: int) -> list[int]:
    """``count`` transactions on one session; each one's final code (MAIL's when it was refused)."""
    codes = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        for _ in range(count):
            code, _ = client.mail("sender@client.test")
            if code != 250:
                codes.append(code)
                continue
            client.rcpt("rcpt@example.test")
            codes.append(client.data(MESSAGE)[0])
    return codes


class SharedLimitTests(RedisQueueTestBase):
    timeout = 120

    async def start_process(self, port: int, name: str) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, f"{name}.toml")
        with open(path, "w") as f:
            f.write(CONFIG.format(port=port, redis=self.redis.url, bodies=os.path.abspath(self.bodies)))
        process = TwistdProcess.spawn(reactor, ["-n", "--pidfile=", "dcrouter", "--config", path], directory)
        self.addCleanup(process.kill_on_cleanup)
        await process.seen(READY).addTimeout(60, reactor)

    async def test_two_processes_share_a_limit_of_100_exactly(self) -> None:
        port1, port2 = free_ports(2)
        await self.start_process(port1, "one")
        await self.start_process(port2, "two")
        results = await DeferredList(
            [deferToThread(send_many, port1, 90), deferToThread(send_many, port2, 70)], consumeErrors=True
        )
        codes = [code for ok, result in results for code in (result if ok else [])]
        self.assertEqual(len(codes), 160, results)
        self.assertEqual(codes.count(250), 100)
        self.assertEqual(codes.count(451), 60)
        self.assertEqual(self.redis.command("GET", "dcrouter:live"), b"$3\r\n100\r\n")  # queued: 100
