"""Tests for dcrouter.smtp.policy.SessionPolicy: connection caps and the relay decision."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.config.domains import DomainConfig
from dcrouter.config.smtp import SmtpConfig
from dcrouter.mail.address import Address, AddressError, parse_rcpt_argument
from dcrouter.mail.reply import Reply
from dcrouter.smtp.policy import SessionPolicy
from dcrouter.smtp.session import Session

OUTSIDE = "203.0.113.5"
RELAY_PEER = "10.9.3.4"
LOCAL_CONFIG = DomainConfig(domains=["local.test", "*.sub.test"], target_ips=["192.0.2.25"])


def make_config(**changes: object) -> SmtpConfig:
    settings: dict[str, object] = {
        "hostname": "mx.test",
        "domain_configs": [LOCAL_CONFIG, DomainConfig(domains=["other.test"])],
        "relay_networks": ["10.9.0.0/16", "2001:db8:9::/48"],
        "max_connections": 5,
        "max_connections_per_ip": 2,
    }
    settings.update(changes)
    return SmtpConfig(**settings)  # type: ignore[arg-type]


def make_session(peer: str = OUTSIDE, auth_user: str | None = None) -> Session:
    return Session(session_id="s1", peer_host=peer, peer_port=40000, local_port=25, auth_user=auth_user)


class ConnectionLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.policy = SessionPolicy(make_config())

    def test_per_ip_cap(self) -> None:
        self.assertIsNone(self.policy.connection_opened("198.51.100.1"))
        self.assertIsNone(self.policy.connection_opened("198.51.100.1"))
        reply = self.policy.connection_opened("198.51.100.1")
        self.assertEqual(reply, Reply(421, "4.7.0", "mx.test Too many connections from your address"))
        self.assertIsNone(self.policy.connection_opened("198.51.100.2"))
        self.assertEqual(self.policy.connections_from("198.51.100.1"), 2)
        self.assertEqual(self.policy.connections, 3)

    def test_total_cap(self) -> None:
        for index in range(5):
            self.assertIsNone(self.policy.connection_opened(f"198.51.100.{index}"))
        reply = self.policy.connection_opened("198.51.100.99")
        self.assertEqual(reply, Reply(421, "4.7.0", "mx.test Too many connections, try again later"))
        self.assertEqual(self.policy.connections, 5)

    def test_refused_connection_is_not_counted(self) -> None:
        for index in range(5):
            self.policy.connection_opened(f"198.51.100.{index}")
        self.assertIsNotNone(self.policy.connection_opened("198.51.100.0"))
        self.assertEqual(self.policy.connections_from("198.51.100.0"), 1)
        self.policy.connection_closed("198.51.100.4")
        self.assertIsNone(self.policy.connection_opened("198.51.100.0"))
        self.assertEqual(self.policy.connections_from("198.51.100.0"), 2)

    def test_closing_frees_a_slot(self) -> None:
        self.policy.connection_opened("198.51.100.1")
        self.policy.connection_opened("198.51.100.1")
        self.policy.connection_closed("198.51.100.1")
        self.assertIsNone(self.policy.connection_opened("198.51.100.1"))

    def test_counts_never_go_negative(self) -> None:
        self.policy.connection_closed("198.51.100.1")
        self.policy.connection_opened("198.51.100.2")
        self.policy.connection_closed("198.51.100.1")
        self.policy.connection_closed("198.51.100.2")
        self.policy.connection_closed("198.51.100.2")
        self.assertEqual(self.policy.connections, 0)
        self.assertEqual(self.policy.connections_from("198.51.100.2"), 0)
        for _ in range(2):
            self.assertIsNone(self.policy.connection_opened("198.51.100.2"))
        self.assertIsNotNone(self.policy.connection_opened("198.51.100.2"))

    def test_ipv4_mapped_counts_as_ipv4(self) -> None:
        self.policy.connection_opened("198.51.100.1")
        self.policy.connection_opened("::ffff:198.51.100.1")
        self.assertIsNotNone(self.policy.connection_opened("198.51.100.1"))
        self.policy.connection_closed("::ffff:198.51.100.1")
        self.assertEqual(self.policy.connections_from("198.51.100.1"), 1)

    def test_ipv6_spellings_count_together(self) -> None:
        self.policy.connection_opened("2001:db8::1")
        self.policy.connection_opened("2001:DB8:0::1")
        self.assertIsNotNone(self.policy.connection_opened("2001:0db8::0001"))

    @given(st.lists(st.tuples(st.booleans(), st.sampled_from(["a", "b", "::ffff:1.2.3.4", "1.2.3.4"]))))
    def test_counts_match_a_model(self, events: list[tuple[bool, str]]) -> None:
        policy = SessionPolicy(make_config(max_connections=4, max_connections_per_ip=2))
        open_: list[str] = []
        for opening, ip in events:
            key = "1.2.3.4" if ip.startswith("::ffff:") else ip
            if opening:
                allowed = len(open_) < 4 and open_.count(key) < 2
                self.assertEqual(policy.connection_opened(ip) is None, allowed)
                if allowed:
                    open_.append(key)
            elif key in open_:
                policy.connection_closed(ip)
                open_.remove(key)
            self.assertEqual(policy.connections, len(open_))
            self.assertEqual(policy.connections_from(ip), open_.count(key))


class SenderTests(SynchronousTestCase):
    def test_every_sender_accepted(self) -> None:
        policy = SessionPolicy(make_config())
        for address in [Address.null(), Address("u", "evil.com"), Address("u%x", "evil.com")]:
            with self.subTest(address=address):
                self.assertIsNone(policy.check_sender(make_session(), address))


# (forward path, may an untrusted peer send it?) — a trusted peer may send every parseable one.
RECIPIENTS = [
    ("<u@local.test>", True),
    ("<U@LOCAL.TEST>", True),
    ("<postmaster@local.test>", True),
    ("<postmaster>", True),
    ("<PostMaster>", True),
    ("<a@x.sub.test>", True),
    ("<a@y.x.sub.test>", True),
    ("<a@other.test>", True),
    ('<"a b"@local.test>', True),
    ("<first.last+tag@local.test>", True),
    ("<a@sub.test>", False),  # the wildcard does not cover its base
    ("<u@evil.com>", False),
    ("<u@local.test.evil.com>", False),
    ("<u@evillocal.test>", False),
    ("<u@xlocal.test>", False),
    ("<u@mx.test>", False),  # our hostname is not a domain we accept mail for
    ("<u%evil.com@local.test>", False),
    ("<u%evil.com%local.test@local.test>", False),
    ("<evil.com!u@local.test>", False),
    ("<u!evil.com@local.test>", False),
    ('<"u@evil.com"@local.test>', False),
    ('<"u\\@evil.com"@local.test>', False),
    ('<"@evil.com:u"@local.test>', False),
    ('<"evil.com!u"@local.test>', False),
    ('<"u%evil.com"@local.test>', False),
    ("<u@[192.0.2.25]>", False),
    ("<u@[IPv6:2001:db8::25]>", False),
    ("<u%evil.com@[192.0.2.25]>", False),
    ("<u@evil.com@local.test>", None),  # syntax error
    ("<@local.test:u@evil.com>", None),  # source route declined
    ("<@local.test,@other.test:u@local.test>", None),
    ("<u@local.test@evil.com>", None),
    ("u@local.test", None),
    ("<>", None),
    ("<abuse>", None),
]

UNTRUSTED = [
    make_session(OUTSIDE),
    make_session("10.10.0.1"),
    make_session("::ffff:10.10.0.1"),
    make_session("2001:db8:a::1"),
    make_session("not-an-ip"),
    make_session(""),
    make_session(OUTSIDE, auth_user=""),
]
TRUSTED = [
    make_session(RELAY_PEER),
    make_session("::ffff:10.9.3.4"),
    make_session("2001:db8:9::77"),
    make_session(OUTSIDE, auth_user="alice"),
]


class RecipientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.policy = SessionPolicy(make_config())

    def decide(self, session: Session, path: str) -> Reply | None:
        """The reply to RCPT TO:<path>, through the parser and the policy as the protocol does it."""
        try:
            address, _ = parse_rcpt_argument("TO:" + path, utf8=False)
        except AddressError as exc:
            return exc.reply
        return self.policy.check_recipient(session, address)

    def test_never_an_open_relay(self) -> None:
        for path, untrusted_ok in RECIPIENTS:
            for session in UNTRUSTED:
                with self.subTest(path=path, peer=session.peer_host, auth=session.auth_user):
                    reply = self.decide(session, path)
                    if untrusted_ok:
                        self.assertIsNone(reply)
                    else:
                        self.assertIsNotNone(reply)
                        assert reply is not None
                        self.assertEqual(reply.code // 100, 5)

    def test_trusted_peers_may_relay(self) -> None:
        for path, untrusted_ok in RECIPIENTS:
            for session in TRUSTED:
                with self.subTest(path=path, peer=session.peer_host, auth=session.auth_user):
                    reply = self.decide(session, path)
                    if untrusted_ok is None:
                        self.assertIsNotNone(reply)
                    else:
                        self.assertIsNone(reply)

    def test_relay_denied_reply(self) -> None:
        reply = self.policy.check_recipient(make_session(), Address("u", "evil.com"))
        self.assertEqual(reply, Reply(554, "5.7.1", "<u@evil.com>: Relay access denied"))
        reply = self.policy.check_recipient(make_session(), Address("u%evil.com", "local.test"))
        self.assertEqual(reply, Reply(554, "5.7.1", "<u%evil.com@local.test>: Relay access denied"))

    def test_domainless_address_other_than_postmaster(self) -> None:
        reply = self.policy.check_recipient(make_session(), Address("abuse", ""))
        self.assertEqual(reply, Reply(554, "5.7.1", "<abuse>: Relay access denied"))
        self.assertIsNotNone(self.policy.check_recipient(make_session(), Address.null()))

    def test_no_domains_no_relay_networks(self) -> None:
        policy = SessionPolicy(make_config(domain_configs=[], relay_networks=[]))
        self.assertIsNotNone(policy.check_recipient(make_session(RELAY_PEER), Address("u", "local.test")))
        self.assertIsNone(policy.check_recipient(make_session(auth_user="bob"), Address("u", "local.test")))
        self.assertIsNone(policy.check_recipient(make_session(), Address("postmaster", "")))

    def test_domain_config_lookup(self) -> None:
        self.assertIs(self.policy.domain_config("a.sub.test"), LOCAL_CONFIG)
        self.assertIs(self.policy.domain_config("LOCAL.test"), LOCAL_CONFIG)
        self.assertIsNone(self.policy.domain_config("sub.test"))

    def test_bad_config_is_refused(self) -> None:
        self.assertRaises(ValueError, SessionPolicy, make_config(relay_networks=["10.0.0.0/33"]))
        wildcard_only = make_config(domain_configs=[DomainConfig(domains=["*"])])
        self.assertRaises(ValueError, SessionPolicy, wildcard_only)

    @given(st.text(max_size=60), st.sampled_from(["local.test", "a.sub.test", "other.test"]))
    def test_untrusted_acceptance_implies_local_and_plain(self, local: str, domain: str) -> None:
        for text in [f"<{local}@{domain}>", f'<"{local}"@{domain}>', f"<{local}>"]:
            reply = self.decide(make_session(OUTSIDE), text)
            if reply is not None:
                continue
            address, _ = parse_rcpt_argument("TO:" + text, utf8=False)
            if address.domain:
                self.assertIsNotNone(self.policy.domain_config(address.domain))
            else:
                self.assertEqual(address.local, "postmaster")
            for char in "%!@:":
                self.assertNotIn(char, address.local)
