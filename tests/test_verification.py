"""Inbound verification (smtpConfig.verification) against a real twisted.names authoritative server on
127.0.0.1 serving the test zone (SPF TXT, DKIM keys, _dmarc), with messages signed here by dkimpy with keys
made here: the Authentication-Results field, and what the chain does (queue, 550, quarantine, 451)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import dkim
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.names import dns
from twisted.trial.unittest import TestCase

from dcrouter.config import ConfigError, load_options
from dcrouter.config.smtp import SmtpConfig
from dcrouter.config.verification import ArcSignConfig, DomainPolicyConfig, VerificationConfig
from dcrouter.mail.dkimkeys import dns_txt_value, generate_private_key, private_key_pem
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.processing.build import build_chain
from dcrouter.processing.message import Refusal
from dcrouter.processing.processor import EmailProcessor
from dcrouter.processing.verification.checks import organizational_domain, parse_dmarc_record
from dcrouter.processing.verification.dns import BlockingDns, DnsTemporaryError
from dcrouter.processing.verification.header import authserv_id
from dcrouter.queue.files import message_reader
from dcrouter.queue.item import QueueItem, QueueItemStatus
from dcrouter.queue.memory import MemoryQueue
from tests.dns_zone import SilentServer, ZoneAuthority, ZoneServer, resolver, txt

GOOD_CLIENT = "127.0.0.2"
OTHER_CLIENT = "127.0.0.9"
AUTHSERV = "mx.example.test"


def _message(sender: str, subject: str = "verification", extra: bytes = b"") -> bytes:
    return (
        extra
        + f"From: Alice <{sender}>\r\n".encode()
        + b"To: Bob <bob@example.test>\r\n"
        + f"Subject: {subject}\r\n".encode()
        + b"Date: Mon, 07 Dec 2026 12:00:00 +0000\r\n"
        + b"Message-ID: <1@test>\r\n"
        + b"\r\n"
        + b"Hello Bob,\r\nthis is a test.\r\n"
    )


class VerificationCase(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.key = generate_private_key("rsa", 2048)
        self.pem = private_key_pem(self.key)
        self.other_key = generate_private_key("rsa", 2048)
        public = dns_txt_value(self.key)
        records = [
            ("good.test", txt(f"v=spf1 ip4:{GOOD_CLIENT} -all")),
            ("sel._domainkey.good.test", txt(public)),
            ("_dmarc.good.test", txt("v=DMARC1; p=reject; sp=quarantine")),
            ("client.good.test", txt(f"v=spf1 ip4:{GOOD_CLIENT} -all")),
            ("soft.test", txt("v=spf1 ~all")),
            ("_dmarc.soft.test", txt("v=DMARC1; p=quarantine")),
            ("sel._domainkey.soft.test", txt(public)),
            ("none.test", dns.Record_A("127.0.0.1")),
            ("relaxed.test", txt("v=spf1 -all")),
            ("_dmarc.relaxed.test", txt("v=DMARC1; p=none")),
        ]
        self.zone = ZoneServer(reactor, ZoneAuthority("test", records))
        self.addCleanup(self.zone.stop)
        self.resolver = resolver(reactor, self.zone.port)
        self.spool = self.mktemp()
        self.queue = MemoryQueue(clock=reactor, spool_directory=self.spool)
        self.successResultOf(self.queue.load())

    def sign(self, message: bytes, domain: str = "good.test", key: bytes | None = None) -> bytes:
        signature = dkim.sign(
            message,
            b"sel",
            domain.encode(),
            key or self.pem,
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        )
        return signature + message

    def processor(self, resolver: Any = None, **verification: Any) -> EmailProcessor:
        config = SmtpConfig(
            ports=[25],
            hostname=AUTHSERV,
            relay_networks=["10.0.0.0/8"],
            verification=VerificationConfig(enabled=True, **verification),
        )
        chain = build_chain(config, reactor, resolver or self.resolver)
        return EmailProcessor(
            self.queue, reactor.seconds, reactor=reactor, threadpool=None, **chain.options()
        )

    def envelope(self, sender: str, ip: str = GOOD_CLIENT, **changes: Any) -> Envelope:
        base = Envelope(
            mail_from=sender,
            recipients=["bob@example.test"],
            helo="client.good.test",
            peer_host=ip,
            peer_port=40000,
        )
        return dataclasses.replace(base, **changes)

    async def submit(self, processor: EmailProcessor, message: bytes, envelope: Envelope) -> QueueItem:
        item: QueueItem = await processor.process(envelope, SpooledMessage(len(message), data=message))
        return item

    async def stored(self, item: QueueItem) -> bytes:
        stream = await self.queue.open_body(item.id)
        with message_reader(item.head, stream, item.body_offset) as reader:
            data: bytes = reader.read()
        return data

    async def results(self, processor: EmailProcessor, message: bytes, envelope: Envelope) -> str:
        """The Authentication-Results value the queued message carries (unfolded), checking it is the
        first field."""
        item = await self.submit(processor, message, envelope)
        data = await self.stored(item)
        self.assertTrue(data.startswith(b"Authentication-Results: "), data[:200])
        head = data.split(b"\r\n\r\n", 1)[0].decode()
        first = head.split("\r\n")
        value = first[0].partition(":")[2]
        for line in first[1:]:
            if not line[:1].isspace():
                break
            value += line
        return " ".join(value.split())

    async def refusal(self, processor: EmailProcessor, message: bytes, envelope: Envelope) -> Refusal:
        try:
            await self.submit(processor, message, envelope)
        except Refusal as refused:
            return refused
        self.fail("the message was accepted")


class ResultTests(VerificationCase):
    def test_pass(self) -> Deferred[None]:
        """SPF passes for MAIL FROM and HELO, the signature verifies, DMARC passes (aligned both ways)."""

        async def go() -> None:
            message = self.sign(_message("alice@good.test"))
            value = await self.results(self.processor(), message, self.envelope("alice@good.test"))
            self.assertTrue(value.startswith(f"{AUTHSERV}; spf=pass smtp.mailfrom=good.test;"), value)
            self.assertIn("spf=pass smtp.helo=client.good.test", value)
            self.assertIn("dkim=pass header.d=good.test header.s=sel header.b=", value)
            self.assertIn("dmarc=pass (p=reject) header.from=good.test", value)
            self.assertIn("arc=none", value)

        return Deferred.fromCoroutine(go())

    def test_fail_tagged_by_default(self) -> Deferred[None]:
        """From another address, unsigned: SPF fail, DMARC fail under p=reject; the default only tags."""

        async def go() -> None:
            envelope = self.envelope("alice@good.test", ip=OTHER_CLIENT)
            value = await self.results(self.processor(), _message("alice@good.test"), envelope)
            self.assertIn("spf=fail smtp.mailfrom=good.test", value)
            self.assertIn("dkim=none", value)
            self.assertIn("dmarc=fail (p=reject) header.from=good.test", value)

        return Deferred.fromCoroutine(go())

    def test_dmarc_reject_refused(self) -> Deferred[None]:
        async def go() -> None:
            envelope = self.envelope("alice@good.test", ip=OTHER_CLIENT)
            refused = await self.refusal(
                self.processor(on_dmarc_reject="reject"), _message("alice@good.test"), envelope
            )
            self.assertEqual((refused.reply.code, refused.reply.enhanced), (550, "5.7.1"))
            self.assertIn("DMARC policy of good.test (p=reject)", refused.reply.text)

        return Deferred.fromCoroutine(go())

    def test_softfail_quarantined(self) -> Deferred[None]:
        """SPF ~all gives softfail; DMARC fails under p=quarantine and the message is quarantined."""

        async def go() -> None:
            processor = self.processor(on_dmarc_quarantine="quarantine")
            item = await self.submit(processor, _message("alice@soft.test"), self.envelope("alice@soft.test"))
            self.assertEqual(item.status, QueueItemStatus.QUARANTINED)
            self.assertIn("DMARC policy of soft.test (p=quarantine)", item.last_error or "")

        return Deferred.fromCoroutine(go())

    def test_softfail_result(self) -> Deferred[None]:
        async def go() -> None:
            value = await self.results(
                self.processor(), _message("alice@soft.test"), self.envelope("a@soft.test")
            )
            self.assertIn("spf=softfail smtp.mailfrom=soft.test", value)
            self.assertIn("dmarc=fail (p=quarantine) header.from=soft.test", value)

        return Deferred.fromCoroutine(go())

    def test_none(self) -> Deferred[None]:
        """A domain that publishes nothing: spf=none, dkim=none, dmarc=none; accepted whatever the policy."""

        async def go() -> None:
            processor = self.processor(on_dmarc_reject="reject", on_dmarc_quarantine="reject")
            value = await self.results(processor, _message("a@none.test"), self.envelope("a@none.test"))
            self.assertIn("spf=none smtp.mailfrom=none.test", value)
            self.assertIn("dkim=none", value)
            self.assertIn("dmarc=none header.from=none.test", value)

        return Deferred.fromCoroutine(go())

    def test_dkim_alone_aligns(self) -> Deferred[None]:
        """SPF fails (another client) but the good.test signature passes: DMARC passes, not refused."""

        async def go() -> None:
            processor = self.processor(on_dmarc_reject="reject")
            envelope = self.envelope("bounces@none.test", ip=OTHER_CLIENT)
            value = await self.results(processor, self.sign(_message("alice@good.test")), envelope)
            self.assertIn("dkim=pass header.d=good.test", value)
            self.assertIn("dmarc=pass", value)

        return Deferred.fromCoroutine(go())

    def test_every_signature_reported(self) -> Deferred[None]:
        """Two signatures: soft.test's made with a key that is not the published one fails; good.test's
        passes; both are reported, top first."""

        async def go() -> None:
            message = self.sign(_message("alice@good.test"))
            message = self.sign(message, "soft.test", private_key_pem(self.other_key))
            value = await self.results(self.processor(), message, self.envelope("alice@good.test"))
            self.assertRegex(
                value,
                r"dkim=fail \(signature did not verify\) header.d=soft.test .*dkim=pass header.d=good.test",
            )

        return Deferred.fromCoroutine(go())

    def test_altered_body_fails_dkim(self) -> Deferred[None]:
        async def go() -> None:
            message = self.sign(_message("alice@good.test")).replace(b"a test", b"a forgery")
            value = await self.results(self.processor(), message, self.envelope("alice@good.test"))
            self.assertIn("dkim=fail", value)
            self.assertIn("dmarc=pass", value)  # SPF still aligned

        return Deferred.fromCoroutine(go())

    def test_subdomain_uses_organizational_policy(self) -> Deferred[None]:
        """From mail.good.test, which has no record: good.test's sp=quarantine applies."""

        async def go() -> None:
            envelope = self.envelope("a@mail.good.test", ip=OTHER_CLIENT)
            value = await self.results(self.processor(), _message("a@mail.good.test"), envelope)
            self.assertIn("dmarc=fail (p=quarantine) header.from=mail.good.test", value)

        return Deferred.fromCoroutine(go())

    def test_forged_results_removed(self) -> Deferred[None]:
        """A field claiming our authserv-id is removed; one from another server stays, below ours."""

        async def go() -> None:
            forged = f"Authentication-Results: {AUTHSERV.upper()}; dmarc=pass header.from=good.test\r\n"
            upstream = "Authentication-Results: upstream.example; spf=pass smtp.mailfrom=good.test\r\n"
            message = _message("alice@good.test", extra=(forged + upstream).encode())
            item = await self.submit(
                self.processor(), message, self.envelope("alice@good.test", ip=OTHER_CLIENT)
            )
            data = await self.stored(item)
            self.assertEqual(data.count(b"Authentication-Results:"), 2, data[:600])
            self.assertNotIn(f"{AUTHSERV.upper()};".encode(), data)
            self.assertIn(upstream.encode(), data)
            self.assertTrue(data.startswith(f"Authentication-Results: {AUTHSERV};".encode()))

        return Deferred.fromCoroutine(go())

    def test_local_clients_not_checked(self) -> Deferred[None]:
        """Authenticated sessions and relayNetworks clients send the gateway's own mail: no field."""

        async def go() -> None:
            processor = self.processor(on_dmarc_reject="reject")
            for envelope in (
                self.envelope("alice@good.test", ip=OTHER_CLIENT, auth_user="alice"),
                self.envelope("alice@good.test", ip="10.1.2.3"),
            ):
                item = await self.submit(processor, _message("alice@good.test"), envelope)
                self.assertNotIn(b"Authentication-Results", await self.stored(item))

        return Deferred.fromCoroutine(go())


