"""Tests for the proxy's configuration: smartProxyConfig and httpDomainRoutes (dcrouter.config.proxy) and the
port cross-check with smtpConfig."""

from __future__ import annotations

import copy
import os
from typing import Any

from twisted.trial import unittest

from dcrouter.config import ConfigError, load_options
from dcrouter.config.proxy import (
    HttpDomainRoute,
    PortRangeConfig,
    RouteConfig,
    SmartProxyConfig,
    hosts,
    port_ranges,
    route_domains,
    target_port,
)

# The seed's §0.1 example, less the features that are not built (useNetworkProxy, acme.enabled), and with
# the port 80 entry dropped so no domain has two owners.
SEED: dict[str, Any] = {
    "smartProxyConfig": {
        "fromPort": 443,
        "toPort": 8080,
        "targetIP": "10.0.0.10",
        "sniEnabled": True,
        "acme": {
            "port": 80,
            "enabled": False,
            "autoRenew": True,
            "useProduction": True,
            "renewThresholdDays": 30,
            "accountEmail": "admin@example.com",
        },
        "globalPortRanges": [{"from": 80, "to": 80}, {"from": 443, "to": 443}],
        "domainConfigs": [
            {
                "domains": ["example.com", "www.example.com"],
                "allowedIPs": ["0.0.0.0/0"],
                "blockedIPs": ["1.2.3.4/32"],
                "targetIPs": ["10.0.0.10", "10.0.0.11"],
                "portRanges": [{"from": 80, "to": 80}, {"from": 443, "to": 443}],
                "connectionTimeout": 60000,
                "useNetworkProxy": False,
            }
        ],
    }
}

ROUTE: dict[str, Any] = {
    "name": "web",
    "priority": 10,
    "match": {
        "ports": [443, {"from": 8443, "to": 8444}],
        "domains": ["*.example.com"],
        "clientIp": ["10.0.0.0/8"],
    },
    "action": {"type": "forward", "target": {"host": ["10.0.0.1", "backend.internal"], "port": 8443}},
    "tls": {"mode": "passthrough"},
    "security": {"ipAllowList": ["10.0.0.0/8"], "ipBlockList": ["10.9.0.0/16"], "maxConnections": 50},
}


def proxy(**keys: Any) -> dict[str, Any]:
    """A minimal proxy config (one route, port 8443) with smartProxyConfig keys replaced."""
    raw: dict[str, Any] = {"smartProxyConfig": {"routes": [copy.deepcopy(ROUTE)]}}
    raw["smartProxyConfig"].update(keys)
    return raw


def route(**keys: Any) -> dict[str, Any]:
    """A proxy config whose one route has keys replaced."""
    entry = copy.deepcopy(ROUTE)
    entry.update(keys)
    return {"smartProxyConfig": {"routes": [entry]}}


class ProxyCase(unittest.TestCase):
    def errors(self, raw: dict[str, Any]) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            load_options(raw)
        return caught.exception.errors

    def config(self, raw: dict[str, Any]) -> SmartProxyConfig:
        config = load_options(raw).options.smart_proxy_config
        assert config is not None
        return config


