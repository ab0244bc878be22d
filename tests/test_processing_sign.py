"""DKIM signing as the last stage of the chain: the message the queue composes (new head + received body)
verifies, with dkimpy and with Perl's Mail::DKIM (independent), both given the key record by a stub resolver.

The verification helpers are those of tests/test_processing_dkim.py: no network, no real DNS.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import SkipTest

from dcrouter.mail.dkimkeys import PrivateKey, dns_txt_value, private_key_pem
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.headers import HeaderBlock
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.processing.dkim import DkimSigner
from dcrouter.processing.processor import EmailProcessor
from dcrouter.processing.transforms.dkim import DkimSign
from dcrouter.processing.transforms.headers import AddHeader, RemoveHeader, RewriteAddress
from dcrouter.queue.files import message_reader
from dcrouter.queue.item import QueueItem
from tests.results import MemoryQueueCase
from tests.test_processing_dkim import (
    DOMAIN,
    ED_KEY,
    HAVE_MAIL_DKIM,
    HAVE_MAIL_DKIM_ED25519,
    NO_MAIL_DKIM,
    NO_MAIL_DKIM_ED25519,
    NO_NACL,
    NOW,
    RSA_KEY,
    SELECTOR,
    dkimpy_verify,
    mail_dkim_verify,
    tag,
)

START = MemoryQueueCase.START

HEAD = (
    b"Received: from client.example.net\r\n"
    b"\tby mx.example.com; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org,\r\n"
    b"  carol@example.org\r\n"
    b"Subject:   Quarterly   report\t \r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"X-Internal: remove me\r\n"
    b"\r\n"
)
BODY = b"Hello  Bob,\t\r\n\r\ncaf\xc3\xa9 \xff bytes   and\t\ttabs   \r\n leading space\r\n\r\n\r\n"
MESSAGE = HEAD + BODY


def signer(key: PrivateKey = RSA_KEY) -> DkimSigner:
    return DkimSigner(DOMAIN, SELECTOR, private_key_pem(key), now=lambda: NOW)


class SigningChainCase(MemoryQueueCase):
    def processor(self, key: PrivateKey = RSA_KEY, transformations: Any = None) -> EmailProcessor:
        if transformations is None:
            transformations = [AddHeader("X-Gateway", "mx.example.com {queueId}")]
        return EmailProcessor(
            self.queue,
            self.clock.seconds,
            reactor=self.clock,
            threadpool=None,
            transformations=transformations,
            signers=[DkimSign([(DOMAIN, signer(key))])],
        )

    def queued(self, processor: EmailProcessor, data: bytes = MESSAGE, spill: bool = False) -> QueueItem:
        if spill:
            os.makedirs(self.spool, exist_ok=True)
            path = os.path.join(self.spool, "spool-sign")
            with open(path, "xb") as f:
                f.write(data)
            message = SpooledMessage(len(data), path=path)
        else:
            message = SpooledMessage(len(data), data=data)
        envelope = Envelope(mail_from="alice@example.com", recipients=["bob@example.org"])
        item: QueueItem = self.successResultOf(processor.process(envelope, message))
        return item

    def composed(self, item: QueueItem) -> bytes:
        stream = self.successResultOf(self.queue.open_body(item.id))
        with message_reader(item.head, stream, item.body_offset) as reader:
            data: bytes = reader.read()
        return data

    def signed(self, key: PrivateKey = RSA_KEY, data: bytes = MESSAGE, **kwargs: Any) -> bytes:
        item = self.queued(self.processor(key, **kwargs), data)
        assert item.head is not None
        self.assertTrue(item.head.startswith(b"DKIM-Signature: "))
        return self.composed(item)

    def assertVerifies(self, message: bytes, key: PrivateKey = RSA_KEY) -> None:
        self.assertTrue(dkimpy_verify(message, key), "dkimpy did not verify the message")
        if HAVE_MAIL_DKIM and (key is RSA_KEY or HAVE_MAIL_DKIM_ED25519):
            self.assertEqual(mail_dkim_verify(message, key), "pass")

    def assertFailsVerification(self, message: bytes, key: PrivateKey = RSA_KEY) -> None:
        self.assertFalse(dkimpy_verify(message, key), "dkimpy verified a changed message")
        if HAVE_MAIL_DKIM and (key is RSA_KEY or HAVE_MAIL_DKIM_ED25519):
            self.assertTrue(mail_dkim_verify(message, key).startswith("fail"))


class SignAfterTransformationTests(SigningChainCase):
    def test_rsa_signature_covers_the_changed_header(self) -> None:
        item = self.queued(self.processor())
        assert item.head is not None
        message = self.composed(item)
        # Header-only change: the received body is stored as it came, behind the new block.
        self.assertEqual(item.body_offset, len(HEAD))
        self.assertEqual(message, item.head + BODY)
        self.assertIn(b"X-Gateway: mx.example.com " + item.id.encode() + b"\r\n", item.head)
        field = HeaderBlock.parse(item.head[:-2]).get("DKIM-Signature") or ""
        self.assertIn("a=rsa-sha256", field)
        self.assertEqual(tag(field.encode(), b"d"), DOMAIN.encode())
        self.assertVerifies(message)

    def test_rsa_with_mail_dkim(self) -> None:
        if not HAVE_MAIL_DKIM:
            raise SkipTest(NO_MAIL_DKIM)
        self.assertEqual(mail_dkim_verify(self.signed(), RSA_KEY), "pass")

    def test_ed25519(self) -> None:
        if NO_NACL:
            raise SkipTest(NO_NACL)
        message = self.signed(ED_KEY)
        self.assertIn(b"a=ed25519-sha256", message)
        self.assertTrue(dkimpy_verify(message, ED_KEY))

    def test_ed25519_with_mail_dkim(self) -> None:
        if not HAVE_MAIL_DKIM_ED25519:
            raise SkipTest(NO_MAIL_DKIM if not HAVE_MAIL_DKIM else NO_MAIL_DKIM_ED25519)
        self.assertEqual(mail_dkim_verify(self.signed(ED_KEY), ED_KEY), "pass")

    def test_removed_and_rewritten_fields_are_what_is_signed(self) -> None:
        transformations = [
            RemoveHeader("X-Internal"),
            RewriteAddress({"@example.org": "@example.net"}, scope="headers"),
        ]
        message = self.signed(transformations=transformations)
        self.assertNotIn(b"X-Internal", message)
        self.assertIn(b"To: bob@example.net,  carol@example.net\r\n", message)
        self.assertVerifies(message)

    def test_from_rewritten_into_the_signing_domain(self) -> None:
        data = MESSAGE.replace(b"alice@example.com", b"alice@old.example")
        rewrite = RewriteAddress({"@old.example": "@example.com"}, scope="headers")
        message = self.signed(data=data, transformations=[rewrite])
        self.assertIn(b"From: Alice <alice@example.com>\r\n", message)
        self.assertVerifies(message)

    def test_big_spilled_body(self) -> None:
        body = (b"line with  spaces and \xe9 8-bit\t \r\n" * 8000) + b"no final newline"
        item = self.queued(self.processor(), HEAD + body, spill=True)
        message = self.composed(item)
        self.assertEqual(message, item.head + body)
        self.assertVerifies(message)


class TamperTests(SigningChainCase):
    def test_second_from_after_signing_fails(self) -> None:
        message = self.signed()
        self.assertVerifies(message)
        above = message.replace(b"From: Alice", b"From: Mallory <m@evil.example>\r\nFrom: Alice", 1)
        self.assertFailsVerification(above)
        below = message.replace(b"X-Internal:", b"From: m@evil.example\r\nX-Internal:", 1)
        self.assertFailsVerification(below)

    def test_changed_subject_fails(self) -> None:
        message = self.signed()
        self.assertFailsVerification(message.replace(b"Quarterly", b"Annual", 1))

    def test_changed_body_fails(self) -> None:
        message = self.signed()
        self.assertFailsVerification(message.replace(b"Hello  Bob", b"Hello  Rob", 1))


class AmbiguousFromTests(SigningChainCase):
    CASES = {
        "two From fields": HEAD.replace(
            b"From: Alice <alice@example.com>\r\n",
            b"From: Alice <alice@example.com>\r\nFrom: Mallory <m@evil.example>\r\n",
        ),
        "two mailboxes": HEAD.replace(
            b"From: Alice <alice@example.com>", b"From: Alice <alice@example.com>, m@evil.example"
        ),
        "two addresses in one mailbox": HEAD.replace(
            b"From: Alice <alice@example.com>", b"From: alice@example.com <m@evil.example>"
        ),
        "a group": HEAD.replace(
            b"From: Alice <alice@example.com>", b"From: friends: alice@example.com, m@evil.example;"
        ),
        "no From": HEAD.replace(b"From: Alice <alice@example.com>\r\n", b""),
        "another domain": HEAD.replace(b"alice@example.com", b"alice@other.example"),
        "a look-alike subdomain": HEAD.replace(b"alice@example.com", b"alice@example.com.evil.example"),
    }

    def test_not_signed(self) -> None:
        for label, head in self.CASES.items():
            with self.subTest(case=label):
                item = self.queued(self.processor(), head + BODY)
                assert item.head is not None  # X-Gateway was added: the head is set, without a signature
                self.assertNotIn(b"DKIM-Signature", item.head)
                self.assertEqual(
                    self.composed(item),
                    head[:-2] + b"X-Gateway: mx.example.com " + item.id.encode() + b"\r\n\r\n" + BODY,
                )

    def test_not_signed_and_otherwise_unchanged(self) -> None:
        item = self.queued(self.processor(transformations=[]), self.CASES["two From fields"] + BODY)
        self.assertIsNone(item.head)
        self.assertEqual(self.composed(item), self.CASES["two From fields"] + BODY)

    def test_from_added_by_a_transformation_is_seen(self) -> None:
        # Signing looks at the block as transformations left it: a From they add makes it ambiguous.
        item = self.queued(self.processor(transformations=[AddHeader("From", "other@example.com")]))
        assert item.head is not None
        self.assertNotIn(b"DKIM-Signature", item.head)


class TwoKeysTests(SigningChainCase):
    """An RSA and an Ed25519 key for one domain each sign the same message (RFC 8463 §6); the same key given
    twice signs once."""

    def test_rsa_and_ed25519_both_sign(self) -> None:
        if NO_NACL:
            raise SkipTest(NO_NACL)
        import dkim

        ed = DkimSigner(DOMAIN, "ed", private_key_pem(ED_KEY), now=lambda: NOW)
        processor = EmailProcessor(
            self.queue,
            self.clock.seconds,
            signers=[DkimSign([(DOMAIN, signer(RSA_KEY)), (DOMAIN, ed), (DOMAIN, signer(RSA_KEY))])],
        )
        data = self.composed(self.queued(processor))
        self.assertEqual(data.count(b"DKIM-Signature: "), 2)
        records = {
            f"{SELECTOR}._domainkey.{DOMAIN}.".encode(): dns_txt_value(RSA_KEY).encode(),
            f"ed._domainkey.{DOMAIN}.".encode(): dns_txt_value(ED_KEY).encode(),
        }
        verifier = dkim.DKIM(data)
        results = [
            verifier.verify(idx=i, dnsfunc=lambda name, timeout=5: records.get(name)) for i in range(2)
        ]
        self.assertEqual(results, [True, True])
        self.assertEqual(
            sorted(tag(f, b"a") for f in data.split(b"\r\n\r\n")[0].split(b"DKIM-Signature: ")[1:]),
            [b"ed25519-sha256", b"rsa-sha256"],
        )


class InternationalisedFromTests(SigningChainCase):
    """EAI mail (RFC 6532, SMTPUTF8) is signed as RFC 8616 says: header fields are signed as the raw UTF-8
    they are, ``d=`` holds the signing domain in A-labels, and the From domain is matched in A-label form
    whichever form the configuration or the message writes it in."""

    def outcome(self, from_field: str, configured: str, key: PrivateKey = RSA_KEY) -> QueueItem:
        head = HEAD.replace(b"From: Alice <alice@example.com>", f"From: {from_field}".encode())
        signer = DkimSigner(configured, SELECTOR, private_key_pem(key), now=lambda: NOW)
        processor = EmailProcessor(self.queue, self.clock.seconds, signers=[DkimSign([(configured, signer)])])
        envelope = Envelope("a@sender.test", ["bob@example.org"], mail_params={"SMTPUTF8": ""})
        data = head + BODY
        item: QueueItem = self.successResultOf(
            processor.process(envelope, SpooledMessage(len(data), data=data))
        )
        return item

    def eai(self, sender: str, domain: str, configured: str, key: PrivateKey = RSA_KEY) -> bytes:
        item = self.outcome(sender, configured, key)
        assert item.head is not None, "not signed"
        data = self.composed(item)
        self.assertTrue(data.startswith(b"DKIM-Signature: "))
        self.assertIn(f"From: {sender}\r\n".encode(), data)  # as received: raw UTF-8, no encoded-word
        self.assertEqual(tag(data, b"d"), domain.encode())
        return data

    def assertVerifiesAt(self, message: bytes, domain: str, key: PrivateKey = RSA_KEY) -> None:
        self.assertTrue(dkimpy_verify(message, key, domain), "dkimpy did not verify the message")
        if HAVE_MAIL_DKIM and (key is RSA_KEY or HAVE_MAIL_DKIM_ED25519):
            self.assertEqual(mail_dkim_verify(message, key, name=f"{SELECTOR}._domainkey.{domain}"), "pass")

    def test_utf8_local_part_is_signed(self) -> None:
        message = self.eai("Jürgen <jürgen@sender.test>", "sender.test", "sender.test")
        self.assertVerifiesAt(message, "sender.test")
        # The UTF-8 From is covered: changing one of its octets breaks the signature.
        changed = message.replace("jürgen@".encode(), b"jurgen@", 1)
        self.assertFalse(dkimpy_verify(changed, RSA_KEY, "sender.test"))

    def test_utf8_local_part_ed25519(self) -> None:
        if NO_NACL:
            raise SkipTest(NO_NACL)
        message = self.eai("jürgen@sender.test", "sender.test", "sender.test", ED_KEY)
        self.assertVerifiesAt(message, "sender.test", ED_KEY)

    def test_idn_from_domain(self) -> None:
        # The signing domain configured as U-labels or as A-labels, the From written either way.
        for configured in ("bücher.test", "xn--bcher-kva.test", "BÜCHER.test"):
            for sender in ("user@bücher.test", "Ütz <ütz@bücher.test>", "user@xn--bcher-kva.test"):
                with self.subTest(configured=configured, sender=sender):
                    message = self.eai(sender, "xn--bcher-kva.test", configured)
                    self.assertVerifiesAt(message, "xn--bcher-kva.test")

    def test_ambiguous_internationalised_from_not_signed(self) -> None:
        for label, field in {
            "two From fields": "jürgen@sender.test\r\nFrom: Mallory <m@evil.example>",
            "two mailboxes": "jürgen@sender.test, m@evil.example",
            "two addresses in one mailbox": "jürgen@sender.test <m@evil.example>",
            "parsers disagree": "jürgen@sender.test)<m@evil.example>",
            "a bidi override": "j\u202egrü@sender.test",
        }.items():
            with self.subTest(case=label):
                self.assertIsNone(self.outcome(field, "sender.test").head)
