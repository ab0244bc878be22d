"""kill -9 at random moments while mail flows in *and out*: every acknowledged message reaches the downstream.

A real ``twistd -n dcrouter`` (from this checkout, disk queue in a temporary directory) relays to a scripted
downstream SMTP server (:mod:`tests.downstream`) in this process, which records every message it accepts.
Several smtplib senders (threads) stream messages with unique Message-IDs and note every one answered
``250 ... queued as <id>``. At ``KILLS`` moments chosen by a seeded generator (after a random number of
further acknowledgements, then a random 50-500 ms) the router is SIGKILLed -- with deliveries in flight -- and
restarted on the same queue directory; the senders reconnect and go on. A message refused or cut off while it
was down was never acknowledged and does not count.

At the end the senders stop, the downstream is watched until it holds every acknowledged message and has
stopped growing, the router is stopped cleanly and its queue opened: nothing may be left to deliver. Asserted:
every acknowledged Message-ID arrived at least once, byte-identical after the Received header dcrouter adds;
each duplicate is explained by one kill, at most ``concurrentDeliveries`` per kill (see
``CONCURRENT_DELIVERIES`` and :func:`extra_copies_by_kill`). The seed and the figures (acknowledged,
delivered, duplicates, kills) are printed; ``DCROUTER_CRASH_SEED=<n>`` replays the same kill schedule.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import smtplib
import sys
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from dcrouter.queue.disk import DiskQueue
from dcrouter.queue.item import QueueItemStatus
from tests.downstream import Downstream, ReceivedMessage, start_downstream
from tests.integration import TwistdProcess, free_ports

SENDERS = 4
KILLS = 3
#: Each kill comes after this many more acknowledgements (drawn from the seeded generator) ...
ACKS_BETWEEN_KILLS = (15, 60)
#: ... and then after this many seconds more: the kill lands at an arbitrary point of ingress and delivery.
KILL_DELAY = (0.05, 0.5)
#: Acknowledgements after the last restart before the senders stop: the last router must take mail too.
ACKS_AFTER_LAST_KILL = 20
#: Upper bound per sender, so a schedule that never completes cannot make the test run away.
MAX_PER_SENDER = 3000
#: Every n-th message is bigger than the spool's in-memory limit (256 KiB), so it is queued as a body file.
BIG_EVERY = 25
#: Delivery limits of the router under test.
#:
#: The duplicate bound: a kill can repeat only messages whose attempt was in flight at that kill (the
#: downstream accepted the copy, the router died before the DELIVERED outcome was committed; recovery returns
#: the claim and the message goes out again: at-least-once). The DeliveryManager runs at most
#: concurrentDeliveries attempts at once; maxPerDestination caps those inside the transport, but an attempt
#: waiting for its outcome to commit has already given its destination slot back, so concurrentDeliveries is
#: the bound. Each attempt sends at most one copy (one route, one target). Hence at most concurrentDeliveries
#: extra copies per kill; the two are equal here, so that is also the issue's kills x maxPerDestination.
CONCURRENT_DELIVERIES = 6
MAX_PER_DESTINATION = 6
#: The downstream is "done" once it holds every acknowledged message and has not grown for this long: longer
#: than a retry (maxRetryDelay 1 s, +10 % jitter) plus a checkInterval, so a deferred message is not missed.
QUIET = 2.0
#: Bounds of each wait, in seconds.
START_TIMEOUT = 30
DRAIN_TIMEOUT = 40
READY = "dcrouter ready"
RECIPIENT = "sink@example.test"
MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>\r$", re.MULTILINE | re.IGNORECASE)


def message_id(sender: int, number: int) -> str:
    return f"crash-{sender}-{number}@sender.test"


def message(sender: int, number: int) -> bytes:
    lines = 6000 if number % BIG_EVERY == BIG_EVERY - 1 else 40
    filler = b"".join(
        b"%d-%d line %d of the body, padding it to a few kilobytes\r\n" % (sender, number, i)
        for i in range(lines)
    )
    return (
        b"From: sender%d@sender.test\r\nTo: %s\r\nSubject: crash test %d-%d\r\nMessage-ID: <%s>\r\n\r\n"
        % (sender, RECIPIENT.encode(), sender, number, message_id(sender, number).encode())
    ) + filler


def extra_copies_by_kill(arrived: dict[str, list[ReceivedMessage]], marks: list[int]) -> list[list[str]]:
    """For each kill, the messages of which it explains an extra copy at the downstream.

    ``marks[k]`` is how many connections the downstream had accepted when kill ``k`` was sent. A message
    arriving on a connection accepted before that was sent by a router alive then, i.e. one started before
    kill ``k``; one arriving on a later connection, by a router started after it (a dead router's half-open
    connection never gets past our greeting). So each copy has an *incarnation*: how many kills preceded the
    router that sent it. A copy is repeated only when the downstream accepted it and its router died before
    the DELIVERED outcome was committed: the kill that ended the incarnation of the previous copy explains it.
    Two copies from one incarnation are a duplicate no kill explains: :class:`AssertionError`.
    """
    explained: list[list[str]] = [[] for _ in marks]
    for mid, copies in arrived.items():
        incarnations = sorted(sum(received.connection >= mark for mark in marks) for received in copies)
        for previous, later in itertools.pairwise(incarnations):
            if previous == later:
                raise AssertionError(f"{mid} arrived twice from one router incarnation ({previous})")
            explained[previous].append(mid)
    return explained


#: An acknowledged message: its queue id, sender and number (from which its exact bytes are made again).
Acked = tuple[str, int, int]


class Stream:
    """Senders on threads that reconnect after each kill; acknowledgements reported to the reactor thread.

    ``up`` is set by the reactor thread while a router accepts mail and cleared just before it is killed: a
    sender whose session broke waits on it (in its own thread) rather than hammering a closed port."""

    def __init__(self, port: int, reactor: Any) -> None:
        self.port = port
        self._reactor = reactor
        self.acked: dict[str, Acked] = {}  # Message-ID -> (queue id, sender, number)
        self.attempted: set[str] = set()  # every Message-ID whose DATA was started
        self.unexpected: list[str] = []  # replies other than 250 (none is expected)
        self.stop = threading.Event()
        self.up = threading.Event()
        self._waiters: list[tuple[int, Deferred[None]]] = []

    def acked_at_least(self, count: int) -> Deferred[None]:
        """Fires once ``count`` messages have been acknowledged; fails after ``START_TIMEOUT`` seconds."""
        waiter: Deferred[None] = Deferred()
        if len(self.acked) >= count:
            waiter.callback(None)
        else:
            self._waiters.append((count, waiter))
        return waiter.addTimeout(START_TIMEOUT, self._reactor)

    def _ack(self, mid: str, queue_id: str, sender: int, number: int) -> None:
        self.acked[mid] = (queue_id, sender, number)
        due = [(n, w) for n, w in self._waiters if len(self.acked) >= n]
        self._waiters = [(n, w) for n, w in self._waiters if len(self.acked) < n]
        for _, waiter in due:
            waiter.callback(None)

    def send(self, sender: int) -> None:
        """Send until ``stop`` (``MAX_PER_SENDER`` messages at most), reconnecting after each kill."""
        number = 0
        while number < MAX_PER_SENDER and not self.stop.is_set():
            if not self.up.wait(1.0):
                continue
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=20) as smtp:
                    smtp.ehlo()
                    while number < MAX_PER_SENDER and not self.stop.is_set():
                        mid, body = message_id(sender, number), message(sender, number)
                        smtp.mail(f"sender{sender}@sender.test")
                        smtp.rcpt(RECIPIENT)
                        self.attempted.add(mid)
                        code, text = smtp.data(body)
                        if code != 250 or not text.startswith(b"2.0.0 Ok: queued as "):
                            self.unexpected.append(f"{mid}: {code} {text!r}")
                        else:
                            queue_id = text.split()[-1].decode("ascii")
                            self._reactor.callFromThread(self._ack, mid, queue_id, sender, number)
                        number += 1  # the next message gets a new id, acknowledged or not
            except (OSError, smtplib.SMTPException):
                number += 1  # cut off mid-transaction: never acknowledged; do not reuse its id
                if self.up.is_set():
                    # Broken while the router is said to be up: it is being killed right now (or a glitch);
                    # give it a moment rather than spin.
                    self.stop.wait(0.05)


def poll(check: Callable[[], bool], timeout: float, interval: float = 0.1) -> Deferred[bool]:
    """Fires with True once ``check()`` is true (asked every ``interval`` on reactor timers), or with False
    after ``timeout`` seconds."""

    async def run() -> bool:
        deadline = reactor.seconds() + timeout
        while not check():
            if reactor.seconds() >= deadline:
                return False
            await deferLater(reactor, interval, lambda: None)
        return True

    return Deferred.fromCoroutine(run())


class CrashDeliveryTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.downstream: Downstream = start_downstream()
        self.addCleanup(self.downstream.stop)
        (self.port,) = free_ports(1)
        self.queue_path = os.path.join(self.directory, "queue")
        self.config = os.path.join(self.directory, "dcrouter.toml")
        with open(self.config, "w") as handle:
            handle.write(
                "[smtpConfig]\n"
                f"ports = [{self.port}]\n"
                'bindAddress = "127.0.0.1"\n'
                'hostname = "mx.test"\n'
                "implicitTlsPorts = []\n"
                "submissionPorts = []\n"
                'queueStorage = "disk"\n'
                f'persistentPath = "{self.queue_path}"\n'
                "baseRetryDelay = 1000\n"
                "maxRetryDelay = 1000\n"
                "checkInterval = 200\n"
                f"maxPerDestination = {MAX_PER_DESTINATION}\n"
                "[smtpConfig.delivery]\n"
                f"concurrentDeliveries = {CONCURRENT_DELIVERIES}\n"
                "connectTimeout = 5000\n"
                "socketTimeout = 10000\n"
                "targetDownTime = 1000\n"
                "[[smtpConfig.domainConfigs]]\n"
                'domains = ["example.test"]\n'
                'targetIPs = ["127.0.0.1"]\n'
                f"port = {self.downstream.port}\n"
            )

    def start_twistd(self) -> TwistdProcess:
        process = TwistdProcess.spawn(
            reactor, ["-n", "--pidfile=", "dcrouter", "--config", self.config], self.directory
        )
        self.addCleanup(process.kill_on_cleanup)
        return process

    def test_kill_9_while_delivering_loses_no_acknowledged_message(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._kill_9_while_delivering())

    async def _kill_9_while_delivering(self) -> None:
        seed = int(os.environ.get("DCROUTER_CRASH_SEED") or random.SystemRandom().randrange(2**32))
        sys.stderr.write(f"\ncrash/delivery test: seed {seed} (DCROUTER_CRASH_SEED={seed} replays it)\n")
        schedule = random.Random(seed)

        router = self.start_twistd()
        await router.seen(READY).addTimeout(START_TIMEOUT, reactor)
        stream = Stream(self.port, reactor)
        stream.up.set()
        self.addCleanup(stream.stop.set)
        senders = gatherResults([deferToThread(stream.send, n) for n in range(SENDERS)])

        kills = []  # (acknowledged, downstream copies) when each SIGKILL was sent
        marks = []  # connections the downstream had accepted then (see extra_copies_by_kill)
        for _ in range(KILLS):
            await stream.acked_at_least(len(stream.acked) + schedule.randint(*ACKS_BETWEEN_KILLS))
            await deferLater(reactor, schedule.uniform(*KILL_DELAY), lambda: None)
            kills.append((len(stream.acked), len(self.downstream.messages)))
            marks.append(len(self.downstream.connections))
            router = await self.kill_and_restart(router, stream)

        await stream.acked_at_least(len(stream.acked) + ACKS_AFTER_LAST_KILL)
        stream.stop.set()
        await senders
        self.assertEqual(stream.unexpected, [])
        acked = dict(stream.acked)

        settled = await self.drain(acked)
        router.signal("TERM")
        # twistd re-raises the signal after a clean shutdown, so it exits "killed by SIGTERM".
        self.assertIn(await router.ended, (0, -15), tail(router))
        self.assertIn(b"dcrouter stopped", router.output)

        arrived = by_message_id(self.downstream)
        missing = sorted(set(acked) - set(arrived), key=lambda mid: acked[mid][1:])
        self.assertEqual(missing, [], f"acknowledged, never delivered (drained: {settled}): {missing[:20]}")
        self.assertTrue(settled, "the downstream kept receiving")
        self.assertEqual(set(arrived) - stream.attempted, set(), "delivered messages no sender sent")
        self.check_copies(acked, arrived)
        await self.check_queue(acked)

        explained = extra_copies_by_kill(arrived, marks)
        duplicates = sum(len(arrived[mid]) - 1 for mid in arrived)
        duplicated = sum(1 for copies in arrived.values() if len(copies) > 1)
        unacknowledged = len(set(arrived) - set(acked))
        sys.stderr.write(
            f"crash/delivery test: seed {seed}; {len(kills)} kills (acknowledged, downstream copies at each: "
            f"{kills}); {len(acked)} acknowledged, {len(arrived)} distinct delivered "
            f"({unacknowledged} of them never acknowledged: in DATA at a kill), "
            f"{len(self.downstream.messages)} copies received, {duplicates} duplicates "
            f"({duplicated} messages received more than once); extra copies per kill "
            f"{[len(mids) for mids in explained]}, bound {CONCURRENT_DELIVERIES} per kill\n"
        )
        # A sender has one transaction at a time; the one in DATA at a kill may have committed before its 250
        # got out: delivered, never acknowledged. At most one per sender per kill.
        self.assertLessEqual(unacknowledged, len(kills) * SENDERS)
        # Every extra copy is explained by one kill (extra_copies_by_kill), each within the bound.
        self.assertEqual(sum(len(mids) for mids in explained), duplicates)
        for kill, mids in enumerate(explained):
            self.assertLessEqual(len(mids), CONCURRENT_DELIVERIES, f"kill {kill} repeated {mids}")

    async def kill_and_restart(self, router: TwistdProcess, stream: Stream) -> TwistdProcess:
        """SIGKILL ``router``, start a new one on the same queue, let the senders back in once it is ready."""
        stream.up.clear()
        router.signal("KILL")
        self.assertEqual(await router.ended, -9, tail(router))
        router = self.start_twistd()
        await router.seen(READY).addTimeout(START_TIMEOUT, reactor)
        self.assertIn(b"queue loaded", router.output)
        stream.up.set()
        return router

    def drain(self, acked: dict[str, Acked]) -> Deferred[bool]:
        """Fires with True once the downstream holds every acknowledged message and has not grown for
        ``QUIET`` seconds; with False after ``DRAIN_TIMEOUT``."""
        last = {"count": -1, "since": reactor.seconds()}

        def drained() -> bool:
            count = len(self.downstream.messages)
            if count != last["count"]:
                last["count"], last["since"] = count, reactor.seconds()
                return False
            if reactor.seconds() - last["since"] < QUIET:
                return False
            return set(acked) <= set(by_message_id(self.downstream))

        return poll(drained, DRAIN_TIMEOUT)

    def check_copies(self, acked: dict[str, Acked], arrived: dict[str, list[ReceivedMessage]]) -> None:
        """Every copy of an acknowledged message is the message as sent, after dcrouter's Received header."""
        for mid, (_queue_id, sender, number) in acked.items():
            for received in arrived[mid]:
                self.assertEqual(received.recipients, [RECIPIENT], mid)
                self.assertEqual(received.mail_from, f"sender{sender}@sender.test", mid)
                self.assertTrue(received.data.startswith(b"Received: "), mid)
                self.assertTrue(received.data.endswith(message(sender, number)), f"{mid}: body differs")

    async def check_queue(self, acked: dict[str, Acked]) -> None:
        """The stopped router's queue agrees: nothing left to deliver, every acknowledged item DELIVERED."""
        queue = DiskQueue(self.queue_path, reactor=reactor, clock=reactor)
        await queue.load()
        try:
            live = await queue.get_item_count()
            delivered = {item.id for item in await queue.get_by_status(QueueItemStatus.DELIVERED)}
        finally:
            await queue.save()
        self.assertEqual(live, 0, "messages still waiting in the queue")
        not_done = sorted(mid for mid, (queue_id, _, _) in acked.items() if queue_id not in delivered)
        self.assertEqual(not_done, [], "acknowledged messages not DELIVERED in the queue")


def by_message_id(downstream: Downstream) -> dict[str, list[ReceivedMessage]]:
    """Every message the downstream accepted, by its Message-ID."""
    arrived: dict[str, list[ReceivedMessage]] = {}
    for received in downstream.messages:
        if not received.reply.startswith("2"):
            continue
        found = MESSAGE_ID.search(received.data.split(b"\r\n\r\n", 1)[0] + b"\r\n")
        mid = found.group(1).decode("ascii") if found else "<no Message-ID>"
        arrived.setdefault(mid, []).append(received)
    return arrived


def tail(process: TwistdProcess) -> str:
    return process.output.decode("utf-8", "replace")[-4000:]