class SeedFormTests(ProxyCase):
    def test_seed_example_loads(self) -> None:
        config = self.config(SEED)
        self.assertIsInstance(config, SmartProxyConfig)
        self.assertEqual((config.from_port, config.to_port, config.target_ip), (443, 8080, "10.0.0.10"))
        self.assertEqual(config.global_port_ranges, [PortRangeConfig(80, 80), PortRangeConfig(443, 443)])
        entry = config.domain_configs[0]
        self.assertEqual(entry.blocked_ips, ["1.2.3.4/32"])
        self.assertEqual(entry.target_ips, ["10.0.0.10", "10.0.0.11"])
        self.assertEqual(entry.connection_timeout, 60000)
        assert config.acme is not None
        self.assertEqual(config.acme.account_email, "admin@example.com")

    def test_defaults(self) -> None:
        config = self.config({"smartProxyConfig": {}})
        self.assertEqual(config.bind_address, "0.0.0.0")
        self.assertEqual(config.max_connections_per_ip, 100)
        self.assertEqual(config.proxy_protocol, "none")
        self.assertTrue(config.sni_enabled)
        self.assertTrue(config.keep_alive)
        self.assertIsNone(config.default_target)
        self.assertEqual(config.routes, [])

    def test_additions(self) -> None:
        config = self.config(
            proxy(
                maxConnectionsPerIP=5,
                defaultTarget={"host": "10.0.0.99", "port": 8080},
                proxyProtocol="v2",
                trustedProxies=["192.0.2.0/24"],
                sniTimeout=2000,
                maxConnectionLifetime=3_600_000,
                keepAlive=False,
                bindAddress="::",
            )
        )
        self.assertEqual(config.max_connections_per_ip, 5)
        assert config.default_target is not None
        self.assertEqual((config.default_target.host, config.default_target.port), ("10.0.0.99", 8080))
        self.assertEqual(config.proxy_protocol, "v2")
        self.assertEqual(config.trusted_proxies, ["192.0.2.0/24"])
        self.assertEqual((config.sni_timeout, config.max_connection_lifetime), (2000, 3_600_000))
        self.assertFalse(config.keep_alive)

    def test_value_checks(self) -> None:
        raw = copy.deepcopy(SEED)
        sp = raw["smartProxyConfig"]
        sp.update(fromPort=0, targetIP="exa mple", globalPortRanges=[{"from": 90, "to": 80}])
        entry = sp["domainConfigs"][0]
        entry.update(allowedIPs=["10.1.2.3/8"], blockedIPs=["nonsense"], domains=["*"], targetIPs=[])
        entry["portRanges"] = [{"from": 1, "to": 70000}]
        self.assertEqual(
            self.errors(raw),
            [
                "smartProxyConfig.fromPort: not a port number (1-65535): 0",
                "smartProxyConfig.targetIP: not a host name or IP address: 'exa mple'",
                (
                    "smartProxyConfig.globalPortRanges[0].to: 80 is less than "
                    "smartProxyConfig.globalPortRanges[0].from (90)"
                ),
                "smartProxyConfig.domainConfigs[0].domains[0]: not a domain name or '*.' wildcard: '*'",
                (
                    "smartProxyConfig.domainConfigs[0].allowedIPs[0]: host bits set in '10.1.2.3/8'; "
                    "did you mean '10.0.0.0/8'?"
                ),
                (
                    "smartProxyConfig.domainConfigs[0].blockedIPs[0]: not an IP network in CIDR notation: "
                    "'nonsense'"
                ),
                "smartProxyConfig.domainConfigs[0].portRanges[0].to: not a port number (1-65535): 70000",
            ],
        )

    def test_durations_in_ms(self) -> None:
        raw = copy.deepcopy(SEED)
        raw["smartProxyConfig"]["domainConfigs"][0]["connectionTimeout"] = 60
        self.assertIn(
            "smartProxyConfig.domainConfigs[0].connectionTimeout: 60 ms is less than a second; "
            "durations are in milliseconds",
            load_options(raw).warnings,
        )

    def test_to_port_needs_from_port(self) -> None:
        self.assertEqual(
            self.errors(proxy(toPort=8080, targetIP="10.0.0.1")),
            [
                "smartProxyConfig.toPort: has no effect without smartProxyConfig.fromPort",
                "smartProxyConfig.targetIP: has no effect without smartProxyConfig.fromPort",
            ],
        )

    def test_domain_config_needs_ports_and_targets(self) -> None:
        raw: dict[str, Any] = {"smartProxyConfig": {"domainConfigs": [{"domains": ["example.com"]}]}}
        self.assertEqual(
            self.errors(raw),
            [
                (
                    "smartProxyConfig.domainConfigs[0].portRanges: required when neither "
                    "smartProxyConfig.globalPortRanges nor smartProxyConfig.fromPort is set"
                ),
                (
                    "smartProxyConfig.domainConfigs[0].targetIPs: required when smartProxyConfig.targetIP "
                    "is not set"
                ),
            ],
        )
        raw["smartProxyConfig"].update(fromPort=443, targetIP="10.0.0.1")
        self.assertEqual(len(self.config(raw).domain_configs), 1)

    def test_domain_in_two_entries_on_one_port(self) -> None:
        entries = [
            {"domains": ["Example.com"], "targetIPs": ["10.0.0.1"], "portRanges": [{"from": 443, "to": 443}]},
            {
                "domains": ["example.com."],
                "targetIPs": ["10.0.0.2"],
                "portRanges": [{"from": 400, "to": 500}],
            },
        ]
        self.assertEqual(
            self.errors({"smartProxyConfig": {"domainConfigs": entries}}),
            [
                (
                    "smartProxyConfig.domainConfigs[1].domains[0]: 'example.com.' is also in "
                    "smartProxyConfig.domainConfigs[0] on the same port"
                )
            ],
        )
        entries[1]["portRanges"] = [{"from": 80, "to": 80}]
        self.config({"smartProxyConfig": {"domainConfigs": entries}})

    def test_sni_disabled(self) -> None:
        raw = copy.deepcopy(SEED)
        raw["smartProxyConfig"]["sniEnabled"] = False
        self.assertEqual(
            self.errors(raw),
            [
                (
                    "smartProxyConfig.domainConfigs[0]: listens on smartProxyConfig.fromPort (443), where "
                    "smartProxyConfig.sniEnabled is false"
                )
            ],
        )
        raw["smartProxyConfig"]["domainConfigs"][0]["portRanges"] = [{"from": 80, "to": 80}]
        self.config(raw)


class RouteFormTests(ProxyCase):
    def test_route_loads(self) -> None:
        config = self.config(proxy())
        loaded = config.routes[0]
        self.assertIsInstance(loaded, RouteConfig)
        self.assertEqual(loaded.name, "web")
        self.assertEqual(loaded.priority, 10)
        self.assertEqual(port_ranges(loaded.match.ports), [(443, 443), (8443, 8444)])
        self.assertEqual(route_domains(loaded.match.domains), ("*.example.com",))
        assert loaded.action.target is not None
        self.assertEqual(hosts(loaded.action.target.host), ("10.0.0.1", "backend.internal"))
        self.assertEqual(target_port(loaded.action.target.port), 8443)
        assert loaded.security is not None
        self.assertEqual(loaded.security.max_connections, 50)

    def test_shapes(self) -> None:
        """The one-value spellings SmartProxy accepts: a single port, a single host, a single domain,
        `"*"` for any name, `"preserve"`."""
        raw = route(
            match={"ports": 443, "domains": "example.com"},
            action={"type": "forward", "target": {"host": "10.0.0.1"}},
        )
        loaded = self.config(raw).routes[0]
        self.assertEqual(port_ranges(loaded.match.ports), [(443, 443)])
        self.assertEqual(route_domains(loaded.match.domains), ("example.com",))
        assert loaded.action.target is not None
        self.assertEqual(hosts(loaded.action.target.host), ("10.0.0.1",))
        self.assertIsNone(target_port(loaded.action.target.port))
        self.assertEqual(route_domains("*"), ())
        self.assertEqual(route_domains(["*", "a.example"]), ())

    def test_bad_shapes(self) -> None:
        raw = route(
            match={
                "ports": [0, {"from": 9, "to": 8}, {"from": 1}, "80"],
                "domains": ["ok.example", "bad_name"],
                "clientIp": ["300.0.0.0/8"],
            },
            action={"type": "forward", "target": {"host": ["a b"], "port": "same"}},
        )
        self.assertEqual(
            self.errors(raw),
            [
                "smartProxyConfig.routes[0].match.ports[0]: not a port number (1-65535): 0",
                "smartProxyConfig.routes[0].match.ports[1]: 'from' (9) is more than 'to' (8)",
                (
                    "smartProxyConfig.routes[0].match.ports[2]: a port range has exactly the keys 'from' and "
                    "'to', got ['from']"
                ),
                (
                    "smartProxyConfig.routes[0].match.ports[3]: expected a port number or a {from, to} "
                    "table, got '80'"
                ),
                "smartProxyConfig.routes[0].match.domains[1]: not a domain name or '*.' wildcard: 'bad_name'",
                (
                    "smartProxyConfig.routes[0].match.clientIp[0]: not an IP network in CIDR notation: "
                    "'300.0.0.0/8'"
                ),
                "smartProxyConfig.routes[0].action.target.host[0]: not a host name or IP address: 'a b'",
                (
                    'smartProxyConfig.routes[0].action.target.port: expected a port number, "preserve" or '
                    '"{port}+N" / "{port}-N", '
                    "got 'same'"
                ),
            ],
        )

    def test_empty_and_wrong_types(self) -> None:
        raw = route(
            match={"ports": [], "domains": 5},
            action={"type": "forward", "target": {"host": []}},
            priority="high",
        )
        self.assertEqual(
            self.errors(raw),
            [
                "smartProxyConfig.routes[0].priority: expected integer, got a string 'high'",
                "smartProxyConfig.routes[0].match.ports: must not be empty",
                (
                    "smartProxyConfig.routes[0].match.domains: expected a domain pattern or a list of them, "
                    "got 5"
                ),
                "smartProxyConfig.routes[0].action.target.host: must not be empty",
            ],
        )

    def test_forward_needs_target(self) -> None:
        self.assertEqual(
            self.errors(route(action={"type": "forward"})),
            ['smartProxyConfig.routes[0].action.target: required for type "forward"'],
        )

    def test_names_unique(self) -> None:
        raw = proxy()
        second = copy.deepcopy(ROUTE)
        raw["smartProxyConfig"]["routes"].append(second)
        unnamed = copy.deepcopy(ROUTE)
        del unnamed["name"]
        raw["smartProxyConfig"]["routes"] += [unnamed, copy.deepcopy(unnamed)]
        self.assertEqual(
            self.errors(raw),
            ["smartProxyConfig.routes[1].name: 'web' is also smartProxyConfig.routes[0]"],
        )

    def test_unknown_key(self) -> None:
        self.assertEqual(
            self.errors(route(secuirty={})),
            ["smartProxyConfig.routes[0].secuirty: unknown key; did you mean 'security'?"],
        )


