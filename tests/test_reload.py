"""Configuration reload (dcrouter.reload) on a router over a recording reactor: each reloadable part is put
in place for what starts next, sessions in flight keep theirs, and a refused file changes nothing. The
same through a real twistd under load is tests/integration/test_reload_twistd.py."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.trial.unittest import SynchronousTestCase

from dcrouter import DcRouter
from dcrouter.config import load_file
from dcrouter.events import Event
from dcrouter.log import level_for
from dcrouter.net.certfiles import generate_self_signed
from dcrouter.reload import Reloader, ReloadOutcome, changed_keys, restart_needed
from dcrouter.tap import make_reloader, on_sighup
from tests.test_net_listen import PortsReactor
from tests.test_router import A_HASH, write_tls


class UdpPort:
    """What DnsService needs of a UDP port on a memory reactor."""

    def __init__(self, port: int, interface: str) -> None:
        self.address = IPv4Address("UDP", interface, port)

    def getHost(self) -> IPv4Address:
        return self.address

    def stopListening(self) -> None:
        pass


class DnsPortsReactor(PortsReactor):
    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> UdpPort:
        return UdpPort(port, interface)


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.events: list[Event] = []

    def receive(self, event: Event) -> None:
        self.events.append(event)


def base_config(test: SynchronousTestCase) -> dict[str, Any]:
    return {
        "logLevel": "info",
        "smtpConfig": {
            "ports": [2525, 2526],
            "bindAddress": "127.0.0.1",
            "hostname": "mx.test",
            "implicitTlsPorts": [],
            "submissionPorts": [],
            "queueStorage": "memory",
            "tls": write_tls(test),
            "domainConfigs": [{"domains": ["example.test"], "targetIPs": ["127.0.0.1"], "port": 2600}],
            "defaultServer": "127.0.0.1",
            "defaultPort": 2700,
        },
    }


class ReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.path = os.path.join(directory, "router.json")
        self.config = base_config(self)
        self.write(self.config)
        self.reactor = PortsReactor()
        self.router = DcRouter(load_file(self.path), reactor=self.reactor)
        self.router.privilegedStartService()
        self.router.startService()
        self.addCleanup(self.stop)
        self.reloader = Reloader(self.router, self.path, maybeDeferred)
        self.events = Recorder()
        self.router.events.subscribe(self.events, ["config.*"])

    def stop(self) -> None:
        self.router.stopService()
        self.reactor.advance(60)

    def write(self, config: dict[str, Any]) -> None:
        with open(self.path, "w") as handle:
            json.dump(config, handle)

    def reload(self) -> ReloadOutcome:
        if os.path.exists(self.path):
            self.write(self.config)
        done: Deferred[ReloadOutcome] = self.reloader.reload("api")
        return self.successResultOf(done)

    def route_name(self, recipient: str) -> str:
        assert self.router.routes is not None
        return self.router.routes.route("a@b.test", recipient).name

    def bound_ports(self) -> list[int]:
        return sorted(self.router.smtp_ports)

    def test_unchanged_file(self) -> None:
        outcome = self.reload()
        self.assertTrue(outcome.applied)
        self.assertEqual(outcome.changes, ["nothing changed in the file; certificates and keys read again"])
        self.assertEqual([e.type for e in self.events.events], ["config.reloaded"])

    def test_routing_rule_for_the_next_message(self) -> None:
        self.assertEqual(self.route_name("x@other.test"), "default")
        self.config["smtpConfig"]["domainConfigs"].append(
            {"domains": ["other.test"], "targetIPs": ["127.0.0.2"], "port": 2601}
        )
        outcome = self.reload()
        self.assertTrue(outcome.applied, outcome.errors)
        self.assertIn("smtpConfig.domainConfigs", outcome.changes)
        self.assertEqual(self.route_name("x@other.test"), "domain:other.test")
        assert self.router.delivery is not None
        self.assertIs(self.router.delivery._routes, self.router.routes)
        self.assertEqual(self.events.events[-1].fields["changes"], outcome.changes)

    def test_sessions_keep_the_configuration_they_started_with(self) -> None:
        assert self.router.smtp is not None
        factory = self.router.smtp.factories[2525]
        before = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        old_policy = self.router.policy
        self.config["smtpConfig"]["relayNetworks"] = ["10.0.0.0/8"]
        self.assertTrue(self.reload().applied)
        after = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
        self.assertIs(before._f.policy, old_policy)
        self.assertIs(after._f.policy, self.router.policy)
        self.assertIsNot(old_policy, self.router.policy)
        # The connection caps count across the reload.
        assert old_policy is not None and self.router.policy is not None
        self.assertIs(old_policy.counts, self.router.policy.counts)

    def test_handed_over_sessions_get_the_new_configuration(self) -> None:
        """Sessions the proxy hands over (its smtp socket handler): a factory first made after a reload has
        the reload's settings, not those of the start."""
        self.config["smtpConfig"]["relayNetworks"] = ["10.0.0.0/8"]
        self.assertTrue(self.reload().applied)
        assert self.router.smtp is not None
        factory = self.router.smtp.handover_factory(2525)
        self.assertIs(factory.policy, self.router.policy)
        self.assertIs(factory.config, self.router.smtp_config)

    def test_ports_opened_and_closed(self) -> None:
        self.config["smtpConfig"]["ports"] = [2526, 2527]
        outcome = self.reload()
        self.assertTrue(outcome.applied, outcome.errors)
        self.assertEqual(self.bound_ports(), [2526, 2527])
        self.assertIn("2527 bound", self.reactor.log)
        self.assertIn("2525 closed", self.reactor.log)
        self.assertIn("smtpConfig.ports: listening on 2527", outcome.changes)
        self.assertIn("smtpConfig.ports: stopped listening on 2525", outcome.changes)

    def test_port_taken_changes_nothing(self) -> None:
        self.reactor.taken = (2527,)
        self.config["smtpConfig"]["ports"] = [2525, 2527]
        self.config["smtpConfig"]["domainConfigs"][0]["port"] = 2999
        outcome = self.reload()
        self.assertFalse(outcome.applied)
        self.assertIn("smtpConfig.ports", outcome.errors[0])
        self.assertEqual(self.bound_ports(), [2525, 2526])
        assert self.router.smtp_config is not None
        self.assertEqual(self.router.smtp_config.domain_configs[0].port, 2600)

    def test_invalid_file_changes_nothing(self) -> None:
        options = self.router.options
        self.config["smtpConfig"]["ports"] = ["not a port"]
        self.config["logLevel"] = "debug"
        outcome = self.reload()
        self.assertFalse(outcome.applied)
        self.assertTrue(any(e.startswith("smtpConfig.ports") for e in outcome.errors), outcome.errors)
        self.assertIs(self.router.options, options)
        self.assertEqual(level_for("dcrouter"), "info")
        self.assertEqual([e.type for e in self.events.events], ["config.reload_failed"])
        self.assertEqual(self.events.events[0].fields["errors"], outcome.errors)

    def test_unreadable_file(self) -> None:
        os.remove(self.path)
        outcome = self.reload()
        self.assertFalse(outcome.applied)
        self.assertIn("cannot read", outcome.errors[0])

    def test_queue_backend_needs_a_restart(self) -> None:
        self.config["smtpConfig"]["queueStorage"] = "disk"
        self.config["smtpConfig"]["persistentPath"] = os.path.abspath(self.mktemp())
        outcome = self.reload()
        self.assertFalse(outcome.applied)
        self.assertTrue(
            any("smtpConfig.queueStorage" in e and "needs a restart" in e for e in outcome.errors)
        )
        self.assertTrue(any("smtpConfig.persistentPath" in e for e in outcome.errors))

    def test_dns_zones_rebuilt(self) -> None:
        self.router.stopService()
        self.reactor.advance(60)
        self.config["dnsServerConfig"] = {
            "udpPort": 5300,
            "udpBindInterface": "127.0.0.1",
            "zones": ["example.test"],
            "records": [{"name": "www.example.test", "type": "A", "value": "192.0.2.1"}],
        }
        self.write(self.config)
        self.reactor = DnsPortsReactor()
        self.router = DcRouter(load_file(self.path), reactor=self.reactor)
        self.router.privilegedStartService()
        self.router.startService()
        self.reloader = Reloader(self.router, self.path, maybeDeferred)

        def answers(name: str) -> list[str]:
            assert self.router.dns is not None
            zones = self.router.dns.zones
            zone = zones.zone_for(name)
            assert zone is not None
            records = zones.records_at(zone, name)
            return sorted(str(r.dottedQuad()) for r in records if hasattr(r, "dottedQuad"))

        self.assertEqual(answers("www.example.test"), ["192.0.2.1"])
        self.reactor.advance(5)
        self.config["dnsServerConfig"]["records"][0]["value"] = "192.0.2.2"
        self.config["smtpConfig"]["domainConfigs"].append(
            {"domains": ["lists.example.test"], "targetIPs": ["127.0.0.1"], "port": 2601}
        )
        outcome = self.reload()
        self.assertTrue(outcome.applied, outcome.errors)
        self.assertIn("dnsServerConfig: zones rebuilt (configured and generated records)", outcome.changes)
        self.assertEqual(answers("www.example.test"), ["192.0.2.2"])
        assert self.router.dns is not None
        zone = self.router.dns.zones.zone_for("example.test")
        assert zone is not None
        mx = [r for r in zone.at("lists.example.test") if r.TYPE == 15]  # the new domainConfigs entry's MX
        self.assertEqual([str(r.name) for r in mx], ["mx.test"])
        # The port is bound: changing it needs a restart, and nothing is applied.
        self.config["dnsServerConfig"]["udpPort"] = 5301
        outcome = self.reload()
        self.assertFalse(outcome.applied)
        self.assertTrue(any(e.startswith("dnsServerConfig.udpPort: changed") for e in outcome.errors))

    def test_log_level(self) -> None:
        self.addCleanup(lambda: __import__("dcrouter.log").log.set_level("info"))
        self.config["logLevel"] = "debug"
        outcome = self.reload()
        self.assertEqual(outcome.changes, ["logLevel"])
        self.assertEqual(level_for("dcrouter"), "debug")

    def test_transformations_reach_the_processor(self) -> None:
        assert self.router.processor is not None
        self.assertEqual(self.router.processor._transformations, [])
        self.config["smtpConfig"]["transformations"] = [
            {"type": "addHeader", "header": "X-Reloaded", "value": "yes"}
        ]
        outcome = self.reload()
        self.assertTrue(outcome.applied, outcome.errors)
        self.assertEqual(len(self.router.processor._transformations), 1)

    def test_renewed_certificate_with_the_same_file_names(self) -> None:
        before = self.router.certificates.default
        assert before is not None
        cert, key = generate_self_signed("mx.test")
        paths = self.config["smtpConfig"]["tls"]
        for name, data in (("certPath", cert), ("keyPath", key)):
            with open(paths[name], "wb") as handle:
                handle.write(data)
        outcome = self.reload()
        self.assertTrue(outcome.applied, outcome.errors)
        after = self.router.certificates.default
        assert after is not None
        self.assertNotEqual(after.certificate.serial_number, before.certificate.serial_number)

    def test_auth_users_for_new_sessions(self) -> None:
        assert self.router.smtp is not None
        factory = self.router.smtp.factories[2525]
        self.assertIsNone(self.router.authenticator)
        self.config["smtpConfig"]["auth"] = {"users": [{"username": "u", "password": A_HASH}]}
        outcome = self.reload()
        self.assertTrue(outcome.applied, outcome.errors)
        self.assertIsNotNone(self.router.authenticator)
        self.assertIs(factory.authenticator, self.router.authenticator)

    def test_sighup_reloads(self) -> None:
        self.router.reloader = make_reloader(self.router, self.path, self.reactor)
        self.router.reloader._defer_to_thread = maybeDeferred
        self.config["smtpConfig"]["ports"] = [2525]
        self.write(self.config)
        on_sighup(self.router)
        self.assertEqual(self.bound_ports(), [2525])
        self.assertEqual(self.events.events[-1].fields["source"], "signal")


