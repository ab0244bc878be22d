"""Body transformations configured like an operator would, through the chain: an attachment removed and a
footer added, then DKIM signing over the rewritten message, read back from the queue as delivery would."""

from __future__ import annotations

import email
import email.policy
import os

import dkim
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from dcrouter.config.load import load_options
from dcrouter.mail.dkimkeys import dns_txt_value, generate_private_key, private_key_pem
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.processing.build import build_chain
from dcrouter.processing.processor import EmailProcessor
from dcrouter.queue.files import message_reader
from dcrouter.queue.item import QueueItem
from dcrouter.queue.memory import MemoryQueue
from tests import mime_samples as samples

KEY = generate_private_key("rsa", 2048)


class BodyTransformationChainTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        key_path = os.path.join(self.directory, "dkim.pem")
        with open(key_path, "wb") as f:
            f.write(private_key_pem(KEY))
        self.config = {
            "smtpConfig": {
                "ports": [2525],
                "hostname": "mx.example.test",
                "implicitTlsPorts": [],
                "submissionPorts": [],
                "defaultServer": "127.0.0.1",
                "transformations": [
                    {"type": "removeAttachment", "extensions": [".exe"]},
                    {"type": "addFooter", "text": "Scanned by the gateway."},
                    {
                        "type": "dkimSign",
                        "domains": ["example.org"],
                        "domainName": "example.org",
                        "keySelector": "s1",
                        "privateKey": key_path,
                    },
                ],
            }
        }

    def process(self, data: bytes, config: dict | None = None) -> bytes:
        smtp = load_options(config or self.config).options.smtp_config
        assert smtp is not None
        queue = MemoryQueue(clock=self.clock, spool_directory=self.directory)
        self.successResultOf(queue.load())
        processor = EmailProcessor(queue, self.clock.seconds, **build_chain(smtp, None).options())
        path = os.path.join(self.directory, "spool-in")
        with open(path, "wb") as f:
            f.write(data)
        item: QueueItem = self.successResultOf(
            processor.process(
                Envelope("alice@example.org", ["bob@example.com"]), SpooledMessage(len(data), path=path)
            )
        )
        with message_reader(
            item.head, self.successResultOf(queue.open_body(item.id)), item.body_offset
        ) as stream:
            relayed = stream.read()
        self.assertEqual(item.size, len(relayed))
        return relayed

    def verifies(self, data: bytes) -> bool:
        record = dns_txt_value(KEY).encode()
        return bool(dkim.verify(data, dnsfunc=lambda name, timeout=5: record))

    def test_attachment_removed_footer_added_then_signed(self) -> None:
        original = samples.message(
            b'Content-Type: multipart/mixed; boundary="b1"\r\n',
            samples.multipart(
                b"b1",
                [samples.text_part("Hello Bob."), samples.attachment("invoice.pdf.exe", b"MZ" + bytes(200))],
            ),
        )
        relayed = self.process(original)
        self.assertTrue(self.verifies(relayed))
        parsed = email.message_from_bytes(relayed, policy=email.policy.default)
        texts = [part.get_content() for part in parsed.walk() if part.get_content_type() == "text/plain"]
        self.assertIn("Hello Bob.", texts[0])
        self.assertIn("Scanned by the gateway.", texts[0])
        self.assertTrue(any("invoice.pdf.exe" in t and "removed" in t for t in texts[1:]), texts)
        self.assertNotIn(b"TVqQ", relayed)  # base64 of "MZ": the executable is gone
        self.assertNotIn("invoice.pdf.exe", [part.get_filename() for part in parsed.walk()])

    def test_nothing_to_change_keeps_the_received_file(self) -> None:
        config = dict(self.config)
        config["smtpConfig"] = dict(
            config["smtpConfig"],
            transformations=[
                {"type": "removeAttachment", "extensions": [".exe"]},
            ],
        )
        original = samples.simple_mixed()
        self.assertEqual(self.process(original, config), original)