class UnsupportedTests(ProxyCase):
    def test_smartproxy_rate_limit_keys_are_named(self) -> None:
        raw = route(match={"ports": 80}, security={"rateLimit": {"maxRequests": 5, "window": 60}})
        del raw["smartProxyConfig"]["routes"][0]["tls"]
        self.assertEqual(
            sorted(e.split(": ")[0].removeprefix("smartProxyConfig.routes[0].") for e in self.errors(raw)),
            ["security.rateLimit.count", "security.rateLimit.maxRequests", "security.rateLimit.window"],
        )

    def test_port_templates(self) -> None:
        from dcrouter.proxy.routes import build_routes

        for written, port, offset in (
            ("{port}", None, 0),
            ("{port}+1000", None, 1000),
            ("{port} - 1", None, -1),
        ):
            raw = route(action={"type": "forward", "target": {"host": "10.0.0.1", "port": written}})
            (built,) = build_routes(self.config(raw), None)
            self.assertEqual((built.target.port, built.target.offset), (port, offset), written)
        self.assertEqual(built.target.port_for(8443), 8442)
        raw = route(action={"type": "forward", "target": {"host": "10.0.0.1", "port": "{port}*2"}})
        (error,) = self.errors(raw)
        self.assertTrue(
            error.startswith("smartProxyConfig.routes[0].action.target.port: expected a port number")
        )


class MatchConfigTests(ProxyCase):
    def test_request_and_tls_conditions_load(self) -> None:
        from dcrouter.proxy.routes import build_routes

        raw = route(
            match={
                "ports": 80,
                "path": "/api/*",
                "headers": {"X-Env": "/^(dev|test)$/", "Accept": "text/html"},
                "tlsVersion": ["TLSv1.3"],
            }
        )
        del raw["smartProxyConfig"]["routes"][0]["tls"]
        (built,) = build_routes(self.config(raw), None)
        self.assertEqual(built.conditions.path, "/api/*")
        (env, env_pattern), accept = built.conditions.headers
        self.assertEqual((env, env_pattern.pattern), ("x-env", "^(dev|test)$"))
        self.assertEqual(accept, ("accept", "text/html"))
        self.assertEqual(built.tls_versions, frozenset({0x0304}))

    def test_bad_conditions(self) -> None:
        raw = route(
            match={"ports": 80, "path": "api", "headers": {"X-A": "/(/"}, "tlsVersion": ["TLS1.3"]},
        )
        errors = [e.removeprefix("smartProxyConfig.routes[0].") for e in self.errors(raw)]
        self.assertEqual(
            errors,
            [
                "match.path: a path starts with '/': 'api'",
                (
                    "match.headers: X-A: not a regular expression: "
                    "missing ), unterminated subpattern at position 0"
                ),
                "match.tlsVersion[0]: one of TLSv1, TLSv1.1, TLSv1.2, TLSv1.3, got 'TLS1.3'",
            ],
        )

    def test_request_conditions_need_http(self) -> None:
        raw = route(match={"ports": 443, "path": "/x"})  # ROUTE passes TLS through
        self.assertEqual(
            self.errors(raw),
            [
                (
                    "smartProxyConfig.routes[0].match.path: is read from HTTP requests: "
                    "passed-through TLS hides them"
                )
            ],
        )


