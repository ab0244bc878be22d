"""Tests for dcrouter.delivery.mx against a real twisted.names authoritative server on 127.0.0.1 (UDP and
TCP), queried through twisted.names.client.Resolver, as in production."""

from __future__ import annotations

import random
from typing import Any, TypeVar

from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.names import authority, client, dns, server
from twisted.trial import unittest

from dcrouter.delivery.mx import (
    AddressLiteralRefused,
    DnsTemporaryFailure,
    MxResolver,
    NoSuchDomain,
    NullMX,
)
from dcrouter.delivery.route import Route
from dcrouter.net.targets import Target

E = TypeVar("E", bound=Exception)
_reactor: Any = reactor  # typed loosely: the global reactor provides UDP and TCP


class ServerBroke(Exception):
    """Raised by the test zone for names that answer SERVFAIL."""


def A(address: str) -> dns.Record_A:
    return dns.Record_A(address)


def AAAA(address: str) -> dns.Record_AAAA:
    return dns.Record_AAAA(address)


def MX(preference: int, exchange: str) -> dns.Record_MX:
    return dns.Record_MX(preference, exchange.encode("ascii"))


def CNAME(name: str) -> dns.Record_CNAME:
    return dns.Record_CNAME(name.encode("ascii"))


ZONE: dict[str, list[Any]] = {
    "ordered.test": [MX(20, "b.hosts.test"), MX(10, "a.hosts.test"), MX(30, "c.hosts.test")],
    "ties.test": [
        MX(10, "a.hosts.test"),
        MX(10, "b.hosts.test"),
        MX(10, "c.hosts.test"),
        MX(5, "v6.hosts.test"),
    ],
    "implicit.test": [A("127.0.0.5"), AAAA("2001:db8::5")],
    "nullmx.test": [MX(0, "")],
    "nullmx-mixed.test": [MX(0, ""), MX(10, "a.hosts.test")],
    "aliased.test": [MX(10, "alias.hosts.test")],
    "chained.test": [MX(10, "alias2.hosts.test")],
    "skips.test": [MX(10, "missing.hosts.test"), MX(20, "b.hosts.test")],
    "nowhere.test": [MX(10, "missing.hosts.test"), MX(20, "loop1.hosts.test")],
    "textonly.test": [dns.Record_TXT(b"v=spf1 -all")],
    "brokenhost.test": [MX(10, "servfail.hosts.test"), MX(20, "missing.hosts.test")],
    "v6.test": [MX(10, "v6.hosts.test")],
    "shared.test": [MX(10, "a.hosts.test"), MX(20, "a-again.hosts.test")],
    "a.hosts.test": [A("127.0.0.1"), AAAA("2001:db8::1")],
    "a-again.hosts.test": [A("127.0.0.1")],
    "b.hosts.test": [A("127.0.0.2")],
    "c.hosts.test": [A("127.0.0.3")],
    "v6.hosts.test": [AAAA("2001:db8::6")],
    "alias.hosts.test": [CNAME("real.hosts.test")],
    "alias2.hosts.test": [CNAME("alias.hosts.test")],
    "real.hosts.test": [A("127.0.0.7"), AAAA("2001:db8::7")],
    "loop1.hosts.test": [CNAME("loop2.hosts.test")],
    "loop2.hosts.test": [CNAME("loop1.hosts.test")],
    # 40 addresses: 640 octets of answers, more than a UDP reply without EDNS may carry (RFC 1035 §4.2.1).
    "big.hosts.test": [A(f"127.0.1.{i}") for i in range(1, 41)],
}
SERVFAIL = {b"servfail.test", b"servfail.hosts.test"}


