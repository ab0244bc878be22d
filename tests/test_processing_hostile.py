"""Malformed MIME through the whole processing chain: every sample ends in a definite SMTP answer (a refusal
with its reply, or a queued message), never an unhandled error, and nothing is left on disk when refused.

The chain is the one an operator gets from configuration: the attachment scanner (reject), the built-in spam
heuristics (tag), an addHeader transformation and DKIM signing, built by ``build_chain``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import cast

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from dcrouter.config.load import load_options
from dcrouter.mail.dkimkeys import generate_private_key, private_key_pem
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.processing.build import build_chain
from dcrouter.processing.message import Refusal
from dcrouter.processing.processor import EmailProcessor
from dcrouter.queue.item import QueueItem
from dcrouter.queue.memory import MemoryQueue
from tests import mime_samples as samples
from tests.archive_samples import EXE, make_gzip, make_tar, make_zip, nested_zips, pax_tar, zip_bomb

KEY = private_key_pem(generate_private_key("rsa", 2048))


class ConfiguredChainCase(TestCase):
    """The chain built from configuration, processing spooled messages."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        key_path = os.path.join(self.directory, "dkim.pem")
        with open(key_path, "wb") as f:
            f.write(KEY)
        config = load_options(
            {
                "smtpConfig": {
                    "ports": [2525],
                    "hostname": "mx.example.test",
                    "implicitTlsPorts": [],
                    "submissionPorts": [],
                    "defaultServer": "127.0.0.1",
                    "contentScanning": True,
                    "scanners": [
                        {"type": "attachment", "blockedExtensions": [".exe"], "action": "reject"},
                        {"type": "spam", "action": "tag"},
                    ],
                    "transformations": [
                        {"type": "addHeader", "header": "X-Checked", "value": "{queueId}"},
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
        ).options.smtp_config
        assert config is not None
        self.queue = MemoryQueue(clock=self.clock, spool_directory=self.directory)
        self.successResultOf(self.queue.load())
        self.processor = EmailProcessor(self.queue, self.clock.seconds, **build_chain(config, None).options())

    def outcome(self, data: bytes) -> QueueItem | Refusal:
        """Process ``data`` spooled to a file, as ingress spools big messages: the queued item or refusal."""
        path = os.path.join(self.directory, "spool-under-test")
        with open(path, "wb") as f:
            f.write(data)
        done = self.processor.process(
            Envelope("alice@example.org", ["bob@example.test"]), SpooledMessage(len(data), path=path)
        )
        outcome: QueueItem | Refusal = self.successResultOf(done.addErrback(refusal))
        if isinstance(outcome, Refusal):
            self.assertFalse(os.path.exists(path), "a refused message's spool file was left behind")
        return outcome

    def refused_as_unscannable(self, make: Callable[[], bytes]) -> None:
        result = self.outcome(make())
        self.assertIsInstance(result, Refusal)
        assert isinstance(result, Refusal)
        self.assertEqual((result.reply.code, result.reply.enhanced), (554, "5.7.1"))
        self.assertIn("cannot be scanned", str(result.reply.text))

    def refused(self, make: Callable[[], bytes], reason: str) -> None:
        """Refused, whether for the .exe the sample carries (found before the damage) or as unscannable."""
        result = self.outcome(make())
        assert isinstance(result, Refusal), result
        self.assertIn((result.reply.code, result.reply.enhanced), ((550, "5.7.1"), (554, "5.7.1")))
        self.assertIn(reason, str(result.reply.text))


def refusal(failure: Failure) -> Refusal:
    """A Refusal is one of the chain's outcomes here; any other failure stays a failure."""
    failure.trap(Refusal)
    return cast(Refusal, failure.value)


class HostileMimeThroughTheChainTests(ConfiguredChainCase):
    def test_unclosed_boundary(self) -> None:
        # The executable before the missing close-delimiter is seen and refused by name.
        self.refused(samples.unclosed_boundary, "x.exe")

    def test_thousand_deep_nesting(self) -> None:
        self.refused_as_unscannable(samples.deep_nesting)

    def test_hundred_thousand_parts(self) -> None:
        self.refused_as_unscannable(samples.many_parts)

    def test_broken_base64(self) -> None:
        self.refused(samples.broken_base64, "")

    def test_two_megabyte_header(self) -> None:
        result = self.outcome(samples.huge_header_line())
        assert isinstance(result, Refusal)
        self.assertEqual((result.reply.code, result.reply.enhanced), (552, "5.3.4"))

    def test_two_megabyte_part_header(self) -> None:
        self.refused_as_unscannable(samples.huge_part_header)

    def test_nul_bytes_and_odd_encodings_end_in_an_answer(self) -> None:
        for make in (
            samples.nul_bytes,
            samples.huge_rfc2231,
            samples.many_encoded_words,
            samples.mixed_line_endings,
            samples.boundary_inside_base64,
        ):
            with self.subTest(sample=make.__name__):
                result = self.outcome(make())
                if isinstance(result, QueueItem):
                    # Accepted: the queued message carries the chain's header (signed only when its From is
                    # one clean mailbox: the NUL sample's is not).
                    assert result.head is not None
                    self.assertIn(b"\r\nX-Checked: " + result.id.encode() + b"\r\n", result.head)

    def test_a_well_formed_message_is_queued_signed(self) -> None:
        result = self.outcome(samples.simple_mixed())
        assert isinstance(result, QueueItem), result
        assert result.head is not None
        self.assertTrue(result.head.startswith(b"DKIM-Signature: "))
        self.assertIn(b"\r\nX-Spam-Status: No, score=", result.head)


def archive_mail(name: str, data: bytes) -> bytes:
    return samples.message(
        samples.headers(("Content-Type", 'multipart/mixed; boundary="b"')),
        samples.multipart(b"b", [samples.text_part("see attached"), samples.attachment(name, data)]),
    )


class ArchivesThroughTheChainTests(ConfiguredChainCase):
    """Archives inside archives, compressed tars and files, bombs: the configured chain's answers."""

    def refused_by_policy(self, data: bytes, reason: str) -> None:
        result = self.outcome(data)
        assert isinstance(result, Refusal), result
        self.assertEqual((result.reply.code, result.reply.enhanced), (550, "5.7.1"))
        self.assertEqual(str(result.reply.text), f"Message refused by policy ({reason})")

    def test_zip_in_a_zip_with_an_exe(self) -> None:
        outer = make_zip({"readme.txt": b"hello", "inner.zip": make_zip({"evil.exe": EXE})})
        reason = "attachment docs.zip contains inner.zip/evil.exe"
        self.refused_by_policy(archive_mail("docs.zip", outer), reason)

    def test_tar_gz_with_an_exe(self) -> None:
        data = make_tar({"readme.txt": b"hi", "bin/evil.exe": EXE}, "gz")
        reason = "attachment src.tar.gz contains bin/evil.exe"
        self.refused_by_policy(archive_mail("src.tar.gz", data), reason)

    def test_gzip_of_an_exe(self) -> None:
        self.refused_by_policy(archive_mail("x.exe.gz", make_gzip(EXE)), "attachment x.exe.gz contains x.exe")

    def test_depth_bomb(self) -> None:
        self.refused_as_unscannable(lambda: archive_mail("deep.zip", nested_zips(10, {"a.txt": b"x"})))

    def test_zip_bomb_by_ratio(self) -> None:
        self.refused_as_unscannable(lambda: archive_mail("data.zip", zip_bomb(50)))
        self.refused_as_unscannable(lambda: archive_mail("data.zip", make_zip({"in.zip": zip_bomb(50)})))

    def test_pax_header_with_a_digit_run_is_unscannable(self) -> None:
        # CVE-2024-6232: CPython < 3.11.10 / 3.12.6 takes quadratic time in tarfile's pax header searches on a
        # long run of digits (60,000 digits: minutes on the reactor for a 64 KiB attachment). Refused unread.
        tar = pax_tar({"a.txt": b"x"}, {"comment": "1" * 60_000})
        self.refused_as_unscannable(lambda: archive_mail("x.tar", tar))

    def test_pax_tar_with_ordinary_headers_is_listed(self) -> None:
        long_name = "d/" * 80 + "evil.exe"  # over ustar's 100 bytes: a pax "path" record
        tar = pax_tar({long_name: EXE}, {"mtime": "1700000000.123456789", "comment": "build 42"})
        result = self.outcome(archive_mail("x.tar", tar))
        assert isinstance(result, Refusal), result
        # Listed: the long name came whole from its pax "path" record.
        self.assertEqual((result.reply.code, result.reply.enhanced), (550, "5.7.1"))
        self.assertTrue(str(result.reply.text).endswith("/d/evil.exe)"), result.reply.text)

    def test_nested_archives_of_harmless_files_are_queued(self) -> None:
        inner = make_tar({"notes.txt": b"hello", "report.pdf": b"%PDF-1.4\n"}, "gz")
        result = self.outcome(archive_mail("docs.zip", make_zip({"inner.tar.gz": inner})))
        self.assertIsInstance(result, QueueItem)
