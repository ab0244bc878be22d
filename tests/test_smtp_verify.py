"""Recipient verification at RCPT (dcrouter.smtp.verify) as byte-exact SMTP transcripts on a StringTransport,
every timer on a Clock. The network side of callouts is a scripted prober here (each probe waits for the
test's answer); CalloutProber itself is tested against real servers in test_delivery_callout."""

from __future__ import annotations

import base64
import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from dcrouter.config.auth import AuthConfig
from dcrouter.config.delivery import RoutingRuleConfig
from dcrouter.config.domains import CalloutConfig, DomainConfig
from dcrouter.config.smtp import SmtpConfig
from dcrouter.delivery.callout import CalloutAnswer, ProbeResult
from dcrouter.delivery.route import Route
from dcrouter.delivery.routing import RecipientRouter
from dcrouter.mail.reply import Reply
from dcrouter.smtp.policy import SessionPolicy
from dcrouter.smtp.recipients import FILE_CHECK_INTERVAL
from dcrouter.smtp.verify import RecipientVerifier, VerdictCache
from tests.smtp_fixtures import PASSWORD, PEER_IP, START_TIME, Server, connect, make_config

EHLO = b"EHLO client.example\r\n"
MAIL = b"MAIL FROM:<sender@example.net>\r\n"


def rcpt(address: str) -> bytes:
    return f"RCPT TO:<{address}>\r\n".encode()


def unknown(address: str) -> bytes:
    return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown\r\n".encode()


def unverified(address: str) -> bytes:
    return (
        f"450 4.1.1 <{address}>: Recipient address rejected: unverified address: try again later\r\n".encode()
    )


OK = b"250 2.1.5 Ok\r\n"
ACCEPTED = ProbeResult(CalloutAnswer.ACCEPTED, Reply(250, "2.1.5", "Ok"), "192.0.2.25:25")
REJECTED = ProbeResult(CalloutAnswer.REJECTED, Reply(550, "5.1.1", "No such user"), "192.0.2.25:25")
GREYLISTED = ProbeResult(CalloutAnswer.UNVERIFIED, Reply(450, "4.2.0", "Greylisted"), "192.0.2.25:25")


@dataclass
class Probe:
    route: Route
    sender: str
    recipient: str
    deadline: float
    answer: Deferred[ProbeResult]
    cancelled: bool = False


class ScriptedProber:
    """Stands in for the network: every probe is recorded and waits until the test answers it."""

    def __init__(self) -> None:
        self.probes: list[Probe] = []
        self.closed = False

    def probe(self, route: Route, sender: str, recipient: str, *, deadline: float) -> Deferred[ProbeResult]:
        def cancel(_: Deferred[ProbeResult]) -> None:
            probe.cancelled = True

        probe = Probe(route, sender, recipient, deadline, Deferred(cancel))
        self.probes.append(probe)
        return probe.answer

    def answer(self, result: ProbeResult, index: int = -1) -> None:
        self.probes[index].answer.callback(result)

    async def close(self) -> None:
        self.closed = True


def entry(**changes: Any) -> DomainConfig:
    return dataclasses.replace(DomainConfig(domains=["example.org"], target_ips=["192.0.2.25"]), **changes)


class VerifyCase(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START_TIME)
        self.prober = ScriptedProber()

    def configure(self, *entries: DomainConfig, **changes: Any) -> SmtpConfig:
        self.config = make_config(domain_configs=list(entries), **changes)
        self.verifier = RecipientVerifier(
            self.config,
            clock=self.clock,
            defer_to_thread=maybeDeferred,
            prober=self.prober,
            route_for=RecipientRouter(self.config).route,
        )
        self.policy = SessionPolicy(self.config, verifier=self.verifier)
        return self.config

    def session(self, peer: str = PEER_IP) -> Server:
        server = connect(self.config, clock=self.clock, policy=self.policy, peer=peer)
        server.exchange(EHLO)
        self.assertEqual(server.exchange(MAIL), b"250 2.1.0 Ok\r\n")
        return server


