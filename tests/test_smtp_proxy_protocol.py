"""The PROXY protocol on SMTP listeners (dcrouter.smtp.proxied): byte transcripts on a StringTransport, the
header read from trusted proxies only, the real client used for relay rules, limits and Received."""

from __future__ import annotations

import copy
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from dcrouter.config import ConfigError, load_options
from dcrouter.net.cidr import CidrSet
from dcrouter.net.proxyprotocol import encode_v1, encode_v2
from dcrouter.smtp.proxied import ProxyHeaderFactory, ProxyHeaderReader
from dcrouter.smtp.service import describe_listener
from tests.smtp_fixtures import GREETING, ControlledQueue, _clock, make_config, make_factory

PROXY_IP = "10.9.0.1"
CLIENT = IPv4Address("TCP", "203.0.113.7", 51234)
GATEWAY = IPv4Address("TCP", "192.0.2.25", 25)
MAIL = b"MAIL FROM:<sender@example.net>\r\n"


class Connection:
    """A wrapped server on a StringTransport from ``peer``."""

    def __init__(self, test: ProxyCase, peer: str, **config: Any) -> None:
        self.clock = _clock()
        self.queue = ControlledQueue()
        config.setdefault("relay_networks", ["203.0.113.0/24"])
        smtp = make_config(**config)
        self.factory = make_factory(smtp, queue=self.queue, clock=self.clock)
        wrapping = ProxyHeaderFactory(
            self.factory,
            trusted=CidrSet(test.trusted),
            version=test.version,
            timeout=5.0,
            clock=self.clock,
        )
        self.wrapper = wrapping.buildProtocol(IPv4Address("TCP", peer, 40000))
        assert isinstance(self.wrapper, ProxyHeaderReader)
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 25), peerAddress=IPv4Address("TCP", peer, 40000)
        )
        self.wrapper.makeConnection(self.transport)

    @property
    def session(self) -> Any:
        return self.wrapper.wrappedProtocol.session

    def exchange(self, data: bytes) -> bytes:
        self.wrapper.dataReceived(data)
        out = self.transport.value()
        self.transport.clear()
        return out


class ProxyCase(unittest.TestCase):
    trusted = [f"{PROXY_IP}/32"]
    version = "any"

    def connect(self, peer: str = PROXY_IP, **config: Any) -> Connection:
        return Connection(self, peer, **config)


