"""The DNS server's zones and answers, in memory: zones built from configurations, queries answered by
:func:`dcrouter.dns.answer.respond` and through the protocol with a fake transport."""

from __future__ import annotations

import copy
import io
import json
import os
import sys
from typing import Any

from twisted.internet.testing import StringTransport
from twisted.names import dns
from twisted.trial import unittest

from dcrouter import cli
from dcrouter.acme.challenges import Dns01Responder
from dcrouter.acme.service import AcmeStateDirectory, certificate_orders
from dcrouter.config import ConfigError, load_options
from dcrouter.dns.answer import EDNS_PAYLOAD, respond
from dcrouter.dns.service import AuthoritativeFactory
from dcrouter.dns.zone import build_zones
from dcrouter.mail.dkimkeys import dns_txt_value, generate_private_key, private_key_pem

KEY = private_key_pem(generate_private_key("ed25519")).decode()

CONFIG: dict[str, Any] = {
    "smtpConfig": {
        "ports": [2525],
        "hostname": "mx.example.com",
        "domainConfigs": [
            {
                "domains": ["example.com", "other.example.net", "*.example.com"],
                "targetIPs": ["127.0.0.1"],
                "signDkim": True,
                "dkimOptions": {"domainName": "example.com", "keySelector": "s1", "privateKey": KEY},
            }
        ],
    },
    "dnsServerConfig": {
        "udpPort": 5353,
        "udpBindInterface": "127.0.0.1",
        "zones": ["example.com"],
        "records": [
            {"name": "www.example.com", "type": "A", "value": "192.0.2.10"},
            {"name": "www.example.com", "type": "AAAA", "value": "2001:db8::10"},
            {"name": "alias.example.com", "type": "CNAME", "value": "www.example.com"},
            {"name": "out.example.com", "type": "CNAME", "value": "elsewhere.example.org"},
            {"name": "big.example.com", "type": "TXT", "value": "x" * 700},
        ],
        "mailRecords": {"spf": "v=spf1 mx -all", "dmarc": "v=DMARC1; p=reject"},
    },
}


