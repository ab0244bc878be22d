"""Rate limits in the SMTP session, byte for byte on a StringTransport and a Clock: each phase's reply
(421 4.7.0 at connect and AUTH, 451 4.7.1 at MAIL and RCPT, 452 4.5.3, 550 5.7.1), the tarpit, tiers, and
that no reply names the counted key."""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from dcrouter.config.auth import AuthConfig
from dcrouter.config.domains import DomainConfig, RateLimitsConfig
from dcrouter.config.ratelimits import IngressLimitsConfig, LimitConfig, NetworkTierConfig, TierConfig
from dcrouter.interfaces import IIngressLimits
from dcrouter.limits.counters import LocalCounters, Outcome
from dcrouter.limits.ingress import IngressLimits, build_ingress_limits
from dcrouter.smtp.policy import SessionPolicy
from dcrouter.smtp.protocol import ESMTPServerFactory
from tests.smtp_fixtures import PASSWORD, PEER_IP, ControlledQueue, Server, _clock, make_config, make_factory

INSECURE = AuthConfig(allow_insecure=True, failure_delay=0)
PLAIN = base64.b64encode(b"\0alice\0" + PASSWORD.encode())
WRONG = base64.b64encode(b"\0alice\0wrong")
MESSAGE = b"Subject: hi\r\n\r\nhello\r\n.\r\n"


def limits(**tiers: Any) -> IngressLimitsConfig:
    return IngressLimitsConfig(**tiers)


class Gateway:
    """One factory (one policy, one limiter, one clock) and the sessions opened on it."""

    def __init__(self, config: Any, port: int = 25) -> None:
        self.clock = _clock()
        self.queue = ControlledQueue()
        self.limits = build_ingress_limits(config, self.clock)
        self.policy = SessionPolicy(config, limits=self.limits)
        self.factory: ESMTPServerFactory = make_factory(
            config, port=port, queue=self.queue, clock=self.clock, policy=self.policy
        )

    def connect(self, peer: str = PEER_IP) -> Server:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", peer, 40000))
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", self.factory.port),
            peerAddress=IPv4Address("TCP", peer, 40000),
        )
        protocol.makeConnection(transport)
        return Server(protocol, transport, self.clock, self.queue, self.factory)

    def greeted(self, peer: str = PEER_IP) -> Server:
        server = self.connect(peer)
        self.assert_greeting(server)
        server.exchange(b"EHLO client.example\r\n")
        return server

    def limiter_store(self) -> LocalCounters:
        assert isinstance(self.limits, IngressLimits)
        store = self.limits.limiter.store
        assert isinstance(store, LocalCounters)
        return store

    @staticmethod
    def assert_greeting(server: Server) -> None:
        assert server.take().startswith(b"220 "), "no greeting"


class SlowCounters:
    """Local counters whose answers arrive 0.1 s later on the clock, as a remote store's do."""

    def __init__(self, local: LocalCounters, clock: Clock) -> None:
        self.local = local
        self.clock = clock

    def apply(self, steps: Any) -> Deferred[Outcome]:
        return deferLater(self.clock, 0.1, self.local.apply, steps)


def config_with(rate_limits: IngressLimitsConfig | None = None, **changes: Any) -> Any:
    if rate_limits is not None:
        changes["rate_limits"] = rate_limits
    changes.setdefault("auth", INSECURE)
    return make_config(**changes)


def send(server: Server, rcpts: tuple[str, ...] = ("a@example.org",)) -> bytes:
    """A whole transaction; every reply it got."""
    out = server.exchange(b"MAIL FROM:<s@sender.example>\r\n")
    if not out.startswith(b"250"):
        return out
    for rcpt in rcpts:
        out += server.exchange(b"RCPT TO:<%s>\r\n" % rcpt.encode())
    if out.count(b"250") <= 1:
        server.exchange(b"RSET\r\n")
        return out
    out += server.exchange(b"DATA\r\n")
    out += server.exchange(MESSAGE)
    return out


