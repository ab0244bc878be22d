"""Workers through a real ``twistd -n dcrouter`` supervisor (``workers = 2``) on a real redis-server: SMTP
load spread over both workers and every message delivered exactly once to a scripted downstream; a worker
killed with SIGKILL under load is restarted and nothing answered 250 is lost; SIGTERM drains a transaction
in flight. The supervisor's logic on a Clock: tests/test_supervisor.py."""

from __future__ import annotations

import collections
import os
import re
import smtplib
import socket
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.downstream import Downstream, start_downstream
from tests.integration import TwistdProcess, free_ports
from tests.integration.test_delivery_twistd import HOSTNAME, message, message_id
from tests.redis_server import SKIP_REASON, start_redis

WAIT = 60.0
#: Sessions at once, and messages in each (one connection per session).
SESSIONS = 12
PER_SESSION = 5


def send_session(port: int, tag: str, numbers: list[int]) -> list[str]:
    """One SMTP session sending message ``tag`` ``n`` for each of ``numbers`` (call in a thread); the
    Message-IDs answered 250. A session cut (its worker killed) ends the list there."""
    acked: list[str] = []
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=WAIT) as smtp:
            smtp.ehlo()
            for number in numbers:
                smtp.mail("sender@sender.test")
                code, _ = smtp.rcpt("sink@example.test")
                if code != 250:
                    return acked
                code, _ = smtp.data(message(tag, number))
                if code == 250:
                    acked.append(f"<{tag}-{number}@sender.test>")
    except (OSError, smtplib.SMTPException):
        pass
    return acked


