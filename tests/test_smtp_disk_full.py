"""A spool whose file system fills up while DATA arrives: every failing write, flush and close answers
``451 4.3.0`` (or the refusal the message earned anyway), leaves no file behind, keeps the session usable and
logs one line. The file system is simulated where the spool opens its file (the spool is what is under test):
``FillingDisk`` hands out real files in the spool directory that take ``free`` more octets and then fail with
ENOSPC, at whichever write, flush or close reaches the device. tests/integration/test_smtp_disk_full.py does
the same on a real, small tmpfs."""

from __future__ import annotations

import errno
import io
import os
from functools import partial
from typing import BinaryIO

from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from dcrouter.interfaces import QueueUnavailable
from dcrouter.smtp.spool import SpoolWriter
from tests.smtp_fixtures import ControlledQueue, Server, connect, make_config

START = b"EHLO client.example\r\nMAIL FROM:<sender@example.net>\r\nRCPT TO:<rcpt@example.org>\r\nDATA\r\n"
READY = b"354 End data with <CR><LF>.<CR><LF>\r\n"
LOCAL_ERROR = b"451 4.3.0 Requested action aborted: local error in processing\r\n"
RSET_QUIT = b"RSET\r\nQUIT\r\n"
AFTER = b"250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"
LINE = b"z" * 998 + b"\r\n"
#: A 400 KB message: past the spool's 256 KiB in memory, so it goes to a file.
BIG = b"Subject: big\r\n\r\n" + LINE * 400


class _FillingFile(io.FileIO):
    def __init__(self, path: str, disk: FillingDisk) -> None:
        super().__init__(path, "xb")
        self._disk = disk

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self._disk.free <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = super().write(memoryview(data)[: self._disk.free])
        assert written is not None
        self._disk.free -= written
        return written


