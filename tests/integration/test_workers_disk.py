"""Workers on the disk queue (a partition per worker, dcrouter.queue.partitions) through a real ``twistd -n
dcrouter`` supervisor with ``workers = 2``: the same proofs as the Redis workers'
(tests/integration/test_workers_twistd.py, whose tests run here again on the disk queue) — load spread over
both workers and every message delivered exactly once to a real downstream SMTP server; a worker killed with
SIGKILL under load (worker 1, and worker 0, which also holds the single-worker partition) and the supervisor
killed with SIGKILL under load lose nothing answered 250; SIGTERM drains a transaction in flight — plus what
is the disk queue's own: each worker's mail is in its own partition, a queue left by two workers is
delivered by one, and a single dcrouter's queue by two workers. The partition logic without processes:
tests/test_queue_partitions.py."""

from __future__ import annotations

import collections
import os
import sqlite3

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from tests.downstream import start_downstream

# test_workers_twistd as a module: its class imported here would be collected (and run) twice.
from tests.integration import TwistdProcess, free_ports
from tests.integration import test_workers_twistd as redis_workers
from tests.integration.test_delivery_twistd import HOSTNAME, message_id

SESSIONS, WAIT = redis_workers.SESSIONS, redis_workers.WAIT


def stored(index: str) -> int:
    """How many items the SQLite index at ``index`` holds (0 when there is none)."""
    if not os.path.isfile(index):
        return 0
    conn = sqlite3.connect(index)
    try:
        count: int = conn.execute("SELECT count(*) FROM items").fetchone()[0]
        return count
    finally:
        conn.close()