class WorkersTests(TestCase):
    skip = SKIP_REASON
    timeout = 180

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.downstream: Downstream = start_downstream(reactor=reactor)
        self.addCleanup(self.downstream.stop)
        self.redis = start_redis(self)
        (self.port,) = free_ports(1)

    def write_config(self) -> str:
        path = os.path.join(self.directory, "router.toml")
        with open(path, "w") as handle:
            handle.write(
                "workers = 2\n"
                "[smtpConfig]\n"
                f"ports = [{self.port}]\n"
                'bindAddress = "127.0.0.1"\n'
                f'hostname = "{HOSTNAME}"\n'
                "implicitTlsPorts = []\n"
                "submissionPorts = []\n"
                'queueStorage = "redis"\n'
                f'redisUrl = "{self.redis.url}"\n'
                f'persistentPath = "{os.path.join(self.directory, "shared")}"\n'
                "checkInterval = 200\n"
                "[[smtpConfig.domainConfigs]]\n"
                'domains = ["example.test"]\n'
                'targetIPs = ["127.0.0.1"]\n'
                f"port = {self.downstream.port}\n"
            )
        return path

    async def until(self, process: TwistdProcess, pattern: bytes, count: int = 1) -> list[bytes]:
        """Wait (polling the output the reactor collects) until ``pattern`` has matched ``count`` times."""
        for _ in range(int(WAIT / 0.05)):
            found = re.findall(pattern, process.output)
            if len(found) >= count:
                return found
            if process.exit_code is not None:
                break
            await deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(
            f"{pattern!r} not seen {count} times; output:\n"
            + process.output.decode("utf-8", "replace")[-6000:]
        )

    async def start(self) -> TwistdProcess:
        process = TwistdProcess.spawn(
            reactor, ["-n", "--pidfile=", "dcrouter", "--config", self.write_config()], self.directory
        )
        self.addCleanup(self.kill_all, process)
        for index in (0, 1):
            await self.until(process, rb"worker %d: [^\n]*dcrouter ready" % index)
        return process

    def kill_all(self, process: TwistdProcess) -> Deferred[int] | None:
        for pid in self.worker_pids(process).values():
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        return process.kill_on_cleanup()

    def worker_pids(self, process: TwistdProcess) -> dict[int, int]:
        """The latest pid of each worker, from the supervisor's log."""
        pids = {}
        for index, pid in re.findall(rb"worker (\d+) started \(pid (\d+)\)", process.output):
            pids[int(index)] = int(pid)
        return pids

    async def stop(self, process: TwistdProcess) -> None:
        process.signal("TERM")
        code = await process.ended.addTimeout(WAIT, reactor)
        output = process.output.decode("utf-8", "replace")
        self.assertIn(code, (0, -15), output[-4000:])
        self.assertIn("every worker has stopped", output)
        self.assertEqual(len(re.findall(r"worker \d: [^\n]*dcrouter stopped", output)), 2, output[-4000:])

    def accepted_per_worker(self, process: TwistdProcess) -> dict[int, int]:
        found = re.findall(rb"worker (\d): [^\n]*SMTP: (\d+) message\(s\) accepted", process.output)
        return {int(index): int(count) for index, count in found}

    async def send_load(self, tag: str) -> list[str]:
        batches = [list(range(k * PER_SESSION, (k + 1) * PER_SESSION)) for k in range(SESSIONS)]
        sent = await gatherResults([deferToThread(send_session, self.port, tag, b) for b in batches])
        return [mid for batch in sent for mid in batch]

    def test_load_spread_and_delivered_once(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._spread())

    async def _spread(self) -> None:
        process = await self.start()
        acked = await self.send_load("spread")
        self.assertEqual(len(acked), SESSIONS * PER_SESSION)
        await self.downstream.wait_for_messages(len(acked)).addTimeout(WAIT, reactor)
        # SIGHUP to the supervisor reloads every worker.
        process.signal("HUP")
        for index in (0, 1):
            await self.until(process, rb"worker %d: [^\n]*SIGHUP received: reloading" % index)
        self.assertEqual(self.worker_pids(process).keys(), {0, 1})
        self.assertNotIn(b"worker 0 ended", process.output)
        await self.stop(process)
        counts = collections.Counter(message_id(r) for r in self.downstream.messages)
        self.assertEqual({m: n for m, n in counts.items() if n != 1}, {}, "delivered more than once")
        self.assertEqual(set(counts), set(acked))
        per_worker = self.accepted_per_worker(process)
        self.assertEqual(sum(per_worker.values()), len(acked), per_worker)
        self.assertEqual(set(per_worker), {0, 1})
        self.assertTrue(all(n > 0 for n in per_worker.values()), f"one worker took everything: {per_worker}")

    def test_worker_killed_under_load(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._killed())

    async def _killed(self) -> None:
        process = await self.start()
        victim = self.worker_pids(process)[1]
        loading = Deferred.fromCoroutine(self.send_load("killed"))
        # Once some mail is in, SIGKILL worker 1 in the middle of the load.
        await self.downstream.wait_for_messages(5).addTimeout(WAIT, reactor)
        os.kill(victim, 9)
        acked = await loading
        await self.until(process, rb"worker 1 started", 2)
        await self.until(process, rb"worker 1: [^\n]*dcrouter ready", 2)
        self.assertNotEqual(self.worker_pids(process)[1], victim)
        # The restarted worker serves too: more mail after the kill, all of it answered.
        after = await self.send_load("after")
        self.assertEqual(len(after), SESSIONS * PER_SESSION)
        expected = set(acked) | set(after)
        for _ in range(int(WAIT / 0.1)):
            if expected <= {message_id(r) for r in self.downstream.messages}:
                break
            await deferLater(reactor, 0.1, lambda: None)
        await self.stop(process)
        delivered = {message_id(r) for r in self.downstream.messages}
        self.assertEqual(expected - delivered, set(), "answered 250 but never delivered")
        self.assertIn(b"worker 1 ended", process.output)

    def test_sigterm_drains_a_transaction_in_flight(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        process = await self.start()
        # Every session still open when the stop starts: one on each worker, most likely; both finish.
        opened = [await deferToThread(self._open_transaction) for _ in range(4)]
        process.signal("TERM")
        await self.until(process, rb"session\(s\) open; transactions in flight", 1)
        replies = await gatherResults([deferToThread(self._finish, sock) for sock in opened])
        for reply in replies:
            self.assertTrue(reply.startswith(b"250 "), replies)
        code = await process.ended.addTimeout(WAIT, reactor)
        self.assertIn(code, (0, -15), process.output.decode("utf-8", "replace")[-4000:])
        # Answered 250 while stopping: in the queue, delivered now or by the next start.
        if len(self.downstream.messages) < 4:
            again = await self.start()
            await self.downstream.wait_for_messages(4).addTimeout(WAIT, reactor)
            await self.stop(again)
        self.assertEqual(
            sorted(message_id(r) for r in self.downstream.messages),
            sorted(f"<drain-{n}@sender.test>" for n in range(4)),
        )

    _opened = 0
    _lock = threading.Lock()

    def _open_transaction(self) -> tuple[socket.socket, Any, bytes]:
        """A session through MAIL, RCPT and DATA with half its message sent (in a thread)."""
        with self._lock:
            number = self._opened
            self._opened += 1
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)
        reader = sock.makefile("rb")
        expect = [b"220", b"250", b"250", b"250", b"354"]
        commands = [b"EHLO client.test\r\n", b"MAIL FROM:<sender@sender.test>\r\n",
                    b"RCPT TO:<sink@example.test>\r\n", b"DATA\r\n"]  # fmt: skip
        for step, code in enumerate(expect):
            while True:
                line = reader.readline()
                if not line.startswith(code + b"-"):
                    break
            assert line.startswith(code), line
            if step < len(commands):
                sock.sendall(commands[step])
        body = message("drain", number).replace(b"\r\n.", b"\r\n..")  # dot-stuffed, as a client must
        sock.sendall(body[: len(body) // 2])
        return sock, reader, body[len(body) // 2 :]

    def _finish(self, opened: tuple[socket.socket, Any, bytes]) -> bytes:
        sock, reader, rest = opened
        sock.sendall(rest + b".\r\n")
        reply: bytes = reader.readline()
        sock.close()
        return reply

    def test_supervisor_killed_under_load(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._supervisor_killed())

    async def _supervisor_killed(self) -> None:
        process = await self.start()
        workers = list(self.worker_pids(process).values())
        loading = Deferred.fromCoroutine(self.send_load("orphaned"))
        await self.downstream.wait_for_messages(5).addTimeout(WAIT, reactor)
        process.signal("KILL")
        acked = await loading
        # The kernel sends each worker SIGTERM (PR_SET_PDEATHSIG): they drain and exit, no orphan serves on.
        for _ in range(int(WAIT / 0.1)):
            if not any(alive(pid) for pid in workers):
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual([pid for pid in workers if alive(pid)], [], "workers outlived their supervisor")
        # A new supervisor on the same Redis delivers whatever was answered 250 and not yet delivered.
        again = await self.start()
        for _ in range(int(WAIT / 0.1)):
            if set(acked) <= {message_id(r) for r in self.downstream.messages}:
                break
            await deferLater(reactor, 0.1, lambda: None)
        await self.stop(again)
        self.assertEqual(set(acked) - {message_id(r) for r in self.downstream.messages}, set())
        self.assertGreater(len(acked), 0)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state != b"Z"