class TrustedProxyTests(ProxyCase):
    def test_v2_header_names_the_client(self) -> None:
        """Nothing is said before the header; after it the session's peer is the client in it."""
        conn = self.connect()
        self.assertEqual(conn.transport.value(), b"")
        self.assertEqual(conn.exchange(encode_v2(CLIENT, GATEWAY)), GREETING)
        self.assertEqual((conn.session.peer_host, conn.session.peer_port), ("203.0.113.7", 51234))
        self.assertEqual(conn.wrapper.getHost(), GATEWAY)

    def test_v1_header_and_pipelined_commands(self) -> None:
        """Bytes after the header in the same segment are the session's first command."""
        conn = self.connect()
        replies = conn.exchange(encode_v1(CLIENT, GATEWAY) + b"HELO client.example\r\n")
        self.assertEqual(replies, GREETING + b"250 mx.example.test\r\n")
        self.assertEqual(conn.session.peer_host, "203.0.113.7")

    def test_header_in_single_bytes(self) -> None:
        conn = self.connect()
        header = encode_v2(CLIENT, GATEWAY)
        for i in range(len(header) - 1):
            self.assertEqual(conn.exchange(header[i : i + 1]), b"")
        self.assertEqual(conn.exchange(header[-1:]), GREETING)

    def test_relay_and_received_use_the_client(self) -> None:
        """relayNetworks covers the client, not the proxy: relaying is allowed, and the Received field
        names the client's address."""
        conn = self.connect()
        conn.exchange(encode_v2(CLIENT, GATEWAY) + b"EHLO client.example\r\n")
        self.assertEqual(conn.exchange(MAIL), b"250 2.1.0 Ok\r\n")
        self.assertEqual(conn.exchange(b"RCPT TO:<someone@elsewhere.example>\r\n"), b"250 2.1.5 Ok\r\n")
        reply = conn.exchange(b"DATA\r\nSubject: hi\r\n\r\nHello.\r\n.\r\n")
        self.assertIn(b"250 2.0.0 Ok: queued as", reply)
        received = conn.queue.bodies[0].split(b"\r\n", 2)[:2]
        self.assertIn(b"[203.0.113.7]", b" ".join(received))
        self.assertNotIn(PROXY_IP.encode(), conn.queue.bodies[0])

    def test_relay_decided_by_the_client_not_the_proxy(self) -> None:
        """The proxy's own address is in relayNetworks, the client's is not: relaying is refused."""
        conn = self.connect(relay_networks=[f"{PROXY_IP}/32"])
        conn.exchange(encode_v2(CLIENT, GATEWAY) + b"EHLO client.example\r\n")
        conn.exchange(MAIL)
        self.assertEqual(
            conn.exchange(b"RCPT TO:<victim@elsewhere.example>\r\n"),
            b"554 5.7.1 <victim@elsewhere.example>: Relay access denied\r\n",
        )

    def test_connection_limit_counts_clients(self) -> None:
        """maxConnectionsPerIP applies to the clients behind the proxy, not to the proxy."""
        policy_config = {"max_connections_per_ip": 1}
        first = self.connect(**policy_config)
        # Two sessions from the same client on the same policy: the second is refused.
        wrapping = ProxyHeaderFactory(
            first.factory, trusted=CidrSet(self.trusted), version="any", timeout=5.0, clock=first.clock
        )
        greetings = []
        for client in (CLIENT, CLIENT, IPv4Address("TCP", "198.51.100.3", 1000)):
            wrapper = wrapping.buildProtocol(None)
            transport = StringTransport(peerAddress=IPv4Address("TCP", PROXY_IP, 40000))
            wrapper.makeConnection(transport)
            wrapper.dataReceived(encode_v2(client, GATEWAY))
            greetings.append(transport.value()[:3])
        self.assertEqual(greetings, [b"220", b"421", b"220"])

    def test_ipv6_client(self) -> None:
        conn = self.connect()
        client = IPv6Address("TCP", "2001:db8::7", 4000)
        conn.exchange(encode_v2(client, IPv6Address("TCP", "2001:db8::25", 25)))
        self.assertEqual(conn.session.peer_host, "2001:db8::7")

    def test_local_header_keeps_the_proxy(self) -> None:
        """A LOCAL header (HAProxy's health check) carries no client: the proxy stays the peer."""
        conn = self.connect()
        self.assertEqual(conn.exchange(encode_v2(None, None)), GREETING)
        self.assertEqual(conn.session.peer_host, PROXY_IP)

    def test_no_header_is_refused(self) -> None:
        """A trusted proxy that speaks SMTP without a header is disconnected, never greeted."""
        conn = self.connect()
        self.assertEqual(conn.exchange(b"EHLO client.example\r\n"), b"")
        self.assertTrue(conn.transport.disconnecting)
        self.assertEqual(len(conn.factory.sessions), 0)

    def test_malformed_header_is_refused(self) -> None:
        conn = self.connect()
        self.assertEqual(conn.exchange(b"PROXY TCP4 not-an-ip 192.0.2.25 1 25\r\n"), b"")
        self.assertTrue(conn.transport.disconnecting)

    def test_header_timeout(self) -> None:
        conn = self.connect()
        conn.exchange(b"PROXY TCP4 203.0.")
        conn.clock.advance(4.9)
        self.assertFalse(conn.transport.disconnecting)
        conn.clock.advance(0.2)
        self.assertTrue(conn.transport.disconnecting)
        self.assertEqual(conn.transport.value(), b"")

    def test_timer_cancelled_after_the_header(self) -> None:
        conn = self.connect()
        conn.exchange(encode_v1(CLIENT, GATEWAY))
        conn.clock.advance(10)
        self.assertFalse(conn.transport.disconnecting)

    def test_connection_lost_before_the_header(self) -> None:
        """The session never started, so it is never told of a loss; the timer goes."""
        conn = self.connect()
        conn.wrapper.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(conn.clock.getDelayedCalls(), [])


