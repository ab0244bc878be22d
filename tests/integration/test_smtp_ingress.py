"""DcRouter in-process on 127.0.0.1 with a disk queue and a certificate made here, driven by real clients:
Python's smtplib (in a thread, so the reactor keeps serving) and Twisted's own ESMTP client."""

from __future__ import annotations

import io
import os
import smtplib
import ssl
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.threads import deferToThread
from twisted.mail.smtp import ESMTPSenderFactory
from twisted.trial.unittest import TestCase

from dcrouter import DcRouter
from dcrouter.net.certfiles import generate_self_signed
from dcrouter.passwords import hash_password
from dcrouter.queue.item import QueueItem, QueueItemStatus
from tests.integration import free_ports

HOSTNAME = "localhost"  # the certificate names it and 127.0.0.1
USER, PASSWORD = "alice", "correct horse"

#: CRLF line endings as on the wire; the ".hidden" line checks dot-unstuffing.
MESSAGE = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: Bob <bob@example.test>\r\n"
    b"Subject: integration\r\n"
    b"\r\n"
    b"first line\r\n"
    b".hidden dot\r\n"
    b"last line\r\n"
)


class SmtpIngressTests(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert_pem, key_pem = generate_self_signed(HOSTNAME)
        self.ca_path = os.path.join(directory, "cert.pem")
        key_path = os.path.join(directory, "key.pem")
        with open(self.ca_path, "wb") as handle:
            handle.write(cert_pem)
        with open(key_path, "wb") as handle:
            handle.write(key_pem)
        self.cert_pem = cert_pem
        self.mx, self.submission, self.implicit = free_ports(3)
        options = {
            "smtpConfig": {
                "ports": [self.mx, self.submission, self.implicit],
                "bindAddress": "127.0.0.1",
                "hostname": HOSTNAME,
                "implicitTlsPorts": [self.implicit],
                "submissionPorts": [self.submission, self.implicit],
                "tls": {"certPath": self.ca_path, "keyPath": key_path},
                # The cheapest cost the password module accepts: the test is about the wiring.
                "auth": {"users": [{"username": USER, "password": hash_password(PASSWORD, log2_n=10)}]},
                "queueStorage": "disk",
                "persistentPath": os.path.join(directory, "queue"),
                "domainConfigs": [{"domains": ["example.test"], "targetIPs": ["127.0.0.1"], "port": 2626}],
            }
        }
        self.router = DcRouter(options, reactor=reactor)
        # These tests are about what ingress stores; delivery (tested end to end elsewhere) stays paused so
        # the queued items are exactly as ingress left them.
        assert self.router.delivery is not None
        self.router.delivery.pause_deliveries()
        self.router.privilegedStartService()
        self.router.startService()
        self.addCleanup(self.router.stopService)
        return self.router.when_ready()

    def client_context(self) -> ssl.SSLContext:
        """Verifies the server against the test's certificate, host name included."""
        context = ssl.create_default_context(cafile=self.ca_path)
        self.assertTrue(context.check_hostname)
        return context

    async def stored(self, queue_id: str) -> tuple[QueueItem, bytes]:
        queue = self.router.queue
        assert queue is not None
        item = await queue.get(queue_id)
        self.assertIsNotNone(item, f"{queue_id} not in the queue")
        body = await queue.open_body(queue_id)
        try:
            return item, body.read()
        finally:
            body.close()

    def assertQueued(self, reply: tuple[int, bytes]) -> str:
        code, text = reply
        self.assertEqual(code, 250, text)
        prefix = b"2.0.0 Ok: queued as "
        self.assertTrue(text.startswith(prefix), text)
        return text[len(prefix) :].decode("ascii")

    def assertStoredExactly(self, body: bytes, message: bytes) -> None:
        """The stored message is the one sent, byte for byte, after the Received field dcrouter prepends."""
        self.assertTrue(body.startswith(b"Received: "), body[:200])
        self.assertTrue(body.endswith((b"\r\n" + message, message)), body[-300:])
        headers = body[: len(body) - len(message)]
        self.assertNotIn(b"\r\n\r\n", headers)  # only header lines were added, no blank line
        self.assertIn(b"from ", headers)

    def test_submission_starttls_auth_plain_queues_exact_body(self) -> Deferred[None]:
        def client() -> tuple[dict[str, str], dict[str, str], tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", self.submission, local_hostname="client.test", timeout=20) as smtp:
                smtp.ehlo()
                before = dict(smtp.esmtp_features)
                smtp.starttls(context=self.client_context())
                smtp.ehlo()
                after = dict(smtp.esmtp_features)
                smtp.user, smtp.password = USER, PASSWORD
                code, text = smtp.auth("PLAIN", smtp.auth_plain)
                self.assertEqual(code, 235, text)
                smtp.mail("alice@sender.test")
                # Authenticated: relaying to a domain outside domainConfigs is allowed.
                for rcpt in ("bob@example.test", "carol@elsewhere.test"):
                    code, text = smtp.rcpt(rcpt)
                    self.assertEqual(code, 250, text)
                return before, after, smtp.data(MESSAGE)

        async def go() -> None:
            before, after, reply = await deferToThread(client)
            self.assertIn("starttls", before)
            self.assertNotIn("auth", before)  # AUTH is not offered before TLS
            self.assertNotIn("starttls", after)
            self.assertEqual(set(after["auth"].split()), {"PLAIN", "LOGIN"})
            queue_id = self.assertQueued(reply)
            item, body = await self.stored(queue_id)
            self.assertStoredExactly(body, MESSAGE)
            self.assertEqual(item.status, QueueItemStatus.QUEUED)
            self.assertEqual(item.envelope.mail_from, "alice@sender.test")
            self.assertEqual(item.envelope.recipients, ["bob@example.test", "carol@elsewhere.test"])
            self.assertEqual(item.envelope.auth_user, USER)
            self.assertTrue(item.envelope.tls and item.envelope.tls.startswith("TLSv1."), item.envelope.tls)

        return Deferred.fromCoroutine(go())

    def test_auth_refused_before_tls_and_mail_before_auth(self) -> Deferred[None]:
        def client() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", self.submission, timeout=20) as smtp:
                smtp.ehlo()
                auth_in_clear = smtp.docmd("AUTH", "PLAIN AGFsaWNlAGNvcnJlY3QgaG9yc2U=")
                smtp.starttls(context=self.client_context())
                smtp.ehlo()
                return auth_in_clear, smtp.mail("alice@sender.test")

        async def go() -> None:
            auth_in_clear, mail = await deferToThread(client)
            self.assertEqual(auth_in_clear[0], 538, auth_in_clear)
            self.assertTrue(auth_in_clear[1].startswith(b"5.7.11"), auth_in_clear)
            self.assertEqual(mail[0], 530, mail)
            self.assertTrue(mail[1].startswith(b"5.7.0"), mail)

        return Deferred.fromCoroutine(go())

    def test_mx_refuses_unauthenticated_relay(self) -> Deferred[None]:
        def client() -> tuple[tuple[int, bytes], tuple[int, bytes], tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", self.mx, timeout=20) as smtp:
                smtp.ehlo()
                smtp.starttls(context=self.client_context())
                smtp.ehlo()
                smtp.mail("mallory@sender.test")
                foreign = smtp.rcpt("victim@elsewhere.test")
                local = smtp.rcpt("bob@example.test")
                return foreign, local, smtp.data(MESSAGE)

        async def go() -> None:
            foreign, local, reply = await deferToThread(client)
            self.assertEqual(foreign[0], 554, foreign)
            self.assertTrue(foreign[1].startswith(b"5.7.1"), foreign)
            self.assertEqual(local[0], 250, local)
            item, body = await self.stored(self.assertQueued(reply))
            self.assertEqual(item.envelope.recipients, ["bob@example.test"])
            self.assertIsNone(item.envelope.auth_user)
            self.assertStoredExactly(body, MESSAGE)

        return Deferred.fromCoroutine(go())

    def test_implicit_tls_port(self) -> Deferred[None]:
        def client() -> tuple[dict[str, str], str | None, tuple[int, bytes]]:
            context = self.client_context()
            with smtplib.SMTP_SSL("127.0.0.1", self.implicit, context=context, timeout=20) as smtp:
                smtp.ehlo()
                features = dict(smtp.esmtp_features)
                version = smtp.sock.version()  # type: ignore[union-attr]
                smtp.login(USER, PASSWORD)
                smtp.mail("alice@sender.test")
                smtp.rcpt("bob@example.test")
                return features, version, smtp.data(MESSAGE)

        async def go() -> None:
            features, version, reply = await deferToThread(client)
            self.assertNotIn("starttls", features)  # never offered on an implicit-TLS port
            self.assertIn("auth", features)
            self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
            item, body = await self.stored(self.assertQueued(reply))
            self.assertEqual(item.envelope.auth_user, USER)
            self.assertStoredExactly(body, MESSAGE)

        return Deferred.fromCoroutine(go())

    def test_twisted_esmtp_client(self) -> Deferred[None]:
        """twisted.mail.smtp's client as a second peer: STARTTLS verified against the test certificate, AUTH,
        one message (written with LF line endings, which that client turns into CRLF)."""
        sent: Deferred[Any] = Deferred()
        tls = optionsForClientTLS(HOSTNAME, trustRoot=Certificate.loadPEM(self.cert_pem))
        text = (
            b"From: twisted@sender.test\nTo: bob@example.test\nSubject: from twisted\n\nhello from twisted\n"
        )
        factory = ESMTPSenderFactory(
            USER.encode(),
            PASSWORD.encode(),
            "twisted@sender.test",
            ["bob@example.test"],
            io.BytesIO(text),
            sent,
            retries=0,
            contextFactory=tls,
            requireAuthentication=True,
            requireTransportSecurity=True,
            hostname="client.test",
        )
        # The client reports success before its QUIT exchange ends; wait for the connection to close too,
        # so the test leaves no socket behind.
        closed: Deferred[None] = Deferred()
        connection_lost = factory.clientConnectionLost

        def lost(connector: Any, reason: Any) -> None:
            connection_lost(connector, reason)
            closed.callback(None)

        factory.clientConnectionLost = lost  # type: ignore[method-assign]
        reactor.connectTCP("127.0.0.1", self.submission, factory)

        async def go() -> None:
            accepted, addresses = await sent
            await closed
            self.assertEqual(accepted, 1, addresses)
            queue = self.router.queue
            assert queue is not None
            items = [
                i
                for i in await queue.get_by_status(QueueItemStatus.QUEUED)
                if i.envelope.mail_from == "twisted@sender.test"
            ]
            self.assertEqual(len(items), 1)
            self.assertEqual(items[0].envelope.auth_user, USER)
            _, body = await self.stored(items[0].id)
            self.assertStoredExactly(body, text.replace(b"\n", b"\r\n"))

        return Deferred.fromCoroutine(go())
