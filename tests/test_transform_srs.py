"""SRS (srsForward, srsReverse): the addresses are those of the reference algorithm, computed here from the
spec with hmac/base64 directly and checked against postsrsd's published vectors; then the transformations on
drafts, their configuration, and a forwarded message and its bounce through the processing chain."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import os
import re
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from dcrouter.config.load import ConfigError, load_options
from dcrouter.interfaces import ITransformation
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.headers import read_header_block
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.processing.build import build_chain
from dcrouter.processing.message import Draft, Refusal
from dcrouter.processing.processor import EmailProcessor
from dcrouter.processing.transforms.srs import SrsForward, SrsReverse, SrsScheme
from dcrouter.queue.item import QueueItem
from dcrouter.queue.memory import MemoryQueue

DAY = 86400
NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
SRS_DOMAIN = "srs.example.net"
SECRET = "correct horse battery staple"
OLD_SECRET = "the secret of last quarter"
MESSAGE = b"From: Alice <alice@example.org>\r\nTo: bob@example.com\r\nSubject: hi\r\n\r\nHello Bob.\r\n"


def reference_hash(secret: str, *fields: str) -> str:
    """Shevek's SRS hash: HMAC-SHA1 of the fields lower-cased and concatenated, base64, first 4 characters."""
    data = "".join(fields).lower().encode()
    return base64.b64encode(hmac.new(secret.encode(), data, hashlib.sha1).digest()).decode()[:4]


