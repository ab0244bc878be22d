"""Recipient verification end to end: DcRouter in process on 127.0.0.1, smtplib as the sending MTA (in a
thread, so the reactor keeps serving) and a scripted downstream server that knows some mailboxes, probed over
real sockets by dcrouter's own outbound client."""

from __future__ import annotations

import os
import smtplib
from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from dcrouter import DcRouter
from tests.downstream import Downstream, Script, closed_port, start_downstream
from tests.integration import free_ports

HOSTNAME = "mx.test"
WAIT = 15.0
MAILBOXES = Script(
    rcpt={"alice@example.test": "250 2.1.5 Ok", "bob@example.test": "250 2.1.5 Ok"},
    rcpt_default="550 5.1.1 <unknown>: Recipient address rejected: User unknown in virtual mailbox table",
)
MESSAGE = b"From: <sender@sender.test>\r\nSubject: verified\r\n\r\nhello\r\n"


def rcpt_replies(port: int, recipients: Sequence[str], data: bool = False) -> list[tuple[int, str]]:
    """One session from an outside client: MAIL, then RCPT for each of ``recipients``; their replies (and
    DATA's when ``data``). Call in a thread."""
    replies = []
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=WAIT) as smtp:
        smtp.ehlo()
        code, text = smtp.mail("sender@sender.test")
        if code != 250:
            raise AssertionError(f"MAIL: {code} {text!r}")
        for recipient in recipients:
            code, text = smtp.rcpt(recipient)
            replies.append((code, text.decode()))
        if data:
            code, text = smtp.data(MESSAGE)
            replies.append((code, text.decode()))
    return replies


def rcpt_commands(downstream: Downstream, recipient: str) -> int:
    return downstream.commands().count(f"RCPT TO:<{recipient}>")


class RecipientVerificationTests(TestCase):
    timeout = 60

    async def start_router(self, **domain: Any) -> None:
        """DcRouter on a free port with one domainConfigs entry for example.test (``domain`` merged in);
        delivery paused, so every RCPT the downstream sees is a probe."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        (port,) = free_ports(1)
        entry = {"domains": ["example.test"], "targetIPs": ["127.0.0.1"]}
        entry.update(domain)
        config = {
            "ports": [port],
            "bindAddress": "127.0.0.1",
            "hostname": HOSTNAME,
            "implicitTlsPorts": [],
            "submissionPorts": [],
            "queueStorage": "disk",
            "persistentPath": os.path.join(directory, "queue"),
            "domainConfigs": [entry],
            "delivery": {"paused": True},
        }
        self.router = DcRouter({"smtpConfig": config}, reactor=reactor)
        self.router.privilegedStartService()
        self.router.startService()
        self.addCleanup(self.router.stopService)
        await self.router.when_ready().addTimeout(WAIT, reactor)
        self.port = self.router.smtp_ports[port]

    def downstream(self) -> Downstream:
        server = start_downstream(MAILBOXES, reactor=reactor)
        self.addCleanup(server.stop)
        return server

    async def session(self, *recipients: str, data: bool = False) -> list[tuple[int, str]]:
        return await deferToThread(rcpt_replies, self.port, recipients, data)

    def test_callout_known_unknown_and_cached(self) -> Deferred[None]:
        async def go() -> None:
            downstream = self.downstream()
            await self.start_router(port=downstream.port, verifyRecipients="callout")
            replies = await self.session("alice@example.test", "nobody@example.test", data=True)
            self.assertEqual(replies[0], (250, "2.1.5 Ok"))
            self.assertEqual(
                replies[1], (550, "5.1.1 <nobody@example.test>: Recipient address rejected: User unknown")
            )
            self.assertEqual(replies[2][0], 250)  # queued for alice alone
            assert self.router.queue is not None
            self.assertEqual(await self.router.queue.get_item_count(), 1)
            probes = [c for c in downstream.commands() if c.split()[0] in ("MAIL", "RCPT", "DATA")]
            self.assertEqual(
                probes,
                [
                    "MAIL FROM:<>",
                    "RCPT TO:<alice@example.test>",
                    "MAIL FROM:<>",
                    "RCPT TO:<nobody@example.test>",
                ],
            )
            # A second sending MTA, later: both answers come from the cache, no probe is made.
            again = await self.session("alice@example.test", "nobody@example.test")
            self.assertEqual([code for code, _ in again], [250, 550])
            self.assertEqual(rcpt_commands(downstream, "alice@example.test"), 1)
            self.assertEqual(rcpt_commands(downstream, "nobody@example.test"), 1)
            # One connection served every probe (kept by the probe pool between them).
            self.assertEqual(len(downstream.connections), 1)

        return Deferred.fromCoroutine(go())

    def test_target_down_is_temporary(self) -> Deferred[None]:
        async def go() -> None:
            port = await closed_port(reactor)
            await self.start_router(port=port, verifyRecipients="callout")
            replies = await self.session("alice@example.test")
            text = "4.1.1 <alice@example.test>: Recipient address rejected: unverified address: "
            text += "try again later"
            self.assertEqual(replies, [(450, text)])

        return Deferred.fromCoroutine(go())

    def test_target_down_with_fail_open(self) -> Deferred[None]:
        async def go() -> None:
            port = await closed_port(reactor)
            await self.start_router(port=port, verifyRecipients="callout", calloutFailOpen=True)
            self.assertEqual(await self.session("alice@example.test"), [(250, "2.1.5 Ok")])

        return Deferred.fromCoroutine(go())

    def test_recipient_list(self) -> Deferred[None]:
        async def go() -> None:
            path = os.path.abspath(self.mktemp())
            with open(path, "w") as handle:
                handle.write("# exported from the mailbox server\nbob@example.test OK\n")
            await self.start_router(
                port=25, verifyRecipients="list", recipients=["alice"], recipientsFile=path
            )
            replies = await self.session("alice@example.test", "bob@example.test", "carol@example.test")
            self.assertEqual([code for code, _ in replies], [250, 250, 550])
            self.assertEqual(
                replies[2][1], "5.1.1 <carol@example.test>: Recipient address rejected: User unknown"
            )

        return Deferred.fromCoroutine(go())
