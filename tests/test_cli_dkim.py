"""Tests for ``dcrouter dkim-keygen`` (dcrouter.cli): the key file, the record, and a signature made with the
key that verifies against the printed record."""

from __future__ import annotations

import io
import os
import re
import stat
import sys

import dkim
from twisted.trial import unittest

from dcrouter import cli
from dcrouter.mail.dkimkeys import dns_txt_value, load_private_key, read_private_key
from dcrouter.processing.dkim import DkimSigner
from tests.test_processing_dkim import HAVE_MAIL_DKIM, MESSAGE, NO_MAIL_DKIM, NO_NACL, mail_dkim_verify


class DkimKeygenTests(unittest.TestCase):
    def setUp(self) -> None:
        self.out, self.err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", self.out)
        self.patch(sys, "stderr", self.err)
        self.dir = self.mktemp()
        os.mkdir(self.dir)

    def keygen(self, *args: str) -> int:
        return cli.main(
            ["dkim-keygen", "--domain", "Example.COM", "--selector", "mail2025", "--out", self.dir, *args]
        )

    @property
    def path(self) -> str:
        return os.path.join(self.dir, "mail2025._domainkey.example.com.pem")

    def record_text(self) -> str:
        line = self.out.getvalue()
        self.assertEqual(line.count("\n"), 1)
        return "".join(re.findall(r'"([^"]*)"', line))

    def test_rsa(self) -> None:
        self.assertEqual(self.keygen(), 0)
        line = self.out.getvalue()
        self.assertTrue(
            line.startswith('mail2025._domainkey.example.com. IN TXT "v=DKIM1; k=rsa; p=MII'), line
        )
        self.assertTrue(all(len(s) <= 255 for s in re.findall(r'"([^"]*)"', line)))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        key = load_private_key(read_private_key(self.path))
        self.assertEqual(key.key_size, 2048)  # type: ignore[union-attr]
        self.assertEqual(self.record_text(), dns_txt_value(key))
        self.assertIn(self.path, self.err.getvalue())

    def test_rsa_bits(self) -> None:
        self.assertEqual(self.keygen("--bits", "3072"), 0)
        self.assertEqual(load_private_key(read_private_key(self.path)).key_size, 3072)  # type: ignore[union-attr]

    def test_ed25519(self) -> None:
        self.assertEqual(self.keygen("--type", "ed25519"), 0)
        self.assertIn('IN TXT "v=DKIM1; k=ed25519; p=', self.out.getvalue())
        self.assertEqual(self.record_text(), dns_txt_value(load_private_key(read_private_key(self.path))))

    def test_refusals(self) -> None:
        self.assertEqual(self.keygen("--bits", "1024"), 1)
        self.assertIn("at least 2048", self.err.getvalue())
        self.assertEqual(self.keygen("--type", "ed25519", "--bits", "4096"), 1)
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual(cli.main(["dkim-keygen", "--domain", "example.com", "--selector", "a b"]), 1)
        self.assertIn("not a valid selector", self.err.getvalue())
        self.assertEqual(self.out.getvalue(), "")

    def test_never_overwrites(self) -> None:
        self.assertEqual(self.keygen("--type", "ed25519"), 0)
        with open(self.path, "rb") as f:
            before = f.read()
        self.assertEqual(self.keygen("--type", "ed25519"), 1)
        self.assertIn("exists", self.err.getvalue())
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_missing_directory(self) -> None:
        self.assertEqual(self.keygen("--out", os.path.join(self.dir, "nope")), 1)
        self.assertIn("cannot create", self.err.getvalue())

    def test_usage(self) -> None:
        self.assertRaises(SystemExit, cli.main, ["dkim-keygen", "--domain", "example.com"])
        self.assertRaises(SystemExit, self.keygen, "--type", "dsa")

    def signed_with_generated_key(self, *args: str) -> tuple[bytes, bytes]:
        self.assertEqual(self.keygen(*args), 0)
        signer = DkimSigner.from_options("example.com", "mail2025", self.path)
        message = MESSAGE.replace(b"alice@example.com", b"alice@Example.COM")
        return signer.sign(io.BytesIO(message)) + message, self.record_text().encode()

    def test_generated_key_verifies_with_dkimpy(self) -> None:
        for args in [(), ("--type", "ed25519")]:
            if args and NO_NACL:
                continue
            if os.path.exists(self.path):
                os.unlink(self.path)
            self.out.truncate(0)
            self.out.seek(0)
            signed, record = self.signed_with_generated_key(*args)

            def dnsfunc(name: bytes, timeout: int = 5, record: bytes = record) -> bytes | None:
                return record if name == b"mail2025._domainkey.example.com." else None

            self.assertTrue(dkim.verify(signed, dnsfunc=dnsfunc), args)
            forged = signed.replace(b"From: Alice", b"From: m@evil.example\r\nFrom: Alice", 1)
            self.assertFalse(dkim.verify(forged, dnsfunc=dnsfunc), args)

    def test_generated_key_verifies_with_mail_dkim(self) -> None:
        if not HAVE_MAIL_DKIM:
            raise unittest.SkipTest(NO_MAIL_DKIM)
        signed, _ = self.signed_with_generated_key()
        key = load_private_key(read_private_key(self.path))
        # The strings exactly as printed, served for the printed name.
        strings = re.findall(r'"([^"]*)"', self.out.getvalue())
        name = "mail2025._domainkey.example.com"
        self.assertEqual(mail_dkim_verify(signed, key, strings, name), "pass")
        forged = signed.replace(b"From: Alice", b"From: m@evil.example\r\nFrom: Alice", 1)
        self.assertTrue(mail_dkim_verify(forged, key, strings, name).startswith("fail"))