def _config(**dns_changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(CONFIG)
    raw["dnsServerConfig"].update(dns_changes)
    return raw


def _zones(raw: dict[str, Any] | None = None, dynamic: Any = None) -> Any:
    return build_zones(load_options(raw or CONFIG).options, serial=7, dynamic=dynamic)


def _query(name: str, qtype: int, *, rd: bool = False, edns: int | None = None) -> dns.Message:
    message = dns.Message(id=4242, recDes=int(rd))
    message.queries = [dns.Query(name, qtype, dns.IN)]
    if edns is not None:
        message.additional = [dns._OPTHeader(udpPayloadSize=edns)]
    # As it arrives: parsed from the wire.
    parsed = dns.Message()
    parsed.fromStr(message.toStr())
    return parsed


def _ask(zones: Any, name: str, qtype: int, *, udp: bool = True, **kw: Any) -> dns.Message:
    response = respond(zones, _query(name, qtype, **kw), udp=udp)
    assert response is not None
    wire = dns.Message()
    wire.fromStr(response.toStr())
    return wire


def _data(response: dns.Message) -> list[tuple[str, str, Any]]:
    return [
        (rr.name.name.decode(), dns.QUERY_TYPES.get(rr.type, str(rr.type)), rr.payload)
        for rr in response.answers
    ]


class ConfigTests(unittest.TestCase):
    def errors(self, raw: dict[str, Any]) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            load_options(raw)
        return caught.exception.errors

    def test_record_outside_zones(self) -> None:
        raw = _config(records=[{"name": "www.example.org", "type": "A", "value": "192.0.2.1"}])
        self.assertEqual(
            ["dnsServerConfig.records[0].name: 'www.example.org' lies in none of dnsServerConfig.zones"],
            self.errors(raw),
        )

    def test_bad_values_name_their_key(self) -> None:
        raw = _config(
            records=[
                {"name": "a.example.com", "type": "A", "value": "2001:db8::1"},
                {"name": "m.example.com", "type": "MX", "value": "mail.example.com"},
                {"name": "c.example.com", "type": "CNAME", "value": "x.example.com"},
                {"name": "c.example.com", "type": "TXT", "value": "hello"},
                {"name": "n.example.com", "type": "NS", "value": "ns.example.com"},
            ]
        )
        errors = self.errors(raw)
        self.assertEqual(
            [
                "dnsServerConfig.records[0].value",
                "dnsServerConfig.records[1].value",
                "dnsServerConfig.records[4].type",
                "dnsServerConfig.records[2].type",
            ],
            [e.split(": ")[0] for e in errors],
        )

    def test_zones_required(self) -> None:
        raw = copy.deepcopy(CONFIG)
        del raw["dnsServerConfig"]["zones"]
        self.assertEqual(["dnsServerConfig.zones: required"], self.errors(raw))

    def test_port_shared_with_smtp(self) -> None:
        raw = _config(udpPort=2525)
        self.assertIn("dnsServerConfig.udpPort: port 2525 is also smtpConfig.ports (TCP)", self.errors(raw))

    def test_dns01_names_in_zones(self) -> None:
        raw = copy.deepcopy(CONFIG)
        raw["smartProxyConfig"] = {
            "acme": {
                "enabled": True,
                "accountEmail": "a@example.com",
                "challenge": "dns-01",
                "stateDirectory": self.mktemp(),
            },
            "routes": [
                {
                    "match": {"ports": 8443, "domains": ["*.example.com", "www.example.org"]},
                    "action": {"type": "forward", "target": {"host": "127.0.0.1", "port": 8080}},
                    "tls": {"mode": "terminate", "certificate": "auto"},
                }
            ],
        }
        errors = self.errors(raw)
        self.assertEqual(1, len(errors), errors)
        self.assertIn("'www.example.org' lies in none of dnsServerConfig.zones", errors[0])


class ZoneTests(unittest.TestCase):
    def test_generated_records(self) -> None:
        zone = _zones().zone_for("example.com")
        assert zone is not None
        listed = {(r.name, r.type_name) for r in zone.records}
        self.assertLessEqual(
            {
                ("example.com", "SOA"),
                ("example.com", "NS"),
                ("example.com", "MX"),
                ("example.com", "TXT"),
                ("_dmarc.example.com", "TXT"),
                ("s1._domainkey.example.com", "TXT"),
            },
            listed,
        )
        # other.example.net is not in a served zone, and a wildcard gets no MX.
        self.assertNotIn("other.example.net", {r.name for r in zone.records})
        mx = zone.at("example.com")
        self.assertIn(dns.Record_MX(10, "mx.example.com", ttl=300), mx)
        dkim = b"".join(zone.at("s1._domainkey.example.com")[0].data).decode()
        from dcrouter.mail.dkimkeys import load_private_key

        self.assertEqual(dns_txt_value(load_private_key(KEY)), dkim)

    def test_configured_record_wins(self) -> None:
        raw = _config(records=[{"name": "example.com", "type": "MX", "value": "5 other.example.com"}])
        zone = _zones(raw).zone_for("example.com")
        assert zone is not None
        self.assertEqual([5], [r.preference for r in zone.at("example.com") if r.TYPE == dns.MX])


class AnswerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.challenges = Dns01Responder()
        self.zones = _zones(dynamic=self.challenges)

    def test_each_type(self) -> None:
        for name, qtype, expected in [
            ("www.example.com", dns.A, dns.Record_A("192.0.2.10", ttl=300)),
            ("www.example.com", dns.AAAA, dns.Record_AAAA("2001:db8::10", ttl=300)),
            ("example.com", dns.MX, dns.Record_MX(10, "mx.example.com", ttl=300)),
            ("example.com", dns.NS, dns.Record_NS("mx.example.com", ttl=300)),
            ("_dmarc.example.com", dns.TXT, dns.Record_TXT(b"v=DMARC1; p=reject", ttl=300)),
        ]:
            response = _ask(self.zones, name, qtype)
            self.assertEqual((dns.OK, 1, 0), (response.rCode, response.auth, response.recAv), name)
            self.assertEqual([(name, dns.QUERY_TYPES[qtype], expected)], _data(response))
        soa = _ask(self.zones, "example.com", dns.SOA).answers[0].payload
        self.assertEqual(
            (b"mx.example.com", b"hostmaster.example.com", 7), (soa.mname.name, soa.rname.name, soa.serial)
        )

    def test_cname_followed_inside_zones(self) -> None:
        response = _ask(self.zones, "alias.example.com", dns.A)
        self.assertEqual(
            [
                ("alias.example.com", "CNAME", dns.Record_CNAME("www.example.com", ttl=300)),
                ("www.example.com", "A", dns.Record_A("192.0.2.10", ttl=300)),
            ],
            _data(response),
        )
        outside = _ask(self.zones, "out.example.com", dns.A)
        self.assertEqual(["CNAME"], [t for _, t, _ in _data(outside)])

    def test_nxdomain_with_soa(self) -> None:
        response = _ask(self.zones, "nothing.example.com", dns.A)
        self.assertEqual((dns.ENAME, 1, []), (response.rCode, response.auth, response.answers))
        self.assertEqual([dns.SOA], [rr.type for rr in response.authority])
        self.assertEqual(300, response.authority[0].ttl)

    def test_nodata_with_soa(self) -> None:
        for name in ("www.example.com", "_domainkey.example.com"):  # the second: an empty non-terminal
            response = _ask(self.zones, name, dns.MX)
            self.assertEqual((dns.OK, []), (response.rCode, response.answers), name)
            self.assertEqual([dns.SOA], [rr.type for rr in response.authority], name)

    def test_refused_outside_zones(self) -> None:
        for name, rd in [("example.org", False), ("www.example.org", True), ("com", True)]:
            response = _ask(self.zones, name, dns.A, rd=rd)
            self.assertEqual((dns.EREFUSED, [], 0), (response.rCode, response.answers, response.recAv), name)
        self.assertEqual(dns.EREFUSED, _ask(self.zones, "example.com", dns.AXFR, udp=False).rCode)

    def test_recursion_desired_inside_zone_answered(self) -> None:
        response = _ask(self.zones, "www.example.com", dns.A, rd=True)
        self.assertEqual((dns.OK, 1, 0), (response.rCode, response.recDes, response.recAv))

    def test_any_is_minimal(self) -> None:
        response = _ask(self.zones, "example.com", dns.ALL_RECORDS)
        self.assertEqual(
            [("example.com", "HINFO", dns.Record_HINFO(b"RFC8482", b"", ttl=3600))], _data(response)
        )

    def test_truncated_over_udp_full_over_tcp(self) -> None:
        udp = _ask(self.zones, "big.example.com", dns.TXT)
        self.assertEqual((1, []), (udp.trunc, udp.answers))
        tcp = _ask(self.zones, "big.example.com", dns.TXT, udp=False)
        self.assertEqual(0, tcp.trunc)
        self.assertEqual(b"x" * 700, b"".join(tcp.answers[0].payload.data))
        edns = _ask(self.zones, "big.example.com", dns.TXT, edns=4096)
        self.assertEqual((0, 1), (edns.trunc, len(edns.answers)))
        self.assertEqual([EDNS_PAYLOAD], [rr.cls for rr in edns.additional if rr.type == dns.OPT])

    def test_edns_size_bounded(self) -> None:
        self.challenges.add("_acme-challenge.example.com", "y" * 250)
        for _ in range(5):
            self.challenges.add("_acme-challenge.example.com", "z" * 250)
        response = respond(self.zones, _query("_acme-challenge.example.com", dns.TXT, edns=65000), udp=True)
        assert response is not None
        self.assertEqual(1, response.trunc)  # ~1.5 KB is over EDNS_PAYLOAD whatever the client offers
        self.assertLessEqual(len(response.toStr()), 512)

    def test_dynamic_txt(self) -> None:
        self.assertEqual(dns.ENAME, _ask(self.zones, "_acme-challenge.example.com", dns.TXT).rCode)
        self.challenges.add("_acme-challenge.example.com.", "digest")
        response = _ask(self.zones, "_ACME-challenge.example.com", dns.TXT)
        self.assertEqual([dns.Record_TXT(b"digest", ttl=0)], [p for _, _, p in _data(response)])
        self.challenges.remove("_acme-challenge.example.com", "digest")
        self.assertEqual(dns.ENAME, _ask(self.zones, "_acme-challenge.example.com", dns.TXT).rCode)

    def test_responses_and_other_opcodes(self) -> None:
        query = _query("www.example.com", dns.A)
        query.answer = 1
        self.assertIsNone(respond(self.zones, query, udp=True))
        query = _query("www.example.com", dns.A)
        query.opCode = dns.OP_NOTIFY
        response = respond(self.zones, query, udp=True)
        assert response is not None
        self.assertEqual((dns.ENOTIMP, 1), (response.rCode, response.answer))


class ProtocolTests(unittest.TestCase):
    def test_tcp_round_trip(self) -> None:
        from twisted.internet.task import Clock

        clock = Clock()
        zones = _zones()
        factory = AuthoritativeFactory(lambda: zones, clock=clock)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        wire = _query("www.example.com", dns.A).toStr()
        protocol.dataReceived(len(wire).to_bytes(2, "big") + wire)
        data = transport.value()
        response = dns.Message()
        response.fromStr(data[2:])
        self.assertEqual(int.from_bytes(data[:2], "big"), len(data) - 2)
        self.assertEqual([dns.Record_A("192.0.2.10", ttl=300)], [rr.payload for rr in response.answers])
        # Idle connections are closed.
        clock.advance(11)
        self.assertTrue(transport.disconnecting)


class DnsRecordsCommandTests(unittest.TestCase):
    def setUp(self) -> None:
        self.out, self.err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", self.out)
        self.patch(sys, "stderr", self.err)

    def write(self, raw: dict[str, Any]) -> str:
        path = self.mktemp() + ".json"
        with open(path, "w") as f:
            json.dump(raw, f)
        return path

    def test_prints_the_zone(self) -> None:
        self.assertEqual(0, cli.main(["dns-records", self.write(CONFIG)]))
        lines = self.out.getvalue().splitlines()
        self.assertEqual("$ORIGIN example.com.", lines[0])
        self.assertRegex(
            lines[1], r"^example\.com\. 300 IN SOA mx\.example\.com\. hostmaster\.example\.com\. \d+ "
        )
        text = self.out.getvalue()
        for line in [
            "example.com. 300 IN MX 10 mx.example.com. ; MX of smtpConfig.domainConfigs[0]",
            'example.com. 300 IN TXT "v=spf1 mx -all" ; dnsServerConfig.mailRecords.spf',
            '_dmarc.example.com. 300 IN TXT "v=DMARC1; p=reject" ; dnsServerConfig.mailRecords.dmarc',
            "www.example.com. 300 IN AAAA 2001:db8::10 ; dnsServerConfig.records[1]",
            "alias.example.com. 300 IN CNAME www.example.com. ; dnsServerConfig.records[2]",
        ]:
            self.assertIn(line + "\n", text)
        self.assertIn('s1._domainkey.example.com. 300 IN TXT "v=DKIM1; k=ed25519; p=', text)
        self.assertIn(f'"{"x" * 255}" "{"x" * 255}" "{"x" * 190}" ; dnsServerConfig.records[4]', text)

    def test_without_dns_server(self) -> None:
        raw = copy.deepcopy(CONFIG)
        del raw["dnsServerConfig"]
        self.assertEqual(1, cli.main(["dns-records", self.write(raw)]))
        self.assertIn("dnsServerConfig is not set", self.err.getvalue())

    def test_invalid_configuration(self) -> None:
        self.assertEqual(1, cli.main(["dns-records", self.write(_config(zones=[]))]))
        self.assertIn("dnsServerConfig.zones: must not be empty", self.err.getvalue())


class AcmeOrderTests(unittest.TestCase):
    def test_wildcard_orders(self) -> None:
        raw = copy.deepcopy(CONFIG)
        state = self.mktemp()
        raw["smartProxyConfig"] = {
            "acme": {
                "enabled": True,
                "accountEmail": "a@example.com",
                "challenge": "dns-01",
                "stateDirectory": state,
            },
            "routes": [
                {
                    "match": {"ports": 8443, "domains": ["*.Example.com", "example.com"]},
                    "action": {"type": "forward", "target": {"host": "127.0.0.1", "port": 8080}},
                    "tls": {"mode": "terminate", "certificate": "auto"},
                }
            ],
        }
        options = load_options(raw).options
        [order] = certificate_orders(options)
        self.assertEqual(("*.example.com", "example.com"), order.names)
        directory = AcmeStateDirectory(state, "https://ca.example/dir").certificate_directory(order)
        self.assertEqual("_.example.com", os.path.basename(directory))

    def test_http01_still_refuses_wildcards(self) -> None:
        raw = copy.deepcopy(CONFIG)
        raw["smartProxyConfig"] = {
            "acme": {"enabled": True, "accountEmail": "a@example.com", "stateDirectory": self.mktemp()},
            "routes": [
                {
                    "match": {"ports": 8443, "domains": ["*.example.com"]},
                    "action": {"type": "forward", "target": {"host": "127.0.0.1", "port": 8080}},
                    "tls": {"mode": "terminate", "certificate": "auto"},
                }
            ],
        }
        with self.assertRaises(ConfigError) as caught:
            load_options(raw)
        self.assertIn("ACME by HTTP-01 cannot obtain wildcard certificates", caught.exception.errors[0])

    def test_dns01_needs_the_server(self) -> None:
        raw = copy.deepcopy(CONFIG)
        del raw["dnsServerConfig"]
        raw["smartProxyConfig"] = {
            "acme": {
                "enabled": True,
                "accountEmail": "a@example.com",
                "challenge": "dns-01",
                "stateDirectory": self.mktemp(),
            },
            "routes": [
                {
                    "match": {"ports": 8443, "domains": ["www.example.com"]},
                    "action": {"type": "forward", "target": {"host": "127.0.0.1", "port": 8080}},
                    "tls": {"mode": "terminate", "certificate": "auto"},
                }
            ],
        }
        with self.assertRaises(ConfigError) as caught:
            load_options(raw)
        self.assertEqual(
            ['smartProxyConfig.acme.challenge: "dns-01" needs dnsServerConfig (the server answering)'],
            caught.exception.errors,
        )


class Dns01ResponderTests(unittest.TestCase):
    def test_several_values_at_one_name(self) -> None:
        responder = Dns01Responder()
        responder.add("_acme-challenge.example.com", "a")
        responder.add("_ACME-challenge.example.com.", "b")
        self.assertEqual(["a", "b"], responder.txt_values("_acme-challenge.example.com"))
        responder.remove("_acme-challenge.example.com", "a")
        responder.remove("_acme-challenge.example.com", "unknown")
        self.assertEqual(["b"], responder.txt_values("_acme-challenge.example.com."))
        responder.remove("_acme-challenge.example.com", "b")
        self.assertEqual(0, len(responder))


class SmtpAcmeTests(unittest.TestCase):
    def options(self, challenge: str = "dns-01", **smtp: Any) -> dict[str, Any]:
        raw = copy.deepcopy(CONFIG)
        raw["smtpConfig"]["tls"] = {"acme": True}
        raw["smtpConfig"].update(smtp)
        raw["smartProxyConfig"] = {
            "acme": {"enabled": True, "accountEmail": "a@example.com", "challenge": challenge,
                     "stateDirectory": self.mktemp()},
        }  # fmt: skip
        return raw

    def test_order_is_the_default(self) -> None:
        [order] = certificate_orders(load_options(self.options()).options)
        self.assertEqual(
            (("mx.example.com",), True, "smtpConfig.tls.acme"), (order.names, order.default, order.source)
        )

    def test_needs_acme_enabled(self) -> None:
        raw = self.options()
        del raw["smartProxyConfig"]
        with self.assertRaises(ConfigError) as caught:
            load_options(raw)
        self.assertEqual(
            ["smtpConfig.tls.acme: needs smartProxyConfig.acme.enabled = true (the account and CA)"],
            caught.exception.errors,
        )

    def test_http01_needs_port_80_answered(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_options(self.options("http-01"))
        self.assertIn("smtpConfig.tls.acme: HTTP-01 is answered by the proxy", caught.exception.errors[0])

    def test_hostname_in_zones(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_options(self.options(hostname="mx.example.org"))
        self.assertEqual(
            [
                (
                    "smtpConfig.hostname: 'mx.example.org' lies in none of dnsServerConfig.zones, so DNS-01 "
                    "cannot answer for it"
                )
            ],
            caught.exception.errors,
        )


class WithoutSmtpTests(unittest.TestCase):
    """A DNS server (and ACME) without smtpConfig: the checks that read smtpConfig when it is there still
    run when it is not."""

    def base(self) -> dict[str, Any]:
        return {
            "dnsServerConfig": {
                "udpPort": 5300,
                "zones": ["example.test"],
                "nameservers": ["ns.example.test"],
            }
        }

    def test_nameservers_required(self) -> None:
        raw = self.base()
        del raw["dnsServerConfig"]["nameservers"]
        with self.assertRaises(ConfigError) as caught:
            load_options(raw)
        self.assertIn(
            "dnsServerConfig.nameservers: required without smtpConfig (whose hostname stands in)",
            caught.exception.errors,
        )

    def test_dns01_name_outside_zones(self) -> None:
        raw = self.base()
        raw["smartProxyConfig"] = {
            "acme": {"enabled": True, "accountEmail": "a@example.test", "challenge": "dns-01",
                     "stateDirectory": self.mktemp()},
            "routes": [
                {
                    "match": {"ports": 8443, "domains": ["*.example.org"]},
                    "action": {"type": "forward", "target": {"host": "127.0.0.1", "port": 8080}},
                    "tls": {"mode": "terminate", "certificate": "auto"},
                }
            ],
        }  # fmt: skip
        with self.assertRaises(ConfigError) as caught:
            load_options(raw)
        self.assertEqual(1, len(caught.exception.errors), caught.exception.errors)
        self.assertIn("'*.example.org' lies in none of dnsServerConfig.zones", caught.exception.errors[0])

    def test_port_shared_with_proxy_or_api(self) -> None:
        raw = self.base()
        raw["dnsServerConfig"]["udpPort"] = 8443
        raw["smartProxyConfig"] = {"fromPort": 8443, "targetIP": "127.0.0.1"}
        raw["apiConfig"] = {"enabled": True, "port": 8443}
        with self.assertRaises(ConfigError) as caught:
            load_options(raw)
        self.assertEqual(
            [
                "dnsServerConfig.udpPort: port 8443 is also smartProxyConfig.fromPort (TCP)",
                "dnsServerConfig.udpPort: port 8443 is also apiConfig.port (TCP)",
            ],
            [e for e in caught.exception.errors if e.startswith("dnsServerConfig")],
        )

    def test_zones_alone_load(self) -> None:
        options = load_options(self.base()).options
        zones = build_zones(options, serial=3)
        zone = zones.zone_for("example.test")
        assert zone is not None
        self.assertEqual(
            [dns.Record_NS("ns.example.test", ttl=300)],
            [r for r in zone.at("example.test") if r.TYPE == dns.NS],
        )