class PolicyTests(VerificationCase):
    """Per-recipient-domain actions: example.test refuses p=reject failures, the rest only tags."""

    def policy_processor(self) -> EmailProcessor:
        return self.processor(
            policies=[DomainPolicyConfig(domains=["example.test"], on_dmarc_reject="reject")]
        )

    def test_domain_policy_applies(self) -> Deferred[None]:
        async def go() -> None:
            envelope = self.envelope("alice@good.test", ip=OTHER_CLIENT)
            refused = await self.refusal(self.policy_processor(), _message("alice@good.test"), envelope)
            self.assertEqual(refused.reply.code, 550)

        return Deferred.fromCoroutine(go())

    def test_other_domain_gets_global(self) -> Deferred[None]:
        async def go() -> None:
            envelope = self.envelope("alice@good.test", ip=OTHER_CLIENT, recipients=["x@elsewhere.test"])
            value = await self.results(self.policy_processor(), _message("alice@good.test"), envelope)
            self.assertIn("dmarc=fail", value)

        return Deferred.fromCoroutine(go())

    def test_strictest_of_the_recipients(self) -> Deferred[None]:
        async def go() -> None:
            envelope = self.envelope(
                "alice@good.test", ip=OTHER_CLIENT, recipients=["x@elsewhere.test", "bob@example.test"]
            )
            refused = await self.refusal(self.policy_processor(), _message("alice@good.test"), envelope)
            self.assertEqual(refused.reply.code, 550)

        return Deferred.fromCoroutine(go())

    def test_mapped_ipv4_client(self) -> Deferred[None]:
        """A dual-stack listener reports an IPv4 client as ::ffff:a.b.c.d; SPF's ip4 still matches it."""

        async def go() -> None:
            envelope = self.envelope("alice@good.test", ip=f"::ffff:{GOOD_CLIENT}")
            value = await self.results(self.processor(), _message("alice@good.test"), envelope)
            self.assertIn("spf=pass smtp.mailfrom=good.test", value)

        return Deferred.fromCoroutine(go())


