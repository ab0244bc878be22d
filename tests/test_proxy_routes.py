"""Tests for dcrouter.proxy.routes: every configured form translated into the one route model, and the
route table's choices."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import tomllib
from typing import Any

from twisted.trial import unittest

from dcrouter.config import load_options
from dcrouter.proxy.routes import (
    Networks,
    PortRange,
    ProxyRoute,
    ProxyTarget,
    RouteTable,
    build_routes,
    listening_ports,
)


def routes_of(raw: dict[str, Any]) -> list[ProxyRoute]:
    options = load_options(raw).options
    return build_routes(options.smart_proxy_config, options.http_domain_routes)


def forward(name: str, ports: Any, domains: Any = (), priority: int = 0, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "priority": priority,
        "match": {"ports": ports, "domains": list(domains)},
        "action": {"type": "forward", "target": {"host": f"{name}.backend", "port": 9000}},
    }
    entry.update(extra)
    return entry


def table(*entries: dict[str, Any]) -> RouteTable:
    return RouteTable(routes_of({"smartProxyConfig": {"routes": list(entries)}}))


def name_of(route: ProxyRoute | None) -> str | None:
    return None if route is None else route.name


def anonymous(route: ProxyRoute) -> ProxyRoute:
    """The route without what names its origin."""
    return dataclasses.replace(route, name="", source="")


class OneVocabularyTests(unittest.TestCase):
    """An allow list, a block list, a connection cap and an idle timeout mean the same whichever spelling
    configured them: SmartProxy shipped bugs where its domainConfigs and routes forms diverged."""

    DOMAIN_CONFIG: dict[str, Any] = {
        "domains": ["example.com", "*.example.com"],
        "allowedIPs": ["10.0.0.0/8", "2001:db8::/32"],
        "blockedIPs": ["10.66.0.0/16"],
        "targetIPs": ["10.1.0.1", "10.1.0.2"],
        "portRanges": [{"from": 443, "to": 443}, {"from": 8443, "to": 8450}],
        "connectionTimeout": 60_000,
        "maxConnections": 25,
    }
    ROUTE: dict[str, Any] = {
        "name": "example",
        "match": {"ports": [443, {"from": 8443, "to": 8450}], "domains": ["example.com", "*.example.com"]},
        "action": {"type": "forward", "target": {"host": ["10.1.0.1", "10.1.0.2"], "port": "preserve"}},
        "security": {
            "ipAllowList": ["2001:db8::/32", "10.0.0.0/8"],
            "ipBlockList": ["10.66.0.0/16"],
            "maxConnections": 25,
        },
        "connectionTimeout": 60_000,
    }

    def test_identical_models(self) -> None:
        (seed,) = routes_of({"smartProxyConfig": {"domainConfigs": [self.DOMAIN_CONFIG]}})
        (route,) = routes_of({"smartProxyConfig": {"routes": [self.ROUTE]}})
        self.assertEqual(anonymous(seed), anonymous(route))
        self.assertEqual(seed.max_connections, 25)
        self.assertEqual(seed.connection_timeout_ms, 60_000)
        self.assertEqual(seed.allow, Networks(["10.0.0.0/8", "2001:db8::/32"]))
        self.assertEqual(seed.block, Networks(["10.66.0.0/16"]))
        self.assertEqual(seed.target, ProxyTarget(("10.1.0.1", "10.1.0.2"), None))
        self.assertEqual(seed.ports, (PortRange(443, 443), PortRange(8443, 8450)))
        self.assertEqual(seed.source, "smartProxyConfig.domainConfigs[0]")
        self.assertEqual((route.name, route.source), ("example", "smartProxyConfig.routes[0]"))

    def test_every_rule_bites_in_both(self) -> None:
        (seed,) = routes_of({"smartProxyConfig": {"domainConfigs": [self.DOMAIN_CONFIG]}})
        (route,) = routes_of({"smartProxyConfig": {"routes": [self.ROUTE]}})
        for r in (seed, route):
            self.assertTrue(r.permits("10.1.2.3"))
            self.assertTrue(r.permits("2001:db8::1"))
            self.assertTrue(r.permits("::ffff:10.1.2.3"))
            self.assertFalse(r.permits("10.66.1.1"), "the block list wins over the allow list")
            self.assertFalse(r.permits("192.0.2.1"), "outside the allow list")
            self.assertFalse(r.permits("2001:db9::1"))

    def test_a_difference_shows(self) -> None:
        """The comparison above can fail: a different cap or list makes the models differ."""
        changed = copy.deepcopy(self.ROUTE)
        changed["security"]["maxConnections"] = 26
        (seed,) = routes_of({"smartProxyConfig": {"domainConfigs": [self.DOMAIN_CONFIG]}})
        (route,) = routes_of({"smartProxyConfig": {"routes": [changed]}})
        self.assertNotEqual(anonymous(seed), anonymous(route))
        changed["security"]["maxConnections"] = 25
        changed["security"]["ipBlockList"] = ["10.67.0.0/16"]
        (route,) = routes_of({"smartProxyConfig": {"routes": [changed]}})
        self.assertNotEqual(anonymous(seed), anonymous(route))

    def test_empty_lists_are_no_rule(self) -> None:
        entry = dict(self.DOMAIN_CONFIG, allowedIPs=[], blockedIPs=[])
        (seed,) = routes_of({"smartProxyConfig": {"domainConfigs": [entry]}})
        self.assertIsNone(seed.allow)
        self.assertIsNone(seed.block)
        self.assertTrue(seed.permits("192.0.2.1"))


class TranslationTests(unittest.TestCase):
    def test_seed_form(self) -> None:
        raw = {
            "smartProxyConfig": {
                "fromPort": 8443,
                "toPort": 443,
                "targetIP": "10.0.0.10",
                "domainConfigs": [
                    {"domains": ["a.example"], "targetIPs": ["10.0.0.1"]},
                    {"domains": ["b.example"], "portRanges": [{"from": 9443, "to": 9443}]},
                ],
            }
        }
        a, b, catch_all = routes_of(raw)
        # No globalPortRanges: an entry without portRanges applies on fromPort, mapped to toPort.
        self.assertEqual((a.ports, a.target), ((PortRange(8443, 8443),), ProxyTarget(("10.0.0.1",), 443)))
        # portRanges keep the port; no targetIPs: targetIP.
        self.assertEqual((b.ports, b.target), ((PortRange(9443, 9443),), ProxyTarget(("10.0.0.10",), None)))
        self.assertEqual(catch_all.domains, ())
        self.assertEqual(catch_all.ports, (PortRange(8443, 8443),))
        self.assertEqual(catch_all.target, ProxyTarget(("10.0.0.10",), 443))
        self.assertEqual(catch_all.source, "smartProxyConfig.fromPort")
        self.assertTrue(all(r.tls_mode == "passthrough" for r in (a, b, catch_all)))

    def test_global_port_ranges(self) -> None:
        raw = {
            "smartProxyConfig": {
                "fromPort": 8443,
                "globalPortRanges": [{"from": 80, "to": 81}, {"from": 443, "to": 443}],
                "domainConfigs": [{"domains": ["a.example"], "targetIPs": ["10.0.0.1"]}],
            }
        }
        (a,) = routes_of(raw)  # fromPort without targetIP: listened on, but no catch-all route
        self.assertEqual(a.ports, (PortRange(80, 81), PortRange(443, 443)))
        self.assertIsNone(a.target.port)
        options = load_options(raw).options
        self.assertEqual(listening_ports([a]), [80, 81, 443])
        self.assertEqual(listening_ports([a], options.smart_proxy_config), [80, 81, 443, 8443])

    def test_http_domain_routes(self) -> None:
        raw = {
            "httpDomainRoutes": [
                {"domain": "a.example", "targetServerIP": "10.0.0.1", "targetServerPort": 8080},
                {
                    "domain": "b.example",
                    "targetServerIP": "10.0.0.2",
                    "targetServerPort": 8443,
                    "useTls": True,
                },
                {
                    "domain": "c.example",
                    "targetServerIP": "10.0.0.3",
                    "targetServerPort": 80,
                    "listenPort": 8081,
                },
            ]
        }
        a, b, c = routes_of(raw)
        self.assertEqual(
            (a.ports, a.domains, a.target),
            ((PortRange(80, 80),), ("a.example",), ProxyTarget(("10.0.0.1",), 8080)),
        )
        self.assertEqual(b.ports, (PortRange(443, 443),))
        self.assertEqual(c.ports, (PortRange(8081, 8081),))
        self.assertEqual(c.source, "httpDomainRoutes[2]")
        self.assertEqual(listening_ports([a, b, c]), [80, 443, 8081])

    def test_default_target(self) -> None:
        raw = {
            "smartProxyConfig": {
                "globalPortRanges": [{"from": 1000, "to": 1999}],
                "routes": [forward("low", 3000, ["a.example"], priority=-5)],
                "defaultTarget": {"host": "10.0.0.99"},
            }
        }
        low, default = routes_of(raw)
        self.assertEqual(default.ports, (PortRange(1000, 1999), PortRange(3000, 3000)))
        self.assertLess(default.priority, low.priority)
        self.assertEqual(default.target, ProxyTarget(("10.0.0.99",), None))
        routes = RouteTable([low, default])
        self.assertIs(routes.match(3000, "a.example", "192.0.2.1"), low)
        self.assertIs(routes.match(3000, "other.example", "192.0.2.1"), default)
        self.assertIs(routes.match(1500, None, "192.0.2.1"), default)
        self.assertIsNone(routes.match(2500, None, "192.0.2.1"))

    def test_nothing_configured(self) -> None:
        self.assertEqual(build_routes(None, None), [])
        self.assertEqual(routes_of({"smartProxyConfig": {}}), [])


class MatchTests(unittest.TestCase):
    def test_ports_first(self) -> None:
        routes = table(
            forward("a", 443, ["a.example"]), forward("b", [{"from": 8000, "to": 8010}], ["a.example"])
        )
        self.assertEqual(name_of(routes.match(443, "a.example", "192.0.2.1")), "a")
        self.assertEqual(name_of(routes.match(8005, "a.example", "192.0.2.1")), "b")
        self.assertIsNone(routes.match(444, "a.example", "192.0.2.1"))

    def test_exact_then_specific_wildcard_then_any(self) -> None:
        routes = table(
            forward("any", 443, priority=100),
            forward("wide", 443, ["*.example.com"], priority=50),
            forward("narrow", 443, ["*.b.example.com"]),
            forward("exact", 443, ["x.b.example.com"], priority=-50),
        )
        chosen = {
            name: name_of(routes.match(443, name, "192.0.2.1"))
            for name in ("x.b.example.com", "y.b.example.com", "b.example.com", "example.com", "other.net")
        }
        self.assertEqual(
            chosen,
            {
                "x.b.example.com": "exact",
                "y.b.example.com": "narrow",
                "b.example.com": "wide",
                "example.com": "any",
                "other.net": "any",
            },
        )
        self.assertEqual(name_of(routes.match(443, None, "192.0.2.1")), "any")

    def test_names_normalised(self) -> None:
        routes = table(forward("idn", 443, ["bücher.example"]), forward("plain", 443, ["*.example.com"]))
        self.assertEqual(name_of(routes.match(443, "xn--bcher-kva.example", "192.0.2.1")), "idn")
        self.assertEqual(name_of(routes.match(443, "BÜCHER.example.", "192.0.2.1")), "idn")
        self.assertEqual(name_of(routes.match(443, "WWW.Example.COM.", "192.0.2.1")), "plain")

    def test_invalid_name_is_no_name(self) -> None:
        routes = table(forward("named", 443, ["*.example.com"]))
        self.assertIsNone(routes.match(443, "bad_name.example.com", "192.0.2.1"))
        self.assertIsNone(routes.match(443, "", "192.0.2.1"))
        routes = table(forward("named", 443, ["*.example.com"]), forward("any", 443))
        self.assertEqual(name_of(routes.match(443, "a..example.com", "192.0.2.1")), "any")

    def test_priority_among_equals(self) -> None:
        routes = table(
            forward("first", 443, ["a.example"]),
            forward("high", 443, ["a.example"], priority=5),
            forward("second", 443, ["a.example"]),
        )
        self.assertEqual(name_of(routes.match(443, "a.example", "192.0.2.1")), "high")
        routes = table(forward("first", 443, ["a.example"]), forward("second", 443, ["a.example"]))
        self.assertEqual(name_of(routes.match(443, "a.example", "192.0.2.1")), "first")

    def test_client_ip_selects(self) -> None:
        """match.clientIp makes a route not match; the next one (even a less specific one) is tried."""
        inside = forward("inside", 443, ["a.example"], priority=10)
        inside["match"]["clientIp"] = ["10.0.0.0/8", "fd00::/8"]
        routes = table(inside, forward("wild", 443, ["*.example"]), forward("any", 443))
        self.assertEqual(name_of(routes.match(443, "a.example", "10.2.3.4")), "inside")
        self.assertEqual(name_of(routes.match(443, "a.example", "fd00::1")), "inside")
        self.assertEqual(name_of(routes.match(443, "a.example", "192.0.2.1")), "wild")
        only = table(inside)
        self.assertIsNone(only.match(443, "a.example", "192.0.2.1"))

    def test_blocked_client_is_not_rerouted(self) -> None:
        """security lists refuse on the chosen route; they never hand the client to another route."""
        guarded = forward("guarded", 443, ["a.example"], security={"ipBlockList": ["192.0.2.0/24"]})
        routes = table(guarded, forward("any", 443))
        chosen = routes.match(443, "a.example", "192.0.2.1")
        assert chosen is not None
        self.assertEqual(chosen.name, "guarded")
        self.assertFalse(chosen.permits("192.0.2.1"))
        self.assertTrue(chosen.permits("198.51.100.1"))

    def test_star_is_any_name(self) -> None:
        routes = table(forward("star", 443, ["*"]))
        self.assertEqual(name_of(routes.match(443, "anything.example", "192.0.2.1")), "star")
        self.assertEqual(name_of(routes.match(443, None, "192.0.2.1")), "star")

    def test_routes_before_domain_configs_among_equals(self) -> None:
        raw = {
            "smartProxyConfig": {
                "domainConfigs": [
                    {
                        "domains": ["a.example"],
                        "targetIPs": ["10.0.0.1"],
                        "portRanges": [{"from": 443, "to": 443}],
                    }
                ],
                "routes": [forward("route", 443, ["a.example"])],
            }
        }
        routes = RouteTable(routes_of(raw))
        self.assertEqual(name_of(routes.match(443, "a.example", "192.0.2.1")), "route")


class HttpsPortTests(unittest.TestCase):
    """Where a terminating route's plain-HTTP side redirects to."""

    def route(self, *ports: tuple[int, int]) -> ProxyRoute:
        raw = forward("web", [{"from": a, "to": b} for a, b in ports], ["a.example"])
        raw["tls"] = {"mode": "terminate", "certificate": "auto"}
        config = {"routes": [raw], "acme": {"enabled": True, "accountEmail": "ops@a.example", "port": 8080}}
        (web, _) = routes_of({"smartProxyConfig": config})
        return web

    def test_the_port_a_client_must_use(self) -> None:
        cases = {
            ((80, 80), (443, 443)): {80: 443, 443: 443},
            ((31080, 31081),): {31080: 31081, 31081: 31080},
            ((31081, 31081),): {31081: 31081},
            ((8000, 8010),): {8000: 8001, 8005: 8000},
            ((9000, 9000), (8443, 8443)): {9000: 8443, 8080: 8443},  # 8080: arrived on acme.port
        }
        for ports, expected in cases.items():
            route = self.route(*ports)
            self.assertEqual({arrived: route.https_port(arrived) for arrived in expected}, expected, ports)

    def test_the_route_behind_acme_port(self) -> None:
        web = forward("web", 8443, ["a.example", "b.example"])
        web["tls"] = {"mode": "terminate", "certificate": "auto"}
        other = forward("other", 443, ["c.example"])
        other["tls"] = {"mode": "terminate", "certificate": "auto"}
        passthrough = forward("tls", 443, ["d.example"])
        acme = {"enabled": True, "accountEmail": "ops@a.example", "port": 80}
        config = {"routes": [web, other, passthrough], "acme": acme}
        routes = RouteTable(routes_of({"smartProxyConfig": config}))
        found = {
            host: name_of(routes.https_route(host, "192.0.2.1"))
            for host in ("a.example", "B.Example.", "c.example", "d.example")
        }
        self.assertEqual(
            found, {"a.example": "web", "B.Example.": "web", "c.example": "other", "d.example": None}
        )