class InterfaceTests(unittest.TestCase):
    def test_provides(self) -> None:
        built = build_ingress_limits(
            config_with(limits(anonymous=TierConfig(messages=[LimitConfig(1)]))), _clock()
        )
        assert built is not None
        verifyObject(IIngressLimits, built)

    def test_nothing_configured_nothing_built(self) -> None:
        self.assertIsNone(build_ingress_limits(config_with(), _clock()))


class ConnectPhaseTests(unittest.TestCase):
    def test_connection_rate_421_at_connect(self) -> None:
        gateway = Gateway(config_with(limits(anonymous=TierConfig(connection_rate=[LimitConfig(2)]))))
        for _ in range(2):
            gateway.assert_greeting(gateway.connect())
        refused = gateway.connect()
        self.assertEqual(
            refused.take(),
            b"421 4.7.0 mx.example.test Connection rate limit exceeded (connections per client address: 2 per"
            b" minute), try again later\r\n",
        )
        self.assertTrue(refused.transport.disconnecting)
        refused.protocol.connectionLost(None)  # type: ignore[arg-type]
        gateway.assert_greeting(gateway.connect("192.0.2.11"))  # another address has its own counter
        gateway.clock.advance(30)
        gateway.assert_greeting(gateway.connect())

    def test_tarpit_at_connect_delays_the_greeting(self) -> None:
        """A check that answers later (a tarpit here; Redis alike) holds the greeting, and what the client
        sends meanwhile waits for it."""
        tier = TierConfig(connection_rate=[LimitConfig(1, action="tarpit")])
        gateway = Gateway(config_with(limits(anonymous=tier, tarpit_delay=2_000)))
        gateway.assert_greeting(gateway.connect())
        slow = gateway.connect()
        self.assertEqual(slow.exchange(b"EHLO client.example\r\n"), b"")
        gateway.clock.advance(2)
        out = slow.take()
        self.assertTrue(out.startswith(b"220 mx.example.test ESMTP"), out)
        self.assertIn(b"250-mx.example.test", out)
        self.assertFalse(slow.transport.disconnecting)

    def test_refusal_that_answers_later(self) -> None:
        """Counters that answer with a Deferred (as Redis does): the 421 comes when they answer."""
        gateway = Gateway(config_with(limits(anonymous=TierConfig(connection_rate=[LimitConfig(1)]))))
        assert isinstance(gateway.limits, IngressLimits)
        gateway.limits.limiter.store = SlowCounters(gateway.limiter_store(), gateway.clock)  # type: ignore[assignment]
        first = gateway.connect()
        self.assertEqual(first.take(), b"")
        gateway.clock.advance(0.1)
        gateway.assert_greeting(first)
        second = gateway.connect()
        gateway.clock.advance(0.1)
        self.assertEqual(second.take()[:9], b"421 4.7.0")
        self.assertTrue(second.transport.disconnecting)

    def test_concurrent_connections_per_tier(self) -> None:
        gateway = Gateway(config_with(limits(anonymous=TierConfig(connections=1))))
        first = gateway.connect()
        gateway.assert_greeting(first)
        second = gateway.connect()
        self.assertEqual(
            second.take(), b"421 4.7.0 mx.example.test Too many connections from your address\r\n"
        )
        second.protocol.connectionLost(None)  # type: ignore[arg-type]
        first.protocol.connectionLost(None)  # type: ignore[arg-type]
        assert isinstance(gateway.limits, IngressLimits)
        self.assertEqual(gateway.limits.connections_from(PEER_IP), 0)
        gateway.assert_greeting(gateway.connect())