class CalloutReplyTests(VerifyCase):
    def setUp(self) -> None:
        super().setUp()
        self.configure(entry(verify_recipients="callout"))

    def test_accepted(self) -> None:
        server = self.session()
        self.assertEqual(server.exchange(rcpt("alice@example.org")), b"")
        [probe] = self.prober.probes
        self.assertEqual(
            (probe.route.name, probe.sender, probe.recipient), ("domain:example.org", "", "alice@example.org")
        )
        self.assertEqual(probe.deadline, START_TIME + 30)
        self.prober.answer(ACCEPTED)
        self.assertEqual(server.take(), OK)

    def test_rejected(self) -> None:
        server = self.session()
        server.exchange(rcpt("nobody@example.org"))
        self.prober.answer(REJECTED)
        self.assertEqual(server.take(), unknown("nobody@example.org"))
        # The transaction goes on without the refused recipient.
        self.assertEqual(server.exchange(b"DATA\r\n"), b"503 5.5.1 Error: need RCPT command\r\n")

    def test_undecided_is_temporary(self) -> None:
        server = self.session()
        server.exchange(rcpt("grey@example.org"))
        self.prober.answer(GREYLISTED)
        self.assertEqual(server.take(), unverified("grey@example.org"))

    def test_fail_open_accepts_the_undecided(self) -> None:
        self.configure(entry(verify_recipients="callout", callout_fail_open=True))
        server = self.session()
        server.exchange(rcpt("grey@example.org") + rcpt("nobody@example.org"))
        self.prober.answer(GREYLISTED, 0)
        self.assertEqual(server.take(), OK)
        self.prober.answer(REJECTED, 1)
        self.assertEqual(server.take(), unknown("nobody@example.org"))

    def test_probe_sender(self) -> None:
        self.configure(entry(verify_recipients="callout", callout_sender="probe@mx.example.test"))
        self.session().exchange(rcpt("alice@example.org"))
        self.assertEqual(self.prober.probes[0].sender, "probe@mx.example.test")

    def test_probe_is_routed_as_the_message_would_be(self) -> None:
        """A rule by sender sends this transaction's mail elsewhere: the probe asks that server."""
        rule = RoutingRuleConfig(name="billing", target_ips=["192.0.2.99"], senders=["*@example.net"])
        self.configure(entry(verify_recipients="callout"), routing_rules=[rule])
        self.session().exchange(rcpt("alice@example.org"))
        self.assertEqual(self.prober.probes[0].route.name, "rule:billing")

    def test_trusted_clients_are_not_probed(self) -> None:
        """relayNetworks and authenticated sessions: as Postfix places reject_unverified_recipient after
        permit_mynetworks and permit_sasl_authenticated."""
        self.configure(
            entry(verify_recipients="callout"),
            relay_networks=["198.51.100.0/24"],
            auth=AuthConfig(allow_insecure=True, failure_delay=0),
        )
        relay = self.session(peer="198.51.100.7")
        self.assertEqual(relay.exchange(rcpt("anyone@example.org")), OK)
        authenticated = connect(self.config, clock=self.clock, policy=self.policy)
        authenticated.exchange(EHLO)
        token = base64.b64encode(f"\0alice\0{PASSWORD}".encode())
        self.assertEqual(authenticated.exchange(b"AUTH PLAIN " + token + b"\r\n")[:3], b"235")
        authenticated.exchange(MAIL)
        self.assertEqual(authenticated.exchange(rcpt("anyone@example.org")), OK)
        self.assertEqual(self.prober.probes, [])

    def test_only_configured_entries_are_probed(self) -> None:
        self.configure(
            entry(verify_recipients="callout"),
            DomainConfig(domains=["other.org"], target_ips=["192.0.2.26"]),
        )
        server = self.session()
        self.assertEqual(server.exchange(rcpt("anyone@other.org")), OK)
        self.assertEqual(
            server.exchange(rcpt("u@elsewhere.example")),
            b"554 5.7.1 <u@elsewhere.example>: Relay access denied\r\n",
        )
        self.assertEqual(self.prober.probes, [])

    def test_pipelined_replies_stay_in_order(self) -> None:
        server = self.session()
        server.exchange(rcpt("known@example.org"))
        self.prober.answer(ACCEPTED)
        self.assertEqual(server.take(), OK)
        # One write: a recipient needing a probe, one answered from the cache, and a NOOP.
        out = server.exchange(rcpt("nobody@example.org") + rcpt("known@example.org") + b"NOOP\r\n")
        self.assertEqual(out, b"")
        self.prober.answer(REJECTED)
        self.assertEqual(server.take(), unknown("nobody@example.org") + OK + b"250 2.0.0 Ok\r\n")

    def test_session_gone_before_the_answer(self) -> None:
        server = self.session()
        server.exchange(rcpt("alice@example.org"))
        server.protocol.connectionLost()
        self.prober.answer(ACCEPTED)
        self.assertEqual(server.take(), b"")

    def test_close_closes_the_prober(self) -> None:
        self.successResultOf(Deferred.fromCoroutine(self.verifier.close()))
        self.assertTrue(self.prober.closed)