class ArcTests(VerificationCase):
    def sealed(self) -> bytes:
        """A message as a mailing list at lists.good.test forwards it: its own results, sealed (i=1)."""
        upstream = b"Authentication-Results: lists.good.test; spf=pass smtp.mailfrom=good.test\r\n"
        message = upstream + _message("alice@none.test")
        arc_set = dkim.arc_sign(message, b"sel", b"good.test", self.pem, b"lists.good.test")
        return b"".join(arc_set) + message

    def test_chain_passes(self) -> Deferred[None]:
        async def go() -> None:
            value = await self.results(self.processor(), self.sealed(), self.envelope("a@none.test"))
            self.assertIn("arc=pass", value)

        return Deferred.fromCoroutine(go())

    def test_altered_after_sealing_fails(self) -> Deferred[None]:
        async def go() -> None:
            message = self.sealed().replace(b"a test", b"a forgery")
            value = await self.results(self.processor(), message, self.envelope("a@none.test"))
            self.assertIn("arc=fail", value)

        return Deferred.fromCoroutine(go())


class ArcSealTests(VerificationCase):
    """arcSign: verified mail leaves with the next ARC set, which dkimpy validates with the published key."""

    def sealing_processor(self) -> EmailProcessor:
        return self.processor(arc_sign=ArcSignConfig("good.test", "sel", self.pem.decode()))

    def validate(self, data: bytes) -> tuple[bytes, str]:
        records = {b"sel._domainkey.good.test.": dns_txt_value(self.key).encode()}
        cv, _sets, reason = dkim.arc_verify(data, dnsfunc=lambda name, timeout=5: records.get(name))
        return cv, reason

    def test_first_seal(self) -> Deferred[None]:
        async def go() -> None:
            message = self.sign(_message("alice@good.test"))
            item = await self.submit(self.sealing_processor(), message, self.envelope("alice@good.test"))
            data = await self.stored(item)
            self.assertTrue(data.startswith(b"ARC-Seal: i=1; cv=none;"), data[:200])
            self.assertIn(b"ARC-Authentication-Results: i=1; mx.example.test;", data)
            self.assertEqual(self.validate(data), (dkim.CV_Pass, "success"))
            self.assertEqual(self.validate(data.replace(b"a test", b"a forgery"))[0], dkim.CV_Fail)

        return Deferred.fromCoroutine(go())

    def test_chain_continued(self) -> Deferred[None]:
        """A message sealed upstream (i=1, valid): dcrouter adds i=2 with cv=pass, and the chain holds."""

        async def go() -> None:
            upstream = b"Authentication-Results: lists.good.test; spf=pass smtp.mailfrom=good.test\r\n"
            message = upstream + _message("alice@none.test")
            message = (
                b"".join(dkim.arc_sign(message, b"sel", b"good.test", self.pem, b"lists.good.test")) + message
            )
            item = await self.submit(self.sealing_processor(), message, self.envelope("a@none.test"))
            data = await self.stored(item)
            self.assertTrue(data.startswith(b"ARC-Seal: i=2; cv=pass;"), data[:200])
            self.assertEqual(self.validate(data), (dkim.CV_Pass, "success"))

        return Deferred.fromCoroutine(go())

    def test_local_mail_not_sealed(self) -> Deferred[None]:
        async def go() -> None:
            envelope = self.envelope("alice@good.test", auth_user="alice")
            item = await self.submit(self.sealing_processor(), _message("alice@good.test"), envelope)
            self.assertNotIn(b"ARC-Seal", await self.stored(item))

        return Deferred.fromCoroutine(go())


