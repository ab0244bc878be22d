"""The router's DNS server on 127.0.0.1, asked by Debian's ``dig`` and by twisted.names' client; and a
wildcard certificate from pebble by DNS-01, answered by that server.

``dig`` comes with ``bind9-dnsutils`` (``make test-peers`` installs it); without it those cases are
skipped with that message.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from typing import Any

from cryptography import x509
from prometheus_client import generate_latest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.names import error
from twisted.trial.unittest import TestCase

from dcrouter import DcRouter
from dcrouter.config import load_options
from dcrouter.dns.service import DnsBindError, DnsService
from dcrouter.dns.zone import build_zones
from dcrouter.router import StartupError
from tests.dns_zone import resolver
from tests.integration import free_ports
from tests.pebble import SKIP_REASON as PEBBLE_SKIP
from tests.pebble import start_pebble, trust_pebble
from tests.test_dns import CONFIG

DIG = shutil.which("dig")
DIG_SKIP = (
    None if DIG else "dig is not installed: run `apt-get install bind9-dnsutils` (or `make test-peers`)"
)


def _dig(port: int, *args: str) -> str:
    assert DIG is not None
    done = subprocess.run(
        [DIG, "@127.0.0.1", "-p", str(port), "+time=2", "+tries=1", *args],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    return done.stdout + done.stderr


class ServerCase(TestCase):
    def setUp(self) -> None:
        zones = build_zones(load_options(copy.deepcopy(CONFIG)).options, serial=1)
        self.service = DnsService(zones, interface="127.0.0.1", port=0, reactor=reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        assert self.service.port is not None
        self.port = self.service.port

    def dig(self, *args: str) -> Deferred[str]:
        return deferToThread(_dig, self.port, *args)


class DigTests(ServerCase):
    skip = DIG_SKIP

    async def _each_type(self) -> None:
        for name, kind, expected in [
            ("www.example.com", "A", "192.0.2.10"),
            ("www.example.com", "AAAA", "2001:db8::10"),
            ("example.com", "MX", "10 mx.example.com."),
            ("example.com", "NS", "mx.example.com."),
            ("alias.example.com", "CNAME", "www.example.com."),
            ("example.com", "TXT", '"v=spf1 mx -all"'),
            ("_dmarc.example.com", "TXT", '"v=DMARC1; p=reject"'),
        ]:
            out = await self.dig("+short", name, kind)
            self.assertEqual(expected, out.strip(), f"{name} {kind}")
        soa = await self.dig("+short", "example.com", "SOA")
        self.assertEqual("mx.example.com. hostmaster.example.com. 1", " ".join(soa.split()[:3]))
        dkim = await self.dig("+short", "s1._domainkey.example.com", "TXT")
        self.assertIn('"v=DKIM1; k=ed25519; p=', dkim)

    def test_each_type(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._each_type())

    async def _negative(self) -> None:
        out = await self.dig("nothing.example.com", "A")
        self.assertIn("status: NXDOMAIN", out)
        self.assertIn("flags: qr aa", out)
        self.assertRegex(out, r"AUTHORITY SECTION:\nexample\.com\.\s+300\s+IN\s+SOA")
        out = await self.dig("www.example.com", "MX")
        self.assertIn("status: NOERROR", out)
        self.assertIn("ANSWER: 0, AUTHORITY: 1", out)

    def test_nxdomain_and_nodata_with_soa(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._negative())

    async def _refused(self) -> None:
        for args in (("+norec", "example.org", "A"), ("+rec", "www.example.org", "A"), ("+rec", ".", "NS")):
            out = await self.dig(*args)
            self.assertIn("status: REFUSED", out, args)
            self.assertNotIn("ANSWER SECTION", out)

    def test_refused_outside_zones(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._refused())

    async def _truncation(self) -> None:
        out = await self.dig("+ignore", "+noedns", "big.example.com", "TXT")
        self.assertRegex(out, r"flags: qr aa tc rd;")  # rd echoed, ra never set
        self.assertIn("ANSWER: 0", out)
        # dig's default: retry over TCP after TC, and get the whole record.
        out = await self.dig("+noedns", "+short", "big.example.com", "TXT")
        self.assertEqual("x" * 700, "".join(part.strip('"') for part in out.split()))
        out = await self.dig("+tcp", "+short", "big.example.com", "TXT")
        self.assertEqual("x" * 700, "".join(part.strip('"') for part in out.split()))

    def test_tc_over_udp_full_answer_over_tcp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._truncation())

    async def _any(self) -> None:
        out = await self.dig("+short", "example.com", "ANY")
        self.assertEqual('"RFC8482" ""', out.strip())

    def test_any_minimal(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._any())


class TwistedClientTests(ServerCase):
    async def _lookups(self) -> None:
        client = resolver(reactor, self.port)
        answers, _, _ = await client.lookupAddress("www.example.com")
        self.assertEqual(["192.0.2.10"], [rr.payload.dottedQuad() for rr in answers])
        answers, _, _ = await client.lookupMailExchange("example.com")
        self.assertEqual(
            [(10, b"mx.example.com")], [(rr.payload.preference, rr.payload.name.name) for rr in answers]
        )
        # The client retries over TCP after a truncated UDP answer.
        answers, _, _ = await client.lookupText("big.example.com")
        self.assertEqual(b"x" * 700, b"".join(answers[0].payload.data))
        with self.assertRaises(error.DomainError):
            await client.lookupAddress("nothing.example.com")
        with self.assertRaises(error.DNSQueryRefusedError):
            await client.lookupAddress("www.example.org")
        self.assertEqual(
            {
                ("udp", "NOERROR", "full"): 2,
                ("udp", "NOERROR", "truncated"): 1,
                ("tcp", "NOERROR", "full"): 1,
                ("udp", "NXDOMAIN", "full"): 1,
                ("udp", "REFUSED", "full"): 1,
            },
            dict(self.service.factory.responses),
        )

    def test_lookups(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._lookups())


class Dns01IssuanceTests(TestCase):
    skip = PEBBLE_SKIP
    timeout = 90

    async def _wildcard(self) -> None:
        dns_port, https_port, http_port = free_ports(3)
        pebble = start_pebble(self, http_port, dns_server=f"127.0.0.1:{dns_port}")
        trust_pebble(self, pebble)
        options: dict[str, Any] = {
            "dnsServerConfig": {
                "udpPort": dns_port,
                "udpBindInterface": "127.0.0.1",
                "zones": ["example.test"],
                "nameservers": ["ns.example.test"],
            },
            "smartProxyConfig": {
                "bindAddress": "127.0.0.1",
                "acme": {
                    "enabled": True,
                    "challenge": "dns-01",
                    "accountEmail": "admin@example.test",
                    "directoryUrl": pebble.directory_url,
                    "stateDirectory": os.path.abspath(self.mktemp()),
                    "port": http_port,
                },
                "routes": [
                    {
                        "name": "wildcard",
                        "match": {"ports": [https_port], "domains": ["*.example.test"]},
                        "action": {"type": "forward", "target": {"host": "127.0.0.1", "port": 9}},
                        "tls": {"mode": "terminate", "certificate": "auto"},
                    }
                ],
            },
        }
        router = DcRouter(options, reactor=reactor)
        router.privilegedStartService()
        router.startService()
        self.addCleanup(router.stopService)
        await router.when_ready()
        assert router.acme is not None
        await router.acme.when_settled()
        key = router.certificates.lookup("anything.example.test")
        self.assertIsNotNone(key, pebble.log_tail())
        assert key is not None
        san = key.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(["*.example.test"], san.get_values_for_type(x509.DNSName))
        # The challenge answer was withdrawn once the order settled.
        self.assertEqual(0, len(router.dns_challenges))
        # (pebble refuses HTTP-01 for a wildcard: the certificate is proof that DNS-01 was answered.)
        exposition = generate_latest(router.metrics.registry).decode()
        self.assertRegex(
            exposition, r'dcrouter_dns_responses_total\{rcode="NOERROR",size="full",transport="udp"\} [1-9]'
        )

    def test_wildcard_certificate_by_dns01(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._wildcard())


class BindTests(ServerCase):
    def test_port_taken(self) -> None:
        zones = build_zones(load_options(copy.deepcopy(CONFIG)).options, serial=1)
        second = DnsService(zones, interface="127.0.0.1", port=self.port, reactor=reactor)
        with self.assertRaises(DnsBindError) as caught:
            second.bind()
        self.assertIn(
            f"dnsServerConfig.udpPort: cannot listen on 127.0.0.1:{self.port} (UDP)", str(caught.exception)
        )

    def test_router_refuses_to_start(self) -> None:
        raw = copy.deepcopy(CONFIG)
        raw["smtpConfig"]["ports"] = free_ports(1)
        raw["smtpConfig"]["bindAddress"] = "127.0.0.1"
        raw["smtpConfig"]["queueStorage"] = "memory"
        raw["dnsServerConfig"]["udpPort"] = self.port
        router = DcRouter(raw, reactor=reactor)
        with self.assertRaises(StartupError) as caught:
            router.privilegedStartService()
        self.assertIn("dnsServerConfig.udpPort: cannot listen on", str(caught.exception))


def _smtp_certificate(port: int) -> bytes:
    """The DER certificate SMTP on 127.0.0.1:``port`` presents after STARTTLS to a client sending no SNI (an
    address as server name sends none), as most MX clients do."""
    import smtplib
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.example")
        client.starttls(context=context)
        assert client.sock is not None
        der = client.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        assert der is not None
        return bytes(der)


class SmtpCertificateByDns01Tests(TestCase):
    skip = PEBBLE_SKIP
    timeout = 90

    async def _smtp(self) -> None:
        dns_port, http_port, smtp_port = free_ports(3)
        pebble = start_pebble(self, http_port, dns_server=f"127.0.0.1:{dns_port}")
        trust_pebble(self, pebble)
        options: dict[str, Any] = {
            "smtpConfig": {
                "ports": [smtp_port],
                "bindAddress": "127.0.0.1",
                "hostname": "mx.example.test",
                "queueStorage": "memory",
                "tls": {"acme": True},
            },
            "dnsServerConfig": {
                "udpPort": dns_port,
                "udpBindInterface": "127.0.0.1",
                "zones": ["example.test"],
            },
            "smartProxyConfig": {
                "bindAddress": "127.0.0.1",
                "acme": {
                    "enabled": True,
                    "challenge": "dns-01",
                    "accountEmail": "admin@example.test",
                    "directoryUrl": pebble.directory_url,
                    "stateDirectory": os.path.abspath(self.mktemp()),
                    "port": http_port,
                },
            },
        }
        router = DcRouter(options, reactor=reactor)
        router.privilegedStartService()
        router.startService()
        self.addCleanup(router.stopService)
        await router.when_ready()
        assert router.acme is not None
        await router.acme.when_settled()
        served = x509.load_der_x509_certificate(await deferToThread(_smtp_certificate, smtp_port))
        san = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(["mx.example.test"], san.get_values_for_type(x509.DNSName), pebble.log_tail())
        self.assertIn("Pebble", served.issuer.rfc4514_string())

    def test_smtp_certificate_by_dns01(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._smtp())