class CacheTests(VerifyCase):
    def setUp(self) -> None:
        super().setUp()
        self.configure(
            entry(verify_recipients="callout"),
            callout=CalloutConfig(positive_ttl=3_600_000, negative_ttl=600_000, cache_size=2),
        )

    def ask(self, address: str, result: ProbeResult | None = None) -> bytes:
        """RCPT in a new session; answers the probe with ``result`` when one is made."""
        server = self.session()
        probes = len(self.prober.probes)
        out = server.exchange(rcpt(address))
        if len(self.prober.probes) > probes:
            self.assertEqual(out, b"")
            assert result is not None, f"unexpected probe for {address}"
            self.prober.answer(result)
            out = server.take()
        return out

    def test_accepted_is_remembered_for_the_positive_ttl(self) -> None:
        self.assertEqual(self.ask("alice@example.org", ACCEPTED), OK)
        self.clock.advance(3599)
        self.assertEqual(self.ask("alice@example.org"), OK)
        self.assertEqual(len(self.prober.probes), 1)
        self.assertEqual(self.verifier.stats["cache_hits"], 1)
        self.clock.advance(1)
        self.assertEqual(self.ask("alice@example.org", ACCEPTED), OK)
        self.assertEqual(len(self.prober.probes), 2)

    def test_rejected_is_remembered_for_the_negative_ttl(self) -> None:
        self.assertEqual(self.ask("nobody@example.org", REJECTED), unknown("nobody@example.org"))
        self.clock.advance(599)
        self.assertEqual(self.ask("nobody@example.org"), unknown("nobody@example.org"))
        self.clock.advance(1)
        self.assertEqual(self.ask("nobody@example.org", ACCEPTED), OK)
        self.assertEqual(len(self.prober.probes), 2)

    def test_undecided_is_not_remembered(self) -> None:
        self.assertEqual(self.ask("grey@example.org", GREYLISTED), unverified("grey@example.org"))
        self.assertEqual(self.ask("grey@example.org", ACCEPTED), OK)

    def test_least_recently_used_goes_first(self) -> None:
        self.ask("a@example.org", ACCEPTED)
        self.ask("b@example.org", ACCEPTED)
        self.ask("a@example.org")  # a is now the more recent
        self.ask("c@example.org", ACCEPTED)  # evicts b
        self.assertEqual(len(self.prober.probes), 3)
        self.ask("a@example.org")
        self.assertEqual(len(self.prober.probes), 3)
        self.ask("b@example.org", ACCEPTED)
        self.assertEqual(len(self.prober.probes), 4)

    def test_cache_is_per_route(self) -> None:
        """Another sender routed elsewhere by a rule: that server has not been asked yet."""
        rule = RoutingRuleConfig(name="billing", target_ips=["192.0.2.99"], senders=["*@billing.example.net"])
        self.configure(entry(verify_recipients="callout"), routing_rules=[rule])
        self.ask("alice@example.org", ACCEPTED)
        server = connect(self.config, clock=self.clock, policy=self.policy)
        server.exchange(EHLO + b"MAIL FROM:<x@billing.example.net>\r\n")
        server.take()
        self.assertEqual(server.exchange(rcpt("alice@example.org")), b"")
        self.assertEqual(self.prober.probes[-1].route.name, "rule:billing")