def reference_stamp(when: float) -> str:
    """Days since the epoch modulo 1024 as two base32 characters: the top 10 bits of 40 bits of base32."""
    days = int(when // DAY) % 1024
    return base64.b32encode((days << 30).to_bytes(5, "big")).decode()[:2]


def draft(sender: str, *recipients: str) -> Draft:
    block, offset = read_header_block(io.BytesIO(MESSAGE), 64 * 1024)
    return Draft(
        queue_id="Q1",
        envelope=Envelope(sender, list(recipients)),
        source=SpooledMessage(len(MESSAGE), data=MESSAGE),
        headers=block,
        body_offset=offset,
        run_in_thread=defer.maybeDeferred,
    )


class ReferenceTests(SynchronousTestCase):
    """The reference helpers themselves, against values worked out by hand from the spec."""

    def test_stamp(self) -> None:
        self.assertEqual(reference_stamp(0), "AA")
        self.assertEqual(reference_stamp(DAY * 33), "BB")  # 33 = 1 * 32 + 1
        self.assertEqual(reference_stamp(DAY * 1023), "77")
        self.assertEqual(reference_stamp(DAY * 1024), "AA")  # wraps


class KnownAnswerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.forward = SrsForward(SRS_DOMAIN, [SECRET], now=self.clock.seconds)

    def test_srs0(self) -> None:
        stamp = reference_stamp(NOW)
        # The address keeps the case it came with; the hash is over the lower-cased fields.
        hashed = reference_hash(SECRET, stamp, "Example.ORG", "Alice.Smith")
        self.assertEqual(
            self.forward.rewrite("Alice.Smith@Example.ORG"),
            f"SRS0={hashed}={stamp}=Example.ORG=Alice.Smith@{SRS_DOMAIN}",
        )

    def test_timestamps_across_the_wrap(self) -> None:
        for day in (0, 31, 32, 1023, 1024, 19_675):
            when = day * DAY + 5
            scheme = SrsScheme(SRS_DOMAIN, [SECRET], now=lambda when=when: when)
            stamp = scheme.forward("a@example.org").split("=")[2]
            self.assertEqual(stamp, reference_stamp(when), day)

    def test_srs0_of_another_forwarder_becomes_srs1(self) -> None:
        theirs = "SRS0=AbCd=XY=example.org=alice@first.example"
        hashed = reference_hash(SECRET, "first.example", "=AbCd=XY=example.org=alice")
        self.assertEqual(
            self.forward.rewrite(theirs),
            f"SRS1={hashed}=first.example==AbCd=XY=example.org=alice@{SRS_DOMAIN}",
        )

    def test_srs1_of_another_forwarder_is_resigned(self) -> None:
        theirs = "SRS1=Wxyz=first.example==AbCd=XY=example.org=alice@second.example"
        hashed = reference_hash(SECRET, "first.example", "=AbCd=XY=example.org=alice")
        self.assertEqual(
            self.forward.rewrite(theirs),
            f"SRS1={hashed}=first.example==AbCd=XY=example.org=alice@{SRS_DOMAIN}",
        )

    def test_postsrsd_vectors(self) -> None:
        # Published by postsrsd (tests/blackbox/socketmap.py, tests/unit/test_srs2.c): secret "tops3cr3t",
        # SRS domain example.com, 2020-01-01 00:01:00 UTC.
        scheme = SrsScheme("example.com", ["tops3cr3t"], now=lambda: 1577836860.0)
        for sender, expected in [
            ("test@otherdomain.com", "SRS0=vmyz=2W=otherdomain.com=test@example.com"),
            ("SRS0=opaque+string@otherdomain.com", "SRS1=chaI=otherdomain.com==opaque+string@example.com"),
            (
                "SRS1=X=thirddomain.com==opaque+string@otherdomain.com",
                "SRS1=JIBX=thirddomain.com==opaque+string@example.com",
            ),
        ]:
            self.assertEqual(scheme.forward(sender), expected)
        for address, expected in [
            ("SRS0=XjO9=2V=otherdomain.com=test@example.com", "test@otherdomain.com"),
            ("srs0=xjo9=2v=otherdomain.com=test@example.com", "test@otherdomain.com"),
            ("SRS0=XJO9=2V=OTHERDOMAIN.COM=TEST@EXAMPLE.COM", "TEST@OTHERDOMAIN.COM"),
            ("SRS1=JIBX=thirddomain.com==opaque+string@example.com", "SRS0=opaque+string@thirddomain.com"),
        ]:
            self.assertEqual(scheme.reverse(address), expected)
        for address, reason in [
            ("SRS0=te87=T7=otherdomain.com=test@example.com", "expired"),  # six months old
            ("SRS0=VcIb=7N=otherdomain.com=test@example.com", "expired"),  # six months ahead
            ("SRS0=FAKE=2V=otherdomain.com=test@example.com", "forged"),
            ("SRS0=@example.com", "forged"),
            ("SRS0=XjO9@example.com", "forged"),
            ("SRS0=XjO9=2V@example.com", "forged"),
            ("SRS0=XjO9=2V=otherdomain.com@example.com", "forged"),
        ]:
            with self.assertRaises(ValueError) as caught:
                scheme.reverse(address)
            self.assertEqual(getattr(caught.exception, "reason", None), reason, address)


class TransformationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.forward = SrsForward(
            SRS_DOMAIN, [SECRET], local_domains=["example.com", "*.corp.example"], now=self.clock.seconds
        )
        self.reverse = SrsReverse(SRS_DOMAIN, [SECRET], now=self.clock.seconds)

    def forwarded(self, sender: str) -> str:
        message = draft(sender, "bob@elsewhere.example")
        self.forward.apply(message)
        self.assertEqual(message.envelope.recipients, ["bob@elsewhere.example"])
        self.assertFalse(message.headers.changed)  # MAIL FROM only, never a header
        return message.envelope.mail_from

    def bounced(self, *recipients: str) -> list[str]:
        message = draft("", *recipients)
        self.reverse.apply(message)
        self.assertEqual(message.envelope.mail_from, "")
        return message.envelope.recipients

    def refused(self, *recipients: str) -> Refusal:
        message = draft("", *recipients)
        with self.assertRaises(Refusal) as caught:
            self.reverse.apply(message)
        reply = caught.exception.reply
        self.assertEqual((reply.code, reply.enhanced, reply.text), (550, "5.1.1", "Invalid SRS address"))
        return caught.exception

    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(ITransformation, self.forward))
        self.assertTrue(verifyObject(ITransformation, self.reverse))

    def test_round_trip(self) -> None:
        address = self.forwarded("alice@example.org")
        self.assertTrue(address.startswith("SRS0="), address)
        self.assertTrue(address.endswith("@" + SRS_DOMAIN), address)
        self.assertEqual(self.bounced(address), ["alice@example.org"])

    def test_round_trip_of_unusual_local_parts(self) -> None:
        for sender in ("a=b@example.org", "x+tag@example.org", "o'hara@example.org", "jörg@example.org"):
            self.assertEqual(self.bounced(self.forwarded(sender)), [sender])

    def test_srs1_from_another_forwarder(self) -> None:
        first = SrsScheme("first.example", ["the first forwarder's key"], now=self.clock.seconds)
        theirs = first.forward("alice@example.org")
        ours = self.forwarded(theirs)
        self.assertTrue(ours.startswith("SRS1="), ours)
        # The bounce goes back to the first forwarder, which alone can check its SRS0 address.
        [back] = self.bounced(ours)
        self.assertEqual(back, theirs)
        self.assertEqual(first.reverse(back), "alice@example.org")

    def test_case_does_not_matter(self) -> None:
        address = self.forwarded("alice@example.org")
        self.assertEqual(self.bounced(address.upper()), ["ALICE@EXAMPLE.ORG"])
        self.assertEqual(self.bounced(address.lower()), ["alice@example.org"])

    def test_tampered_hash(self) -> None:
        address = self.forwarded("alice@example.org")
        hashed = address.split("=")[1]
        other = ("B" if hashed[0].lower() == "a" else "A") + hashed[1:]  # differs in any case
        refusal = self.refused(address.replace(hashed, other, 1))
        self.assertEqual(refusal.reason, "forged SRS address")

    def test_tampered_address(self) -> None:
        address = self.forwarded("alice@example.org")
        self.refused(address.replace("=alice@", "=mallory@"))
        self.refused(address.replace("=example.org=", "=evil.example="))

    def test_one_bad_recipient_refuses_the_message(self) -> None:
        address = self.forwarded("alice@example.org")
        self.refused(address, "SRS0=AAAA=AA=example.org=bob@" + SRS_DOMAIN)

    def test_expired(self) -> None:
        address = self.forwarded("alice@example.org")
        self.clock.advance(21 * DAY)
        self.assertEqual(self.bounced(address), ["alice@example.org"])
        self.clock.advance(DAY)
        refusal = self.refused(address)
        self.assertEqual(refusal.reason, "expired SRS address")

    def test_from_the_future(self) -> None:
        address = self.forwarded("alice@example.org")
        self.clock.advance(-DAY)
        self.refused(address)

    def test_max_age(self) -> None:
        address = self.forwarded("alice@example.org")
        self.clock.advance(3 * DAY)
        reverse = SrsReverse(SRS_DOMAIN, [SECRET], max_age_days=2, now=self.clock.seconds)
        with self.assertRaises(Refusal):
            reverse.apply(draft("", address))

    def test_key_rotation(self) -> None:
        old = SrsForward(SRS_DOMAIN, [OLD_SECRET], now=self.clock.seconds).rewrite("alice@example.org")
        rotated = SrsReverse(SRS_DOMAIN, [SECRET, OLD_SECRET], now=self.clock.seconds)
        message = draft("", old)
        rotated.apply(message)
        self.assertEqual(message.envelope.recipients, ["alice@example.org"])
        # The first secret signs ...
        new = SrsForward(SRS_DOMAIN, [SECRET, OLD_SECRET], now=self.clock.seconds).rewrite(
            "alice@example.org"
        )
        self.assertEqual(new.split("=")[1], reference_hash(SECRET, new.split("=")[2], "example.org", "alice"))
        # ... and once the old one is dropped, its addresses stop working.
        self.refused(old)

    def test_null_sender_untouched(self) -> None:
        self.assertEqual(self.forwarded(""), "")

    def test_local_domains_untouched(self) -> None:
        for sender in ("carol@example.com", "carol@EXAMPLE.com", "dave@mx.corp.example", "x@" + SRS_DOMAIN):
            self.assertEqual(self.forwarded(sender), sender)
        # A wildcard covers sub-domains only.
        self.assertTrue(self.forwarded("eve@corp.example").startswith("SRS0="))

    def test_addresses_it_cannot_carry_untouched(self) -> None:
        for sender in ('"john doe"@example.org', "user@[192.0.2.1]", "no-domain"):
            self.assertEqual(self.forwarded(sender), sender)

    def test_other_recipients_untouched(self) -> None:
        address = self.forwarded("alice@example.org")
        self.assertEqual(
            self.bounced("postmaster@" + SRS_DOMAIN, "SRS0=x@other.example", address, "alice@example.org"),
            ["postmaster@" + SRS_DOMAIN, "SRS0=x@other.example", "alice@example.org"],
        )

    def test_malformed_at_the_srs_domain_refused(self) -> None:
        for local in ("SRS0=", "SRS0=abcd", "SRS0+abcd=AA=example.org", "SRS1=abcd=host", "srs1-"):
            self.refused(f"{local}@{SRS_DOMAIN}")