class BasicAuthConfigTests(ProxyCase):
    HASH = "scrypt$15$8$1$RLinzXEgoHDp+tVepmtkqA==$KNF2ptdCmFXBQ1jmLhS9nw44wypV6vnglklGxZ6Vh4w="

    def test_loads_into_the_route(self) -> None:
        from dcrouter.proxy.routes import BasicAuthRule, build_routes

        raw = route(
            security={"basicAuth": {"realm": "staff", "users": [{"username": "ann", "password": self.HASH}]}}
        )
        del raw["smartProxyConfig"]["routes"][0]["tls"]
        (built,) = build_routes(self.config(raw), None)
        self.assertEqual(built.basic_auth, BasicAuthRule("staff", (("ann", self.HASH),)))

    def test_checked(self) -> None:
        bad = [{"username": "a:b", "password": "secret"}]
        errors = [
            e.removeprefix("smartProxyConfig.routes[0].security.basicAuth.")
            for e in self.errors(route(security={"basicAuth": {"users": bad}}))
        ]
        self.assertEqual(
            errors,
            [
                "users[0].username: ':' is not allowed",
                (
                    "users[0].password: must be a hash made by `dcrouter hash-password` (scrypt$...), "
                    "not a password"
                ),
            ],
        )
        twice = [{"username": "x", "password": self.HASH}] * 2
        raw = route(security={"basicAuth": {"users": twice}})
        del raw["smartProxyConfig"]["routes"][0]["tls"]
        self.assertEqual(
            self.errors(raw), ["smartProxyConfig.routes[0].security.basicAuth.users: 'x' is listed twice"]
        )

    def test_needs_http(self) -> None:
        raw = route(security={"basicAuth": {"users": [{"username": "a", "password": self.HASH}]}})
        self.assertEqual(
            self.errors(raw),
            [
                (
                    "smartProxyConfig.routes[0].security.basicAuth: works on HTTP requests: "
                    "passed-through TLS hides them"
                )
            ],
        )


class HeaderChangeConfigTests(ProxyCase):
    def test_loads(self) -> None:
        from dcrouter.proxy.routes import FieldChanges, build_routes

        headers = {
            "request": {"set": {"X-Env": "prod"}, "remove": ["Cookie"]},
            "response": {"set": {"Strict-Transport-Security": "max-age=63072000"}, "remove": ["Server"]},
        }
        raw = route(action={"type": "forward", "target": {"host": "10.0.0.1"}, "headers": headers})
        del raw["smartProxyConfig"]["routes"][0]["tls"]
        (built,) = build_routes(self.config(raw), None)
        self.assertEqual(built.request_fields, FieldChanges(((b"X-Env", b"prod"),), frozenset({b"cookie"})))
        self.assertEqual(built.response_fields.dropped, frozenset({b"server", b"strict-transport-security"}))
        self.assertTrue(built.reads_http)

    def test_framing_and_hop_fields_refused(self) -> None:
        headers = {"request": {"set": {"Content-Length": "0"}, "remove": ["Transfer-Encoding", "bad name"]}}
        raw = route(action={"type": "forward", "target": {"host": "10.0.0.1"}, "headers": headers})
        errors = [
            e.removeprefix("smartProxyConfig.routes[0].action.headers.request.") for e in self.errors(raw)
        ]
        self.assertEqual(
            errors,
            [
                "set: Content-Length is set by the proxy or frames the message; it cannot be changed",
                (
                    "remove[0]: Transfer-Encoding is set by the proxy or frames the message; "
                    "it cannot be changed"
                ),
                "remove[1]: not a header field name: 'bad name'",
            ],
        )


class RateLimitConfigTests(ProxyCase):
    def test_loads_into_the_route(self) -> None:
        from dcrouter.limits.gcra import Rate
        from dcrouter.proxy.routes import RequestRateRule, build_routes

        limit = {"count": 100, "window": 60_000, "burst": 20, "keyBy": "header", "headerName": "X-Api-Key"}
        raw = route(security={"rateLimit": limit})
        del raw["smartProxyConfig"]["routes"][0]["tls"]
        (built,) = build_routes(self.config(raw), None)
        self.assertEqual(built.request_rate, RequestRateRule(Rate(100, 60.0, 20), "header", "X-Api-Key"))
        self.assertTrue(built.reads_http)

    def test_checked(self) -> None:
        base = "smartProxyConfig.routes[0].security.rateLimit"
        for given, expected in (
            ({"count": 5, "keyBy": "header"}, f'{base}.headerName: required with keyBy = "header"'),
            ({"count": 5, "headerName": "X-A"}, f'{base}.headerName: has no effect with keyBy = "ip"'),
        ):
            raw = route(security={"rateLimit": given})
            del raw["smartProxyConfig"]["routes"][0]["tls"]
            self.assertEqual(self.errors(raw), [expected])
        self.assertEqual(
            self.errors(route(security={"rateLimit": {"count": 5}})),
            [f"{base}: works on HTTP requests: passed-through TLS hides them"],
        )


class JwtAuthConfigTests(ProxyCase):
    def pem(self) -> str:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(
                ec.generate_private_key(ec.SECP256R1())
                .public_key()
                .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            )
        return path

    def test_loads_into_the_route(self) -> None:
        from dcrouter.proxy.routes import JwtRule, build_routes

        pem = self.pem()
        jwt_auth = {"keyFile": pem, "algorithms": ["ES256"], "issuer": "https://id.test", "audience": ["app"]}
        raw = route(security={"jwtAuth": jwt_auth})
        del raw["smartProxyConfig"]["routes"][0]["tls"]
        (built,) = build_routes(self.config(raw), None)
        self.assertEqual(
            built.jwt_auth,
            JwtRule(algorithms=("ES256",), key_file=pem, issuer="https://id.test", audience=("app",)),
        )
        self.assertTrue(built.reads_http)

    def test_checked(self) -> None:
        path = "smartProxyConfig.routes[0].security.jwtAuth"
        cases = [
            (
                {"algorithms": ["RS256"]},
                f"{path}: set exactly one of keyFile, jwksFile and jwksUrl (got none)",
            ),
            (
                {"keyFile": "/no/such.pem"},
                f"{path}.keyFile: cannot read '/no/such.pem': No such file or directory",
            ),
            ({"jwksUrl": "http://id.test/jwks"}, f"{path}.jwksUrl: must be an https:// URL"),
            (
                {"jwksUrl": "https://id.test/jwks", "algorithms": ["HS256"]},
                (
                    f"{path}.algorithms[0]: one of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, "
                    "ES512, EdDSA (public-key algorithms only), got 'HS256'"
                ),
            ),
        ]
        for given, expected in cases:
            raw = route(security={"jwtAuth": given})
            del raw["smartProxyConfig"]["routes"][0]["tls"]
            self.assertEqual(self.errors(raw), [expected])

    def test_not_with_basic_auth(self) -> None:
        users = [{"username": "a", "password": BasicAuthConfigTests.HASH}]
        raw = route(security={"jwtAuth": {"jwksUrl": "https://id.test/k"}, "basicAuth": {"users": users}})
        del raw["smartProxyConfig"]["routes"][0]["tls"]
        self.assertEqual(
            self.errors(raw),
            [
                (
                    "smartProxyConfig.routes[0].security.jwtAuth: a request carries one Authorization: "
                    "basicAuth or jwtAuth"
                )
            ],
        )


