"""Stopping and signalling a real ``twistd -n dcrouter`` process (from this checkout).

SIGTERM while a client is in the middle of DATA: the client finishes its message and gets its ``250``, then
``421 4.3.2``; the process exits once that session is done, and the message is in the queue at the next start
(delivered then to a downstream server in the test's reactor). SIGHUP leaves the process running, with a log
line saying why nothing changed.
"""

from __future__ import annotations

import os
import re
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.downstream import Downstream, start_downstream
from tests.integration import TwistdProcess, free_ports

READY = "dcrouter ready"
DRAINING = "SMTP: 1 session(s) open; transactions in flight have up to 30 s"
HOSTNAME = "mx.test"
#: Seconds any one wait may take before the test fails.
WAIT = 30.0


def read_until(sock: socket.socket, ending: bytes) -> bytes:
    """Bytes from ``sock`` until they end with ``ending`` or the peer closes."""
    data = b""
    while not data.endswith(ending):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def begin_message(port: int) -> socket.socket:
    """Connect, go through EHLO, MAIL, RCPT and DATA, send half a message (call in a thread)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    greeting = read_until(sock, b"\r\n")
    assert greeting.startswith(b"220 "), greeting
    sock.sendall(b"EHLO client.test\r\n")
    assert read_until(sock, b"250 SMTPUTF8\r\n").startswith(b"250-"), "EHLO"
    sock.sendall(b"MAIL FROM:<sender@sender.test>\r\n")
    assert read_until(sock, b"\r\n") == b"250 2.1.0 Ok\r\n"
    sock.sendall(b"RCPT TO:<sink@example.test>\r\n")
    assert read_until(sock, b"\r\n") == b"250 2.1.5 Ok\r\n"
    sock.sendall(b"DATA\r\n")
    assert read_until(sock, b"\r\n").startswith(b"354 ")
    sock.sendall(b"From: sender@sender.test\r\nTo: sink@example.test\r\nSubject: caught by SIGTERM\r\n")
    return sock


def finish_message(sock: socket.socket) -> bytes:
    """Send the rest of the message and QUIT; everything the server says until it closes (in a thread)."""
    try:
        sock.sendall(b"\r\nThe body arrived after SIGTERM.\r\n.\r\nQUIT\r\n")
        return read_until(sock, b"\0never")
    finally:
        sock.close()


def session_reply(port: int) -> bytes:
    """The greeting and the answer to NOOP of a fresh session (in a thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        greeting = read_until(sock, b"\r\n")
        sock.sendall(b"NOOP\r\nQUIT\r\n")
        return greeting + read_until(sock, b"221 2.0.0 Bye\r\n")


class TwistdShutdownTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.downstream: Downstream = start_downstream(reactor=reactor)
        self.addCleanup(self.downstream.stop)
        (self.port,) = free_ports(1)

    def write_config(self, *, paused: bool) -> str:
        path = os.path.join(self.directory, "paused.toml" if paused else "running.toml")
        with open(path, "w") as handle:
            handle.write(
                "[smtpConfig]\n"
                f"ports = [{self.port}]\n"
                'bindAddress = "127.0.0.1"\n'
                f'hostname = "{HOSTNAME}"\n'
                "implicitTlsPorts = []\n"
                "submissionPorts = []\n"
                'queueStorage = "disk"\n'
                f'persistentPath = "{os.path.join(self.directory, "queue")}"\n'
                "[smtpConfig.delivery]\n"
                f"paused = {'true' if paused else 'false'}\n"
                "[[smtpConfig.domainConfigs]]\n"
                'domains = ["example.test"]\n'
                'targetIPs = ["127.0.0.1"]\n'
                f"port = {self.downstream.port}\n"
            )
        return path

    async def start_twistd(self, config: str) -> TwistdProcess:
        process = TwistdProcess.spawn(
            reactor, ["-n", "--pidfile=", "dcrouter", "--config", config], self.directory
        )
        self.addCleanup(process.kill_on_cleanup)
        await process.seen(READY).addTimeout(WAIT, reactor)
        return process

    async def ended_cleanly(self, process: TwistdProcess) -> None:
        code = await process.ended.addTimeout(WAIT, reactor)
        # twistd re-raises the signal it stopped on once shut down, so a clean stop exits by SIGTERM.
        self.assertIn(code, (0, -15), process.output.decode("utf-8", "replace")[-3000:])
        self.assertIn(b"dcrouter stopped", process.output)

    def test_sigterm_during_data_keeps_the_message(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._sigterm_during_data())

    async def _sigterm_during_data(self) -> None:
        process = await self.start_twistd(self.write_config(paused=True))
        sock = await deferToThread(begin_message, self.port)
        process.signal("TERM")
        await process.seen(DRAINING).addTimeout(WAIT, reactor)
        # Stopping has begun and the port no longer accepts; the process waits for this session.
        self.assertIsNone(process.exit_code)
        replies = await deferToThread(finish_message, sock)
        match = re.fullmatch(
            rb"250 2\.0\.0 Ok: queued as ([0-9A-F]{20})\r\n"
            rb"421 4\.3\.2 mx\.test Service shutting down, try again later\r\n",
            replies,
        )
        self.assertIsNotNone(match, replies)
        assert match is not None
        queue_id = match.group(1).decode()
        await self.ended_cleanly(process)
        self.assertIn(f"{queue_id}: queued from=<sender@sender.test>".encode(), process.output)
        self.assertEqual(self.downstream.messages, [])  # delivery was paused: it is still queued

        # The next start finds it in the queue and delivers it.
        again = await self.start_twistd(self.write_config(paused=False))
        (arrived,) = await self.downstream.wait_for_messages(1).addTimeout(WAIT, reactor)
        self.assertEqual(arrived.recipients, ["sink@example.test"])
        self.assertIn(f"id {queue_id}".encode(), arrived.data)
        self.assertTrue(arrived.data.endswith(b"\r\nThe body arrived after SIGTERM.\r\n"), arrived.data)
        again.signal("TERM")
        await self.ended_cleanly(again)

    def test_sighup_is_harmless(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._sighup())

    async def _sighup(self) -> None:
        process = await self.start_twistd(self.write_config(paused=True))
        process.signal("HUP")
        # The file has not changed: the reload finds nothing to do, and the process goes on.
        await process.seen("configuration reloaded (signal)").addTimeout(WAIT, reactor)
        self.assertIn(b"nothing changed", process.output)
        self.assertIsNone(process.exit_code)
        reply = await deferToThread(session_reply, self.port)
        self.assertEqual(reply, b"220 mx.test ESMTP dcrouter\r\n250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n")
        process.signal("TERM")
        await self.ended_cleanly(process)