def smtp_config(**extra: Any) -> dict[str, Any]:
    return {
        "smtpConfig": {
            "ports": [2525],
            "hostname": "mx.example.com",
            "implicitTlsPorts": [],
            "submissionPorts": [],
            "defaultServer": "127.0.0.1",
            **extra,
        }
    }


def transformation_errors(*entries: dict[str, Any]) -> list[str]:
    try:
        load_options(smtp_config(transformations=list(entries)))
    except ConfigError as e:
        return e.errors
    return []


class ConfigTests(SynchronousTestCase):
    def test_valid(self) -> None:
        options = load_options(
            smtp_config(
                transformations=[
                    {"type": "srsReverse", "srsDomain": SRS_DOMAIN, "secrets": [SECRET], "maxAgeDays": 7},
                    {
                        "type": "srsForward",
                        "srsDomain": SRS_DOMAIN,
                        "secrets": [SECRET, OLD_SECRET],
                        "localDomains": ["example.com", "*.example.com"],
                    },
                ]
            )
        ).options
        assert options.smtp_config is not None
        reverse, forward = options.smtp_config.transformations
        self.assertEqual((reverse.srs_domain, reverse.max_age_days), (SRS_DOMAIN, 7))
        self.assertEqual(forward.secrets, [SECRET, OLD_SECRET])
        self.assertEqual(forward.local_domains, ["example.com", "*.example.com"])
        chain = build_chain(options.smtp_config, Clock())
        self.assertEqual([t.name for t in chain.transformations], ["srsReverse", "srsForward"])

    def test_missing_secrets_and_domain(self) -> None:
        self.assertEqual(
            transformation_errors({"type": "srsForward"}),
            [
                "smtpConfig.transformations[0].srsDomain: is required by a 'srsForward' transformation",
                "smtpConfig.transformations[0].secrets: is required by a 'srsForward' transformation",
            ],
        )
        self.assertEqual(
            transformation_errors({"type": "srsReverse", "srsDomain": SRS_DOMAIN, "secrets": []}),
            ["smtpConfig.transformations[0].secrets: is required by a 'srsReverse' transformation"],
        )

    def test_short_secret(self) -> None:
        errors = transformation_errors(
            {"type": "srsReverse", "srsDomain": SRS_DOMAIN, "secrets": [SECRET, "hunter2"]}
        )
        self.assertEqual(
            errors, ["smtpConfig.transformations[0].secrets[1]: must be at least 16 characters (it has 7)"]
        )
        self.assertNotIn("hunter2", "".join(errors))  # a secret is never echoed

    def test_keys_of_another_type(self) -> None:
        base = {"srsDomain": SRS_DOMAIN, "secrets": [SECRET]}
        self.assertEqual(
            transformation_errors(
                {"type": "srsReverse", **base, "localDomains": ["example.com"]},
                {"type": "srsForward", **base, "maxAgeDays": 3, "header": "X-A"},
                {"type": "addHeader", "header": "X-A", "value": "1", "srsDomain": SRS_DOMAIN},
            ),
            [
                "smtpConfig.transformations[0].localDomains: does not apply to a 'srsReverse' transformation",
                "smtpConfig.transformations[1].header: does not apply to a 'srsForward' transformation",
                "smtpConfig.transformations[1].maxAgeDays: does not apply to a 'srsForward' transformation",
                "smtpConfig.transformations[2].srsDomain: does not apply to a 'addHeader' transformation",
            ],
        )

    def test_bad_values(self) -> None:
        errors = transformation_errors(
            {"type": "srsReverse", "srsDomain": "not a domain", "secrets": [SECRET], "maxAgeDays": 1024},
            {"type": "srsForward", "srsDomain": SRS_DOMAIN, "secrets": [SECRET], "localDomains": ["*"]},
        )
        self.assertEqual(
            errors,
            [
                "smtpConfig.transformations[0].srsDomain: not a valid host name: 'not a domain'",
                "smtpConfig.transformations[0].maxAgeDays: must be 1 to 1023 days: 1024",
                "smtpConfig.transformations[1].localDomains[0]: not a domain name or '*.' wildcard: '*'",
            ],
        )