class ActionConfigTests(ProxyCase):
    def test_each_action_type_loads(self) -> None:
        from dcrouter.proxy.routes import Redirect, StaticContent, build_routes

        root = self.mktemp()
        os.makedirs(root)
        raw = proxy()
        raw["smartProxyConfig"]["routes"] = [
            {
                "name": "r",
                "match": {"ports": 80},
                "action": {"type": "redirect", "redirect": {"to": "https://{domain}{path}{query}"}},
            },
            {"name": "s", "match": {"ports": 81}, "action": {"type": "static", "static": {"root": root}}},
            {
                "name": "c",
                "match": {"ports": 82},
                "action": {"type": "static", "static": {"content": "hi", "status": 503}},
            },
            {"name": "b", "match": {"ports": 83}, "action": {"type": "block"}},
            {"name": "b403", "match": {"ports": 84}, "action": {"type": "block", "status": 403}},
            {
                "name": "h",
                "match": {"ports": 85},
                "action": {"type": "socket-handler", "socketHandler": "plugins.mine:handler"},
            },
        ]
        routes = {r.name: r for r in build_routes(self.config(raw), None)}
        self.assertEqual(routes["r"].action.redirect, Redirect("https://{domain}{path}{query}", 301))
        self.assertEqual(routes["s"].action.static, StaticContent(root=root))
        self.assertEqual(routes["c"].action.static, StaticContent(content=b"hi", status=503))
        self.assertEqual((routes["b"].action.type, routes["b"].action.status), ("block", None))
        self.assertFalse(routes["b"].action.answers_http)
        self.assertTrue(routes["b403"].action.answers_http)
        self.assertEqual(routes["h"].action.handler, "plugins.mine:handler")
        self.assertEqual(routes["h"].target.hosts, ())

    def test_action_tables_checked(self) -> None:
        raw = proxy()
        raw["smartProxyConfig"]["routes"] = [
            {"match": {"ports": 80}, "action": {"type": "redirect"}},
            {"match": {"ports": 81}, "action": {"type": "static", "static": {}}},
            {"match": {"ports": 82}, "action": {"type": "static", "static": {"root": "/no/such/dir"}}},
            {"match": {"ports": 83}, "action": {"type": "forward", "target": {"host": "h"}, "status": 403}},
            {
                "match": {"ports": 84},
                "action": {"type": "redirect", "redirect": {"to": "https://{host}/", "status": 200}},
            },
            {"match": {"ports": 85}, "action": {"type": "block", "status": 200}},
            {"match": {"ports": 86}, "action": {"type": "socket-handler"}},
        ]
        errors = [e.removeprefix("smartProxyConfig.routes") for e in self.errors(raw)]
        self.assertEqual(
            errors,
            [
                '[0].action.redirect: required for type "redirect"',
                (
                    "[1].action.static: set exactly one of 'root' (a directory of files) and 'content' "
                    "(a fixed body)"
                ),
                "[2].action.static.root: no such directory: '/no/such/dir'",
                '[3].action.status: has no effect with type "forward"',
                (
                    "[4].action.redirect.to: unknown placeholder {host} "
                    "(known: {domain}, {path}, {query}, {port})"
                ),
                "[4].action.redirect.status: a redirect status is one of 301, 302, 303, 307, 308: 200",
                "[5].action.status: a block answers an error status (400-599): 200",
                '[6].action.socketHandler: required for type "socket-handler"',
            ],
        )

    def test_the_smtp_handler_needs_smtp(self) -> None:
        raw = route(action={"type": "socket-handler", "socketHandler": "smtp"})
        self.assertEqual(
            self.errors(raw),
            [
                (
                    'smartProxyConfig.routes[0].action.socketHandler: "smtp" hands connections to '
                    "dcrouter's "
                    "ESMTP server, which needs smtpConfig"
                )
            ],
        )

    def test_tls_in_the_action_as_smartproxy_writes_it(self) -> None:
        from dcrouter.proxy.routes import build_routes

        raw = proxy()
        entry = raw["smartProxyConfig"]["routes"][0]
        entry["action"]["tls"] = entry.pop("tls")
        entry["action"]["tls"]["mode"] = "terminate"
        entry["action"]["tls"]["certificate"] = "store"
        (built,) = build_routes(self.config(raw), None)
        self.assertEqual((built.tls_mode, built.certificate), ("terminate", "store"))
        entry["tls"] = {"mode": "passthrough"}
        self.assertEqual(
            self.errors(raw),
            [
                (
                    "smartProxyConfig.routes[0].tls: set both here and as "
                    "smartProxyConfig.routes[0].action.tls; "
                    "keep one"
                )
            ],
        )

    def test_http_actions_and_tls_modes(self) -> None:
        raw = proxy()
        raw["smartProxyConfig"]["routes"] = [
            {
                "match": {"ports": 80},
                "action": {"type": "static", "static": {"content": "x"}, "tls": {"mode": "passthrough"}},
            },
            {
                "match": {"ports": 81},
                "action": {"type": "socket-handler", "socketHandler": "plugins.mine:handler"},
                "tls": {"mode": "terminate", "certificate": "store"},
            },
        ]
        self.assertEqual(
            [e.removeprefix("smartProxyConfig.routes") for e in self.errors(raw)],
            [
                (
                    '[0].action.tls.mode: a "static" action answers HTTP itself: it needs "terminate" '
                    "(HTTPS) or no tls (plain HTTP)"
                ),
                '[1].tls.mode: has no effect with action type "socket-handler"',
            ],
        )