class TestZone(authority.FileAuthority):
    """The ``test.`` zone from ZONE, held in memory; names in SERVFAIL fail with a non-DNS error, which
    DNSServerFactory answers with SERVFAIL."""

    soa: Any
    records: Any

    def __init__(self) -> None:
        super().__init__(None)

    def loadFile(self, filename: Any) -> None:
        soa = dns.Record_SOA(
            mname=b"ns.test", rname=b"root.test", serial=1, refresh=60, retry=60, expire=60, minimum=60
        )
        self.soa = (b"test", soa)
        self.records = {name.encode("ascii"): list(records) for name, records in ZONE.items()}
        self.records[b"test"] = [soa]

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> Deferred[Any]:
        if name.lower() in SERVFAIL:
            return defer.fail(ServerBroke(name))
        return super()._lookup(name, cls, type, timeout)


class TestServerFactory(server.DNSServerFactory):
    """Truncates UDP replies over 512 octets the way real servers do (TC set, no records), so that clients
    retry over TCP; tells when its TCP connections are gone."""

    def __init__(self) -> None:
        super().__init__(authorities=[TestZone()])
        self.tcp_closed: dict[Any, Deferred[None]] = {}

    def sendReply(self, protocol: Any, message: dns.Message, address: Any) -> None:
        if address is not None and len(message.toStr()) > 512:
            message.answers, message.authority, message.additional = [], [], []
            message.trunc = 1
        super().sendReply(protocol, message, address)

    def connectionMade(self, protocol: Any) -> None:
        super().connectionMade(protocol)
        self.tcp_closed[protocol] = Deferred()

    def connectionLost(self, protocol: Any) -> None:
        super().connectionLost(protocol)
        self.tcp_closed[protocol].callback(None)


class ClosingResolver(client.Resolver):
    """The production resolver, plus a way to close the TCP connections it keeps open after a TCP query."""

    def close(self) -> Deferred[Any]:
        closing = []
        protocols: list[Any] = list(self.connections or ())
        for proto in protocols:
            done: Deferred[None] = Deferred()
            original = proto.connectionLost

            def lost(reason: Any, original: Any = original, done: Deferred[None] = done) -> None:
                original(reason)
                done.callback(None)

            proto.connectionLost = lost
            proto.transport.loseConnection()
            closing.append(done)
        return defer.gatherResults(closing)


def listen_dns(case: unittest.TestCase, factory: TestServerFactory) -> int:
    """Listen on 127.0.0.1 with UDP and TCP on one free port; returns the port."""
    for _ in range(20):
        udp = _reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        port = udp.getHost().port
        try:
            tcp = _reactor.listenTCP(port, factory, interface="127.0.0.1")
        except CannotListenError:
            udp.stopListening()
            continue
        case.addCleanup(udp.stopListening)
        case.addCleanup(tcp.stopListening)
        return port
    raise RuntimeError("no port free for both UDP and TCP")


class ReversingRandom(random.Random):
    """A random source whose shuffle reverses: makes the order of equal preferences visible."""

    def shuffle(self, x: Any) -> None:  # type: ignore[override]
        x.reverse()


def mx(domain: str) -> Route:
    return Route(name=f"mx:{domain}", mx_domain=domain)


class MxCase(unittest.TestCase):
    def setUp(self) -> None:
        self.factory = TestServerFactory()
        port = listen_dns(self, self.factory)
        self.resolver = ClosingResolver(servers=[("127.0.0.1", port)], timeout=(5,), reactor=reactor)
        self.addCleanup(
            lambda: defer.gatherResults([self.resolver.close(), *self.factory.tcp_closed.values()])
        )
        self.mx = MxResolver(self.resolver, rng=random.Random(7))

    async def hosts(self, route: Route) -> list[tuple[str, str]]:
        return [(t.host, t.address) for t in await self.mx.targets(route)]

    async def failure(self, route: Route, kind: type[E]) -> E:
        try:
            await self.mx.targets(route)
        except kind as exc:
            return exc
        self.fail(f"{route} resolved, expected {kind.__name__}")