class MailPhaseTests(unittest.TestCase):
    def test_message_rate_451_at_mail(self) -> None:
        gateway = Gateway(config_with(limits(anonymous=TierConfig(messages=[LimitConfig(2)]))))
        server = gateway.greeted()
        for _ in range(2):
            self.assertIn(b"250 2.0.0 Ok: queued as", send(server))
        reply = server.exchange(b"MAIL FROM:<s@sender.example>\r\n")
        self.assertEqual(
            reply,
            b"451 4.7.1 Rate limit exceeded (messages per client address: 2 per minute), try again later\r\n",
        )
        self.assertNotIn(PEER_IP.encode(), reply)
        self.assertEqual(len(gateway.queue.items), 2)
        gateway.clock.advance(30)  # one message's worth of the rate (the session itself timed out)
        server = gateway.greeted()
        self.assertIn(b"250 2.0.0 Ok: queued as", send(server))
        self.assertEqual(server.exchange(b"MAIL FROM:<s@sender.example>\r\n")[:9], b"451 4.7.1")

    def test_per_sender_and_prefix_keys(self) -> None:
        tier = TierConfig(messages=[LimitConfig(1, per="sender"), LimitConfig(3, per="ipPrefix")])
        gateway = Gateway(config_with(limits(anonymous=tier)))
        server = gateway.greeted()
        self.assertEqual(server.exchange(b"MAIL FROM:<one@x.example>\r\n"), b"250 2.1.0 Ok\r\n")
        server.exchange(b"RSET\r\n")
        self.assertEqual(
            server.exchange(b"MAIL FROM:<ONE@x.example>\r\n"),
            b"451 4.7.1 Rate limit exceeded (messages per sender: 1 per minute), try again later\r\n",
        )
        neighbour = gateway.greeted("192.0.2.99")  # same /24
        self.assertEqual(neighbour.exchange(b"MAIL FROM:<two@x.example>\r\n"), b"250 2.1.0 Ok\r\n")
        neighbour.exchange(b"RSET\r\n")
        self.assertEqual(neighbour.exchange(b"MAIL FROM:<three@x.example>\r\n"), b"250 2.1.0 Ok\r\n")
        neighbour.exchange(b"RSET\r\n")
        self.assertEqual(
            neighbour.exchange(b"MAIL FROM:<four@x.example>\r\n"),
            b"451 4.7.1 Rate limit exceeded (messages per client network: 3 per minute), try again later\r\n",
        )

    def test_bytes_counted_at_acceptance_checked_at_mail(self) -> None:
        tier = TierConfig(data_bytes=[LimitConfig(300)])
        gateway = Gateway(config_with(limits(anonymous=tier)))
        server = gateway.greeted()
        big = b"Subject: x\r\n\r\n" + b"y" * 330 + b"\r\n.\r\n"
        server.exchange(b"MAIL FROM:<s@sender.example>\r\nRCPT TO:<a@example.org>\r\nDATA\r\n")
        self.assertIn(b"250 2.0.0 Ok: queued as", server.exchange(big))
        self.assertEqual(
            server.exchange(b"MAIL FROM:<s@sender.example>\r\n"),
            b"451 4.7.1 Rate limit exceeded (bytes per client address: 300 per minute), try again later\r\n",
        )
        gateway.clock.advance(60)
        server = gateway.greeted()
        self.assertEqual(server.exchange(b"MAIL FROM:<s@sender.example> SIZE=400\r\n")[:3], b"451")
        self.assertEqual(server.exchange(b"MAIL FROM:<s@sender.example> SIZE=200\r\n"), b"250 2.1.0 Ok\r\n")

    def test_reject_action_550(self) -> None:
        tier = TierConfig(messages=[LimitConfig(1, window=86_400_000, action="reject")])
        gateway = Gateway(config_with(limits(anonymous=tier)))
        server = gateway.greeted()
        self.assertIn(b"250 2.0.0 Ok: queued", send(server))
        self.assertEqual(
            server.exchange(b"MAIL FROM:<s@sender.example>\r\n"),
            b"550 5.7.1 Quota exceeded (messages per client address: 1 per day)\r\n",
        )

    def test_tarpit_holds_the_reply_then_lets_it_through(self) -> None:
        tier = TierConfig(messages=[LimitConfig(1, action="tarpit")])
        gateway = Gateway(config_with(limits(anonymous=tier, tarpit_delay=3_000)))
        server = gateway.greeted()
        self.assertIn(b"250 2.0.0 Ok: queued", send(server))
        self.assertEqual(server.exchange(b"MAIL FROM:<s@sender.example>\r\nNOOP\r\n"), b"")
        gateway.clock.advance(2.9)
        self.assertEqual(server.take(), b"")
        gateway.clock.advance(0.1)
        self.assertEqual(server.take(), b"250 2.1.0 Ok\r\n250 2.0.0 Ok\r\n")