class TerminationConfigTests(ProxyCase):
    """tls.mode terminate / terminate-and-reencrypt, tls.certificate files, domainConfigs useNetworkProxy."""

    def files(self) -> dict[str, str]:
        from dcrouter.net.certfiles import generate_self_signed

        directory = self.mktemp()
        os.makedirs(directory)
        cert, key = generate_self_signed("a.example.com")
        paths = {"certPath": os.path.join(directory, "c.pem"), "keyPath": os.path.join(directory, "k.pem")}
        for path, data in zip(paths.values(), (cert, key), strict=True):
            with open(path, "wb") as handle:
                handle.write(data)
        return paths

    def test_terminating_routes_load(self) -> None:
        from dcrouter.proxy.routes import CertificateFiles, build_routes

        files = self.files()
        raw = copy.deepcopy(SEED)
        sp = raw["smartProxyConfig"]
        sp["domainConfigs"][0]["useNetworkProxy"] = True
        sp["domainConfigs"][0]["certificate"] = files
        sp["routes"] = [
            dict(copy.deepcopy(ROUTE), name="a", tls={"mode": "terminate", "certificate": files}),
            dict(
                copy.deepcopy(ROUTE), name="b", tls={"mode": "terminate-and-reencrypt", "certificate": files}
            ),
        ]
        routes = build_routes(self.config(raw), None)
        expected = CertificateFiles(files["certPath"], files["keyPath"])
        self.assertEqual(
            [(r.name, r.tls_mode, r.certificate) for r in routes[:3]],
            [
                ("a", "terminate", expected),
                ("b", "terminate-and-reencrypt", expected),
                ("smartProxyConfig.domainConfigs[0]", "terminate", expected),
            ],
        )

    def test_use_network_proxy_with_acme_is_auto(self) -> None:
        from dcrouter.proxy.routes import build_routes

        raw = copy.deepcopy(SEED)
        raw["smartProxyConfig"]["domainConfigs"][0]["useNetworkProxy"] = True
        raw["smartProxyConfig"]["acme"]["enabled"] = True
        (entry,) = [r for r in build_routes(self.config(raw), None) if "domainConfigs" in r.name]
        self.assertEqual((entry.tls_mode, entry.certificate), ("terminate", "auto"))

    def test_acme_port_answers_for_terminated_names(self) -> None:
        from dcrouter.proxy.routes import PortRange, build_routes

        raw = route(
            tls={"mode": "terminate", "certificate": "auto"},
            match={"ports": 443, "domains": ["a.example.com"]},
        )
        raw["smartProxyConfig"]["acme"] = {"enabled": True, "accountEmail": "ops@example.com", "port": 8080}
        web, acme = build_routes(self.config(raw), None)
        self.assertEqual(
            (acme.ports, acme.domains, acme.tls_mode, acme.priority < web.priority),
            ((PortRange(8080, 8080),), ("a.example.com",), "terminate", True),
        )

    def test_certificate_required_and_checked(self) -> None:
        raw = copy.deepcopy(SEED)
        sp = raw["smartProxyConfig"]
        sp["domainConfigs"][0]["useNetworkProxy"] = True
        sp["routes"] = [
            dict(copy.deepcopy(ROUTE), name="a", tls={"mode": "terminate"}),
            dict(copy.deepcopy(ROUTE), name="b", tls={"mode": "passthrough", "certificate": self.files()}),
            dict(
                copy.deepcopy(ROUTE),
                name="c",
                tls={"mode": "terminate", "certificate": {"certPath": "/none.pem", "keyPath": "/k"}},
            ),
        ]
        errors = [e.removeprefix("smartProxyConfig.") for e in self.errors(raw)]
        self.assertEqual(
            errors,
            [
                (
                    'routes[0].tls.certificate: required with mode "terminate": {certPath, keyPath}, '
                    '"auto" (ACME) or "store"'
                ),
                'routes[1].tls.certificate: has no effect with mode "passthrough"',
                "routes[2].tls.certificate.certPath: cannot read '/none.pem': No such file or directory",
                "routes[2].tls.certificate.keyPath: cannot read '/k': No such file or directory",
                (
                    "domainConfigs[0].useNetworkProxy: needs a certificate: smartProxyConfig.domainConfigs[0]"
                    ".certificate, or smartProxyConfig.acme.enabled = true"
                ),
            ],
        )

    def test_tls_profile(self) -> None:
        """tlsProfile on terminating routes reaches the route model (not set: intermediate)."""
        from dcrouter.proxy.routes import build_routes

        files = self.files()
        raw = copy.deepcopy(SEED)
        sp = raw["smartProxyConfig"]
        sp["domainConfigs"][0].update(useNetworkProxy=True, certificate=files, tlsProfile="modern")
        sp["routes"] = [
            dict(copy.deepcopy(ROUTE), name="a", tls={"mode": "terminate", "certificate": files}),
            dict(
                copy.deepcopy(ROUTE),
                name="b",
                tls={"mode": "terminate-and-reencrypt", "certificate": files, "tlsProfile": "modern"},
            ),
        ]
        routes = build_routes(self.config(raw), None)
        self.assertEqual(
            [(r.name, r.tls_profile) for r in routes[:3]],
            [("a", "intermediate"), ("b", "modern"), ("smartProxyConfig.domainConfigs[0]", "modern")],
        )

    def test_tls_profile_checked(self) -> None:
        raw = copy.deepcopy(SEED)
        sp = raw["smartProxyConfig"]
        sp["domainConfigs"][0]["tlsProfile"] = "intermediate"
        sp["routes"] = [dict(copy.deepcopy(ROUTE), tls={"mode": "passthrough", "tlsProfile": "modern"})]
        errors = [e.removeprefix("smartProxyConfig.") for e in self.errors(raw)]
        self.assertEqual(
            errors,
            [
                'routes[0].tls.tlsProfile: has no effect with mode "passthrough"',
                "domainConfigs[0].tlsProfile: has no effect without useNetworkProxy = true",
            ],
        )
        raw = route(tls={"mode": "terminate", "certificate": self.files(), "tlsProfile": "old"})
        self.assertEqual(
            self.errors(raw),
            [
                (
                    'smartProxyConfig.routes[0].tls.tlsProfile: expected one of "modern", "intermediate", '
                    "got a string 'old'"
                )
            ],
        )

    def test_defaults_of_unsupported_keys_load(self) -> None:
        raw = route(tls={"mode": "passthrough", "certificate": None})
        raw["smartProxyConfig"]["acme"] = {"enabled": False}
        self.config(raw)


