"""``QueueItem.head``/``body_offset`` in every queue backend: the header block processing wrote is stored
with the item (latin-1 JSON text, so any byte survives), the received body stays as it came, and delivery
relays the composed message (head + body from the offset) - for a recipient and in a DSN's headers.

Disk is reloaded by a new DiskQueue on the same directory, Redis by a fresh RedisQueue on the same server
(tests/redis_server.py); the memory queue keeps nothing across a restart, so it is only read back.
"""

from __future__ import annotations

import email
import email.policy
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from dcrouter.delivery.bounces import dsn_queue_id
from dcrouter.delivery.manager import DeliveryManager
from dcrouter.delivery.routing import RecipientRouter
from dcrouter.mail.envelope import Envelope
from dcrouter.processing.processor import EmailProcessor
from dcrouter.processing.transforms.headers import AddHeader, RemoveHeader
from dcrouter.queue.disk import DiskQueue
from dcrouter.queue.files import message_reader
from dcrouter.queue.item import QueueItem, QueueItemStatus
from dcrouter.queue.memory import MemoryQueue
from dcrouter.queue.redis import RedisQueue
from tests.redis_server import SKIP_REASON, start_redis
from tests.test_delivery_manager import DomainRule, ScriptedTransport, config
from tests.test_queue_contract import START, inline, make_item, read_body, spool_file

RECEIVED_HEAD = b"From: alice@senders.test\r\nX-Internal: drop me\r\nSubject: caf\xc3\xa9\r\n\r\n"
BODY = b".\r\n..x\r\n8-bit \xc3\xa9t\xc3\xa9 \xff\r\n"
RECEIVED = RECEIVED_HEAD + BODY
#: A head as processing might store it, with every byte value in it: storage must be lossless whatever
#: it holds (8-bit UTF-8 of an SMTPUTF8 message, raw latin-1, control bytes).
HEAD_8BIT = (
    b"X-Gateway: mx.test\r\n"
    b"From: alice@senders.test\r\n"
    b"Subject: caf\xc3\xa9\r\n"
    b"X-Bytes: " + bytes(range(256)) + b"\r\n"
    b"\r\n"
)