class ListeningPortsTests(unittest.TestCase):
    def test_ranges_and_duplicates(self) -> None:
        routes = routes_of(
            {
                "smartProxyConfig": {
                    "routes": [
                        forward("a", [443, {"from": 8000, "to": 8002}]),
                        forward("b", 443, ["b.example"]),
                    ]
                }
            }
        )
        self.assertEqual(listening_ports(routes), [443, 8000, 8001, 8002])


class DocumentTests(unittest.TestCase):
    """The examples in docs/proxy.md load, and its migration pair really is equivalent."""

    def blocks(self, language: str) -> list[str]:
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "proxy.md")
        with open(path, encoding="utf-8") as f:
            return re.findall(rf"```{language}\n(.*?)```", f.read(), re.S)

    def test_toml_example(self) -> None:
        # The SNI/Host recipe (the route-field examples are checked by tests/test_docs.py).
        (example,) = [block for block in self.blocks("toml") if "globalPortRanges" in block]
        routes = RouteTable(routes_of(tomllib.loads(example)))
        self.assertEqual(name_of(routes.match(443, "admin.example.com", "192.0.2.7")), "admin")
        self.assertEqual(
            name_of(routes.match(443, "admin.example.com", "198.51.100.7")),
            "smartProxyConfig.domainConfigs[0]",
        )
        self.assertEqual(
            name_of(routes.match(80, "other.test", "198.51.100.7")), "smartProxyConfig.defaultTarget"
        )

    def test_migration_pair(self) -> None:
        seed, route_form = (routes_of(json.loads(text)) for text in self.blocks("json"))
        self.assertEqual([anonymous(r) for r in seed], [anonymous(r) for r in route_form])