class DiskWorkersTests(redis_workers.WorkersTests):
    skip = None  # type: ignore[assignment]  # no Redis here

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.downstream = start_downstream(reactor=reactor)
        self.addCleanup(self.downstream.stop)
        (self.port,) = free_ports(1)
        self.queue = os.path.join(self.directory, "queue")
        self.workers = 2
        self.paused = False

    def write_config(self) -> str:
        path = os.path.join(self.directory, "router.toml")
        with open(path, "w") as handle:
            handle.write(
                f"workers = {self.workers}\n"
                "[smtpConfig]\n"
                f"ports = [{self.port}]\n"
                'bindAddress = "127.0.0.1"\n'
                f'hostname = "{HOSTNAME}"\n'
                "implicitTlsPorts = []\n"
                "submissionPorts = []\n"
                'queueStorage = "disk"\n'
                f'persistentPath = "{self.queue}"\n'
                "checkInterval = 200\n"
                "[[smtpConfig.domainConfigs]]\n"
                'domains = ["example.test"]\n'
                'targetIPs = ["127.0.0.1"]\n'
                f"port = {self.downstream.port}\n"
                "[smtpConfig.delivery]\n"
                f"paused = {'true' if self.paused else 'false'}\n"
            )
        return path

    async def start(self) -> TwistdProcess:
        if self.workers > 1:
            return await super().start()
        process = TwistdProcess.spawn(
            reactor, ["-n", "--pidfile=", "dcrouter", "--config", self.write_config()], self.directory
        )
        self.addCleanup(process.kill_on_cleanup)
        await process.seen("dcrouter ready").addTimeout(WAIT, reactor)
        return process

    def test_each_worker_queues_into_its_own_partition(self) -> None:
        return Deferred.fromCoroutine(self._own_partitions())

    async def _own_partitions(self) -> None:
        process = await self.start()
        acked = await self.send_load("own")
        self.assertEqual(len(acked), SESSIONS * 5)
        await self.downstream.wait_for_messages(len(acked)).addTimeout(WAIT, reactor)
        await self.stop(process)
        per_worker = self.accepted_per_worker(process)
        # What each worker accepted is in its partition (delivered items stay for finishedRetention).
        self.assertEqual(stored(os.path.join(self.queue, "index.sqlite")), per_worker.get(0, 0), per_worker)
        self.assertEqual(
            stored(os.path.join(self.queue, "partitions", "1", "index.sqlite")),
            per_worker.get(1, 0),
            per_worker,
        )
        self.assertIn(b"holding queue partitions [1]", process.output)
        counts = collections.Counter(message_id(r) for r in self.downstream.messages)
        self.assertEqual({m: n for m, n in counts.items() if n != 1}, {}, "delivered more than once")

    def test_worker_zero_killed_under_load(self) -> None:
        return Deferred.fromCoroutine(self._worker_killed(0))

    async def _worker_killed(self, index: int) -> None:
        process = await self.start()
        victim = self.worker_pids(process)[index]
        loading = Deferred.fromCoroutine(self.send_load("killed0"))
        await self.downstream.wait_for_messages(5).addTimeout(WAIT, reactor)
        os.kill(victim, 9)
        acked = await loading
        await self.until(process, rb"worker %d started" % index, 2)
        await self.until(process, rb"worker %d: [^\n]*dcrouter ready" % index, 2)
        for _ in range(int(WAIT / 0.1)):
            if set(acked) <= {message_id(r) for r in self.downstream.messages}:
                break
            await deferLater(reactor, 0.1, lambda: None)
        await self.stop(process)
        delivered = {message_id(r) for r in self.downstream.messages}
        self.assertEqual(set(acked) - delivered, set(), "answered 250 but never delivered")
        self.assertGreater(len(acked), 0)
        self.assertIn(b"worker %d ended" % index, process.output)

    def test_one_worker_delivers_what_two_left(self) -> None:
        return Deferred.fromCoroutine(self._fewer())

    async def _fewer(self) -> None:
        # Two workers accept mail with delivery paused, stop, and one worker then delivers all of it:
        # partition 1 is adopted by worker 0.
        self.paused = True
        process = await self.start()
        acked = await self.send_load("fewer")
        await self.stop(process)
        self.assertEqual(self.downstream.messages, [])
        self.assertGreater(stored(os.path.join(self.queue, "partitions", "1", "index.sqlite")), 0)
        self.paused = False
        self.workers = 1
        single = await self.start()
        for _ in range(int(WAIT / 0.1)):
            if set(acked) <= {message_id(r) for r in self.downstream.messages}:
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertIn(b"holding queue partitions [0, 1]", single.output)
        single.signal("TERM")
        await single.ended.addTimeout(WAIT, reactor)
        counts = collections.Counter(message_id(r) for r in self.downstream.messages)
        self.assertEqual(set(counts), set(acked))
        self.assertEqual({m: n for m, n in counts.items() if n != 1}, {}, "delivered more than once")

    def test_two_workers_deliver_what_one_left(self) -> None:
        return Deferred.fromCoroutine(self._more())

    async def _more(self) -> None:
        # A single dcrouter queues mail with delivery paused and stops; two workers then deliver all of it:
        # the single-worker queue is worker 0's partition.
        self.paused, self.workers = True, 1
        single = await self.start()
        acked = await self.send_load("more")
        single.signal("TERM")
        await single.ended.addTimeout(WAIT, reactor)
        self.assertEqual(self.downstream.messages, [])
        self.assertEqual(stored(os.path.join(self.queue, "index.sqlite")), len(acked))
        self.assertFalse(os.path.exists(os.path.join(self.queue, "partitions")))
        self.paused, self.workers = False, 2
        process = await self.start()
        for _ in range(int(WAIT / 0.1)):
            if set(acked) <= {message_id(r) for r in self.downstream.messages}:
                break
            await deferLater(reactor, 0.1, lambda: None)
        await self.stop(process)
        counts = collections.Counter(message_id(r) for r in self.downstream.messages)
        self.assertEqual(set(counts), set(acked))
        self.assertEqual({m: n for m, n in counts.items() if n != 1}, {}, "delivered more than once")
        self.assertIn(b"holding queue partitions [0]", process.output)