class FillingDisk:
    """A file system with ``free`` octets left. Files are opened buffered as the spool's own are, so the
    ENOSPC surfaces where it would: in a write that fills the buffer, in the flush of close()."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.opened: list[str] = []

    def open(self, path: str) -> BinaryIO:
        self.opened.append(path)
        return io.BufferedWriter(_FillingFile(path, self), 256 * 1024)  # type: ignore[return-value]


class DiskFullTests(unittest.TestCase):
    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def server(
        self, free: int, queue: ControlledQueue | None = None, max_message_size: int = 1_000_000
    ) -> tuple[Server, FillingDisk]:
        disk = FillingDisk(free)
        server = connect(make_config(max_message_size=max_message_size), queue=queue)
        server.factory.spool_writer = partial(SpoolWriter, open_file=disk.open)
        return server, disk

    def send_lines(self, server: Server, count: int = 400) -> None:
        """DATA, then a header and ``count`` lines, one write each (the file's buffer fills gradually)."""
        self.assertEqual(server.exchange(START + b"Subject: big\r\n\r\n")[-len(READY) :], READY)
        for _ in range(count):
            self.assertEqual(server.exchange(LINE), b"")

    def assert_no_spool_file(self, server: Server, disk: FillingDisk) -> None:
        self.assertTrue(disk.opened, "the message never reached a file: the test tests nothing")
        self.assertEqual(os.listdir(server.factory.spool_directory), [])

    def assert_one_line_logged(self, *words: str) -> None:
        """One warning or error from the SMTP session, without a traceback; nothing logged as a failure."""
        logged = [
            e
            for e in self.events
            if e.get("log_namespace", "").startswith("dcrouter.smtp") and e["log_level"] >= LogLevel.warn
        ]
        self.assertEqual(len(logged), 1, [formatEvent(e) for e in logged])
        self.assertNotIn("log_failure", logged[0])
        text = formatEvent(logged[0])
        for word in words:
            self.assertIn(word, text)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_write_during_data_fails(self) -> None:
        # The spill to the file at 256 KiB already fails: the rest of DATA is read and dropped, then 451.
        server, disk = self.server(free=100_000)
        out = server.exchange(START + BIG)
        self.assertEqual(out[-len(READY) :], READY)
        self.assert_no_spool_file(server, disk)
        self.assertEqual(server.exchange(b".\r\n" + RSET_QUIT), LOCAL_ERROR + AFTER)
        self.assertEqual(server.queue.items, [])
        self.assert_one_line_logged("No space left on device", "451")

    def test_write_fails_with_data_in_many_pieces(self) -> None:
        # The spill fits, a later write that fills the file's buffer does not.
        server, disk = self.server(free=300_000)
        self.send_lines(server, 800)
        self.assertEqual(disk.free, 0)
        self.assert_no_spool_file(server, disk)
        self.assertEqual(server.exchange(b".\r\n" + RSET_QUIT), LOCAL_ERROR + AFTER)
        self.assert_one_line_logged("No space left on device")

    def test_flush_at_the_end_fails(self) -> None:
        # The spill fits; the tail still in the file's buffer does not, when finish() closes the file.
        server, disk = self.server(free=300_000)
        self.send_lines(server)
        self.assertGreater(disk.free, 0)
        self.assertEqual(server.exchange(b".\r\n" + RSET_QUIT), LOCAL_ERROR + AFTER)
        self.assertEqual(disk.free, 0)
        self.assert_no_spool_file(server, disk)
        self.assertEqual(server.queue.items, [])
        self.assert_one_line_logged("No space left on device")

    def test_close_in_abort_fails_after_a_refusal(self) -> None:
        # Refused for a bare LF at the end: abort() closes the file, whose buffered tail cannot be written.
        server, disk = self.server(free=300_000)
        self.send_lines(server)
        self.assertGreater(disk.free, 0)
        out = server.exchange(b"bare\nLF\r\n.\r\n" + RSET_QUIT)
        self.assertTrue(
            out.endswith(
                b"550 5.6.0 Message refused: bare CR or LF in message text (RFC 5321 section 2.3.8)\r\n"
                + AFTER
            ),
            out,
        )
        self.assert_no_spool_file(server, disk)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_close_in_abort_fails_when_the_client_goes(self) -> None:
        server, disk = self.server(free=300_000)
        self.send_lines(server)
        self.assertEqual(len(os.listdir(server.factory.spool_directory)), 1)
        server.protocol.connectionLost()
        self.assert_no_spool_file(server, disk)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_too_big_is_still_said_when_the_disk_is_full(self) -> None:
        # A permanent refusal the message earned wins over the temporary failure of the store.
        server, disk = self.server(free=100_000, max_message_size=350_000)
        self.send_lines(server)
        out = server.exchange(b".\r\nNOOP\r\n")
        self.assertTrue(
            out.endswith(b"552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.0.0 Ok\r\n"),
            out,
        )
        self.assert_no_spool_file(server, disk)

    def test_next_message_on_the_session_is_accepted(self) -> None:
        server, disk = self.server(free=100_000)
        server.exchange(START + BIG)
        self.assertEqual(server.exchange(b".\r\n"), LOCAL_ERROR)
        disk.free = 10**9
        out = server.exchange(START[21:] + BIG + b".\r\n")
        self.assertEqual(out, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n" + READY + queued(server))
        self.assertEqual(server.queue.bodies[0][-len(BIG) :], BIG)
        self.assertEqual(os.listdir(server.factory.spool_directory), [])

    def test_queue_unavailable_is_one_line(self) -> None:
        # The queue's own ENOSPC (tests/test_queue_disk.py): 451, one line, no traceback.
        queue = ControlledQueue(auto=False)
        server, _disk = self.server(free=10**9, queue=queue)
        server.exchange(START + b"Subject: x\r\n\r\nbody\r\n.\r\n")
        queue.pending[0].errback(QueueUnavailable("disk queue: database or disk is full"))
        self.assertEqual(server.take(), LOCAL_ERROR)
        self.assertEqual(server.exchange(RSET_QUIT), AFTER)
        self.assert_one_line_logged("database or disk is full", "451")


def queued(server: Server) -> bytes:
    return b"250 2.0.0 Ok: queued as %s\r\n" % server.queue.items[-1].id.encode()


class SpoolWriterTests(unittest.TestCase):
    """The writer's own contract, on the same simulated file system."""

    def writer(self, free: int) -> tuple[SpoolWriter, FillingDisk, str]:
        directory = self.mktemp()
        os.makedirs(directory)
        disk = FillingDisk(free)
        return SpoolWriter(directory, memory_limit=10, open_file=disk.open), disk, directory

    def test_failed_write_keeps_the_error_for_finish(self) -> None:
        spool, _disk, directory = self.writer(free=100)
        spool.write(b"a" * 8)
        spool.write(b"b" * 8)  # to the file's buffer
        self.assertIsNone(spool.error)
        spool.write(b"c" * 300_000)  # more than the buffer holds: to the device, which takes 100 octets
        self.assertIsInstance(spool.error, OSError)
        self.assertEqual(os.listdir(directory), [])
        spool.write(b"d" * 8)
        self.assertEqual(spool.size, 300_024)
        error = self.assertRaises(OSError, spool.finish)
        self.assertEqual(error.errno, errno.ENOSPC)
        spool.abort()
        self.assertEqual(os.listdir(directory), [])

    def test_failed_close_in_finish_removes_the_file(self) -> None:
        spool, _disk, directory = self.writer(free=20)
        spool.write(b"a" * 16)
        spool.write(b"b" * 16)
        self.assertIsNone(spool.error)
        self.assertEqual(len(os.listdir(directory)), 1)
        self.assertRaises(OSError, spool.finish)
        self.assertEqual(os.listdir(directory), [])

    def test_abort_never_raises(self) -> None:
        spool, _disk, directory = self.writer(free=20)
        spool.write(b"a" * 16)
        spool.write(b"b" * 16)
        spool.abort()
        spool.abort()
        self.assertEqual(os.listdir(directory), [])

    def test_open_failure(self) -> None:
        def cannot_open(path: str) -> BinaryIO:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        directory = self.mktemp()
        os.makedirs(directory)
        spool = SpoolWriter(directory, memory_limit=10, open_file=cannot_open)
        spool.write(b"x" * 20)
        self.assertRaises(OSError, spool.finish)
        self.assertEqual(os.listdir(directory), [])
