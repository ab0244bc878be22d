"""``dcrouter quarantine`` (dcrouter.cli, dcrouter.quarantine) against real disk and Redis queues, including
one held open by another DiskQueue or RedisQueue, as a running router holds it."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from dcrouter import cli, quarantine
from dcrouter.config import load_file
from dcrouter.queue.disk import DiskQueue
from dcrouter.queue.item import QueueItem, QueueItemStatus
from dcrouter.queue.partitions import PartitionedQueue
from tests.redis_server import SKIP_REASON, start_redis
from tests.test_queue_contract import START, inline, make_item, read_body, spool_file

REASON = "virus found (Eicar-Test-Signature)"
BODY = b"Subject: hello\r\nFrom: <sender@example.org>\r\n\r\nthe body\r\n"
#: A message whose header block processing replaced (QueueItem.head): the stored body keeps the old one.
STORED = b"Subject: as received\r\n\r\nthe body\r\n"
NEW_HEAD = b"Subject: as relayed\r\nX-Virus-Status: Infected\r\n\r\n"


def quarantined(item_id: str, **fields: Any) -> QueueItem:
    fields.setdefault("last_error", REASON)
    return make_item(item_id, status=QueueItemStatus.QUARANTINED, **fields)


class QuarantineCase(unittest.TestCase):
    def setUp(self) -> None:
        self.out, self.err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", self.out)
        self.patch(sys, "stderr", self.err)
        self.clock = Clock()
        self.clock.advance(START)

    def write_config(self, **smtp: str) -> str:
        path = self.mktemp() + ".toml"
        lines = ["[smtpConfig]", "ports = [2525]", 'hostname = "mx.example.com"']
        lines += [f'{key} = "{value}"' for key, value in smtp.items()]
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    async def run_cli(self, *argv: str) -> int:
        """``dcrouter quarantine ARGV`` as ``cli.main`` runs it, in this test's reactor rather than one of its
        own (the real command, in its own process, is what the test_command_line tests run)."""
        self.out.seek(0), self.out.truncate()
        self.err.seek(0), self.err.truncate()
        work = cli.quarantine_work(cli.parse_args(["quarantine", *argv]), sys.stdout, sys.stderr)
        return work if isinstance(work, int) else await work(reactor)

    def run_command(self, *argv: str) -> subprocess.CompletedProcess[bytes]:
        """The real ``dcrouter quarantine ARGV``, in its own process and reactor (task.react)."""
        command = [sys.executable, "-m", "dcrouter.cli", "quarantine", *argv]
        # This checkout's dcrouter, not an installed copy (trial runs in _trial_temp).
        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))}
        return subprocess.run(command, check=False, capture_output=True, timeout=60, env=env)


class DiskQuarantineTests(QuarantineCase):
    def setUp(self) -> None:
        super().setUp()
        self.path = self.mktemp()
        self.config = self.write_config(queueStorage="disk", persistentPath=self.path)

    async def open_queue(self, clock: Any = None) -> DiskQueue:
        queue = DiskQueue(self.path, reactor=reactor, clock=clock or self.clock)
        await queue.load()
        self.addCleanup(queue.save)
        return queue

    async def fill(self) -> DiskQueue:
        """An open queue with a quarantined message (inline body), a quarantined big one (a body file), one
        whose header block processing replaced, and an ordinary one."""
        queue = await self.open_queue()
        await queue.enqueue(quarantined("QUAR1", size=len(BODY)), inline(BODY))
        big = b"Subject: big\r\n\r\n" + os.urandom(300_000)
        await queue.enqueue(
            quarantined("QUARBIG", size=len(big), created_at=START + 1), spool_file(queue, big)
        )
        head = quarantined(
            "QUARHEAD", created_at=START + 2, head=NEW_HEAD, body_offset=len(b"Subject: as received\r\n\r\n")
        )
        await queue.enqueue(head, inline(STORED))
        await queue.enqueue(make_item("NORMAL1"), inline(b"Subject: normal\r\n\r\nx"))
        return queue

    def row(self, item_id: str) -> tuple[Any, ...] | None:
        conn = sqlite3.connect(os.path.join(self.path, "index.sqlite"))
        try:
            found: tuple[Any, ...] | None = conn.execute(
                "SELECT status, next_attempt_at, item, body_file FROM items WHERE id = ?", (item_id,)
            ).fetchone()
            return found
        finally:
            conn.close()

    async def test_list_shows_only_quarantined(self) -> None:
        await (await self.fill()).save()
        self.assertEqual(await self.run_cli("list", "--config", self.config), 0)
        lines = self.out.getvalue().splitlines()
        self.assertEqual([line.split("\t")[0] for line in lines], ["QUAR1", "QUARBIG", "QUARHEAD"])
        self.assertEqual(
            lines[0].split("\t"),
            ["QUAR1", "2023-11-14T22:13:20Z", str(len(BODY)), "sender@example.org", "1", REASON],
        )
        self.assertEqual(self.err.getvalue(), "")

    async def test_show_prints_fields_and_headers_as_relayed(self) -> None:
        await (await self.fill()).save()
        self.assertEqual(await self.run_cli("show", "--config", self.config, "QUAR1"), 0)
        shown = self.out.getvalue()
        self.assertIn("id:            QUAR1\n", shown)
        self.assertIn(f"reason:        {REASON}\n", shown)
        self.assertIn("recipient:     rcpt@example.com\n", shown)
        self.assertTrue(shown.endswith("Subject: hello\nFrom: <sender@example.org>\n"), shown)
        self.assertNotIn("the body", shown)

        self.assertEqual(await self.run_cli("show", "--config", self.config, "QUARHEAD"), 0)
        shown = self.out.getvalue()
        self.assertIn("Subject: as relayed\nX-Virus-Status: Infected\n", shown)
        self.assertNotIn("as received", shown)

        self.assertEqual(await self.run_cli("show", "--config", self.config, "QUARBIG"), 0)
        self.assertTrue(self.out.getvalue().endswith("headers as they will be relayed:\nSubject: big\n"))

    async def test_show_escapes_control_characters(self) -> None:
        queue = await self.open_queue()
        body = b"Subject: \x1b[2Jgotcha\r\n\r\n"
        await queue.enqueue(quarantined("HOSTILE", last_error="bad\x07"), inline(body))
        await queue.save()
        self.assertEqual(await self.run_cli("show", "--config", self.config, "HOSTILE"), 0)
        shown = self.out.getvalue()
        self.assertNotIn("\x1b", shown)
        self.assertIn("Subject: \\x1b[2Jgotcha\n", shown)
        self.assertIn("reason:        bad\\x07\n", shown)

    async def test_release_then_the_queue_hands_it_out(self) -> None:
        await (await self.fill()).save()
        before = time.time()
        self.assertEqual(await self.run_cli("release", "--config", self.config, "QUAR1"), 0)
        self.assertIn("QUAR1 released", self.out.getvalue())
        status, next_attempt_at, _text, _file = self.row("QUAR1") or ()
        self.assertEqual(status, "queued")
        self.assertGreaterEqual(next_attempt_at, before)

        later = Clock()
        later.advance(time.time() + 1)
        queue = await self.open_queue(later)
        item = await queue.get("QUAR1")
        self.assertEqual((item.status, item.last_error), (QueueItemStatus.QUEUED, None))
        self.assertEqual(item.next_attempt_at, next_attempt_at)
        self.assertIn("QUAR1", [i.id for i in await queue.get_next(10)])
        self.assertEqual(await read_body(queue, "QUAR1"), BODY)
        self.assertEqual((await queue.get("QUARBIG")).status, QueueItemStatus.QUARANTINED)

    async def test_release_beside_a_running_queue(self) -> None:
        """Another DiskQueue holds the index open, with a claim in flight, as a running router does: the
        release needs no restart, and no recovery runs (the claim stays DELIVERING: no second delivery)."""
        later = Clock()
        later.advance(START)
        queue = await self.open_queue(later)
        await queue.enqueue(quarantined("QUAR1"), inline(BODY))
        await queue.enqueue(make_item("NORMAL1"), inline(b"x"))
        self.assertEqual([i.id for i in await queue.get_next(10)], ["NORMAL1"])

        self.assertEqual(await self.run_cli("list", "--config", self.config), 0)
        self.assertTrue(self.out.getvalue().startswith("QUAR1\t"))
        self.assertEqual(await self.run_cli("release", "--config", self.config, "QUAR1"), 0)

        later.advance(time.time() + 1 - START)
        self.assertEqual([i.id for i in await queue.get_next(10)], ["QUAR1"])
        self.assertEqual((await queue.get("QUAR1")).status, QueueItemStatus.DELIVERING)
        self.assertEqual((await queue.get("NORMAL1")).status, QueueItemStatus.DELIVERING)
        self.assertEqual(await self.run_cli("list", "--config", self.config), 0)
        self.assertEqual(self.out.getvalue(), "")

    async def test_delete_removes_row_and_body(self) -> None:
        await (await self.fill()).save()
        body_file = os.path.join(self.path, (self.row("QUARBIG") or ())[3])
        self.assertTrue(os.path.isfile(body_file))
        self.assertEqual(await self.run_cli("delete", "--config", self.config, "QUARBIG"), 0)
        self.assertEqual(self.out.getvalue(), "QUARBIG deleted\n")
        self.assertIsNone(self.row("QUARBIG"))
        self.assertFalse(os.path.exists(body_file))

        self.assertEqual(await self.run_cli("delete", "--config", self.config, "QUAR1"), 0)
        conn = sqlite3.connect(os.path.join(self.path, "index.sqlite"))
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("SELECT count(*) FROM bodies WHERE id = 'QUAR1'").fetchone(), (0,))
        self.assertIsNone(self.row("QUAR1"))

        queue = await self.open_queue()  # recovery finds nothing damaged or orphaned
        self.assertEqual([i.id for i in await queue.get_by_status("quarantined")], ["QUARHEAD"])
        self.assertIsNotNone(await queue.get("NORMAL1"))

    async def test_every_worker_partition(self) -> None:
        """With workers, quarantined mail sits in every worker's partition: list, release and delete find it
        wherever it is, beside the worker holding it."""
        await (await self.fill()).save()  # partition 0, as one worker left it
        worker = PartitionedQueue(self.path, reactor=reactor, clock=self.clock, worker=1, workers=2)
        await worker.load()
        self.addCleanup(worker.save)
        await worker.enqueue(quarantined("QUARW1", size=len(BODY), created_at=START + 5), inline(BODY))
        self.assertEqual(await self.run_cli("list", "--config", self.config), 0)
        listed = self.out.getvalue()
        for item_id in ("QUAR1", "QUARBIG", "QUARHEAD", "QUARW1"):
            self.assertIn(item_id, listed)
        self.assertEqual(await self.run_cli("release", "--config", self.config, "QUARW1"), 0)
        self.assertEqual((await worker.get("QUARW1")).status, QueueItemStatus.QUEUED)  # type: ignore[union-attr]
        self.assertEqual(await self.run_cli("delete", "--config", self.config, "QUAR1"), 0)
        self.assertIsNone(self.row("QUAR1"))

    async def test_unknown_or_not_quarantined(self) -> None:
        await (await self.fill()).save()
        for action in ("show", "release", "delete"):
            self.assertEqual(await self.run_cli(action, "--config", self.config, "NOSUCH"), 1)
            self.assertEqual(self.err.getvalue(), "dcrouter quarantine: no message NOSUCH in the queue\n")
            self.assertEqual(await self.run_cli(action, "--config", self.config, "NORMAL1"), 1)
            self.assertEqual(
                self.err.getvalue(), "dcrouter quarantine: message NORMAL1 is queued, not quarantined\n"
            )
        self.assertEqual(await self.run_cli("show", "--config", self.config, "../etc"), 1)
        self.assertIn("is not a queue id", self.err.getvalue())
        self.assertEqual(self.row("NORMAL1")[0], "queued")  # type: ignore[index]

    async def test_no_queue_there(self) -> None:
        self.assertEqual(await self.run_cli("list", "--config", self.config), 1)
        self.assertIn("no disk queue in", self.err.getvalue())
        self.assertFalse(os.path.exists(self.path))  # nothing created

    async def test_bad_config(self) -> None:
        config = self.write_config(queueStorage="tape")
        self.assertEqual(await self.run_cli("list", "--config", config), 2)
        self.assertIn("error: smtpConfig.queueStorage", self.err.getvalue())
        self.assertIn(f"{config}: not valid, 1 error(s)", self.err.getvalue())
        self.assertEqual(self.out.getvalue(), "")

    async def test_memory_queue(self) -> None:
        config = self.write_config(queueStorage="memory")
        self.assertEqual(await self.run_cli("list", "--config", config), 2)
        self.assertIn('smtpConfig.queueStorage is "memory"', self.err.getvalue())
        self.assertIn("inside the running process", self.err.getvalue())

    async def test_usage(self) -> None:
        with self.assertRaises(SystemExit) as stopped:
            await self.run_cli("release", "--config", self.config)  # no id
        self.assertEqual(stopped.exception.code, 2)

    async def test_command_line(self) -> None:
        """The real command, in its own process and reactor (task.react), beside an open queue."""
        later = Clock()
        later.advance(START)
        queue = await self.open_queue(later)
        await queue.enqueue(quarantined("QUAR1"), inline(BODY))
        done = self.run_command("list", "--config", self.config)
        self.assertEqual((done.returncode, done.stderr), (0, b""))
        self.assertTrue(done.stdout.startswith(b"QUAR1\t"))
        done = self.run_command("release", "--config", self.config, "QUAR1")
        self.assertEqual((done.returncode, done.stderr), (0, b""))
        self.assertIn(b"QUAR1 released", done.stdout)
        done = self.run_command("delete", "--config", self.config, "QUAR1")
        self.assertEqual(
            (done.returncode, done.stderr),
            (1, b"dcrouter quarantine: message QUAR1 is queued, not quarantined\n"),
        )
        later.advance(time.time() + 1 - START)
        self.assertEqual([i.id for i in await queue.get_next(10)], ["QUAR1"])


class RedisQuarantineTests(QuarantineCase):
    if SKIP_REASON:
        skip = SKIP_REASON

    def setUp(self) -> None:
        super().setUp()
        self.server = start_redis(self)
        self.bodies = self.mktemp()
        self.config = self.write_config(
            queueStorage="redis", redisUrl=self.server.url, persistentPath=os.path.abspath(self.bodies)
        )
        self.smtp = load_file(self.config).options.smtp_config

    async def open_queue(self, clock: Any) -> Any:
        from dcrouter.queue.redis import RedisQueue

        # A small inline limit puts big bodies in files, as 1 MiB does in production with redisBodyStore
        # "directory" (the CLI, configured with the default "redis", still reads and deletes them).
        queue = RedisQueue(
            self.server.url,
            reactor=reactor,
            clock=clock,
            body_directory=self.bodies,
            inline_body_limit=1000,
            body_store="directory",
        )
        await queue.load()
        self.addCleanup(queue.save)
        return queue

    async def run_action(self, action: str, item_id: str | None = None) -> int:
        self.out.seek(0), self.out.truncate()
        self.err.seek(0), self.err.truncate()
        return await quarantine.run(self.smtp, action, item_id, self.out, self.err, reactor=reactor)

    async def test_list_show_release_delete_beside_a_running_queue(self) -> None:
        clock = Clock()
        clock.advance(START)
        queue = await self.open_queue(clock)  # the "router": open throughout
        await queue.enqueue(quarantined("QUAR1", size=len(BODY)), inline(BODY))
        big = b"Subject: big\r\n\r\n" + os.urandom(5000)
        await queue.enqueue(quarantined("QUARBIG", created_at=START + 1), spool_file(queue, big))
        await queue.enqueue(make_item("NORMAL1"), inline(b"x"))
        self.assertEqual([i.id for i in await queue.get_next(10)], ["NORMAL1"])

        self.assertEqual(await self.run_action("list"), 0)
        lines = self.out.getvalue().splitlines()
        self.assertEqual([line.split("\t")[0] for line in lines], ["QUAR1", "QUARBIG"])
        self.assertEqual(
            lines[0].split("\t")[1:],
            ["2023-11-14T22:13:20Z", str(len(BODY)), "sender@example.org", "1", REASON],
        )

        self.assertEqual(await self.run_action("show", "QUARBIG"), 0)
        self.assertTrue(self.out.getvalue().endswith("headers as they will be relayed:\nSubject: big\n"))

        self.assertEqual(await self.run_action("release", "NORMAL1"), 1)
        self.assertIn("NORMAL1 is delivering, not quarantined", self.err.getvalue())
        self.assertEqual(await self.run_action("release", "NOSUCH"), 1)
        self.assertIn("no message NOSUCH", self.err.getvalue())

        self.assertEqual(await self.run_action("release", "QUAR1"), 0)
        clock.advance(time.time() + 1 - START)
        self.assertEqual([i.id for i in await queue.get_next(10)], ["QUAR1"])
        self.assertIsNone((await queue.get("QUAR1")).last_error)

        body_file = os.path.join(self.bodies, "messages", "QU", "QUARBIG")
        self.assertTrue(os.path.isfile(body_file))
        self.assertEqual(await self.run_action("delete", "QUARBIG"), 0)
        self.assertIsNone(await queue.get("QUARBIG"))
        self.assertFalse(os.path.exists(body_file))
        # The CLI's own queue held no claims: the router's stay valid.
        self.assertEqual((await queue.get("NORMAL1")).status, QueueItemStatus.DELIVERING)

    async def test_command_line(self) -> None:
        """The real command, in its own process and reactor (task.react)."""
        clock = Clock()
        clock.advance(START)
        queue = await self.open_queue(clock)
        await queue.enqueue(quarantined("QUAR1"), inline(BODY))
        done = self.run_command("list", "--config", self.config)
        self.assertEqual((done.returncode, done.stderr), (0, b""))
        self.assertTrue(done.stdout.startswith(b"QUAR1\t"))
        done = self.run_command("show", "--config", self.config, "NOSUCH")
        self.assertEqual(
            (done.returncode, done.stderr), (1, b"dcrouter quarantine: no message NOSUCH in the queue\n")
        )