class RcptPhaseTests(unittest.TestCase):
    def test_recipient_rate_451_at_rcpt(self) -> None:
        gateway = Gateway(config_with(limits(anonymous=TierConfig(recipients=[LimitConfig(2)]))))
        server = gateway.greeted()
        server.exchange(b"MAIL FROM:<s@sender.example>\r\n")
        self.assertEqual(
            server.exchange(
                b"RCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\n"
            ),
            b"250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
            b"451 4.7.1 <c@example.org>: Rate limit exceeded (recipients per client address: 2 per minute),"
            b" try again later\r\n",
        )

    def test_domain_max_recipients_per_message_452(self) -> None:
        domain = DomainConfig(
            domains=["example.org"], rate_limits=RateLimitsConfig(max_recipients_per_message=2)
        )
        gateway = Gateway(config_with(domain_configs=[domain], max_recipients=10))
        server = gateway.greeted()
        server.exchange(b"MAIL FROM:<s@sender.example>\r\n")
        out = server.exchange(
            b"RCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\n"
        )
        self.assertEqual(
            out,
            b"250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
            b"452 4.5.3 Too many recipients at example.org in one message\r\n",
        )
        # The next message starts again.
        self.assertIn(b"250 2.0.0 Ok: queued", server.exchange(b"DATA\r\n" + MESSAGE))
        self.assertIn(b"250 2.1.5", send(server, ("d@example.org",)))

    def test_domain_max_messages_per_minute_451_at_rcpt(self) -> None:
        domain = DomainConfig(
            domains=["example.org"], rate_limits=RateLimitsConfig(max_messages_per_minute=2)
        )
        gateway = Gateway(config_with(domain_configs=[domain]))
        server = gateway.greeted()
        other = gateway.greeted("203.0.113.5")
        # Two recipients at the domain in one message count once.
        self.assertIn(b"250 2.0.0 Ok: queued", send(server, ("a@example.org", "b@example.org")))
        self.assertIn(b"250 2.0.0 Ok: queued", send(other))  # all clients together
        server.exchange(b"MAIL FROM:<s@sender.example>\r\n")
        self.assertEqual(
            server.exchange(b"RCPT TO:<a@example.org>\r\n"),
            b"451 4.7.1 <a@example.org>: Rate limit exceeded (messages to example.org: 2 per minute),"
            b" try again later\r\n",
        )
        gateway.clock.advance(30)
        server = gateway.greeted()
        server.exchange(b"MAIL FROM:<s@sender.example>\r\n")
        self.assertEqual(server.exchange(b"RCPT TO:<a@example.org>\r\n"), b"250 2.1.5 Ok\r\n")

    def test_allowed_ips_550_at_rcpt(self) -> None:
        domain = DomainConfig(domains=["example.org"], allowed_ips=["198.51.100.0/24"])
        gateway = Gateway(config_with(domain_configs=[domain]))
        outsider = gateway.greeted()
        outsider.exchange(b"MAIL FROM:<s@sender.example>\r\n")
        self.assertEqual(
            outsider.exchange(b"RCPT TO:<a@example.org>\r\n"),
            b"550 5.7.1 <a@example.org>: Client address not allowed to send mail to this domain\r\n",
        )
        allowed = gateway.greeted("198.51.100.7")
        self.assertIn(b"250 2.0.0 Ok: queued", send(allowed))
        # An authenticated session is not held to it.
        outsider.exchange(b"RSET\r\nAUTH PLAIN " + PLAIN + b"\r\n")
        self.assertIn(b"250 2.0.0 Ok: queued", send(outsider))


