"""kill -9 during a stream of enqueues loses nothing that was acknowledged (a real child process, SIGKILL)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from dcrouter.queue.disk import DiskQueue
from dcrouter.queue.item import QueueItemStatus
from tests.integration import CHECKOUT

CHILD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "queue_crash_child.py")


class EnqueueingChild(ProcessProtocol):
    """Reads the child's ``ACK <id> <sha256>`` lines and SIGKILLs it once ``kill_after`` acks arrived."""

    def __init__(self, kill_after: int) -> None:
        self.kill_after = kill_after
        self.acked: dict[str, str] = {}
        self.other: list[str] = []
        self.ended: Deferred = Deferred()
        self._buffer = b""
        self._killed = False

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            words = line.decode().split()
            if words[:1] == ["ACK"]:
                self.acked[words[1]] = words[2]
            else:
                self.other.append(line.decode())
        if len(self.acked) >= self.kill_after and not self._killed:
            self._killed = True
            self.transport.signalProcess("KILL")

    def errReceived(self, data: bytes) -> None:
        self.other.append(data.decode(errors="replace"))

    def processEnded(self, reason: Failure) -> None:
        # The exception, not the Failure: a Failure passed to callback() would run the errback chain.
        self.ended.callback(reason.value)


class CrashTests(TestCase):
    timeout = 60

    async def run_and_kill(self, path: str, prefix: str, kill_after: int, *extra: str) -> EnqueueingChild:
        child = EnqueueingChild(kill_after)
        env = dict(os.environ, PYTHONPATH=CHECKOUT)
        reactor.spawnProcess(child, sys.executable, [sys.executable, CHILD, path, prefix, *extra], env=env)
        reason = await child.ended
        # Killed by our SIGKILL, not ended on its own: anything else means the run proved nothing.
        self.assertEqual(getattr(reason, "signal", None), 9, child.other)
        self.assertGreaterEqual(len(child.acked), kill_after)
        return child

    async def check_all_there(self, path: str, acked: dict[str, str]) -> dict[str, int]:
        queue = DiskQueue(path, reactor=reactor, clock=Clock())
        counts = await queue.load()
        try:
            for item_id, digest in acked.items():
                item = await queue.get(item_id)
                self.assertIsNotNone(item, f"acknowledged {item_id} lost")
                self.assertEqual(item.status, QueueItemStatus.QUEUED)
                stream = await queue.open_body(item_id)
                try:
                    body = stream.read()
                finally:
                    stream.close()
                self.assertEqual(hashlib.sha256(body).hexdigest(), digest, item_id)
                self.assertEqual(len(body), item.size)
        finally:
            await queue.save()
        return counts

    async def test_kill_9_loses_no_acknowledged_item(self) -> None:
        path = os.path.abspath(self.mktemp())
        first = await self.run_and_kill(path, "A", kill_after=300)
        counts = await self.check_all_there(path, first.acked)
        self.assertEqual(counts["damaged"], 0)
        self.assertGreaterEqual(counts["items"], len(first.acked))

        # A second crash on top of the recovered store: both generations must be there.
        second = await self.run_and_kill(path, "B", kill_after=300)
        counts = await self.check_all_there(path, {**first.acked, **second.acked})
        self.assertEqual(counts["damaged"], 0)

    async def test_kill_9_during_background_verification(self) -> None:
        """Killed while it verifies in the background, having taken new mail meanwhile: the next start
        finds every acknowledged item of both runs, and sets aside the damaged row and the orphan the
        interrupted verification had not reached yet, as a start without background verification does."""
        path = os.path.abspath(self.mktemp())
        first = await self.run_and_kill(path, "A", kill_after=300)
        conn = sqlite3.connect(os.path.join(path, "index.sqlite"), isolation_level=None)
        try:
            # The newest row is damaged: the verification (oldest first) reaches it last.
            (bad,) = conn.execute("SELECT id FROM items ORDER BY seq DESC LIMIT 1").fetchone()
            conn.execute("UPDATE items SET item = '{\"truncated' WHERE id = ?", (bad,))
        finally:
            conn.close()
        os.makedirs(os.path.join(path, "messages", "ZZ"), exist_ok=True)
        with open(os.path.join(path, "messages", "ZZ", "ZZ999"), "wb") as f:
            f.write(b"nobody's")

        second = await self.run_and_kill(path, "B", 40, "background")
        self.assertTrue(any(line.startswith("LOADED") for line in second.other), second.other)
        self.assertFalse(any("VERIFIED" in line for line in second.other), "killed too late to prove it")

        acked = {**first.acked, **second.acked}
        acked.pop(bad, None)
        counts = await self.check_all_there(path, acked)
        self.assertEqual(counts["damaged"], 1)
        self.assertGreaterEqual(counts["orphans"], 1)
        self.assertTrue(os.path.exists(os.path.join(path, "orphans", "ZZ999")))