def coroutine_test(f: Any) -> Any:
    """Run an ``async def`` test method as a Deferred-returning one."""

    def run(self: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(f(self))

    run.__name__ = f.__name__
    return run


class MxLookupTests(MxCase):
    @coroutine_test
    async def test_preference_order(self) -> None:
        targets = await self.mx.targets(mx("ordered.test"))
        self.assertEqual(
            targets,
            [
                Target("a.hosts.test", "127.0.0.1", 25),
                Target("a.hosts.test", "2001:db8::1", 25),
                Target("b.hosts.test", "127.0.0.2", 25),
                Target("c.hosts.test", "127.0.0.3", 25),
            ],
        )

    @coroutine_test
    async def test_equal_preferences_use_the_random_source(self) -> None:
        self.mx = MxResolver(self.resolver, rng=ReversingRandom())
        hosts = [h for h, _ in await self.hosts(mx("ties.test"))]
        self.assertEqual(hosts[0], "v6.hosts.test")  # preference 5 before the three at 10
        self.assertEqual(list(dict.fromkeys(hosts[1:])), ["c.hosts.test", "b.hosts.test", "a.hosts.test"])

    @coroutine_test
    async def test_equal_preferences_vary(self) -> None:
        firsts = set()
        for seed in range(30):
            self.mx = MxResolver(self.resolver, rng=random.Random(seed))
            hosts = [h for h, _ in await self.hosts(mx("ties.test"))]
            self.assertEqual(hosts[0], "v6.hosts.test")
            firsts.add(hosts[1])
        self.assertEqual(firsts, {"a.hosts.test", "b.hosts.test", "c.hosts.test"})

    @coroutine_test
    async def test_implicit_mx(self) -> None:
        self.assertEqual(
            await self.hosts(mx("implicit.test")),
            [("implicit.test", "127.0.0.5"), ("implicit.test", "2001:db8::5")],
        )

    @coroutine_test
    async def test_null_mx(self) -> None:
        exc = await self.failure(mx("nullmx.test"), NullMX)
        self.assertEqual((exc.code, exc.enhanced), (556, "5.1.10"))

    @coroutine_test
    async def test_null_mx_beside_real_mx_is_ignored(self) -> None:
        self.assertEqual(
            await self.hosts(mx("nullmx-mixed.test")),
            [("a.hosts.test", "127.0.0.1"), ("a.hosts.test", "2001:db8::1")],
        )

    @coroutine_test
    async def test_nxdomain(self) -> None:
        exc = await self.failure(mx("nope.test"), NoSuchDomain)
        self.assertEqual((exc.code, exc.enhanced), (550, "5.1.2"))
        self.assertIn("NXDOMAIN", str(exc))

    @coroutine_test
    async def test_cnamed_host(self) -> None:
        self.assertEqual(
            await self.hosts(mx("aliased.test")),
            [("alias.hosts.test", "127.0.0.7"), ("alias.hosts.test", "2001:db8::7")],
        )

    @coroutine_test
    async def test_cname_chain_asked_again(self) -> None:
        # The server's answer for alias2 holds only the first link; the rest needs a second query.
        self.assertEqual(
            await self.hosts(mx("chained.test")),
            [("alias2.hosts.test", "127.0.0.7"), ("alias2.hosts.test", "2001:db8::7")],
        )

    @coroutine_test
    async def test_ipv6_only_host(self) -> None:
        self.assertEqual(await self.mx.targets(mx("v6.test")), [Target("v6.hosts.test", "2001:db8::6", 25)])
        self.assertEqual(str(Target("v6.hosts.test", "2001:db8::6", 25)), "[2001:db8::6]:25")

    @coroutine_test
    async def test_unresolvable_host_skipped(self) -> None:
        self.assertEqual(await self.hosts(mx("skips.test")), [("b.hosts.test", "127.0.0.2")])

    @coroutine_test
    async def test_address_listed_once(self) -> None:
        self.assertEqual(
            await self.hosts(mx("shared.test")),
            [("a.hosts.test", "127.0.0.1"), ("a.hosts.test", "2001:db8::1")],
        )

    @coroutine_test
    async def test_no_host_exists(self) -> None:
        exc = await self.failure(mx("nowhere.test"), NoSuchDomain)
        self.assertIn("missing.hosts.test", str(exc))

    @coroutine_test
    async def test_no_mx_no_address(self) -> None:
        exc = await self.failure(mx("textonly.test"), NoSuchDomain)
        self.assertIn("no MX and no A/AAAA", str(exc))

    @coroutine_test
    async def test_servfail(self) -> None:
        exc = await self.failure(mx("servfail.test"), DnsTemporaryFailure)
        self.assertEqual((exc.code, exc.enhanced), (451, "4.4.3"))
        self.assertIn("SERVFAIL", str(exc))
        self.assertEqual(len(self.flushLoggedErrors(ServerBroke)), 1)

    @coroutine_test
    async def test_host_servfail_is_temporary(self) -> None:
        # One host failed temporarily, the other does not exist: not a reason to bounce.
        await self.failure(mx("brokenhost.test"), DnsTemporaryFailure)
        self.assertEqual(len(self.flushLoggedErrors(ServerBroke)), 2)

    @coroutine_test
    async def test_address_literal_refused(self) -> None:
        exc = await self.failure(mx("[192.0.2.1]"), AddressLiteralRefused)
        self.assertIsInstance(exc, NoSuchDomain)


class ConfiguredTargetTests(MxCase):
    @coroutine_test
    async def test_config_order_and_port(self) -> None:
        route = Route(
            name="domain:x.test",
            targets=("c.hosts.test", "192.0.2.9", "a.hosts.test", "2001:db8::99"),
            port=2525,
        )
        self.assertEqual(
            await self.mx.targets(route),
            [
                Target("c.hosts.test", "127.0.0.3", 2525),
                Target("192.0.2.9", "192.0.2.9", 2525),
                Target("a.hosts.test", "127.0.0.1", 2525),
                Target("a.hosts.test", "2001:db8::1", 2525),
                Target("2001:db8::99", "2001:db8::99", 2525),
            ],
        )

    @coroutine_test
    async def test_unresolvable_target_skipped(self) -> None:
        route = Route(name="default", targets=("missing.hosts.test", "b.hosts.test"))
        self.assertEqual(await self.hosts(route), [("b.hosts.test", "127.0.0.2")])

    @coroutine_test
    async def test_no_target_resolves_is_temporary(self) -> None:
        # Configured servers that vanish from DNS are an operator's problem to fix, not a reason to bounce.
        route = Route(name="default", targets=("missing.hosts.test",))
        exc = await self.failure(route, DnsTemporaryFailure)
        self.assertIn("missing.hosts.test", str(exc))

    @coroutine_test
    async def test_large_answer_over_tcp(self) -> None:
        targets = await self.mx.targets(Route(name="default", targets=("big.hosts.test",)))
        self.assertEqual(len(targets), 40)
        self.assertEqual(
            len(self.resolver.connections or ()), 1
        )  # the TCP retry after the truncated UDP reply


class SilentDns(protocol.DatagramProtocol):
    """A DNS server that never answers."""

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        pass


class ClockedReactor:
    """The real reactor's sockets with a Clock's time, so a DNS timeout happens at Clock.advance."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def __getattr__(self, name: str) -> Any:
        if name in ("callLater", "seconds", "getDelayedCalls"):
            return getattr(self.clock, name)
        return getattr(reactor, name)


class TimeoutTests(unittest.TestCase):
    def test_timeout_is_temporary(self) -> None:
        silent = SilentDns()
        port = _reactor.listenUDP(0, silent, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        clock = Clock()
        resolver = client.Resolver(
            servers=[("127.0.0.1", port.getHost().port)], timeout=(5, 5), reactor=ClockedReactor(clock)
        )
        result = MxResolver(resolver).targets(mx("slow.test"))
        self.assertNoResult(result)
        clock.advance(5)
        self.assertNoResult(result)
        clock.advance(5)
        failure = self.failureResultOf(result, DnsTemporaryFailure)
        self.assertIn("timeout", str(failure.value))