class TemporaryFailureTests(VerificationCase):
    def setUp(self) -> None:
        super().setUp()
        self.silent = SilentServer(reactor)
        self.addCleanup(self.silent.stop)
        self.silent_resolver = resolver(reactor, self.silent.port, timeout=0.2)

    def test_dns_timeout_defers(self) -> Deferred[None]:
        """The DNS server never answers: DMARC cannot be evaluated, and with an acting policy the message
        is deferred with 451 4.7.0, never refused for good."""

        async def go() -> None:
            refused = await self.refusal(
                self.processor(self.silent_resolver, on_dmarc_reject="reject"),
                _message("alice@good.test"),
                self.envelope("alice@good.test"),
            )
            self.assertEqual((refused.reply.code, refused.reply.enhanced), (451, "4.7.0"))

        return Deferred.fromCoroutine(go())

    def test_dns_timeout_tagged_when_nothing_acts(self) -> Deferred[None]:
        async def go() -> None:
            value = await self.results(
                self.processor(self.silent_resolver),
                _message("alice@good.test"),
                self.envelope("a@good.test"),
            )
            self.assertIn("spf=temperror smtp.mailfrom=good.test", value)
            self.assertIn("dmarc=temperror", value)

        return Deferred.fromCoroutine(go())


class Recording:
    """A resolver whose TXT lookups' Deferreds are kept, so a test can wait for abandoned ones to end."""

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped
        self.started: list[Deferred[Any]] = []

    def lookupText(self, name: str) -> Deferred[Any]:
        started: Deferred[Any] = self.wrapped.lookupText(name)
        self.started.append(started)
        return started