class QueueHeadMixin:
    """Mixed into a TestCase with ``make_queue()`` (a new queue object on the test's storage) and
    ``reloads`` (whether a new object sees what the last one stored)."""

    clock: Clock
    reloads = True

    def make_queue(self) -> Any:
        raise NotImplementedError

    async def open_queue(self) -> Any:
        queue = self.make_queue()
        await queue.load()
        self.addCleanup(queue.save)  # type: ignore[attr-defined]
        return queue

    async def reopen(self, queue: Any) -> Any:
        """The queue as the next process sees it (the same object for the memory queue)."""
        if not self.reloads:
            return queue
        await queue.save()
        return await self.open_queue()

    async def composed(self, queue: Any, item: QueueItem) -> bytes:
        stream = await queue.open_body(item.id)
        with message_reader(item.head, stream, item.body_offset) as reader:
            data: bytes = reader.read()
        return data

    def item_with_head(self, item_id: str, head: bytes = HEAD_8BIT) -> QueueItem:
        return make_item(item_id, head=head, body_offset=len(RECEIVED_HEAD), size=len(head) + len(BODY))

    # -- storage --

    async def test_head_survives_reload_inline_body(self) -> None:
        queue = await self.open_queue()
        await queue.enqueue(self.item_with_head("H1"), inline(RECEIVED))
        queue = await self.reopen(queue)
        item = await queue.get("H1")
        self.assertEqual(item.head, HEAD_8BIT)
        self.assertIsInstance(item.head, bytes)
        self.assertEqual(item.body_offset, len(RECEIVED_HEAD))
        self.assertEqual(await read_body(queue, "H1"), RECEIVED)
        self.assertEqual(await self.composed(queue, item), HEAD_8BIT + BODY)

    async def test_head_survives_reload_file_body(self) -> None:
        queue = await self.open_queue()
        big = RECEIVED + os.urandom(300_000)
        await queue.enqueue(self.item_with_head("H2"), spool_file(queue, big))
        queue = await self.reopen(queue)
        item = await queue.get("H2")
        self.assertEqual(item.head, HEAD_8BIT)
        self.assertEqual(await read_body(queue, "H2"), big)
        composed = await self.composed(queue, item)
        self.assertEqual(composed, HEAD_8BIT + big[len(RECEIVED_HEAD) :])

    async def test_no_head_stays_none(self) -> None:
        queue = await self.open_queue()
        await queue.enqueue(make_item("N1"), inline(RECEIVED))
        queue = await self.reopen(queue)
        item = await queue.get("N1")
        self.assertEqual((item.head, item.body_offset), (None, 0))

    async def test_head_kept_through_updates_and_claims(self) -> None:
        queue = await self.open_queue()
        await queue.enqueue(self.item_with_head("U1"), inline(RECEIVED))
        self.clock.advance(START)
        [claimed] = await queue.get_next(1)
        self.assertEqual(claimed.head, HEAD_8BIT)
        await queue.update(
            "U1", status=QueueItemStatus.DEFERRED, attempts=1, last_error="451 4.4.1 later", next_attempt_at=0
        )
        queue = await self.reopen(queue)
        [again] = await queue.get_next(1)
        self.assertEqual((again.id, again.head, again.attempts), ("U1", HEAD_8BIT, 1))
        [listed] = await queue.get_by_status(QueueItemStatus.DELIVERING)
        self.assertEqual(listed.head, HEAD_8BIT)

    async def test_quarantined_item_with_head(self) -> None:
        queue = await self.open_queue()
        item = self.item_with_head("Q1")
        item.status = QueueItemStatus.QUARANTINED
        await queue.enqueue(item, inline(RECEIVED))
        queue = await self.reopen(queue)
        self.clock.advance(START + 3600)
        self.assertEqual(await queue.get_next(10), [])
        [listed] = await queue.get_by_status(QueueItemStatus.QUARANTINED)
        self.assertEqual(listed.head, HEAD_8BIT)

    # -- through processing and delivery --

    def processor(self, queue: Any) -> EmailProcessor:
        return EmailProcessor(
            queue,
            self.clock.seconds,
            transformations=[AddHeader("X-Gateway", "mx.test"), RemoveHeader("X-Internal")],
        )

    def manager(self, queue: Any, transport: ScriptedTransport) -> DeliveryManager:
        cfg = config()
        return DeliveryManager(
            queue=queue,
            routes=RecipientRouter(cfg, rules=[DomainRule()]),
            transport=transport,
            submit_dsn=self.processor(queue).submit_local,
            config=cfg,
            clock=self.clock,
            random=lambda: 0.5,
        )

    async def processed(self, queue: Any, recipient: str = "bob@a.test") -> QueueItem:
        envelope = Envelope(mail_from="alice@senders.test", recipients=[recipient], received_at=START)
        message = spool_file(queue, RECEIVED, "spool-processed")
        item: QueueItem = await self.processor(queue).process(envelope, message)
        return item

    EXPECTED = b"From: alice@senders.test\r\nSubject: caf\xc3\xa9\r\nX-Gateway: mx.test\r\n\r\n" + BODY

    async def test_processed_head_stored(self) -> None:
        queue = await self.open_queue()
        item = await self.processed(queue)
        self.assertEqual(item.head, self.EXPECTED[: -len(BODY)])
        queue = await self.reopen(queue)
        stored = await queue.get(item.id)
        self.assertEqual(stored.head, item.head)
        self.assertEqual(await read_body(queue, item.id), RECEIVED)
        self.assertEqual(stored.size, len(self.EXPECTED))

    async def test_delivery_relays_the_composed_message(self) -> None:
        queue = await self.open_queue()
        item = await self.processed(queue)
        queue = await self.reopen(queue)
        transport = ScriptedTransport(queue, self.clock)
        self.clock.advance(START)
        [claimed] = await queue.get_next(1)
        done = await self.manager(queue, transport).deliver_message(claimed)
        self.assertEqual(done.status, QueueItemStatus.DELIVERED)
        [call] = transport.calls
        self.assertEqual((call["id"], call["rcpts"]), (item.id, ["bob@a.test"]))
        self.assertEqual(call["body"], self.EXPECTED)

    async def test_dsn_quotes_the_composed_headers(self) -> None:
        queue = await self.open_queue()
        item = await self.processed(queue)
        transport = ScriptedTransport(queue, self.clock)
        transport.script["bob@a.test"] = ["550 5.1.1 No such user"]
        self.clock.advance(START)
        [claimed] = await queue.get_next(1)
        done = await self.manager(queue, transport).deliver_message(claimed)
        self.assertEqual(done.status, QueueItemStatus.BOUNCED)
        bounce_id = dsn_queue_id(item.id, "failed")
        dsn = email.message_from_bytes(await read_body(queue, bounce_id), policy=email.policy.compat32)
        quoted = dsn.get_payload()[2].get_payload()
        text = quoted if isinstance(quoted, str) else quoted[0].as_string()
        self.assertIn("X-Gateway: mx.test", text)
        self.assertNotIn("X-Internal", text)


class MemoryQueueHeadTests(QueueHeadMixin, TestCase):
    reloads = False

    def setUp(self) -> None:
        self.clock = Clock()
        self.spool = self.mktemp()

    def make_queue(self) -> MemoryQueue:
        return MemoryQueue(clock=self.clock, spool_directory=self.spool)


class DiskQueueHeadTests(QueueHeadMixin, TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.path = self.mktemp()

    def make_queue(self) -> DiskQueue:
        return DiskQueue(self.path, reactor=reactor, clock=self.clock)

    async def test_body_file_is_the_received_file(self) -> None:
        queue = await self.open_queue()
        message = spool_file(queue, RECEIVED, "spool-inode")
        assert message.path is not None
        inode = os.stat(message.path).st_ino
        envelope = Envelope(mail_from="alice@senders.test", recipients=["bob@a.test"])
        item = await self.processor(queue).process(envelope, message)
        stream = await queue.open_body(item.id)
        with stream:
            self.assertEqual(os.fstat(stream.fileno()).st_ino, inode)
            self.assertEqual(stream.read(), RECEIVED)


class RedisQueueHeadTests(QueueHeadMixin, TestCase):
    """Bodies over 100 kB go to files (so the file-body test goes through one)."""

    skip = SKIP_REASON

    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = start_redis(self)
        self.bodies = self.mktemp()

    def make_queue(self) -> RedisQueue:
        return RedisQueue(
            self.redis.url,
            reactor=reactor,
            clock=self.clock,
            body_directory=self.bodies,
            inline_body_limit=100_000,
        )