class ChainTests(TestCase):
    """A message forwarded by the gateway and its bounce, through EmailProcessor and the queue."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        srs = {"srsDomain": SRS_DOMAIN, "secrets": [SECRET]}
        config = smtp_config(
            transformations=[
                {"type": "srsReverse", **srs},
                # bob@example.com forwards his mail elsewhere.
                {"type": "rewriteAddress", "map": {"bob@example.com": "bob@elsewhere.example"}},
                {"type": "srsForward", **srs, "localDomains": ["example.com"]},
            ]
        )
        smtp = load_options(config).options.smtp_config
        assert smtp is not None
        self.queue = MemoryQueue(clock=self.clock, spool_directory=self.directory)
        self.successResultOf(self.queue.load())
        self.processor = EmailProcessor(
            self.queue, self.clock.seconds, **build_chain(smtp, self.clock).options()
        )

    def process(self, envelope: Envelope) -> defer.Deferred:
        return self.processor.process(envelope, SpooledMessage(len(MESSAGE), data=MESSAGE))

    def test_forwarded_then_bounced(self) -> None:
        item: QueueItem = self.successResultOf(
            self.process(Envelope("alice@example.org", ["bob@example.com"]))
        )
        self.assertEqual(item.envelope.recipients, ["bob@elsewhere.example"])
        sender = item.envelope.mail_from
        match = re.fullmatch(r"SRS0=([^=]{4})=([A-Z2-7]{2})=example\.org=alice@srs\.example\.net", sender)
        assert match is not None, sender
        self.assertEqual(match.group(2), reference_stamp(NOW))
        self.assertEqual(match.group(1), reference_hash(SECRET, match.group(2), "example.org", "alice"))
        self.assertEqual(self.successResultOf(self.queue.get(item.id)).envelope.mail_from, sender)

        self.clock.advance(2 * DAY)
        bounce: QueueItem = self.successResultOf(self.process(Envelope("", [sender])))
        self.assertEqual((bounce.envelope.mail_from, bounce.envelope.recipients), ("", ["alice@example.org"]))

    def test_forged_bounce_refused(self) -> None:
        failure = self.failureResultOf(
            self.process(Envelope("", [f"SRS0=AAAA=AA=example.org=victim@{SRS_DOMAIN}"])), Refusal
        )
        self.assertEqual(failure.value.reply.code, 550)
        self.assertEqual(failure.value.reply.enhanced, "5.1.1")

    def test_the_gateways_own_bounce_goes_to_the_original_sender(self) -> None:
        """A DSN the gateway makes for forwarded mail (``submit_local``: no scanning, no other change) is
        reversed like a remote bounce; one to a forged SRS address is sent as addressed."""
        item: QueueItem = self.successResultOf(
            self.process(Envelope("alice@example.org", ["bob@example.com"]))
        )
        dsn = Envelope("", [item.envelope.mail_from])
        queued: QueueItem = self.successResultOf(
            self.processor.submit_local(
                dsn, SpooledMessage(len(MESSAGE), data=MESSAGE), "DSN0000000000000001", priority=0
            )
        )
        self.assertEqual(queued.envelope.recipients, ["alice@example.org"])
        self.assertIsNone(queued.head)
        forged = f"SRS0=AAAA=AA=example.org=victim@{SRS_DOMAIN}"
        queued = self.successResultOf(
            self.processor.submit_local(
                Envelope("", [forged]),
                SpooledMessage(len(MESSAGE), data=MESSAGE),
                "DSN0000000000000002",
                priority=0,
            )
        )
        self.assertEqual(queued.envelope.recipients, [forged])