class DiffTests(SynchronousTestCase):
    def test_changed_keys_and_restart_only(self) -> None:
        from dcrouter.config import load_options

        config = base_config(self)
        old = load_options(config).options
        config["smtpConfig"]["maxRetries"] = 2
        config["smtpConfig"]["bindAddress"] = "127.0.0.2"
        new = load_options(config).options
        self.assertEqual(changed_keys(old, new), ["smtpConfig.maxRetries", "smtpConfig.bindAddress"])
        self.assertEqual([e.split(":")[0] for e in restart_needed(old, new)], ["smtpConfig.bindAddress"])


def proxy_config(*routes: tuple[str, int, str]) -> dict[str, Any]:
    return {
        "smartProxyConfig": {
            "bindAddress": "127.0.0.1",
            "routes": [
                {
                    "name": name,
                    "match": {"ports": port, "domains": domain},
                    "action": {"type": "forward", "target": {"host": "127.0.0.1", "port": 9}},
                }
                for name, port, domain in routes
            ],
        }
    }


class ProxyReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.path = os.path.join(directory, "router.json")
        self.write(proxy_config(("a", 8443, "a.test")))
        self.reactor = PortsReactor()
        self.router = DcRouter(load_file(self.path), reactor=self.reactor)
        self.router.privilegedStartService()
        self.router.startService()
        self.addCleanup(self.stop)
        self.reloader = Reloader(self.router, self.path, maybeDeferred)

    def stop(self) -> None:
        self.router.stopService()
        self.reactor.advance(60)

    def write(self, config: dict[str, Any]) -> None:
        with open(self.path, "w") as handle:
            json.dump(config, handle)

    def test_routes_and_ports(self) -> None:
        proxy = self.router.proxy
        assert proxy is not None
        counters = proxy.counters["a"]
        self.write(proxy_config(("a", 9443, "a.test"), ("b", 9443, "b.test")))
        outcome = self.successResultOf(self.reloader.reload("api"))
        self.assertTrue(outcome.applied, outcome.errors)
        self.assertEqual(sorted(proxy.ports), [9443])
        self.assertIn("9443 bound", self.reactor.log)
        self.assertIn("8443 closed", self.reactor.log)
        route = proxy.context.table.match(9443, "b.test", "127.0.0.1")
        assert route is not None
        self.assertEqual(route.name, "b")
        self.assertIsNone(proxy.context.table.match(8443, "a.test", "127.0.0.1"))
        # A route that stays keeps its counters; a new one has its own.
        self.assertIs(proxy.counters["a"], counters)
        self.assertIn("b", proxy.counters)
        self.assertIn("smartProxyConfig ports: listening on 9443", outcome.changes)

    def test_proxy_port_taken_changes_nothing(self) -> None:
        proxy = self.router.proxy
        assert proxy is not None
        table = proxy.context.table
        self.reactor.taken = (9443,)
        self.write(proxy_config(("a", 9443, "a.test")))
        outcome = self.successResultOf(self.reloader.reload("api"))
        self.assertFalse(outcome.applied)
        self.assertIs(proxy.context.table, table)
        self.assertEqual(sorted(proxy.ports), [8443])