class HttpDomainRoutesTests(ProxyCase):
    def test_loads(self) -> None:
        raw = {
            "httpDomainRoutes": [
                {"domain": "example.com", "targetServerIP": "10.0.0.1", "targetServerPort": 8080},
                {
                    "domain": "*.example.com",
                    "targetServerIP": "web.internal",
                    "targetServerPort": 8443,
                    "useTls": True,
                    "listenPort": 8443,
                },
            ]
        }
        routes = load_options(raw).options.http_domain_routes
        assert routes is not None
        self.assertIsInstance(routes[0], HttpDomainRoute)
        self.assertEqual(
            [(r.domain, r.target_server_ip, r.target_server_port, r.use_tls, r.listen_port) for r in routes],
            [
                ("example.com", "10.0.0.1", 8080, False, None),
                ("*.example.com", "web.internal", 8443, True, 8443),
            ],
        )

    def test_checks(self) -> None:
        raw = {"httpDomainRoutes": [{"domain": "*", "targetServerIP": "", "targetServerPort": 0}]}
        self.assertEqual(
            self.errors(raw),
            [
                "httpDomainRoutes[0].domain: not a domain name or '*.' wildcard: '*'",
                "httpDomainRoutes[0].targetServerIP: not a host name or IP address: ''",
                "httpDomainRoutes[0].targetServerPort: not a port number (1-65535): 0",
            ],
        )


class SmtpPortConflictTests(ProxyCase):
    SMTP: dict[str, Any] = {"ports": [25, 2525], "hostname": "mx.example.com"}

    def test_every_proxy_spelling_is_checked(self) -> None:
        raw = proxy(fromPort=2525, targetIP="10.0.0.1", globalPortRanges=[{"from": 20, "to": 30}])
        raw["smartProxyConfig"]["routes"][0]["match"]["ports"] = 25
        raw["smartProxyConfig"]["domainConfigs"] = [
            {"domains": ["a.example"], "portRanges": [{"from": 2500, "to": 2600}]}
        ]
        raw["httpDomainRoutes"] = [
            {"domain": "b.example", "targetServerIP": "10.0.0.2", "targetServerPort": 80, "listenPort": 25}
        ]
        raw["smtpConfig"] = dict(self.SMTP)
        self.assertEqual(
            self.errors(raw),
            [
                "smartProxyConfig.fromPort: port 2525 is also smtpConfig.ports[1]",
                "smartProxyConfig.globalPortRanges[0]: port 25 is also smtpConfig.ports[0]",
                "smartProxyConfig.domainConfigs[0].portRanges[0]: port 2525 is also smtpConfig.ports[1]",
                "smartProxyConfig.routes[0].match.ports: port 25 is also smtpConfig.ports[0]",
                "httpDomainRoutes[0]: port 25 is also smtpConfig.ports[0]",
            ],
        )

    def test_acme_port_of_a_terminating_proxy(self) -> None:
        """With terminating routes and an acme block the proxy also listens on acme.port (challenges and
        redirects to HTTPS), so that port must not be SMTP's either."""
        raw = route(tls={"mode": "terminate", "certificate": "auto"})
        raw["smartProxyConfig"]["routes"][0]["match"]["domains"] = ["www.example.com"]  # HTTP-01: no wildcard
        raw["smartProxyConfig"]["acme"] = {"enabled": True, "accountEmail": "a@example.com", "port": 2525}
        raw["smtpConfig"] = dict(self.SMTP)
        self.assertEqual(
            self.errors(raw), ["smartProxyConfig.acme.port: port 2525 is also smtpConfig.ports[1]"]
        )
        raw = proxy(acme={"enabled": False, "port": 2525})  # only passthrough routes: nothing listens there
        raw["smtpConfig"] = dict(self.SMTP)
        load_options(raw)

    def test_list_item_path(self) -> None:
        raw = proxy()
        raw["smartProxyConfig"]["routes"][0]["match"]["ports"] = [443, {"from": 2000, "to": 3000}]
        raw["smtpConfig"] = dict(self.SMTP)
        self.assertEqual(
            self.errors(raw),
            ["smartProxyConfig.routes[0].match.ports[1]: port 2525 is also smtpConfig.ports[1]"],
        )

    def test_separate_ports_load(self) -> None:
        raw = copy.deepcopy(SEED)
        raw["smtpConfig"] = dict(self.SMTP)
        options = load_options(raw).options
        self.assertIsNotNone(options.smart_proxy_config)
        self.assertIsNotNone(options.smtp_config)