class AuthPhaseTests(unittest.TestCase):
    def test_auth_failures_421_and_close(self) -> None:
        tier = TierConfig(auth_failures=[LimitConfig(2, window=600_000)])
        gateway = Gateway(config_with(limits(anonymous=tier)))
        server = gateway.greeted()
        for _ in range(2):
            self.assertEqual(server.exchange(b"AUTH PLAIN " + WRONG + b"\r\n")[:3], b"535")
        self.assertEqual(
            server.exchange(b"AUTH PLAIN " + PLAIN + b"\r\n"),
            b"421 4.7.0 mx.example.test Too many failed authentications (failed AUTH attempts per client"
            b" address: 2 per 600 seconds), try again later\r\n",
        )
        self.assertTrue(server.transport.disconnecting)
        # A new connection from the same address is refused too, until the failures age.
        again = gateway.greeted()
        self.assertEqual(again.exchange(b"AUTH PLAIN " + PLAIN + b"\r\n")[:9], b"421 4.7.0")
        gateway.clock.advance(300)
        self.assertEqual(gateway.greeted().exchange(b"AUTH PLAIN " + PLAIN + b"\r\n")[:3], b"235")


class TierTests(unittest.TestCase):
    def test_authenticated_not_held_by_anonymous_tier(self) -> None:
        tiers = limits(
            anonymous=TierConfig(messages=[LimitConfig(1)]),
            authenticated=TierConfig(messages=[LimitConfig(3, per="user")]),
        )
        gateway = Gateway(config_with(tiers))
        anonymous = gateway.greeted()
        self.assertIn(b"250 2.0.0 Ok: queued", send(anonymous))
        self.assertEqual(anonymous.exchange(b"MAIL FROM:<s@sender.example>\r\n")[:9], b"451 4.7.1")
        user = gateway.greeted()  # the same address
        self.assertEqual(user.exchange(b"AUTH PLAIN " + PLAIN + b"\r\n")[:3], b"235")
        for _ in range(3):
            self.assertIn(b"250 2.0.0 Ok: queued", send(user))
        self.assertEqual(
            user.exchange(b"MAIL FROM:<s@sender.example>\r\n"),
            b"451 4.7.1 Rate limit exceeded (messages per user: 3 per minute), try again later\r\n",
        )
        self.assertNotIn(b"alice", user.take())

    def test_named_tier_and_relay_networks(self) -> None:
        tiers = limits(
            anonymous=TierConfig(messages=[LimitConfig(1)]),
            tiers=[
                NetworkTierConfig(name="partner", networks=["198.51.100.0/24"], messages=[LimitConfig(2)])
            ],
        )
        config = config_with(tiers, relay_networks=["203.0.113.0/24"])
        gateway = Gateway(config)
        assert isinstance(gateway.limits, IngressLimits)
        partner = gateway.greeted("198.51.100.1")
        self.assertEqual(gateway.limits.tier(partner.protocol.session), "tier:partner")
        for _ in range(2):
            self.assertIn(b"250 2.0.0 Ok: queued", send(partner))
        self.assertEqual(partner.exchange(b"MAIL FROM:<s@sender.example>\r\n")[:9], b"451 4.7.1")
        relay = gateway.greeted("203.0.113.9")  # relayNetworks tier: no limits set
        self.assertEqual(gateway.limits.tier(relay.protocol.session), "relayNetworks")
        for _ in range(5):
            self.assertIn(b"250 2.0.0 Ok: queued", send(relay))
