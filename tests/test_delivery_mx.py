"""dcrouter.delivery.mx.make_resolver: the resolver built from the configuration or resolv.conf, without
asking it anything. (MxResolver against a real twisted.names server on 127.0.0.1: tests/integration/.)"""

from __future__ import annotations

from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.names import client
from twisted.names.error import DNSNameError
from twisted.trial import unittest

from dcrouter.config.delivery import MtaConfig
from dcrouter.delivery.mx import MxResolver, make_resolver
from dcrouter.delivery.route import Route
from dcrouter.net.targets import Target


class MakeResolverTests(unittest.TestCase):
    def test_configured_servers(self) -> None:
        config = MtaConfig(
            dns_servers=["10.0.0.53", "10.0.0.54:5353", "[::1]:5300", "2001:db8::53"], dns_timeout=2_500
        )
        resolver = make_resolver(config, Clock())
        assert isinstance(resolver, client.Resolver)
        self.assertEqual(
            resolver.servers, [("10.0.0.53", 53), ("10.0.0.54", 5353), ("::1", 5300), ("2001:db8::53", 53)]
        )
        self.assertEqual(resolver.timeout, (2.5, 2.5))

    def test_system_resolv_conf(self) -> None:
        """Without dnsServers: the nameservers of resolv.conf, read once, and no timer left behind."""
        path = self.mktemp()
        with open(path, "w") as conf:
            conf.write(
                "# comment\nsearch example.com\nnameserver 192.0.2.53\nnameserver ::1\noptions ndots:1\n"
            )
        clock = Clock()
        resolver = make_resolver(None, clock, resolv_conf=path)
        assert isinstance(resolver, client.Resolver)
        self.assertEqual(resolver.servers, [("192.0.2.53", 53), ("::1", 53)])
        self.assertEqual(resolver.timeout, (5.0, 5.0))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_resolv_conf_means_local_resolver(self) -> None:
        resolver = make_resolver(None, Clock(), resolv_conf=self.mktemp())
        assert isinstance(resolver, client.Resolver)
        self.assertEqual(resolver.servers, [("127.0.0.1", 53)])


class _NoDns:
    """An IResolver that knows no name and notes what it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __getattr__(self, name: str) -> object:
        def lookup(host: str, *args: object) -> object:
            self.asked.append(host)
            return fail(DNSNameError(host))

        return lookup


class LiteralTargetTests(unittest.TestCase):
    def test_ip_literal_targets_need_no_lookup(self) -> None:
        dns = _NoDns()
        mx = MxResolver(dns)  # type: ignore[arg-type]
        route = Route(name="default", targets=("192.0.2.9", "2001:db8::99", "192.0.2.9"), port=2525)
        first = self.successResultOf(mx.targets(route))
        self.assertEqual(
            first, [Target("192.0.2.9", "192.0.2.9", 2525), Target("2001:db8::99", "2001:db8::99", 2525)]
        )
        # Each call gets its own list (callers may reorder it).
        second = self.successResultOf(mx.targets(route))
        self.assertEqual(second, first)
        self.assertIsNot(second, first)
        self.assertEqual(dns.asked, [])

    def test_a_host_name_among_literals_is_resolved(self) -> None:
        dns = _NoDns()
        mx = MxResolver(dns)  # type: ignore[arg-type]
        route = Route(name="default", targets=("192.0.2.9", "relay.example"))
        self.assertEqual(self.successResultOf(mx.targets(route)), [Target("192.0.2.9", "192.0.2.9", 25)])
        self.assertIn("relay.example", dns.asked)
