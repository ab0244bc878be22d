"""Processing end to end through a real ``twistd -n dcrouter``: mail in over SMTP (smtplib), scanned by
the real spamd and clamd from Debian's packages (tests.spamd_server, tests.clamd_server), transformed,
DKIM-signed, and out to a scripted downstream server, where the signature is checked by independent
verifiers (dkimpy, and Perl's Mail::DKIM when installed) against the published key.
"""

from __future__ import annotations

import base64
import os
import smtplib

import dkim
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from dcrouter.mail.dkimkeys import dns_txt_value, generate_private_key, private_key_pem
from tests.clamd_server import CLAMD, EICAR, REPORTED_SIGNATURE, shared_clamd
from tests.downstream import Downstream, ReceivedMessage, start_downstream
from tests.integration import TwistdProcess, free_ports
from tests.spamd_server import SPAMD, shared_spamd
from tests.test_processing_dkim import HAVE_MAIL_DKIM, mail_dkim_verify

READY = "dcrouter ready"
WAIT = 60.0
DOMAIN = "sender.test"
SELECTOR = "gw1"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
KEY = generate_private_key("rsa", 2048)


def message(subject: str, body: bytes = b"Hello from the test.\r\n", extra: bytes = b"") -> bytes:
    return (
        b"From: Sender <sender@sender.test>\r\n"
        b"To: sink@example.test\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"Date: Wed, 25 Nov 2026 12:00:00 +0000\r\n"
        b"Message-ID: <" + subject.replace(" ", "-").encode() + b"@sender.test>\r\n"
        b"MIME-Version: 1.0\r\n" + extra + b"\r\n" + body
    )


def with_attachment(subject: str, filename: str, content: bytes) -> bytes:
    encoded = base64.encodebytes(content).replace(b"\n", b"\r\n")
    return message(
        subject,
        b"--b1\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        b"--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="'
        + filename.encode()
        + b'"\r\n\r\n'
        + encoded
        + b"--b1--\r\n",
        extra=b'Content-Type: multipart/mixed; boundary="b1"\r\n',
    )


