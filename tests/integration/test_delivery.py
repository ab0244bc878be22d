"""Delivery end to end, in process: DcRouter on 127.0.0.1 with a disk queue receives mail from smtplib (in a
thread, so the reactor keeps serving) and delivers it to scripted downstream servers (``tests.downstream``)
over real sockets. What each downstream received is compared byte for byte with what the queue stored.

The retry schedule is checked with the delivery pieces built as ``DcRouter`` builds them, but with a
``Clock`` as the DeliveryManager's (and the queue's) clock: sockets run on the real reactor, time only moves
when the test advances it.
"""

from __future__ import annotations

import email
import email.policy
import os
import smtplib
from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from dcrouter import DcRouter
from dcrouter.config import load_options
from dcrouter.delivery.dotstuff import CHUNK_SIZE
from dcrouter.delivery.manager import DeliveryManager
from dcrouter.delivery.mx import MxResolver, make_resolver
from dcrouter.delivery.pool import ConnectionPool
from dcrouter.delivery.routing import RecipientRouter
from dcrouter.delivery.transport import ESMTPTransport
from dcrouter.interfaces import IDeliveryQueue
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.net.targets import TargetHealth
from dcrouter.processing.processor import EmailProcessor
from dcrouter.queue.disk import DiskQueue
from dcrouter.queue.item import QueueItem, QueueItemStatus
from tests.downstream import Downstream, ReceivedMessage, Script, start_downstream
from tests.integration import free_ports

HOSTNAME = "mx.test"
#: Seconds any one wait may take before the test fails (everything here is on 127.0.0.1).
WAIT = 15.0

MESSAGE = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: Bob <bob@example.test>\r\n"
    b"Message-ID: <delivery-1@sender.test>\r\n"
    b"Subject: delivery\r\n"
    b"\r\n"
    b"first line\r\n"
    b"last line\r\n"
)

FINAL = (QueueItemStatus.DELIVERED, QueueItemStatus.BOUNCED, QueueItemStatus.FAILED)


def smtp_send(
    port: int,
    mail_from: str,
    recipients: Sequence[str],
    messages: Sequence[bytes],
    mail_options: Sequence[str] = (),
) -> list[str]:
    """Send each of ``messages`` (bytes, CRLF) in one smtplib session (call in a thread); the queue ids."""
    ids = []
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=WAIT) as smtp:
        smtp.ehlo()
        for message in messages:
            code, text = smtp.mail(mail_from, list(mail_options))
            if code != 250:
                raise AssertionError(f"MAIL FROM:<{mail_from}>: {code} {text!r}")
            for rcpt in recipients:
                code, text = smtp.rcpt(rcpt)
                if code != 250:
                    raise AssertionError(f"RCPT TO:<{rcpt}>: {code} {text!r}")
            code, text = smtp.data(message)
            prefix = b"2.0.0 Ok: queued as "
            if code != 250 or not text.startswith(prefix):
                raise AssertionError(f"DATA: {code} {text!r}")
            ids.append(text[len(prefix) :].decode("ascii"))
    return ids


async def read_body(queue: IDeliveryQueue, queue_id: str) -> bytes:
    stream = await queue.open_body(queue_id)
    try:
        return bytes(stream.read())
    finally:
        stream.close()


async def wait_for_item(
    queue: IDeliveryQueue, queue_id: str, statuses: Sequence[QueueItemStatus], timeout: float = WAIT
) -> QueueItem:
    """Poll the queue (on reactor timers, every 20 ms) until the item has one of ``statuses``."""
    deadline = reactor.seconds() + timeout
    while True:
        item = await queue.get(queue_id)
        if item is not None and item.status in statuses:
            return item
        if reactor.seconds() > deadline:
            raise AssertionError(
                f"{queue_id} did not reach {[s.value for s in statuses]} in {timeout} s: {item}"
            )
        await deferLater(reactor, 0.02, lambda: None)


