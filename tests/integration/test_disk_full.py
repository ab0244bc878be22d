"""A real file system running out of room: a small tmpfs mounted by the test under dcrouter's persistentPath
(and under the queues' body directories), filled with a file. Ingress must answer ``451 4.3.0``, leave no
file behind and keep the session usable; the queues' body writers must leave no partial file.

Mounting needs root (``make test`` runs as root); elsewhere these tests are skipped with the reason, and
tests/test_smtp_disk_full.py and tests/test_queue_disk.py (DiskFullTests) cover the same paths with the
failures injected."""

from __future__ import annotations

import errno
import glob
import os
import smtplib
import subprocess

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from dcrouter import DcRouter
from dcrouter.queue import redis_bodies
from dcrouter.queue.files import link_without_replacing
from tests.integration import free_ports

LINE = b"z" * 998 + b"\r\n"
#: 400 KB: past the 256 KiB ingress keeps in memory, so it is spooled to a file.
BIG = b"From: <a@sender.test>\r\nTo: <b@example.test>\r\nSubject: big\r\n\r\n" + LINE * 400
#: 100 KB: kept in memory, stored inline in the index (the SQLite WAL has to grow for it).
SMALL = b"From: <a@sender.test>\r\nTo: <b@example.test>\r\nSubject: small\r\n\r\n" + LINE * 100


class SmallFileSystem:
    """A tmpfs of ``size`` octets at a new directory of ``test``, unmounted after the test."""

    def __init__(self, test: TestCase, size: int) -> None:
        if os.geteuid() != 0:
            raise SkipTest("needs root to mount a small tmpfs (make test runs as root)")
        self.path = os.path.abspath(test.mktemp())
        os.makedirs(self.path)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", self.path],
            capture_output=True,
            text=True,
            check=False,
        )
        if mounted.returncode != 0:
            raise SkipTest(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        # Registered first, so it runs after every cleanup that still uses the files.
        test.addCleanup(subprocess.run, ["umount", "-l", self.path], check=False)
        self._filler = os.path.join(self.path, "filler")

    def fill(self, leave: int = 0) -> None:
        """Take all the room, then give back about ``leave`` octets."""
        with open(self._filler, "ab", buffering=0) as filler:
            try:
                while True:
                    filler.write(b"\xff" * 65536)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
        if leave:
            os.truncate(self._filler, max(0, os.path.getsize(self._filler) - leave))

    def free(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def make_room(self) -> None:
        os.unlink(self._filler)


class IngressOnFullDiskTests(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:
        self.disk = SmallFileSystem(self, 8 * 1024 * 1024)
        self.queue_path = os.path.join(self.disk.path, "queue")
        (self.port,) = free_ports(1)
        options = {
            "smtpConfig": {
                "ports": [self.port],
                "bindAddress": "127.0.0.1",
                "hostname": "localhost",
                "queueStorage": "disk",
                "persistentPath": self.queue_path,
                "domainConfigs": [{"domains": ["example.test"], "targetIPs": ["127.0.0.1"], "port": 2626}],
            }
        }
        self.router = DcRouter(options, reactor=reactor)
        assert self.router.delivery is not None
        self.router.delivery.pause_deliveries()
        self.router.privilegedStartService()
        self.router.startService()
        self.addCleanup(self.router.stopService)
        return self.router.when_ready()

    def transaction(self, message: bytes) -> Deferred[list[tuple[int, bytes]]]:
        """MAIL, RCPT and DATA with ``message``, then RSET and QUIT: every reply from DATA's on."""

        def client() -> list[tuple[int, bytes]]:
            smtp = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=20)
            try:
                smtp.ehlo()
                smtp.mail("a@sender.test")
                smtp.rcpt("b@example.test")
                return [smtp.data(message), smtp.rset(), smtp.quit()]
            finally:
                smtp.close()

        return deferToThread(client)

    async def assert_nothing_stored(self) -> None:
        self.assertEqual(os.listdir(os.path.join(self.queue_path, "spool")), [])
        self.assertEqual(glob.glob(os.path.join(self.queue_path, "messages", "*", "*")), [])
        assert self.router.queue is not None
        self.assertEqual(await self.router.queue.get_item_count(), 0)

    def assert_temporary_failure_then_usable(self, replies: list[tuple[int, bytes]]) -> None:
        (code, text), rset, quit_ = replies
        self.assertEqual((code, text[:6]), (451, b"4.3.0 "), text)
        self.assertEqual(rset[0], 250)
        self.assertEqual(quit_[0], 221)

    async def test_big_message_on_a_nearly_full_disk(self) -> None:
        self.disk.fill(leave=100 * 1024)
        self.assertLess(self.disk.free(), len(BIG))
        self.assert_temporary_failure_then_usable(await self.transaction(BIG))
        await self.assert_nothing_stored()
        # Once there is room again, the same message is taken.
        self.disk.make_room()
        replies = await self.transaction(BIG)
        self.assertEqual(replies[0][0], 250, replies)

    async def test_small_message_on_a_full_disk(self) -> None:
        wal = os.path.join(self.queue_path, "index.sqlite-wal")
        # The WAL must grow to take the body: its current size cannot hold it.
        self.assertLess(os.path.getsize(wal) if os.path.exists(wal) else 0, len(SMALL))
        self.disk.fill()
        self.assert_temporary_failure_then_usable(await self.transaction(SMALL))
        await self.assert_nothing_stored()
        self.disk.make_room()
        replies = await self.transaction(SMALL)
        self.assertEqual(replies[0][0], 250, replies)


class BodyFilesOnFullDiskTests(TestCase):
    """The queues' own writers of body files, on a file system with 100 KB left."""

    def setUp(self) -> None:
        self.disk = SmallFileSystem(self, 1024 * 1024)
        self.disk.fill(leave=100 * 1024)

    def test_copy_from_another_file_system(self) -> None:
        # The spool is elsewhere (EXDEV): the body is copied, and the copy runs out of room half-way.
        source = os.path.abspath(self.mktemp())
        with open(source, "wb") as f:
            f.write(b"c" * 300_000)
        target = os.path.join(self.disk.path, "body")
        error = self.assertRaises(OSError, link_without_replacing, source, target)
        self.assertEqual(error.errno, errno.ENOSPC)
        self.assertFalse(os.path.exists(target))
        self.assertTrue(os.path.exists(source))

    def test_redis_queue_body_file(self) -> None:
        redis_bodies.prepare(self.disk.path)
        error = self.assertRaises(OSError, redis_bodies.write_file, self.disk.path, "AB123", b"w" * 300_000)
        self.assertEqual(error.errno, errno.ENOSPC)
        self.assertFalse(os.path.exists(redis_bodies.body_path(self.disk.path, "AB123")))