class DnsBridgeTests(VerificationCase):
    """The lookups the libraries make from a worker thread, answered by the resolver on the reactor."""

    def test_answers_and_empty_answers(self) -> Deferred[None]:
        def lookups() -> tuple[list[bytes], list[bytes], list[Any]]:
            bridge = BlockingDns(self.resolver, reactor)
            return bridge.txt("good.test"), bridge.txt("nothing.test"), bridge.spf_lookup("none.test", "A")

        async def go() -> None:
            spf, missing, address = await deferToThread(lookups)
            self.assertEqual(spf, [f"v=spf1 ip4:{GOOD_CLIENT} -all".encode()])
            self.assertEqual(missing, [])
            self.assertEqual(address, [(("none.test", "A"), "127.0.0.1")])

        return Deferred.fromCoroutine(go())

    def test_time_limit_bounds_the_wait(self) -> Deferred[None]:
        """A server that never answers, a resolver that would wait 30 s: the thread gives up at the
        verification's limit, and later lookups fail at once."""
        silent = SilentServer(reactor)
        self.addCleanup(silent.stop)
        slow = Recording(resolver(reactor, silent.port, timeout=0.5))

        def lookups() -> tuple[list[str], float]:
            bridge = BlockingDns(slow, reactor, time_limit=0.2)
            started = time.monotonic()
            for name in ("a.test", "b.test"):
                with self.assertRaises(DnsTemporaryError):
                    bridge.txt(name)
            return bridge.failures, time.monotonic() - started

        async def go() -> None:
            failures, elapsed = await deferToThread(lookups)
            self.assertEqual(failures, ["a.test", "b.test"])
            self.assertLess(elapsed, 0.9)  # the resolver alone would have waited 1 s for the first
            self.assertEqual(len(slow.started), 1)  # the second was never sent
            # The abandoned query ends on its own (the resolver's timeout); let it, for a clean reactor.
            for started in slow.started:
                await started.addErrback(lambda failure: None)

        return Deferred.fromCoroutine(go())