class VersionTests(ProxyCase):
    version = "v1"

    def test_other_version_refused(self) -> None:
        conn = self.connect()
        self.assertEqual(conn.exchange(encode_v2(CLIENT, GATEWAY)), b"")
        self.assertTrue(conn.transport.disconnecting)

    def test_own_version_accepted(self) -> None:
        conn = self.connect()
        self.assertEqual(conn.exchange(encode_v1(CLIENT, GATEWAY)), GREETING)


class UntrustedPeerTests(ProxyCase):
    def test_plain_client_is_greeted(self) -> None:
        conn = self.connect(peer="198.51.100.9")
        self.assertEqual(conn.transport.value(), GREETING)
        conn.transport.clear()
        self.assertEqual(conn.exchange(b"HELO c\r\n"), b"250 mx.example.test\r\n")
        self.assertEqual(conn.session.peer_host, "198.51.100.9")

    def test_short_first_bytes_held_until_they_tell(self) -> None:
        """``P`` may start a PROXY header: held back; ``PING`` cannot, and the session sees it whole."""
        conn = self.connect(peer="198.51.100.9")
        conn.transport.clear()
        self.assertEqual(conn.exchange(b"P"), b"")
        self.assertEqual(conn.exchange(b"ING\r\n"), b"500 5.5.1 Error: command not recognized\r\n")

    def test_v1_header_from_untrusted_closes(self) -> None:
        conn = self.connect(peer="198.51.100.9")
        conn.transport.clear()
        self.assertEqual(conn.exchange(encode_v1(CLIENT, GATEWAY)), b"")
        self.assertTrue(conn.transport.disconnecting)
        self.assertEqual(conn.session.peer_host, "198.51.100.9")

    def test_v2_header_from_untrusted_closes(self) -> None:
        """The v2 signature opens with CRLF: no reply to an empty line leaks out before the close."""
        conn = self.connect(peer="198.51.100.9")
        conn.transport.clear()
        self.assertEqual(conn.exchange(encode_v2(CLIENT, GATEWAY)), b"")
        self.assertTrue(conn.transport.disconnecting)


class ListenerTests(unittest.TestCase):
    def test_description(self) -> None:
        config = make_config(proxy_protocol="v2", trusted_proxies=["10.0.0.0/8"])
        self.assertEqual(
            describe_listener(config, 25, True, False), "mx, STARTTLS, PROXY v2 from trustedProxies"
        )


BASE: dict[str, Any] = {
    "smtpConfig": {
        "ports": [2525],
        "hostname": "mx.example.com",
        "domainConfigs": [{"domains": ["example.com"], "targetIPs": ["10.0.0.10"]}],
    }
}


def smtp(**keys: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    raw["smtpConfig"].update(keys)
    return raw


class ConfigTests(unittest.TestCase):
    def errors(self, raw: dict[str, Any]) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            load_options(raw)
        return caught.exception.errors

    def test_loaded(self) -> None:
        options = load_options(
            smtp(proxyProtocol="v2", trustedProxies=["10.0.0.0/8"], proxyHeaderTimeout=3000)
        ).options.smtp_config
        self.assertEqual(
            (options.proxy_protocol, options.trusted_proxies, options.proxy_header_timeout),
            ("v2", ["10.0.0.0/8"], 3000),
        )

    def test_protocol_needs_trusted_proxies(self) -> None:
        errors = self.errors(smtp(proxyProtocol="any"))
        self.assertTrue(any(e.startswith("smtpConfig.trustedProxies") for e in errors), errors)

    def test_trusted_proxies_need_protocol(self) -> None:
        errors = self.errors(smtp(trustedProxies=["10.0.0.0/8"]))
        self.assertTrue(any(e.startswith("smtpConfig.proxyProtocol") for e in errors), errors)

    def test_bad_values(self) -> None:
        errors = self.errors(smtp(proxyProtocol="v3", trustedProxies=["10.0.0.1/8"]))
        self.assertTrue(any("smtpConfig.proxyProtocol" in e for e in errors), errors)
        self.assertTrue(any("smtpConfig.trustedProxies[0]" in e for e in errors), errors)
