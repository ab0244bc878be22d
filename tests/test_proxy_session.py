"""One proxied connection on MemoryReactorClock: IP rules, connection caps, peek and deadline, routing,
round robin and failover, connect timeout, PROXY headers in and out, lifetime and idle limits, counters.

The client is a StringTransport; backends are the connection attempts MemoryReactorClock records, answered
by the test (accepted with a transport, or failed with a reason).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.config import load_options
from dcrouter.net.cidr import CidrSet
from dcrouter.net.proxyprotocol import encode_v1, encode_v2
from dcrouter.net.targets import Target
from dcrouter.proxy.routes import PortRange, ProxyRoute, ProxyTarget, RouteTable, build_routes
from dcrouter.proxy.session import REFUSAL_LINGER, ProxyContext, ProxySession, ProxySettings
from tests.test_proxy_forward import BufferingTransport
from tests.tls_hellos import real_client_hello

HELLO_A = real_client_hello("a.test")
HELLO_B = real_client_hello("b.test")
HELLO_NO_SNI = real_client_hello(None)


def route(
    name: str,
    *,
    ports: tuple[int, ...] = (443,),
    domains: tuple[str, ...] = (),
    hosts: tuple[str, ...] = ("10.0.0.1",),
    port: int | None = None,
    allow: list[str] | None = None,
    block: list[str] | None = None,
    client_ips: list[str] | None = None,
    max_connections: int | None = None,
    timeout_ms: int | None = None,
    priority: int = 0,
) -> ProxyRoute:
    return ProxyRoute(
        name=name,
        priority=priority,
        ports=tuple(PortRange(p, p) for p in ports),
        domains=domains,
        client_ips=CidrSet(client_ips) if client_ips else None,
        allow=CidrSet(allow) if allow else None,
        block=CidrSet(block) if block else None,
        target=ProxyTarget(hosts, port),
        tls_mode="passthrough",
        max_connections=max_connections,
        connection_timeout_ms=timeout_ms,
        source=name,
    )


A = route("a", domains=("a.test",), hosts=("10.0.0.1",))
B = route("b", domains=("b.test",), hosts=("10.0.0.2",), port=8443)
ANY = route("any", hosts=("10.0.0.9",))


class SessionTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def context(self, *routes: ProxyRoute, **settings: Any) -> ProxyContext:
        self.ctx = ProxyContext(RouteTable(routes), ProxySettings(**settings), self.reactor)
        return self.ctx

    def connect(self, ip: str = "192.0.2.1", port: int = 443, data: bytes = b"") -> tuple[ProxySession, Any]:
        address_type = IPv6Address if ":" in ip else IPv4Address
        transport = BufferingTransport(limit=10**9)
        transport.peerAddr = address_type("TCP", ip, 40000)
        transport.hostAddr = address_type("TCP", "::1" if ":" in ip else "127.0.0.1", port)
        session = ProxySession(self.ctx, port)
        session.makeConnection(transport)
        if data:
            session.dataReceived(data)
        return session, transport

    def attempts(self) -> list[tuple[str, int]]:
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    def accept(self, index: int = -1) -> tuple[Any, BufferingTransport]:
        """Let the backend of attempt ``index`` accept: returns its protocol and transport."""
        factory = self.reactor.tcpClients[index][2]
        protocol = factory.buildProtocol(None)
        transport = BufferingTransport(limit=10**9)
        protocol.makeConnection(transport)
        return protocol, transport

    def refuse(self, index: int = -1) -> None:
        factory = self.reactor.tcpClients[index][2]
        factory.clientConnectionFailed(self.reactor.connectors[index], Failure(ConnectionRefusedError()))

    def assertRefused(self, transport: StringTransport, session: ProxySession) -> None:
        """Refused: no byte written, our FIN sent at once, the connection closed at the latest
        REFUSAL_LINGER seconds later (what the client still sends meanwhile is read and dropped)."""
        self.assertEqual(transport.value(), b"", "a refused client must get no bytes")
        self.assertIsNotNone(session.refused)
        if not transport.disconnecting:
            self.assertTrue(getattr(transport, "write_closed", False), "the client got no FIN")
            self.assertEqual(transport.producerState, "producing", "a lingering close must read")
            session.dataReceived(b"still sending")
            self.reactor.advance(REFUSAL_LINGER)
        self.assertTrue(transport.disconnecting, "the client was not closed")
        self.assertEqual(transport.value(), b"", "a refused client must get no bytes")


class RoutingTests(SessionTestCase):
    def test_sni_picks_the_backend_and_the_hello_is_replayed_first(self) -> None:
        self.context(A, B)
        session, client = self.connect(data=HELLO_B)
        self.assertEqual(self.attempts(), [("10.0.0.2", 8443)])
        self.assertEqual(client.producerState, "paused")  # nothing more read while connecting
        session.dataReceived(b"in flight")
        _, backend = self.accept()
        self.assertEqual(backend.value(), HELLO_B + b"in flight")
        self.assertEqual(client.producerState, "producing")
        self.assertIs(session.route, B)

    def test_hello_byte_by_byte(self) -> None:
        self.context(A, B)
        session, _ = self.connect()
        for i in range(len(HELLO_A) - 1):
            session.dataReceived(HELLO_A[i : i + 1])
        self.assertEqual(self.attempts(), [])
        session.dataReceived(HELLO_A[-1:])
        self.assertEqual(self.attempts(), [("10.0.0.1", 443)])  # target port: the listening port

    def test_http_by_host(self) -> None:
        self.context(
            route("www", ports=(80,), domains=("www.test",), hosts=("10.0.1.1",)),
            route("api", ports=(80,), domains=("api.test",), hosts=("10.0.1.2",)),
        )
        request = b"GET / HTTP/1.1\r\nHost: API.test.:80\r\n\r\n"
        self.connect(port=80, data=request)
        self.assertEqual(self.attempts(), [("10.0.1.2", 80)])
        _, backend = self.accept()
        self.assertEqual(backend.value(), request)

    def test_no_route_closes(self) -> None:
        self.context(A, B)
        session, client = self.connect(data=real_client_hello("c.test"))
        self.assertRefused(client, session)
        self.assertEqual(self.attempts(), [])

    def test_refused_client_that_ends_is_closed_at_once(self) -> None:
        """The lingering close of a refusal ends as soon as the client's EOF says nothing more comes."""
        self.context(A, B)
        session, client = self.connect(data=real_client_hello("c.test"))
        self.assertTrue(client.write_closed)
        self.assertFalse(client.disconnecting)
        session.readConnectionLost()
        self.assertTrue(client.disconnecting)
        session.connectionLost(Failure(ConnectionDone()))
        self.assertFalse([call for call in self.reactor.getDelayedCalls() if call.active()])

    def test_absent_sni_never_reaches_a_named_route(self) -> None:
        self.context(A)
        session, client = self.connect(data=HELLO_NO_SNI)
        self.assertRefused(client, session)
        self.context(A, ANY)
        session, _ = self.connect(data=HELLO_NO_SNI)
        self.assertIs(session.route, ANY)

    def test_malformed_hello_falls_to_a_route_for_any_name(self) -> None:
        self.context(A, ANY)
        broken = HELLO_A[:5] + b"\x02" + HELLO_A[6:]  # handshake type ServerHello
        session, _ = self.connect(data=broken)
        self.assertIs(session.route, ANY)
        self.assertIsNone(session.sniffed.server_name)  # type: ignore[union-attr]

    def test_deadline_gives_up_and_uses_the_default(self) -> None:
        self.context(A, ANY, sni_timeout=5)
        session, _ = self.connect(data=HELLO_A[:20])
        self.reactor.advance(4.9)
        self.assertEqual(self.attempts(), [])
        self.reactor.advance(0.1)
        self.assertIs(session.route, ANY)
        _, backend = self.accept()
        self.assertEqual(backend.value(), HELLO_A[:20])

    def test_deadline_without_default_closes(self) -> None:
        self.context(A, sni_timeout=5)
        session, client = self.connect()
        self.reactor.advance(5)
        self.assertRefused(client, session)

    def test_port_without_named_routes_is_not_peeked(self) -> None:
        """A server-first protocol (SMTP) would wait forever for client bytes that never come."""
        self.context(route("smtp", ports=(25,), hosts=("10.0.2.1",)))
        self.connect(port=25)
        self.assertEqual(self.attempts(), [("10.0.2.1", 25)])
        protocol, _ = self.accept()
        protocol.dataReceived(b"220 mx\r\n")

    def test_a_terminating_route_for_any_name_is_peeked(self) -> None:
        # TLS must be told from plain HTTP (redirected) even when no route there selects by name.
        self.context(dataclasses.replace(route("web", ports=(443,)), tls_mode="terminate"))
        session, _ = self.connect(data=b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        self.assertIsNone(session.refused)
        self.assertIsNotNone(session.sniffed)
        assert session.sniffed is not None
        self.assertEqual(session.sniffed.server_name, "a.example")

    def test_sni_disabled_port_is_not_peeked(self) -> None:
        self.context(A, ANY, no_sni_ports=frozenset({443}))
        session, _ = self.connect()
        self.assertIs(session.route, ANY)


class IpRuleTests(SessionTestCase):
    def test_blocked_everywhere_is_refused_before_reading(self) -> None:
        self.context(route("a", domains=("a.test",), block=["192.0.2.0/24"]))
        session, client = self.connect("192.0.2.9")
        self.assertRefused(client, session)
        session, client = self.connect("198.51.100.1", data=HELLO_A)
        self.assertIsNone(session.refused)

    def test_block_wins_over_allow(self) -> None:
        self.context(route("r", allow=["10.0.0.0/8"], block=["10.1.0.0/16"]))
        session, client = self.connect("10.1.2.3")
        self.assertRefused(client, session)
        session, _ = self.connect("10.2.0.1")
        self.assertIsNone(session.refused)
        session, client = self.connect("192.0.2.1")  # outside the allow list
        self.assertRefused(client, session)

    def test_a_blocked_client_is_not_handed_to_another_route(self) -> None:
        guarded = route("a", domains=("a.test",), block=["192.0.2.0/24"])
        self.context(guarded, ANY)
        session, client = self.connect("192.0.2.9", data=HELLO_A)
        self.assertRefused(client, session)
        self.assertEqual(self.attempts(), [])
        self.assertEqual(self.ctx.counters["a"].refused, 1)

    def test_ipv6_and_ipv4_mapped_clients(self) -> None:
        self.context(route("r", block=["192.0.2.0/24", "2001:db8:bad::/48"]))
        for ip in ("::ffff:192.0.2.5", "2001:db8:bad::1"):
            session, client = self.connect(ip)
            self.assertRefused(client, session)
        session, _ = self.connect("2001:db8:600d::1")
        self.assertIsNone(session.refused)

    def test_max_connections_per_ip(self) -> None:
        self.context(ANY, max_connections_per_ip=2)
        first, _ = self.connect("192.0.2.1")
        self.connect("::ffff:192.0.2.1")  # the same client, as a dual-stack listener reports it
        session, client = self.connect("192.0.2.1")
        self.assertRefused(client, session)
        session, _ = self.connect("192.0.2.2")
        self.assertIsNone(session.refused)
        first.connectionLost(Failure(ConnectionRefusedError()))
        session, _ = self.connect("192.0.2.1")
        self.assertIsNone(session.refused)


class ConnectionCapTests(SessionTestCase):
    def test_route_max_connections(self) -> None:
        capped = route("a", domains=("a.test",), max_connections=2)
        self.context(capped, ANY)
        sessions = [self.connect(f"192.0.2.{i}", data=HELLO_A)[0] for i in (1, 2)]
        session, client = self.connect("192.0.2.3", data=HELLO_A)
        self.assertRefused(client, session)
        self.assertEqual(self.ctx.counters["a"].active, 2)
        self.assertEqual(self.ctx.counters["a"].refused, 1)
        sessions[0].connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(self.ctx.counters["a"].active, 1)
        session, _ = self.connect("192.0.2.3", data=HELLO_A)
        self.assertIsNone(session.refused)

    def test_every_spelling_of_a_cap_bites(self) -> None:
        """SmartProxy's per-route maxConnections was never enforced; here every spelling must refuse."""
        spellings = {
            "domainConfigs": {
                "globalPortRanges": [{"from": 443, "to": 443}],
                "domainConfigs": [{"domains": ["a.test"], "targetIPs": ["10.0.0.1"], "maxConnections": 1}],
            },
            "routes": {
                "routes": [
                    {
                        "match": {"ports": 443, "domains": "a.test"},
                        "action": {"type": "forward", "target": {"host": "10.0.0.1"}},
                        "security": {"maxConnections": 1},
                    }
                ]
            },
            "maxConnectionsPerIP": {"fromPort": 443, "targetIP": "10.0.0.1", "maxConnectionsPerIP": 1},
        }
        for spelling, proxy in spellings.items():
            options = load_options({"smartProxyConfig": proxy}).options
            routes = build_routes(options.smart_proxy_config, None)
            self.ctx = ProxyContext(
                RouteTable(routes), ProxySettings.from_config(options.smart_proxy_config), self.reactor
            )
            first, _ = self.connect("192.0.2.1", data=HELLO_A)
            self.assertIsNone(first.refused, spelling)
            second, client = self.connect("192.0.2.1", data=HELLO_A)
            self.assertIsNotNone(second.refused, spelling)
            self.assertEqual(client.value(), b"", spelling)


class TargetTests(SessionTestCase):
    def test_round_robin(self) -> None:
        self.context(route("r", hosts=("10.0.0.1", "10.0.0.2", "10.0.0.3"), port=80))
        for _ in range(4):
            self.connect()
        self.assertEqual(
            self.attempts(), [("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80), ("10.0.0.1", 80)]
        )

    def test_refused_target_fails_over_and_is_marked_down(self) -> None:
        self.context(route("r", hosts=("10.0.0.1", "10.0.0.2"), port=80), target_down_time=30)
        self.connect(data=b"x")
        self.refuse()
        self.assertEqual(self.attempts(), [("10.0.0.1", 80), ("10.0.0.2", 80)])
        _, backend = self.accept()
        self.assertEqual(backend.value(), b"x")
        # Round robin would start at .2 now anyway; twice more shows .1 is skipped while down.
        self.connect()
        self.connect()
        self.assertEqual(self.attempts()[2:], [("10.0.0.2", 80), ("10.0.0.2", 80)])
        self.reactor.advance(30)
        self.connect()
        self.connect()
        self.assertIn(("10.0.0.1", 80), self.attempts()[4:])

    def test_connect_timeout_fails_over(self) -> None:
        """The session relies on the connector's own timeout (MemoryReactor keeps no timers for its
        connectors: they are armed here as ``BaseConnector.connect`` arms them)."""
        self.context(route("r", hosts=("10.0.0.1", "10.0.0.2"), port=80), connect_timeout=3)
        self.connect()
        self.assertEqual([timeout for _, _, _, timeout, _ in self.reactor.tcpClients], [3])
        factory, connector = self.reactor.tcpClients[0][2], self.reactor.connectors[0]
        self.reactor.callLater(3, factory.clientConnectionFailed, connector, Failure(ConnectTimeoutError()))
        self.reactor.advance(2.9)
        self.assertEqual(len(self.attempts()), 1)
        self.reactor.advance(0.1)
        self.assertEqual(self.attempts(), [("10.0.0.1", 80), ("10.0.0.2", 80)])
        self.assertEqual([timeout for _, _, _, timeout, _ in self.reactor.tcpClients], [3, 3])
        self.assertTrue(self.ctx.health.is_down(Target("10.0.0.1", "10.0.0.1", 80)))

    def test_no_target_reachable_closes_the_client(self) -> None:
        self.context(route("r", hosts=("10.0.0.1", "10.0.0.2"), port=80))
        session, client = self.connect()
        self.refuse()
        self.refuse()
        self.assertRefused(client, session)
        session.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(self.ctx.counters["r"].active, 0)
        self.assertEqual(self.ctx.per_ip, {})

    def test_client_gone_while_connecting(self) -> None:
        self.context(route("r", hosts=("10.0.0.1", "10.0.0.2"), port=80))
        session, _ = self.connect()
        session.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(len(self.attempts()), 1)  # the attempt was cancelled, not failed over
        self.assertEqual(self.ctx.counters["r"].active, 0)
        self.assertEqual(self.ctx.per_ip, {})
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class ProxyHeaderTests(SessionTestCase):
    def test_v1_header_written_before_the_replayed_bytes(self) -> None:
        self.context(A, proxy_protocol="v1")
        self.connect("192.0.2.7", data=HELLO_A)
        _, backend = self.accept()
        self.assertEqual(backend.value(), b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 443\r\n" + HELLO_A)

    def test_v2_header(self) -> None:
        self.context(ANY, proxy_protocol="v2")
        _, client = self.connect("2001:db8::7")
        _, backend = self.accept()
        self.assertEqual(backend.value(), encode_v2(client.getPeer(), client.getHost()))

    def test_trusted_proxy_header_gives_the_client_address(self) -> None:
        self.context(A, trusted_proxies=CidrSet(["10.9.0.0/16"]), proxy_protocol="v1")
        client_addr = IPv4Address("TCP", "192.0.2.50", 1234)
        header = encode_v1(client_addr, IPv4Address("TCP", "203.0.113.1", 443))
        session, _ = self.connect("10.9.0.1", data=header + HELLO_A[:10])
        session.dataReceived(HELLO_A[10:])
        self.assertEqual(session.client_ip, "192.0.2.50")
        _, backend = self.accept()
        self.assertEqual(backend.value(), header + HELLO_A)

    def test_ip_rules_apply_to_the_address_in_a_trusted_header(self) -> None:
        self.context(
            route("a", domains=("a.test",), block=["192.0.2.0/24"]), trusted_proxies=CidrSet(["10.9.0.0/16"])
        )
        header = encode_v1(IPv4Address("TCP", "192.0.2.50", 1), IPv4Address("TCP", "203.0.113.1", 443))
        session, client = self.connect("10.9.0.1", data=header)
        self.assertRefused(client, session)

    def test_header_from_an_untrusted_peer_is_refused(self) -> None:
        self.context(A, ANY, trusted_proxies=CidrSet(["10.9.0.0/16"]))
        header = encode_v1(IPv4Address("TCP", "192.0.2.50", 1), IPv4Address("TCP", "203.0.113.1", 443))
        session, client = self.connect("198.51.100.1", data=header + HELLO_A)
        self.assertRefused(client, session)
        self.assertEqual(self.attempts(), [])

    # A client's own PROXY header never reaches a backend, whatever the port: where nothing is peeked (a
    # server may speak first), the client's first bytes are looked at when they come, before forwarding.

    SPOOF = b"PROXY TCP4 203.0.113.8 127.0.0.1 5555 443\r\n"
    SPOOF_V2 = encode_v2(IPv4Address("TCP", "203.0.113.8", 5555), IPv4Address("TCP", "127.0.0.1", 443))

    def assertSpoofRefused(self, session: ProxySession, client: Any, backend: Any, header: bytes) -> None:
        self.assertEqual(backend.value(), header, "only dcrouter's own header reached the backend")
        self.assertTrue(client.aborted and backend.aborted)
        self.assertEqual(session.refused, "PROXY header from the client")
        assert session.route is not None
        self.assertEqual(self.ctx.counters[session.route.name].refused, 1)

    def test_header_from_an_untrusted_peer_on_a_port_not_peeked(self) -> None:
        for spoof in (self.SPOOF, self.SPOOF_V2):
            self.context(ANY, proxy_protocol="v1", trusted_proxies=CidrSet(["127.0.0.25/32"]))
            session, client = self.connect("127.0.0.1")
            _, backend = self.accept()
            ours = encode_v1(client.getPeer(), client.getHost())
            session.dataReceived(spoof + b"EHLO x\r\n")
            self.assertSpoofRefused(session, client, backend, ours)

    def test_header_split_across_reads_on_a_port_not_peeked(self) -> None:
        self.context(ANY)
        session, client = self.connect()
        _, backend = self.accept()
        for byte in self.SPOOF[:6]:
            session.dataReceived(bytes([byte]))
        self.assertSpoofRefused(session, client, backend, b"")

    def test_server_speaks_first_on_a_port_not_peeked(self) -> None:
        self.context(ANY, proxy_protocol="v1")
        session, client = self.connect()
        protocol, backend = self.accept()
        ours = backend.value()
        protocol.dataReceived(b"220 mail.test ESMTP\r\n")
        self.assertEqual(client.value(), b"220 mail.test ESMTP\r\n")
        session.dataReceived(b"PROX")  # may still become a header: held back
        self.assertEqual(backend.value(), ours)
        session.dataReceived(b"Y? EHLO x\r\n")  # cannot: forwarded whole
        self.assertEqual(backend.value(), ours + b"PROXY? EHLO x\r\n")
        session.dataReceived(self.SPOOF)  # only the client's first bytes count
        self.assertEqual(backend.value(), ours + b"PROXY? EHLO x\r\n" + self.SPOOF)
        self.assertIsNone(session.refused)

    def test_start_of_a_header_then_silence_on_a_port_not_peeked(self) -> None:
        self.context(ANY, sni_timeout=5)
        session, client = self.connect()
        _, backend = self.accept()
        session.dataReceived(b"\r\n\r\n")  # the v2 signature's start
        self.reactor.advance(4.9)
        self.assertFalse(client.aborted)
        self.reactor.advance(0.1)
        self.assertSpoofRefused(session, client, backend, b"")

    def test_start_of_a_header_then_eof_on_a_port_not_peeked(self) -> None:
        self.context(ANY)
        session, client = self.connect()
        _, backend = self.accept()
        session.dataReceived(b"PROX")
        session.readConnectionLost()
        self.assertSpoofRefused(session, client, backend, b"")

    def test_header_after_the_peek_gave_up(self) -> None:
        # A peeked port whose client says nothing within sniTimeout goes to a route for any name; its first
        # bytes, when they come, are looked at there.
        self.context(A, ANY, sni_timeout=5)
        session, client = self.connect()
        self.reactor.advance(5)
        _, backend = self.accept()
        session.dataReceived(self.SPOOF)
        self.assertSpoofRefused(session, client, backend, b"")

    def test_header_from_the_client_behind_a_trusted_proxy(self) -> None:
        self.context(A, ANY, trusted_proxies=CidrSet(["10.9.0.0/16"]))
        theirs = encode_v1(IPv4Address("TCP", "192.0.2.50", 1), IPv4Address("TCP", "203.0.113.1", 443))
        session, client = self.connect("10.9.0.1", data=theirs + self.SPOOF)
        self.assertRefused(client, session)
        self.assertEqual(self.attempts(), [])
        self.context(ANY, trusted_proxies=CidrSet(["10.9.0.0/16"]))
        session, client = self.connect("10.9.0.1", data=theirs)
        _, backend = self.accept()
        session.dataReceived(self.SPOOF)
        self.assertSpoofRefused(session, client, backend, b"")

    def test_trusted_peer_must_send_a_valid_header_in_time(self) -> None:
        self.context(A, trusted_proxies=CidrSet(["10.9.0.0/16"]), sni_timeout=5)
        session, client = self.connect("10.9.0.1", data=HELLO_A)
        self.assertRefused(client, session)
        session, client = self.connect("10.9.0.1", data=b"PROXY TCP4 ")
        self.reactor.advance(5)
        self.assertRefused(client, session)


class RedirectPortTests(SessionTestCase):
    """Plain HTTP that reaches a terminating route is redirected to the port HTTPS is served on."""

    def terminating(self, ports: Any, acme_port: int = 80) -> None:
        web = {
            "name": "web",
            "match": {"ports": ports, "domains": ["a.example"]},
            "action": {"type": "forward", "target": {"host": "10.0.0.1", "port": 8080}},
            "tls": {"mode": "terminate", "certificate": "auto"},
        }
        acme = {"enabled": True, "accountEmail": "ops@a.example", "port": acme_port}
        options = load_options({"smartProxyConfig": {"routes": [web], "acme": acme}}).options
        routes = RouteTable(build_routes(options.smart_proxy_config, None))
        self.ctx = ProxyContext(routes, ProxySettings(), self.reactor)

    def location(self, port: int) -> bytes:
        request = b"GET /p HTTP/1.1\r\nHost: a.example:%d\r\n\r\n" % port
        _, client = self.connect(port=port, data=request)
        (location,) = [line for line in client.value().split(b"\r\n") if line.startswith(b"Location:")]
        return location

    def test_a_port_that_is_not_443_is_kept(self) -> None:
        self.terminating([{"from": 31080, "to": 31081}])
        self.assertEqual(self.location(31080), b"Location: https://a.example:31081/p")

    def test_443_is_left_out(self) -> None:
        self.terminating([80, 443], acme_port=8080)
        self.assertEqual(self.location(80), b"Location: https://a.example/p")

    def test_from_acme_port_to_the_routes_https_port(self) -> None:
        self.terminating(8443)
        self.assertEqual(self.location(80), b"Location: https://a.example:8443/p")

    def test_one_port_for_both(self) -> None:
        self.terminating(31081, acme_port=31080)
        self.assertEqual(self.location(31081), b"Location: https://a.example:31081/p")


class PlainHttpOnTerminatingRouteTests(SessionTestCase):
    def test_an_unfinished_request_head_is_dropped_after_the_connection_timeout(self) -> None:
        # Past sniTimeout the peek gives up with the head unfinished; the plain-HTTP answerer must not wait
        # for the rest for good (a per-IP slot each, until maxConnectionLifetime).
        web = dataclasses.replace(route("web", ports=(80,), timeout_ms=60_000), tls_mode="terminate")
        self.context(web, sni_timeout=5)
        session, client = self.connect(port=80, data=b"GET / HTTP/1.1\r\nHost: a.example\r\n")
        self.reactor.advance(5)
        self.assertIsNone(session.refused)
        self.reactor.advance(59.9)
        self.assertFalse(client.aborted)
        self.reactor.advance(0.1)
        self.assertTrue(client.aborted)
        session.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(self.ctx.per_ip, {})
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class LimitTests(SessionTestCase):
    def test_lifetime(self) -> None:
        self.context(ANY, max_connection_lifetime=60)
        session, client = self.connect()
        _, backend = self.accept()
        self.reactor.advance(59)
        session.dataReceived(b"keepalive")
        self.assertFalse(client.aborted)
        self.reactor.advance(1)
        self.assertTrue(client.aborted and backend.aborted)

    def test_idle_timeout_from_the_route(self) -> None:
        self.context(route("r", timeout_ms=30_000), max_connection_lifetime=None)
        session, client = self.connect()
        self.accept()
        self.reactor.advance(29)
        session.dataReceived(b"x")
        self.reactor.advance(29)
        self.assertFalse(client.aborted)
        self.reactor.advance(1)
        self.assertTrue(client.aborted)

    def test_counters(self) -> None:
        self.context(A)
        session, _ = self.connect(data=HELLO_A)
        protocol, _ = self.accept()
        protocol.dataReceived(b"server hello")
        counters = self.ctx.counters["a"]
        self.assertEqual((counters.connections, counters.active), (1, 1))
        self.assertEqual((counters.bytes_in, counters.bytes_out), (len(HELLO_A), 12))
        session.connectionLost(Failure(ConnectionRefusedError()))
        protocol.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual((counters.connections, counters.active), (1, 0))
        self.assertEqual(self.ctx.sessions, set())

    def test_client_eof_while_peeking_routes_and_passes_the_eof(self) -> None:
        self.context(route("www", ports=(80,), domains=("www.test",)), route("rest", ports=(80,)))
        request = b"GET / HTTP/1.0\r\nHost: www.test\r\n\r\n"
        session, _ = self.connect(port=80, data=request[:10])
        session.readConnectionLost()
        _, backend = self.accept()
        self.assertEqual(backend.value(), request[:10])
        self.assertTrue(backend.write_closed)


class BalancingTests(SessionTestCase):
    """``loadBalancing`` and health marks as sessions see them: the order of connection attempts."""

    def balanced(self, method: str, *hosts: str, weights: tuple[int, ...] = ()) -> ProxyRoute:
        base = route("r", hosts=hosts, port=80)
        return dataclasses.replace(
            base, target=dataclasses.replace(base.target, balancing=method, weights=weights)
        )

    def test_least_connections_counts_open_backend_connections(self) -> None:
        self.context(self.balanced("leastConnections", "10.0.0.1", "10.0.0.2"))
        self.connect(data=b"a")
        first, _ = self.accept()  # .1 has one open connection
        self.connect(data=b"b")  # so .2 is chosen
        self.accept()
        self.assertEqual(self.attempts(), [("10.0.0.1", 80), ("10.0.0.2", 80)])
        self.assertEqual(
            {str(t): n for t, n in self.ctx.connections.items()}, {"10.0.0.1:80": 1, "10.0.0.2:80": 1}
        )
        first.connectionLost(Failure(ConnectionDone()))  # .1's backend connection ends
        self.assertEqual({str(t): n for t, n in self.ctx.connections.items()}, {"10.0.0.2:80": 1})
        self.connect()  # .1 (none open) first, whatever the round-robin turn
        self.assertEqual(self.attempts()[-1], ("10.0.0.1", 80))
        self.accept()
        self.connect()  # one each: now the round-robin turn decides, and it is .2's
        self.assertEqual(self.attempts()[-1], ("10.0.0.2", 80))

    def test_source_hash_is_sticky_per_client(self) -> None:
        self.context(self.balanced("sourceHash", "10.0.0.1", "10.0.0.2", "10.0.0.3"))
        for ip in ("192.0.2.7", "192.0.2.8", "2001:db8::9"):
            for _ in range(3):
                self.connect(ip=ip)
            chosen = set(self.attempts()[-3:])
            self.assertEqual(len(chosen), 1, ip)

    def test_weights(self) -> None:
        self.context(self.balanced("roundRobin", "10.0.0.1", "10.0.0.2", weights=(3, 1)))
        for _ in range(8):
            self.connect()
        self.assertEqual([host for host, _ in self.attempts()].count("10.0.0.1"), 6)

    def test_a_target_checks_hold_down_gets_nothing(self) -> None:
        self.context(route("r", hosts=("10.0.0.1", "10.0.0.2"), port=80))
        self.ctx.health.check_failed(Target("10.0.0.1", "10.0.0.1", 80))
        for _ in range(3):
            self.connect()
        self.assertEqual({host for host, _ in self.attempts()}, {"10.0.0.2"})
        self.ctx.health.check_failed(Target("10.0.0.2", "10.0.0.2", 80))
        session, client = self.connect()
        self.assertEqual(len(self.attempts()), 3)  # nothing left to try: refused
        self.assertRefused(client, session)
        self.ctx.health.check_passed(Target("10.0.0.1", "10.0.0.1", 80))
        self.connect()
        self.assertEqual(self.attempts()[-1], ("10.0.0.1", 80))

    def test_checks_hold_targets_down_and_a_reload_replaces_them(self) -> None:
        from dcrouter.net.healthcheck import HealthCheckRule

        checked = route("r", hosts=("10.0.0.1", "10.0.0.2"), port=80)
        rule = HealthCheckRule(kind="tcp", interval=1.0, timeout=0.5, rise=1, fall=1)
        checked = dataclasses.replace(checked, target=dataclasses.replace(checked.target, health_check=rule))
        self.context(checked)
        self.ctx.monitor.start()
        self.assertEqual(self.attempts(), [("10.0.0.1", 80), ("10.0.0.2", 80)])  # probed at once
        self.refuse(0)
        self.accept(1)
        one = Target("10.0.0.1", "10.0.0.1", 80)
        self.assertTrue(self.ctx.health.is_failing(one))
        self.assertEqual(self.ctx.monitor.states(), {("r", "10.0.0.1:80"): False, ("r", "10.0.0.2:80"): True})
        self.connect()
        self.assertEqual(self.attempts()[-1], ("10.0.0.2", 80))
        # A reload without the check: .1 is no longer held down, and no probe runs any more.
        self.ctx.replace(RouteTable([route("r", hosts=("10.0.0.1", "10.0.0.2"), port=80)]), ProxySettings())
        self.assertFalse(self.ctx.health.is_failing(one))
        self.assertEqual(self.ctx.monitor.states(), {})
        before = len(self.attempts())
        self.reactor.advance(10)
        self.assertEqual(len(self.attempts()), before)


class CachedDecisionTests(SessionTestCase):
    """What a session works out once per port, per reload or per subscription (not per connection) must
    follow the reload or the subscription that changes it."""

    def test_the_route_of_a_port_read_without_peeking_follows_a_reload(self) -> None:
        self.context(route("r", ports=(25,), hosts=("10.0.0.1",), port=25))
        self.connect(port=25)
        self.ctx.replace(RouteTable([route("s", ports=(25,), hosts=("10.0.0.2",), port=25)]), ProxySettings())
        session, _ = self.connect(port=25)
        self.assertEqual(self.attempts(), [("10.0.0.1", 25), ("10.0.0.2", 25)])
        self.assertEqual(session.route.name if session.route else None, "s")

    def test_client_ip_rules_are_applied_to_every_connection(self) -> None:
        # Two routes on a port that is not peeked, told apart by client IP: not one answer per port.
        inside = route("inside", ports=(25,), hosts=("10.0.0.1",), port=25, client_ips=["192.0.2.0/24"])
        outside = route("outside", ports=(25,), hosts=("10.0.0.2",), port=25)
        self.context(inside, outside)
        self.connect(ip="192.0.2.1", port=25)
        self.connect(ip="198.51.100.1", port=25)
        self.connect(ip="192.0.2.2", port=25)
        self.assertEqual(self.attempts(), [("10.0.0.1", 25), ("10.0.0.2", 25), ("10.0.0.1", 25)])

    def test_backend_connections_are_counted_once_some_route_balances_by_them(self) -> None:
        self.context(route("r", hosts=("10.0.0.1", "10.0.0.2"), port=80))  # round robin: not counted
        self.connect(data=b"a")
        uncounted, _ = self.accept()
        self.assertEqual(self.ctx.connections, {})
        least = route("r", hosts=("10.0.0.1", "10.0.0.2"), port=80)
        target = dataclasses.replace(least.target, balancing="leastConnections")
        least = dataclasses.replace(least, target=target)
        self.ctx.replace(RouteTable([least]), ProxySettings())
        self.connect(data=b"b")
        counted, _ = self.accept()
        self.assertEqual(sum(self.ctx.connections.values()), 1)
        uncounted.connectionLost(Failure(ConnectionDone()))  # not counted: takes nothing off
        self.assertEqual(sum(self.ctx.connections.values()), 1)
        counted.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.ctx.connections, {})

    def test_connection_events_follow_subscriptions(self) -> None:
        from dcrouter.events import CallableSink, EventBus

        bus = EventBus(self.reactor.seconds)
        self.context(route("r", ports=(25,), port=25))
        self.ctx.events = bus
        seen: list[str] = []
        self.connect(port=25)  # nothing subscribed: no event
        sink = CallableSink(lambda event: seen.append(event.type), "test")
        bus.subscribe(sink, ["connection.*"])
        session, _ = self.connect(port=25)
        session.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(seen, ["connection.connect", "connection.disconnect"])
        bus.unsubscribe(sink)
        session, _ = self.connect(port=25)
        session.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(seen), 2)
