"""Two DcRouters (as two dcrouter processes would) on one real redis-server with the Redis queue: a shared
anonymous limit of 100 messages is exceeded by nothing, however the clients split between them. (The fallback
to local counting while Redis is away is in tests/test_limits_redis.py: with the Redis queue, no mail is
accepted then anyway.)"""

from __future__ import annotations

import smtplib
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.threads import deferToThread

from dcrouter import DcRouter
from dcrouter.limits.counters import SharedCounters
from tests.redis_server import free_port
from tests.test_queue_redis import RedisQueueTestBase

MESSAGE = b"Subject: shared\r\n\r\nbody\r\n"


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

    async def router(self, limit: dict[str, Any]) -> tuple[DcRouter, int]:
        port = free_port()
        config = {
            "ports": [port],
            "bindAddress": "127.0.0.1",
            "hostname": "mx.test",
            "implicitTlsPorts": [],
            "submissionPorts": [],
            "queueStorage": "redis",
            "redisUrl": self.redis.url,
            "persistentPath": self.bodies,
            "domainConfigs": [{"domains": ["example.test"], "targetIPs": ["127.0.0.1"]}],
            "rateLimits": {"anonymous": {"messages": [limit]}},
        }
        router = DcRouter({"smtpConfig": config}, reactor=reactor)
        assert router.delivery is not None
        router.delivery.pause_deliveries()
        router.privilegedStartService()
        router.startService()
        self.addCleanup(router.stopService)
        await router.when_ready()
        return router, port

    async def test_two_routers_share_a_limit_of_100_exactly(self) -> None:
        day = {"count": 100, "window": 86_400_000}  # nothing is paid back during the test
        (first, port1), (_, port2) = [await self.router(day), await self.router(day)]
        assert first.limits is not None
        self.assertIsInstance(first.limits.limiter.store, SharedCounters)
        results = await DeferredList(
            [deferToThread(send_many, port1, 90), deferToThread(send_many, port2, 70)], consumeErrors=True
        )
        codes = [code for ok, result in results for code in (result if ok else [])]
        self.assertEqual(len(codes), 160, results)
        self.assertEqual(codes.count(250), 100)
        self.assertEqual(codes.count(451), 60)
        queue = first.queue
        assert queue is not None
        self.assertEqual(await queue.get_item_count(), 100)
