"""The suppression list of each queue backend (memory, SQLite beside the disk queue, Redis keys), one
contract: add, get, replace, remove, list soonest-to-expire first, and expiry on the injected Clock."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from dcrouter.interfaces import ISuppressionList, Suppression
from dcrouter.mail.address import Address
from dcrouter.queue.disk import DiskQueue
from dcrouter.queue.memory import MemoryQueue
from dcrouter.queue.redis import RedisQueue
from dcrouter.queue.suppression import normalize
from dcrouter.smtp.policy import SessionPolicy
from tests.redis_server import SKIP_REASON, start_redis
from tests.test_queue_contract import START

DAY = 86_400.0


class SuppressionContract:
    clock: Clock

    async def make_list(self) -> Any:
        raise NotImplementedError

    async def test_contract(self) -> None:
        from zope.interface.verify import verifyObject

        suppressions = await self.make_list()
        self.assertTrue(verifyObject(ISuppressionList, suppressions))  # type: ignore[attr-defined]
        self.assertIsNone(await suppressions.get("bob@example.com"))
        entry = await suppressions.add("Bob@Example.COM", "550 5.1.1 No such user", 7 * DAY)
        self.assertEqual(
            entry, Suppression("bob@example.com", "550 5.1.1 No such user", START, START + 7 * DAY)
        )
        self.assertEqual(await suppressions.get("<bob@example.com>"), entry)
        await suppressions.add("carol@example.com", "550 5.1.1 gone", DAY)
        self.assertEqual(
            [e.address for e in await suppressions.entries(10)], ["carol@example.com", "bob@example.com"]
        )
        self.assertEqual(len(await suppressions.entries(1)), 1)
        # Expiry on the clock: carol's day passes, bob's week does not.
        self.clock.advance(DAY)
        self.assertIsNone(await suppressions.get("carol@example.com"))
        self.assertEqual([e.address for e in await suppressions.entries(10)], ["bob@example.com"])
        # Added again: the newer entry replaces the older.
        renewed = await suppressions.add("bob@example.com", "550 5.1.1 still gone", 7 * DAY)
        self.assertEqual((await suppressions.get("bob@example.com")), renewed)
        self.assertTrue(await suppressions.remove("BOB@example.com"))
        self.assertFalse(await suppressions.remove("bob@example.com"))
        self.assertIsNone(await suppressions.get("bob@example.com"))
        self.assertEqual(await suppressions.entries(10), [])

    def test_normalize(self) -> None:
        self.assertEqual(normalize(" <A@B.test> "), "a@b.test")  # type: ignore[attr-defined]
        for bad in (
            "",
            "nobody",
            "a b@c.test",
            "a@b.test\r\nRCPT",
            "x" * 300 + "@a.test",
            "a\x00@b",
            "a\u2003@b",
        ):
            with self.assertRaises(ValueError):  # type: ignore[attr-defined]
                normalize(bad)


class MemorySuppressionTests(SuppressionContract, TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)

    async def make_list(self) -> Any:
        return MemoryQueue(clock=self.clock).suppression_list()


class DiskSuppressionTests(SuppressionContract, TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.path = os.path.abspath(self.mktemp())

    async def make_list(self) -> Any:
        queue = DiskQueue(self.path, reactor=reactor, clock=self.clock)
        suppressions = queue.suppression_list()
        self.addCleanup(suppressions.close)
        return suppressions

    async def test_durable(self) -> None:
        first = await self.make_list()
        await first.add("bob@example.com", "550 5.1.1 No such user", DAY)
        await first.close()
        second = await self.make_list()
        found = await second.get("bob@example.com")
        self.assertEqual(found.reason, "550 5.1.1 No such user")
        self.assertTrue(os.path.exists(os.path.join(self.path, "suppression.sqlite")))


class RedisSuppressionTests(SuppressionContract, TestCase):
    skip = SKIP_REASON

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.redis = start_redis(self)

    async def make_list(self) -> Any:
        queue = RedisQueue(self.redis.url, reactor=reactor, clock=self.clock, body_directory=self.mktemp())
        await queue.load()
        self.addCleanup(queue.save)
        return queue.suppression_list()

    async def test_shared_and_expiring_in_redis(self) -> None:
        first = await self.make_list()
        await first.add("bob@example.com", "550 5.1.1 No such user", DAY)
        second = await self.make_list()  # another router on the same Redis
        self.assertEqual((await second.get("bob@example.com")).reason, "550 5.1.1 No such user")
        ttl = int(self.redis.command("PTTL", "dcrouter:suppressed:bob@example.com").strip().lstrip(b":"))
        self.assertTrue(0 < ttl <= DAY * 1000, ttl)


class PolicySuppressionTests(TestCase):
    """What RCPT gets from SessionPolicy with a suppression list: 550 5.1.1 for a suppressed address (and
    counted), until it expires on the clock; an unreadable list accepts (delivery decides)."""

    def setUp(self) -> None:
        from tests.test_smtp_policy import make_config, make_session

        self.clock = Clock()
        self.clock.advance(START)
        self.suppressions = MemoryQueue(clock=self.clock).suppression_list()
        self.policy = SessionPolicy(make_config(), suppressions=self.suppressions)
        self.session = make_session("192.0.2.7", auth_user="alice")

    async def rcpt(self, address: str) -> Any:
        local, _, domain = address.partition("@")
        return await self.policy.check_recipient(self.session, Address(local, domain))

    async def test_refused_until_expiry(self) -> None:
        await self.suppressions.add("bob@elsewhere.test", "550 5.1.1 No such user", 60)
        reply = await self.rcpt("Bob@elsewhere.test")
        self.assertEqual((reply.code, reply.enhanced), (550, "5.1.1"))
        self.assertEqual(self.policy.suppressed_refusals, 1)
        self.assertIsNone(await self.rcpt("carol@elsewhere.test"))
        self.clock.advance(60)
        self.assertIsNone(await self.rcpt("bob@elsewhere.test"))
        self.assertEqual(self.policy.suppressed_refusals, 1)

    async def test_unreadable_list_accepts(self) -> None:
        from twisted.internet.defer import fail
        from twisted.logger import globalLogPublisher

        from dcrouter.interfaces import QueueUnavailable

        seen: list[dict[str, object]] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        # An unavailable store (Redis down, a full disk) is an operating condition: a warning, not an error.
        self.suppressions.get = lambda address: fail(QueueUnavailable("down"))  # type: ignore[method-assign]
        self.assertIsNone(await self.rcpt("bob@elsewhere.test"))
        self.assertEqual(self.flushLoggedErrors(QueueUnavailable), [])
        warnings = [e for e in seen if "suppression list unavailable" in str(e.get("log_format", ""))]
        self.assertEqual([e["why"] for e in warnings], ["down"])
        # Anything else is a defect and logged as one; RCPT still goes on.
        self.suppressions.get = lambda address: fail(KeyError("bug"))  # type: ignore[method-assign]
        self.assertIsNone(await self.rcpt("carol@elsewhere.test"))
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
