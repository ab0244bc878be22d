"""The proxy's connection rates (``connectionRatePerIP``, a route's or domainConfigs entry's
``connectionRate``), counted by dcrouter.limits on MemoryReactorClock: over a rate, a connection is refused as
by the caps (no byte written, closed)."""

from __future__ import annotations

from typing import Any

from dcrouter.config import ConfigError, load_options
from dcrouter.proxy.routes import RouteTable, build_routes
from dcrouter.proxy.session import ProxyContext, ProxySettings
from tests.test_proxy_session import HELLO_A, SessionTestCase


class ConnectionRateTests(SessionTestCase):
    def load(self, proxy: dict[str, Any]) -> None:
        options = load_options({"smartProxyConfig": proxy}).options
        routes = build_routes(options.smart_proxy_config, None)
        self.ctx = ProxyContext(
            RouteTable(routes), ProxySettings.from_config(options.smart_proxy_config), self.reactor
        )

    def test_per_client_ip(self) -> None:
        self.load(
            {
                "fromPort": 443,
                "targetIP": "10.0.0.1",
                "sniEnabled": False,
                "connectionRatePerIP": {"count": 2, "window": 60000},
            }
        )
        for _ in range(2):
            session, _ = self.connect("192.0.2.1")
            self.assertIsNone(session.refused)
        session, client = self.connect("::ffff:192.0.2.1")  # the same client, however spelt
        self.assertRefused(client, session)
        self.assertIn("connectionRatePerIP", session.refused or "")
        other, _ = self.connect("192.0.2.2")
        self.assertIsNone(other.refused)
        self.reactor.advance(30)  # one connection's worth of the rate
        again, _ = self.connect("192.0.2.1")
        self.assertIsNone(again.refused)

    def test_per_route_every_spelling(self) -> None:
        rate = {"count": 2, "window": 60000}
        spellings = {
            "domainConfigs": {
                "globalPortRanges": [{"from": 443, "to": 443}],
                "domainConfigs": [{"domains": ["a.test"], "targetIPs": ["10.0.0.1"], "connectionRate": rate}],
            },
            "routes": {
                "routes": [
                    {
                        "name": "a",
                        "match": {"ports": 443, "domains": "a.test"},
                        "action": {"type": "forward", "target": {"host": "10.0.0.1"}},
                        "security": {"connectionRate": rate},
                    }
                ]
            },
        }
        for spelling, proxy in spellings.items():
            self.load(proxy)
            for i in range(2):
                session, _ = self.connect(f"192.0.2.{i + 1}", data=HELLO_A)
                self.assertIsNone(session.refused, spelling)
            session, client = self.connect("192.0.2.9", data=HELLO_A)  # all clients together
            self.assertRefused(client, session)
            self.assertIn("connectionRate", session.refused or "", spelling)
            route = next(iter(self.ctx.counters.values()))
            self.assertEqual(route.refused, 1, spelling)

    def test_checked_with_key_paths(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_options(
                {
                    "smartProxyConfig": {
                        "fromPort": 443,
                        "targetIP": "10.0.0.1",
                        "connectionRatePerIP": {"count": 0, "window": 10},
                    }
                }
            )
        self.assertEqual(
            sorted(e.split(": ")[0] for e in caught.exception.errors),
            ["smartProxyConfig.connectionRatePerIP.count", "smartProxyConfig.connectionRatePerIP.window"],
        )