class PartsTests(TestCase):
    def test_authserv_id(self) -> None:
        self.assertEqual(authserv_id(" MX.Example.test; spf=pass"), "mx.example.test")
        self.assertEqual(authserv_id("(comment (nested)) mx.example.test 1; none"), "mx.example.test")
        self.assertEqual(authserv_id('"mx.example.test"; none'), "mx.example.test")
        self.assertEqual(authserv_id(""), "")

    def test_dmarc_record(self) -> None:
        record = parse_dmarc_record("v=DMARC1; p=reject; sp=none; adkim=s")
        assert record is not None
        self.assertEqual(
            (record.policy, record.subdomain_policy, record.adkim, record.aspf), ("reject", "none", "s", "r")
        )
        self.assertIsNone(parse_dmarc_record("v=spf1 -all"))
        self.assertIsNone(parse_dmarc_record("p=reject; v=DMARC1"))
        missing_p = parse_dmarc_record("v=DMARC1; rua=mailto:d@example.test")
        self.assertEqual(missing_p.policy if missing_p else None, "none")

    def test_organizational_domain(self) -> None:
        self.assertEqual(organizational_domain("a.b.example.co.uk"), "example.co.uk")
        self.assertEqual(organizational_domain("mail.good.test"), "good.test")


MX: dict[str, Any] = {
    "smtpConfig": {
        "ports": [2525],
        "hostname": "mx.example.com",
        "domainConfigs": [{"domains": ["example.com"], "targetIPs": ["10.0.0.10"]}],
    }
}


class ConfigTests(TestCase):
    def load(self, verification: dict[str, Any]) -> Any:
        raw = {"smtpConfig": {**MX["smtpConfig"], "verification": verification}}
        return load_options(raw)

    def errors(self, verification: dict[str, Any]) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            self.load(verification)
        return caught.exception.errors

    def test_loaded(self) -> None:
        config = self.load(
            {"enabled": True, "authservId": "auth.example.com", "onDmarcReject": "reject", "arc": False}
        ).options.smtp_config.verification
        self.assertEqual(
            (config.enabled, config.authserv_id, config.on_dmarc_reject, config.arc),
            (True, "auth.example.com", "reject", False),
        )

    def test_arc_sign_key(self) -> None:
        """arcSign takes its key inline, or from the dkimOptions of the domainConfigs entry of its domain;
        without either, or with an Ed25519 key (ARC seals with rsa-sha256), the file is refused."""
        rsa_pem = private_key_pem(generate_private_key("rsa", 2048)).decode()
        inline = {"domainName": "example.com", "keySelector": "arc", "privateKey": rsa_pem}
        loaded = self.load({"enabled": True, "arcSign": inline}).options.smtp_config.verification
        self.assertEqual(loaded.arc_sign.key_selector if loaded.arc_sign else None, "arc")
        errors = self.errors({"enabled": True, "arcSign": {"domainName": "example.com"}})
        self.assertTrue(
            any(e.startswith("smtpConfig.verification.arcSign.domainName") for e in errors), errors
        )
        errors = self.errors({"enabled": True, "arcSign": {"domainName": "example.com", "keySelector": "a"}})
        self.assertTrue(any(e.startswith("smtpConfig.verification.arcSign") for e in errors), errors)
        ed_pem = private_key_pem(generate_private_key("ed25519")).decode()
        errors = self.errors({"enabled": True, "arcSign": {**inline, "privateKey": ed_pem}})
        self.assertTrue(any("RSA" in e for e in errors), errors)

    def test_action_needs_dmarc(self) -> None:
        errors = self.errors({"enabled": True, "dmarc": False, "onDmarcReject": "reject"})
        self.assertTrue(any(e.startswith("smtpConfig.verification.onDmarcReject") for e in errors), errors)

    def test_policies(self) -> None:
        config = self.load(
            {"enabled": True, "policies": [{"domains": ["*.example.com"], "onDmarcQuarantine": "quarantine"}]}
        ).options.smtp_config.verification
        self.assertEqual(config.policies[0].on_dmarc_quarantine, "quarantine")
        duplicate = {"policies": [{"domains": ["a.example.com"]}, {"domains": ["A.example.com"]}]}
        errors = self.errors(duplicate)
        self.assertTrue(
            any(e.startswith("smtpConfig.verification.policies[1].domains[0]") for e in errors), errors
        )
        errors = self.errors({"policies": [{"domains": ["a.example.com"], "onDmarcReject": "no"}]})
        self.assertTrue(
            any(e.startswith("smtpConfig.verification.policies[0].onDmarcReject") for e in errors), errors
        )

    def test_bad_action(self) -> None:
        errors = self.errors({"onDmarcReject": "bounce"})
        self.assertTrue(any("smtpConfig.verification.onDmarcReject" in e for e in errors), errors)