def send(port: int, data: bytes) -> tuple[int, str]:
    """One message in one smtplib session (call in a thread); the reply to DATA."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=WAIT) as smtp:
        smtp.ehlo()
        smtp.mail("sender@sender.test")
        code, text = smtp.rcpt("sink@example.test")
        assert code == 250, (code, text)
        try:
            code, reply = smtp.data(data)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode()
        return code, reply.decode()


def dkimpy_verifies(data: bytes) -> bool:
    record = dns_txt_value(KEY).encode("ascii")

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == f"{SELECTOR}._domainkey.{DOMAIN}.".encode() else None

    return bool(dkim.verify(data, dnsfunc=dnsfunc))


class ProcessingThroughTwistdTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        if SPAMD is None or CLAMD is None:
            raise SkipTest("spamd or clamd missing: apt-get install spamd spamassassin clamav-daemon")
        self.spamd = shared_spamd()
        self.clamd = shared_clamd()
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.key_path = os.path.join(self.directory, "dkim.pem")
        with open(self.key_path, "wb") as f:
            f.write(private_key_pem(KEY))
        self.downstream: Downstream = start_downstream(reactor=reactor)
        self.addCleanup(self.downstream.stop)

    def write_config(self, port: int, spam_action: str) -> str:
        path = os.path.join(self.directory, f"router-{spam_action}.toml")
        with open(path, "w") as f:
            f.write(
                "[smtpConfig]\n"
                f"ports = [{port}]\n"
                'bindAddress = "127.0.0.1"\n'
                'hostname = "mx.test"\n'
                "implicitTlsPorts = []\n"
                "submissionPorts = []\n"
                f'persistentPath = "{os.path.join(self.directory, "queue-" + spam_action)}"\n'
                "contentScanning = true\n"
                "scanners = [\n"
                f'  {{ type = "virus", engine = "clamav", port = {self.clamd.port}, action = "reject" }},\n'
                f'  {{ type = "spam", engine = "spamassassin", port = {self.spamd.port}, threshold = 5.0, '
                f'action = "{spam_action}", subjectPrefix = "[SPAM] " }},\n'
                '  { type = "attachment", blockedExtensions = [".exe"], action = "reject" },\n'
                "]\n"
                "transformations = [\n"
                '  { type = "addHeader", header = "X-Gateway", value = "dcrouter {queueId}" },\n'
                f'  {{ type = "dkimSign", domains = ["{DOMAIN}"], domainName = "{DOMAIN}", '
                f'keySelector = "{SELECTOR}", privateKey = "{self.key_path}" }},\n'
                "]\n"
                "[[smtpConfig.domainConfigs]]\n"
                'domains = ["example.test"]\n'
                'targetIPs = ["127.0.0.1"]\n'
                f"port = {self.downstream.port}\n"
            )
        return path

    async def start(self, spam_action: str) -> int:
        (port,) = free_ports(1)
        process = TwistdProcess.spawn(
            reactor,
            ["-n", "--pidfile=", "dcrouter", "--config", self.write_config(port, spam_action)],
            self.directory,
        )
        self.addCleanup(process.kill_on_cleanup)
        await process.seen(READY).addTimeout(WAIT, reactor)
        return port

    async def arrived(self, count: int) -> list[ReceivedMessage]:
        return await self.downstream.wait_for_messages(count).addTimeout(WAIT, reactor)

    def assert_signed(self, data: bytes) -> None:
        self.assertTrue(data.startswith(b"DKIM-Signature: "), data[:300])
        self.assertTrue(dkimpy_verifies(data), "dkimpy: signature does not verify")
        if HAVE_MAIL_DKIM:
            result = mail_dkim_verify(data, KEY, name=f"{SELECTOR}._domainkey.{DOMAIN}")
            self.assertEqual(result, "pass")
        # A second From added after signing breaks the signature (From is over-signed).
        forged = data.replace(b"\r\nTo: ", b"\r\nFrom: attacker@evil.test\r\nTo: ", 1)
        self.assertFalse(dkimpy_verifies(forged))
        if HAVE_MAIL_DKIM:
            self.assertNotEqual(mail_dkim_verify(forged, KEY, name=f"{SELECTOR}._domainkey.{DOMAIN}"), "pass")

    async def _refusals_and_clean_mail(self) -> None:
        port = await self.start("reject")
        code, text = await deferToThread(send, port, message("gtube", GTUBE + b"\r\n"))
        self.assertEqual(code, 550, text)
        self.assertTrue(text.startswith("5.7.1 Message refused as spam"), text)
        code, text = await deferToThread(send, port, with_attachment("eicar", "eicar.com", EICAR))
        self.assertEqual(code, 554, text)
        self.assertIn(f"virus found ({REPORTED_SIGNATURE})", text)
        code, text = await deferToThread(
            send, port, with_attachment("exe", "invoice.pdf.exe", b"MZ" + b"\0" * 64)
        )
        self.assertEqual(code, 550, text)
        self.assertIn("invoice.pdf.exe", text)
        code, text = await deferToThread(send, port, message("clean message"))
        self.assertEqual(code, 250, text)
        (arrived,) = await self.arrived(1)
        self.assertEqual(arrived.recipients, ["sink@example.test"])
        head = arrived.data.split(b"\r\n\r\n", 1)[0]
        queue_id = text.split()[-1]
        self.assertIn(b"\r\nX-Gateway: dcrouter " + queue_id.encode() + b"\r\n", head + b"\r\n")
        self.assertIn(b"\r\nX-Spam-Status: No, score=", head)
        self.assertIn(b"\r\nX-Virus-Status: Clean\r\n", head)
        self.assert_signed(arrived.data)
        self.assertEqual(len(self.downstream.messages), 1, "a refused message was relayed")

    def test_refusals_and_clean_mail(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._refusals_and_clean_mail())

    async def _spam_tagged(self) -> None:
        port = await self.start("tag")
        code, text = await deferToThread(
            send,
            port,
            message("gtube", GTUBE + b"\r\n", extra=b"X-Spam-Status: No, forged by the sender\r\n"),
        )
        self.assertEqual(code, 250, text)
        (arrived,) = await self.arrived(1)
        head = arrived.data.split(b"\r\n\r\n", 1)[0]
        self.assertIn(b"\r\nSubject: [SPAM] gtube\r\n", head)
        self.assertIn(b"\r\nX-Spam-Status: Yes, score=", head)
        self.assertNotIn(b"forged by the sender", head)
        self.assertIn(b"GTUBE", head)
        self.assert_signed(arrived.data)

    def test_spam_tagged(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._spam_tagged())