class VerdictCacheTests(unittest.SynchronousTestCase):
    def test_zero_ttl_keeps_nothing(self) -> None:
        cache = VerdictCache(Clock(), size=10, positive_ttl=0, negative_ttl=5)
        cache.put("a", CalloutAnswer.ACCEPTED)
        cache.put("b", CalloutAnswer.REJECTED)
        cache.put("c", CalloutAnswer.UNVERIFIED)
        self.assertEqual(
            (cache.get("a"), cache.get("b"), cache.get("c")), (None, CalloutAnswer.REJECTED, None)
        )
        self.assertEqual(len(cache), 1)


class SharedProbeTests(VerifyCase):
    def setUp(self) -> None:
        super().setUp()
        self.configure(entry(verify_recipients="callout"))

    def test_concurrent_rcpts_for_one_address_share_one_probe(self) -> None:
        first, second = self.session(), self.session()
        first.exchange(rcpt("alice@example.org"))
        second.exchange(rcpt("Alice@EXAMPLE.org"))  # another spelling: another mailbox to the target
        third = self.session()
        third.exchange(rcpt("alice@example.org"))
        self.assertEqual(
            [p.recipient for p in self.prober.probes], ["alice@example.org", "Alice@example.org"]
        )
        self.assertEqual(self.verifier.probes_running, 2)
        self.prober.answer(REJECTED, 0)
        self.assertEqual((first.take(), third.take()), (unknown("alice@example.org"),) * 2)
        self.assertEqual(second.take(), b"")
        self.prober.answer(ACCEPTED, 1)
        self.assertEqual(second.take(), OK)
        self.assertEqual((self.verifier.stats["probes"], self.verifier.stats["joined"]), (2, 1))
        self.assertEqual(self.verifier.probes_running, 0)


class TimeoutTests(VerifyCase):
    def test_no_answer_within_the_timeout(self) -> None:
        self.configure(entry(verify_recipients="callout"))
        server = self.session()
        server.exchange(rcpt("alice@example.org") + b"NOOP\r\n")
        self.clock.advance(29.9)
        self.assertEqual(server.take(), b"")
        self.clock.advance(0.1)
        self.assertEqual(server.take(), unverified("alice@example.org") + b"250 2.0.0 Ok\r\n")
        self.assertTrue(self.prober.probes[0].cancelled)
        self.assertEqual(self.verifier.probes_running, 0)

    def test_timeout_with_fail_open(self) -> None:
        self.configure(entry(verify_recipients="callout", callout_fail_open=True))
        server = self.session()
        server.exchange(rcpt("alice@example.org"))
        self.clock.advance(30)
        self.assertEqual(server.take(), OK)

    def test_probes_beyond_max_parallel_wait_within_the_same_timeout(self) -> None:
        self.configure(entry(verify_recipients="callout"), callout=CalloutConfig(max_parallel=1))
        first, second = self.session(), self.session()
        first.exchange(rcpt("a@example.org"))
        second.exchange(rcpt("b@example.org"))
        self.assertEqual([p.recipient for p in self.prober.probes], ["a@example.org"])
        self.clock.advance(10)
        self.prober.answer(ACCEPTED)
        self.assertEqual(first.take(), OK)
        [_, waited] = self.prober.probes
        self.assertEqual(waited.deadline, START_TIME + 30)  # the wait counted
        self.clock.advance(20)
        self.assertEqual(second.take(), unverified("b@example.org"))
        self.assertTrue(waited.cancelled)

    def test_a_probe_whose_turn_comes_late_gets_what_is_left(self) -> None:
        self.configure(entry(verify_recipients="callout"), callout=CalloutConfig(max_parallel=1))
        first, second = self.session(), self.session()
        first.exchange(rcpt("a@example.org"))
        self.clock.advance(1)
        second.exchange(rcpt("b@example.org"))
        self.clock.advance(29)  # a times out; b's turn comes with 1 s left
        self.assertEqual(first.take(), unverified("a@example.org"))
        self.assertEqual(len(self.prober.probes), 2)
        self.clock.advance(1)
        self.assertEqual(second.take(), unverified("b@example.org"))

    def test_a_probe_whose_turn_comes_at_its_deadline_is_not_started(self) -> None:
        self.configure(entry(verify_recipients="callout"), callout=CalloutConfig(max_parallel=1))
        first, second = self.session(), self.session()
        first.exchange(rcpt("a@example.org"))
        second.exchange(rcpt("b@example.org"))
        self.clock.advance(30)
        self.assertEqual(first.take(), unverified("a@example.org"))
        self.assertEqual(second.take(), unverified("b@example.org"))
        self.assertEqual([p.recipient for p in self.prober.probes], ["a@example.org"])


