"""dcrouter.delivery.mx.make_resolver: the resolver built from the configuration or resolv.conf, without
asking it anything. (MxResolver against a real twisted.names server on 127.0.0.1: tests/integration/.)"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.names import client
from twisted.trial import unittest

from dcrouter.config.delivery import MtaConfig
from dcrouter.delivery.mx import make_resolver


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