def stuffed(data: bytes) -> bytes:
    """``data`` as SMTP transparency puts it on the wire (every line starting with "." gets one more)."""
    return b"".join(b"." + line if line.startswith(b".") else line for line in data.splitlines(keepends=True))


def mail_commands(downstream: Downstream) -> list[str]:
    """The commands of a transaction (MAIL, RCPT, DATA, BDAT) the downstream saw, on any connection."""
    verbs = ("MAIL", "RCPT", "DATA", "BDAT")
    return [line for line in downstream.commands() if line.split(" ", 1)[0].upper() in verbs]


class RouterDeliveryTests(TestCase):
    """DcRouter in process: SMTP in, queue on disk, delivery to scripted downstream servers."""

    timeout = 30

    def downstream(self, script: Script | None = None) -> Downstream:
        server = start_downstream(script, reactor=reactor)
        self.addCleanup(server.stop)
        return server

    async def start_router(self, *, paused: bool = False, **smtp: Any) -> DcRouter:
        """A DcRouter on a free port (``self.port``) with ``smtp`` merged into its smtpConfig. ``paused``:
        delivery claims nothing until ``router.delivery.resume_deliveries()``."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        (port,) = free_ports(1)
        config: dict[str, Any] = {
            "ports": [port],
            "bindAddress": "127.0.0.1",
            "hostname": HOSTNAME,
            "implicitTlsPorts": [],
            "submissionPorts": [],
            "queueStorage": "disk",
            "persistentPath": os.path.join(directory, "queue"),
        }
        config.update(smtp)
        router = DcRouter({"smtpConfig": config}, reactor=reactor)
        assert router.delivery is not None and router.queue is not None
        if paused:
            router.delivery.pause_deliveries()
        router.privilegedStartService()
        router.startService()
        self.addCleanup(router.stopService)
        await router.when_ready().addTimeout(WAIT, reactor)
        self.port = router.smtp_ports[port]
        self.router = router
        self.queue: IDeliveryQueue = router.queue
        return router

    async def send(
        self, mail_from: str, recipients: Sequence[str], *messages: bytes, mail_options: Sequence[str] = ()
    ) -> list[str]:
        return await deferToThread(smtp_send, self.port, mail_from, recipients, messages, mail_options)

    def assertStoredExactly(self, stored: bytes, original: bytes) -> None:
        """The queue holds the original after the header lines dcrouter prepends (Received first)."""
        self.assertTrue(stored.startswith(b"Received: "), stored[:200])
        self.assertTrue(stored.endswith(original), stored[-200:])
        added = stored[: len(stored) - len(original)]
        self.assertTrue(added.endswith(b"\r\n"), added)
        self.assertNotIn(b"\r\n\r\n", added)  # header lines only: no blank line, the body is untouched

    def assertArrivedExactly(self, received: ReceivedMessage, stored: bytes) -> None:
        """What the downstream got is what the queue stored, and it went over the wire dot-stuffed."""
        self.assertEqual(len(received.data), len(stored))
        self.assertTrue(received.data == stored, "the delivered message differs from the stored one")
        self.assertTrue(received.raw == stuffed(stored), "the wire form is not the stored one dot-stuffed")
        self.assertTrue(received.reply.startswith("250"), received.reply)

    # -- 250 -----------------------------------------------------------------------------------------

    def test_accepted_message_arrives_as_stored(self) -> Deferred[None]:
        async def go() -> None:
            downstream = self.downstream()
            router = await self.start_router(
                paused=True,
                domainConfigs=[
                    {"domains": ["example.test"], "targetIPs": ["127.0.0.1"], "port": downstream.port}
                ],
            )
            [queue_id] = await self.send(
                "alice@sender.test", ["bob@example.test", "carol@example.test"], MESSAGE
            )
            stored = await read_body(self.queue, queue_id)
            self.assertStoredExactly(stored, MESSAGE)
            self.assertEqual(downstream.connections, [])  # paused: nothing left before we looked

            assert router.delivery is not None
            router.delivery.resume_deliveries()
            [received] = await downstream.wait_for_messages(1).addTimeout(WAIT, reactor)
            item = await wait_for_item(self.queue, queue_id, FINAL)

            self.assertEqual(received.mail_from, "alice@sender.test")
            self.assertEqual(received.recipients, ["bob@example.test", "carol@example.test"])
            self.assertArrivedExactly(received, stored)
            self.assertEqual(item.status, QueueItemStatus.DELIVERED)
            self.assertEqual(item.envelope.mail_from, "alice@sender.test")
            target = f"127.0.0.1:{downstream.port}"
            for rcpt in ("bob@example.test", "carol@example.test"):
                self.assertEqual(item.outcomes[rcpt]["outcome"], "delivered")
                self.assertEqual(item.outcomes[rcpt]["target"], target)
                self.assertTrue(item.outcomes[rcpt]["reply"].startswith("250 2.0.0"), item.outcomes[rcpt])
            [entry] = item.history
            self.assertEqual(entry["route"], "domain:example.test")
            self.assertEqual(entry["tried"], [f"{target} answered"])
            self.assertEqual(len(downstream.messages), 1)  # one transaction for both recipients

        return Deferred.fromCoroutine(go())

    # -- 550: a bounce to the sender's route; none for the null sender --------------------------------

    def test_permanent_failure_bounces_to_the_senders_route(self) -> Deferred[None]:
        async def go() -> None:
            no_such_user = "550 5.1.1 No such user here"
            recipients = self.downstream(
                Script(rcpt={"bad@example.test": no_such_user, "bad2@example.test": no_such_user})
            )
            senders = self.downstream()
            await self.start_router(
                domainConfigs=[
                    {"domains": ["example.test"], "targetIPs": ["127.0.0.1"], "port": recipients.port},
                    {"domains": ["sender.test"], "targetIPs": ["127.0.0.1"], "port": senders.port},
                ],
            )
            [queue_id] = await self.send(
                "alice@sender.test", ["good@example.test", "bad@example.test"], MESSAGE
            )
            [dsn] = await senders.wait_for_messages(1).addTimeout(WAIT, reactor)
            item = await wait_for_item(self.queue, queue_id, FINAL)

            self.assertEqual(item.status, QueueItemStatus.BOUNCED)
            self.assertEqual(item.outcomes["good@example.test"]["outcome"], "delivered")
            self.assertEqual(item.outcomes["bad@example.test"]["outcome"], "permanent")
            self.assertEqual(item.bounce_id, queue_id + "B")
            [delivered] = recipients.messages
            self.assertEqual(delivered.recipients, ["good@example.test"])

            # The DSN: from <>, to the envelope sender, via the sender domain's route.
            self.assertEqual(dsn.mail_from, "")
            self.assertEqual(dsn.recipients, ["alice@sender.test"])
            self.assertTrue(dsn.reply.startswith("250"), dsn.reply)
            report = email.message_from_bytes(dsn.data, policy=email.policy.default)
            self.assertEqual(report.get_content_type(), "multipart/report")
            self.assertEqual(report.get_param("report-type"), "delivery-status")
            self.assertEqual(report["To"].addresses[0].addr_spec, "alice@sender.test")
            status = dsn.data.decode("utf-8", "replace")
            self.assertIn("Final-Recipient: rfc822; bad@example.test", status)
            self.assertNotIn("rfc822; good@example.test", status)
            self.assertIn("Action: failed", status)
            self.assertIn("Status: 5.1.1", status)
            self.assertIn("No such user here", status)
            self.assertIn("<delivery-1@sender.test>", status)  # the original's headers come along
            self.assertNotIn("first line", status)  # never its body
            dsn_item = await wait_for_item(self.queue, queue_id + "B", FINAL)
            self.assertEqual(dsn_item.status, QueueItemStatus.DELIVERED)
            self.assertEqual(dsn_item.envelope.mail_from, "")
            self.assertEqual(dsn_item.history[0]["route"], "domain:sender.test")

            # The null sender's failure ends FAILED without any DSN (it would be queued before the status).
            # (Another address: bad@example.test is now on the suppression list, refused at RCPT.)
            [null_id] = await self.send("", ["bad2@example.test"], MESSAGE)
            null_item = await wait_for_item(self.queue, null_id, FINAL)
            self.assertEqual(null_item.status, QueueItemStatus.FAILED)
            self.assertIsNone(null_item.bounce_id)
            self.assertIsNone(await self.queue.get(null_id + "B"))
            self.assertEqual(len(senders.messages), 1)
            self.assertEqual(len(recipients.messages), 1)  # the only RCPT was refused: no DATA

        return Deferred.fromCoroutine(go())

    # -- a target that is down -------------------------------------------------------------------------

    def test_failover_to_the_next_target(self) -> Deferred[None]:
        async def go() -> None:
            downstream = self.downstream()
            # Targets share the route's port: nothing listens on it at 127.0.0.2, so the first is refused.
            await self.start_router(
                domainConfigs=[
                    {
                        "domains": ["example.test"],
                        "targetIPs": ["127.0.0.2", "127.0.0.1"],
                        "port": downstream.port,
                    }
                ],
            )
            [queue_id] = await self.send("alice@sender.test", ["bob@example.test"], MESSAGE)
            [received] = await downstream.wait_for_messages(1).addTimeout(WAIT, reactor)
            item = await wait_for_item(self.queue, queue_id, FINAL)
            self.assertEqual(item.status, QueueItemStatus.DELIVERED)
            self.assertEqual(item.attempts, 0)  # no retry was needed: failover is within the attempt
            self.assertEqual(received.recipients, ["bob@example.test"])
            self.assertStoredExactly(received.data, MESSAGE)
            [entry] = item.history
            self.assertEqual(
                entry["tried"],
                [f"127.0.0.2:{downstream.port} refused", f"127.0.0.1:{downstream.port} answered"],
            )
            self.assertEqual(item.outcomes["bob@example.test"]["target"], f"127.0.0.1:{downstream.port}")

        return Deferred.fromCoroutine(go())

    # -- STARTTLS required, not offered ----------------------------------------------------------------

    def test_required_tls_not_offered_defers_and_sends_nothing(self) -> Deferred[None]:
        async def go() -> None:
            downstream = self.downstream(Script(tls=None))
            await self.start_router(
                domainConfigs=[
                    {
                        "domains": ["example.test"],
                        "targetIPs": ["127.0.0.1"],
                        "port": downstream.port,
                        "useTls": True,
                    }
                ],
            )
            [queue_id] = await self.send("alice@sender.test", ["bob@example.test"], MESSAGE)
            item = await wait_for_item(self.queue, queue_id, (QueueItemStatus.DEFERRED, *FINAL))
            self.assertEqual(item.status, QueueItemStatus.DEFERRED)
            self.assertEqual(item.attempts, 1)
            self.assertIsNotNone(item.last_error)
            assert item.last_error is not None
            self.assertTrue(item.last_error.startswith("451 4.7.5"), item.last_error)
            self.assertIn("STARTTLS", item.last_error)
            self.assertEqual(item.outcomes, {})
            self.assertGreater(item.next_attempt_at, item.created_at)
            # It connected and asked (EHLO), then said nothing more: no envelope, no text in plaintext.
            self.assertGreaterEqual(len(downstream.connections), 1)
            self.assertEqual(downstream.connections[0].commands[:1], [f"EHLO {HOSTNAME}"])
            self.assertEqual(mail_commands(downstream), [])
            self.assertEqual(downstream.messages, [])
            for connection in downstream.connections:
                self.assertFalse(connection.tls)
                for line in connection.commands:
                    self.assertIn(line.split(" ", 1)[0].upper(), ("EHLO", "QUIT"), connection.commands)

        return Deferred.fromCoroutine(go())

    # -- transparency: dots and 8-bit text ---------------------------------------------------------------

    def test_dots_and_8bit_text_arrive_byte_identical(self) -> Deferred[None]:
        async def go() -> None:
            downstream = self.downstream()
            router = await self.start_router(
                paused=True,
                domainConfigs=[
                    {"domains": ["example.test"], "targetIPs": ["127.0.0.1"], "port": downstream.port}
                ],
            )
            originals = [dot_first_message()] + [chunk_boundary_message(shift) for shift in range(3)]
            ids = await self.send(
                "alice@sender.test", ["bob@example.test"], *originals, mail_options=["BODY=8BITMIME"]
            )
            stored = [await read_body(self.queue, queue_id) for queue_id in ids]
            for body, original in zip(stored, originals, strict=True):
                self.assertStoredExactly(body, original)
            # The stuffer reads the body in CHUNK_SIZE pieces: one of the shifted messages has a "." line
            # starting exactly at the first chunk boundary (it is the line a naive sender forgets).
            self.assertTrue(
                any(body[CHUNK_SIZE - 2 : CHUNK_SIZE + 3] == b"\r\n.\r\n" for body in stored),
                [body[CHUNK_SIZE - 4 : CHUNK_SIZE + 4] for body in stored],
            )
            item = await self.queue.get(ids[0])
            assert item is not None
            self.assertEqual(item.envelope.mail_params.get("BODY"), "8BITMIME")

            assert router.delivery is not None
            router.delivery.resume_deliveries()
            received = await downstream.wait_for_messages(len(ids)).addTimeout(WAIT, reactor)
            by_body = {r.data: r for r in received}
            for body in stored:
                self.assertIn(body, by_body, "a message arrived altered")
                self.assertArrivedExactly(by_body[body], body)
            for queue_id in ids:
                item = await wait_for_item(self.queue, queue_id, FINAL)
                self.assertEqual(item.status, QueueItemStatus.DELIVERED)
            mails = [line for line in mail_commands(downstream) if line.upper().startswith("MAIL")]
            self.assertEqual(len(mails), len(ids))
            for line in mails:
                self.assertIn("BODY=8BITMIME", line)

        return Deferred.fromCoroutine(go())

    # -- one message, three routes ---------------------------------------------------------------------

    def test_recipients_at_three_routes(self) -> Deferred[None]:
        async def go() -> None:
            a, b, default = self.downstream(), self.downstream(), self.downstream()
            await self.start_router(
                paused=True,
                domainConfigs=[
                    {"domains": ["a.test"], "targetIPs": ["127.0.0.1"], "port": a.port},
                    {"domains": ["b.test"], "targetIPs": ["127.0.0.1"], "port": b.port},
                ],
                defaultServer="127.0.0.1",
                defaultPort=default.port,
                relayNetworks=["127.0.0.1"],  # c.test is no domain of ours: relaying for this client
            )
            rcpts = ["a1@a.test", "b1@b.test", "c1@c.test", "a2@a.test"]
            [queue_id] = await self.send("alice@sender.test", rcpts, MESSAGE)
            stored = await read_body(self.queue, queue_id)
            assert self.router.delivery is not None
            self.router.delivery.resume_deliveries()
            for server in (a, b, default):
                await server.wait_for_messages(1).addTimeout(WAIT, reactor)
            item = await wait_for_item(self.queue, queue_id, FINAL)

            expected = {a: ["a1@a.test", "a2@a.test"], b: ["b1@b.test"], default: ["c1@c.test"]}
            for server, wanted in expected.items():
                [received] = server.messages
                self.assertEqual(received.mail_from, "alice@sender.test")
                self.assertEqual(received.recipients, wanted)
                self.assertArrivedExactly(received, stored)
                self.assertEqual(len(mail_commands(server)), 2 + len(wanted))  # MAIL, RCPT each, DATA
            self.assertEqual(item.status, QueueItemStatus.DELIVERED)
            self.assertEqual(
                [entry["route"] for entry in item.history], ["domain:a.test", "domain:b.test", "default"]
            )
            for rcpt in rcpts:
                self.assertEqual(item.outcomes[rcpt]["outcome"], "delivered")

        return Deferred.fromCoroutine(go())


def dot_first_message() -> bytes:
    """A message whose very first line starts with "." (smtplib stuffs it; ingress must unstuff it), and
    whose text has lone dots, double dots and 8-bit UTF-8."""
    return (
        b".first line of the message starts with a dot\r\n"
        b"From: alice@sender.test\r\n"
        b"Message-ID: <dots-first@sender.test>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b".\r\n"
        b"..x\r\n"
        b"...\r\n"
        b". a line after a lone dot\r\n"
        + "Grüße aus Köln — ✓ 日本語 ÆØÅ\r\n".encode()
        + b"\xc3\xa9t\xc3\xa9 .\r\n"
        b".\r\n"
    )


def chunk_boundary_message(shift: int) -> bytes:
    """About 70 KB: ordinary lines, then a run of lone "." lines across offset CHUNK_SIZE of the stored
    message (whatever the length of the Received header, a few hundred octets). ``shift`` (0, 1, 2) moves
    the run by one octet each, so for one of the three a "." line starts exactly at CHUNK_SIZE."""
    head = (
        b"From: alice@sender.test\r\n"
        b"Message-ID: <chunk-%d@sender.test>\r\n"
        b"Subject: padded " % shift + b"x" * shift + b"\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n" + "..x and 8-bit: naïve café\r\n".encode()
    )
    lines = [head]
    size = len(head)
    number = 0
    while size < CHUNK_SIZE - 1500:
        line = b"line %05d of ordinary text, to push the dots to the chunk boundary\r\n" % number
        lines.append(line)
        size += len(line)
        number += 1
    dots = b".\r\n" * 600  # 1800 octets: offsets CHUNK_SIZE - 1500 .. CHUNK_SIZE + 300 of the original
    return b"".join(lines) + dots + b"..x\r\nend\r\n.\r\n"


class RetryScheduleTests(TestCase):
    """451 then 250, with time driven by a Clock: the DeliveryManager and the disk queue's due-ness on the
    Clock, sockets (and the outbound pool's timeouts) on the real reactor."""

    timeout = 30

    START = 1_700_000_000.0
    BASE = 30.0  # baseRetryDelay, seconds
    INTERVAL = 1.0  # checkInterval, seconds

    def test_451_then_250_on_the_retry_schedule(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._retry())

    async def build(self, downstream: Downstream) -> tuple[Clock, DiskQueue, DeliveryManager, EmailProcessor]:
        """The delivery pieces wired as DcRouter._build_delivery wires them, around a Clock."""
        clock = Clock()
        clock.advance(self.START)
        config = load_options(
            {
                "smtpConfig": {
                    "ports": [2525],
                    "hostname": HOSTNAME,
                    "implicitTlsPorts": [],
                    "submissionPorts": [],
                    "baseRetryDelay": int(self.BASE * 1000),
                    "checkInterval": int(self.INTERVAL * 1000),
                    "domainConfigs": [
                        {"domains": ["example.test"], "targetIPs": ["127.0.0.1"], "port": downstream.port}
                    ],
                }
            }
        ).options.smtp_config
        assert config is not None
        queue = DiskQueue(os.path.abspath(self.mktemp()), reactor=reactor, clock=clock)
        await queue.load()
        self.addCleanup(queue.save)
        pool = ConnectionPool(reactor=reactor, clock=reactor, config=config.delivery, helo_name=HOSTNAME)
        self.addCleanup(lambda: Deferred.fromCoroutine(pool.close()))
        transport = ESMTPTransport(
            resolver=MxResolver(make_resolver(None, reactor)),
            health=TargetHealth(clock, config.delivery.target_down_time / 1000),
            pool=pool,
            clock=clock,
        )
        processor = EmailProcessor(queue, clock.seconds)
        manager = DeliveryManager(
            queue=queue,
            routes=RecipientRouter(config),
            transport=transport,
            submit_dsn=processor.submit_local,
            config=config,
            clock=clock,
        )
        processor.on_queued = lambda item: manager.wake()
        manager.startService()
        self.addCleanup(manager.stopService)
        return clock, queue, manager, processor

    async def _retry(self) -> None:
        downstream = start_downstream(
            Script(data=["451 4.3.0 Try again later", "250 2.0.0 Ok: queued"]), reactor=reactor
        )
        self.addCleanup(downstream.stop)
        clock, queue, manager, processor = await self.build(downstream)
        envelope = Envelope(
            mail_from="alice@sender.test",
            recipients=["bob@example.test"],
            helo="client.test",
            received_at=clock.seconds(),
        )
        item = await processor.process(envelope, SpooledMessage(len(MESSAGE), data=MESSAGE))
        clock.advance(0)  # the wake-up on enqueue: the first attempt starts now, at START

        [first] = await downstream.wait_for_messages(1).addTimeout(WAIT, reactor)
        self.assertTrue(first.reply.startswith("451"), first.reply)
        self.assertEqual(first.data, MESSAGE)
        deferred = await wait_for_item(queue, item.id, (QueueItemStatus.DEFERRED, *FINAL))
        self.assertEqual(deferred.status, QueueItemStatus.DEFERRED)
        self.assertEqual(deferred.attempts, 1)
        self.assertEqual(deferred.last_error, "451 4.3.0 Try again later")
        [entry] = deferred.history
        self.assertEqual(entry["at"], self.START)
        self.assertEqual(
            entry["results"],
            [
                {
                    "recipient": "bob@example.test",
                    "outcome": "temporary",
                    "reply": "451 4.3.0 Try again later",
                    "target": f"127.0.0.1:{downstream.port}",
                }
            ],
        )
        self.assertEqual(deferred.outcomes, {})
        wait = deferred.next_attempt_at - self.START
        self.assertGreaterEqual(wait, 0.9 * self.BASE)
        self.assertLessEqual(wait, 1.1 * self.BASE)

        # Step the Clock one checkInterval at a time. Each step's look at the queue is a claim (a write);
        # a purge issued after it commits after it, so once the purge fires the claim has been decided.
        retried_at = None
        while clock.seconds() < self.START + 1.1 * self.BASE + 2 * self.INTERVAL:
            clock.advance(self.INTERVAL)
            await queue.purge_expired(1e12)
            now = await queue.get(item.id)
            assert now is not None
            if now.status is not QueueItemStatus.DEFERRED:
                retried_at = clock.seconds()
                break
            self.assertEqual(len(downstream.messages), 1, f"retried at +{clock.seconds() - self.START} s")
        self.assertIsNotNone(retried_at, "never retried")
        assert retried_at is not None
        self.assertGreaterEqual(retried_at, deferred.next_attempt_at)
        self.assertLess(retried_at, deferred.next_attempt_at + self.INTERVAL)

        [_, second] = await downstream.wait_for_messages(2).addTimeout(WAIT, reactor)
        self.assertTrue(second.reply.startswith("250"), second.reply)
        self.assertEqual(second.data, MESSAGE)
        self.assertEqual((second.mail_from, second.recipients), ("alice@sender.test", ["bob@example.test"]))
        done = await wait_for_item(queue, item.id, FINAL)
        self.assertEqual(done.status, QueueItemStatus.DELIVERED)
        self.assertEqual([e["at"] for e in done.history], [self.START, retried_at])
        self.assertEqual(done.outcomes["bob@example.test"]["outcome"], "delivered")
        self.assertEqual(manager.get_delivery_stats()["deferred"], 1)
        self.assertEqual(manager.get_delivery_stats()["delivered"], 1)