class ListTests(VerifyCase):
    def setUp(self) -> None:
        super().setUp()
        self.configure(
            entry(verify_recipients="list", recipients=["alice", "sales-*@example.org"]),
            relay_networks=["198.51.100.0/24"],
        )

    def test_known_and_unknown(self) -> None:
        server = self.session()
        self.assertEqual(
            server.exchange(
                rcpt("alice@example.org") + rcpt("Sales-EU@example.org") + rcpt("bob@example.org")
            ),
            OK + OK + unknown("bob@example.org"),
        )

    def test_applies_to_trusted_clients_too(self) -> None:
        """As Postfix's smtpd_reject_unlisted_recipient: the list is the truth about the domain."""
        server = self.session(peer="198.51.100.7")
        self.assertEqual(server.exchange(rcpt("bob@example.org")), unknown("bob@example.org"))
        self.assertEqual(server.exchange(rcpt("bob@elsewhere.example")), OK)

    def test_postmaster_without_domain_is_still_accepted(self) -> None:
        self.assertEqual(self.session().exchange(rcpt("postmaster")), OK)

    def test_recipients_file_and_inline_list_together(self) -> None:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as handle:
            handle.write("carol@example.org OK\n")
        self.configure(entry(verify_recipients="list", recipients=["alice"], recipients_file=path))
        server = self.session()
        self.assertEqual(server.exchange(rcpt("alice@example.org") + rcpt("carol@example.org")), OK + OK)
        with open(path, "w") as handle:
            handle.write("dave@example.org OK\n# carol left\n")
        stat = os.stat(path)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        self.clock.advance(FILE_CHECK_INTERVAL)
        server = self.session()
        self.assertEqual(
            server.exchange(rcpt("carol@example.org") + rcpt("dave@example.org")),
            unknown("carol@example.org") + OK,
        )
        self.assertEqual(self.prober.probes, [])


class UnverifiedEntryTests(VerifyCase):
    def test_off_accepts_every_address(self) -> None:
        self.configure(entry(), entry(domains=["other.org"], verify_recipients="list", recipients=["x"]))
        self.assertEqual(self.session().exchange(rcpt("whoever@example.org")), OK)

    def test_callouts_need_a_prober(self) -> None:
        config = make_config(domain_configs=[entry(verify_recipients="callout")])
        with self.assertRaises(ValueError):
            RecipientVerifier(config, clock=self.clock, defer_to_thread=maybeDeferred)


class CancelledProbeTests(VerifyCase):
    def test_a_failing_prober_is_an_unverified_answer(self) -> None:
        """A bug in the prober is logged, and the client hears 450, never a silent 250."""
        self.configure(entry(verify_recipients="callout"))
        server = self.session()
        server.exchange(rcpt("alice@example.org"))
        self.prober.probes[0].answer.errback(CancelledError())
        self.assertEqual(server.take(), unverified("alice@example.org"))
        self.assertEqual(len(self.flushLoggedErrors(CancelledError)), 1)