class BackendsTests(ProxyCase):
    """action.loadBalancing, target.weights, action.healthCheck and the backend verification keys."""

    def action(self, **keys: Any) -> dict[str, Any]:
        action = copy.deepcopy(ROUTE["action"])
        action.update(keys)
        return route(action=action)

    def test_they_load_into_the_model(self) -> None:
        from dcrouter.net.healthcheck import HealthCheckRule
        from dcrouter.proxy.routes import BackendVerification, build_routes

        raw = self.action(
            target={"host": ["10.0.0.1", "backend.internal"], "port": 8443, "weights": [3, 1]},
            loadBalancing="sourceHash",
            healthCheck={"type": "http", "path": "/healthz", "expectStatus": [200, 204], "interval": 5000},
        )
        raw["smartProxyConfig"]["routes"][0]["tls"] = {
            "mode": "terminate-and-reencrypt",
            "certificate": "store",
            "verifyBackend": False,
        }
        (web, *_) = build_routes(self.config(raw), None)
        target = web.target
        self.assertEqual((target.weights, target.balancing), ((3, 1), "sourceHash"))
        self.assertEqual(
            target.health_check,
            HealthCheckRule(kind="http", interval=5.0, timeout=1.0, path="/healthz", expect=(200, 204)),
        )
        self.assertEqual(target.verification, BackendVerification(verify=False))

    def test_defaults(self) -> None:
        from dcrouter.proxy.routes import VERIFIED, build_routes

        (web, *_) = build_routes(self.config(route()), None)
        self.assertEqual(
            (web.target.balancing, web.target.weights, web.target.health_check, web.target.verification),
            ("roundRobin", (), None, VERIFIED),
        )

    def test_refusals_name_the_key(self) -> None:
        at = "smartProxyConfig.routes[0]"
        cases = [
            (
                self.action(target={"host": ["10.0.0.1", "b.internal"], "port": 80, "weights": [1]}),
                f"{at}.action.target.weights",
            ),
            (self.action(target={"host": "10.0.0.1", "port": 80, "weights": [0]}), "weights[0]"),
            (self.action(loadBalancing="random"), f"{at}.action.loadBalancing"),
            (
                self.action(target={"host": "10.0.0.1", "port": "preserve"}, healthCheck={}),
                f"{at}.action.healthCheck.port",
            ),
            (self.action(healthCheck={"type": "tcp", "path": "/x"}), f"{at}.action.healthCheck.path"),
            (self.action(healthCheck={"type": "http", "expectStatus": [700]}), "expectStatus[0]"),
            (self.action(healthCheck={"fall": 0}), f"{at}.action.healthCheck.fall"),
            (
                route(
                    action={
                        "type": "block",
                        "loadBalancing": "leastConnections",
                        "healthCheck": {"type": "tcp"},
                    }
                ),
                f"{at}.action.loadBalancing",
            ),
            (route(tls={"mode": "passthrough", "verifyBackend": False}), f"{at}.tls.verifyBackend"),
            (route(tls={"mode": "passthrough", "serverName": "b.internal"}), f"{at}.tls.serverName"),
            (
                route(
                    tls={"mode": "terminate-and-reencrypt", "certificate": "store", "backendCaFile": "/nope"}
                ),
                f"{at}.tls.backendCaFile",
            ),
        ]
        for raw, key in cases:
            errors = self.errors(raw)
            self.assertTrue(any(key in error for error in errors), (key, errors))


class Http2AndWebsocketConfigTests(ProxyCase):
    def test_loaded_into_routes_and_settings(self) -> None:
        from dcrouter.proxy.routes import build_routes
        from dcrouter.proxy.session import ProxySettings

        raw = proxy(http2={"maxConcurrentStreams": 10, "maxResets": 5, "floodWindow": 2000})
        entry = raw["smartProxyConfig"]["routes"][0]
        entry["tls"] = {"mode": "terminate", "certificate": "store", "http2": False}
        entry["action"]["websocket"] = {"idleTimeout": 60_000, "maxAge": 3_600_000}
        config = self.config(raw)
        (built,) = build_routes(config, None)
        self.assertEqual((built.http2, built.websocket_idle, built.websocket_max_age), (False, 60.0, 3600.0))
        limits = ProxySettings.from_config(config).http2
        self.assertEqual((limits.max_concurrent_streams, limits.max_resets, limits.window), (10, 5, 2.0))
        self.assertEqual(limits.initial_window_size, 1_048_576)
        (default,) = build_routes(self.config(route(tls={"mode": "terminate", "certificate": "store"})), None)
        self.assertEqual(
            (default.http2, default.websocket_idle, default.websocket_max_age), (True, None, None)
        )

    def test_checked(self) -> None:
        errors = self.errors(proxy(http2={"maxConcurrentStreams": 0, "initialWindowSize": 2**31}))
        self.assertEqual(len(errors), 2, errors)
        self.assertTrue(any("smartProxyConfig.http2.maxConcurrentStreams" in e for e in errors), errors)
        self.assertTrue(any("smartProxyConfig.http2.initialWindowSize" in e for e in errors), errors)
        errors = self.errors(route(action={"type": "forward", "websocket": {"idleTime": 5}}))
        self.assertTrue(any("websocket.idleTime" in e for e in errors), errors)

    def test_no_effect_refused(self) -> None:
        raw = proxy()
        entry = raw["smartProxyConfig"]["routes"][0]
        entry["tls"]["http2"] = False
        entry["action"]["websocket"] = {"maxAge": 60_000}
        self.assertEqual(
            self.errors(raw),
            [
                'smartProxyConfig.routes[0].tls.http2: has no effect with mode "passthrough"',
                (
                    "smartProxyConfig.routes[0].action.websocket: applies to forward routes that read HTTP "
                    "(terminated, or plain HTTP)"
                ),
            ],
        )


class H2cTargetTests(ProxyCase):
    """action.target.protocol = "h2c": where it applies, and the key path named where it cannot."""

    files = TerminationConfigTests.files

    def with_target(self, tls: dict[str, Any] | None, **action: Any) -> dict[str, Any]:
        entry = copy.deepcopy(ROUTE)
        entry["action"]["target"]["protocol"] = "h2c"
        entry["action"].update(action)
        if tls is None:
            del entry["tls"]
        else:
            entry["tls"] = tls
        return {"smartProxyConfig": {"routes": [entry]}}

    def test_terminating_and_plain_routes_take_it(self) -> None:
        from dcrouter.proxy.routes import build_routes

        for tls in ({"mode": "terminate", "certificate": self.files()}, None):
            routes = build_routes(self.config(self.with_target(tls)), None)
            self.assertEqual(routes[0].target.protocol, "h2c")
            self.assertTrue(routes[0].reads_http, "requests are read, not spliced")

    def test_default_is_http1(self) -> None:
        config = self.config(route())
        self.assertEqual(config.routes[0].action.target.protocol, "http/1.1")

    def test_refused_where_it_cannot_apply(self) -> None:
        where = "smartProxyConfig.routes[0].action.target.protocol"
        for tls in (
            {"mode": "passthrough"},
            {"mode": "terminate-and-reencrypt", "certificate": self.files()},
        ):
            errors = self.errors(self.with_target(tls))
            self.assertTrue(any(e.startswith(where) for e in errors), (tls, errors))

    def test_unknown_protocol_refused(self) -> None:
        entry = copy.deepcopy(ROUTE)
        entry["action"]["target"]["protocol"] = "h3"
        errors = self.errors({"smartProxyConfig": {"routes": [entry]}})
        self.assertTrue(any("action.target.protocol" in e for e in errors), errors)
