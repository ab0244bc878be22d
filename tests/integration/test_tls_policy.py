"""The TLS policy on real sockets: a DcRouter in-process on 127.0.0.1 with an implicit-TLS SMTP port, a
STARTTLS SMTP port (an ECDSA certificate) and a terminating proxy route (an RSA certificate, since static-RSA
and ECDHE-RSA suites exist only with one), probed

- by ``sslscan`` and ``testssl.sh`` (Debian's packages; ``make test-peers`` installs them), whose reports
  must show nothing weaker than the policy: TLS 1.2/1.3 only, TLS 1.2 suites from the profile only, no
  client-initiated renegotiation, no compression, and for testssl.sh no finding rated LOW or worse (LUCKY13
  was the one it raised before);
- by Python's ``ssl`` (in a thread, so the reactor keeps serving), for a machine without sslscan: a client
  offering only a weak suite or an old version must fail to shake hands, one offering the profile's suites
  must succeed.

And the self-signed certificate generated for a listener on 127.0.0.21 verifies for that address.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
from collections.abc import Callable
from typing import Any
from xml.etree import ElementTree

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from dcrouter import DcRouter
from dcrouter.net.certfiles import generate_self_signed
from dcrouter.net.tls import INTERMEDIATE_CIPHERS
from tests.integration import free_ports
from tests.integration.test_smtp_sni import SmtpLine
from tests.test_net_tls import WEAK_SUITES, offering, rsa_self_signed

LOCAL = "127.0.0.1"
HOSTNAME = "mx.test"
WEB = "web.test"
TIMEOUT = 20

SSLSCAN = shutil.which("sslscan")
#: Debian installs testssl.sh as ``testssl``.
TESTSSL = shutil.which("testssl") or shutil.which("testssl.sh")


def write(directory: str, name: str, pair: tuple[bytes, bytes]) -> dict[str, str]:
    paths = {
        "certPath": os.path.join(directory, f"{name}.crt"),
        "keyPath": os.path.join(directory, f"{name}.key"),
    }
    for path, data in zip(paths.values(), pair, strict=True):
        with open(path, "wb") as handle:
            handle.write(data)
    return paths


class Endpoint:
    """One TLS listener of the router and how a client reaches its TLS: ``kind`` is the key type of its
    certificate, ``starttls`` whether SMTP's STARTTLS comes first, ``server_name`` what SNI asks for."""

    def __init__(self, name: str, port: int, kind: str, starttls: bool, server_name: str) -> None:
        self.name, self.port, self.kind = name, port, kind
        self.starttls, self.server_name = starttls, server_name

    def __repr__(self) -> str:
        return f"{self.name} ({LOCAL}:{self.port})"

    def handshake(self, context: ssl.SSLContext) -> tuple[str, str]:
        """(version, suite) of a TLS session with ``context``; raises ssl.SSLError when refused."""
        raw = socket.create_connection((LOCAL, self.port), timeout=TIMEOUT)
        try:
            if self.starttls:
                plain = SmtpLine(raw)
                assert plain.reply()[0] == 220
                code, features = plain.command("EHLO client.test")
                assert code == 250 and "STARTTLS" in features, features
                assert plain.command("STARTTLS")[0] == 220
            with context.wrap_socket(raw, server_hostname=self.server_name) as tls:
                cipher = tls.cipher()
                assert cipher is not None
                return str(tls.version()), cipher[0]
        finally:
            raw.close()


class PolicyOnTheWire(TestCase):
    """Starts the router with the three listeners; ``profile`` is their ``tlsProfile`` (None: not set)."""

    timeout = 180
    profile: str | None = None

    def setUp(self) -> Deferred[None]:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        smtp_files = write(directory, "mx", generate_self_signed(HOSTNAME))
        web_files = write(directory, "web", rsa_self_signed(WEB))
        mx, implicit, web, backend = free_ports(4)
        smtp_tls: dict[str, Any] = dict(smtp_files)
        route_tls: dict[str, Any] = {"mode": "terminate", "certificate": web_files}
        if self.profile is not None:
            smtp_tls["tlsProfile"] = route_tls["tlsProfile"] = self.profile
        options = {
            "smtpConfig": {
                "ports": [mx, implicit],
                "bindAddress": LOCAL,
                "hostname": HOSTNAME,
                "implicitTlsPorts": [implicit],
                "submissionPorts": [],
                "queueStorage": "memory",
                "persistentPath": os.path.join(directory, "spool"),
                "tls": smtp_tls,
                "domainConfigs": [{"domains": ["example.test"], "targetIPs": [LOCAL], "port": backend}],
            },
            "smartProxyConfig": {
                "bindAddress": LOCAL,
                "routes": [
                    {
                        "name": "web",
                        "match": {"ports": web, "domains": [WEB]},
                        "action": {"type": "forward", "target": {"host": LOCAL, "port": backend}},
                        "tls": route_tls,
                    }
                ],
            },
        }
        self.endpoints = [
            Endpoint("implicit TLS", implicit, "ecdsa", False, HOSTNAME),
            Endpoint("STARTTLS", mx, "ecdsa", True, HOSTNAME),
            Endpoint("terminating proxy route", web, "rsa", False, WEB),
        ]
        self.router = DcRouter(options, reactor=reactor)
        self.router.privilegedStartService()
        self.router.startService()
        self.addCleanup(self.router.stopService)
        return self.router.when_ready()

    def probe(self, check: Callable[[Endpoint], list[str]]) -> Deferred[None]:
        """Run ``check`` (blocking clients) for every endpoint in a thread; fail with every problem found."""

        def all_endpoints() -> list[str]:
            return [problem for endpoint in self.endpoints for problem in check(endpoint)]

        async def go() -> None:
            problems = await deferToThread(all_endpoints)
            self.assertEqual(problems, [])

        return Deferred.fromCoroutine(go())


class PythonProbeTests(PolicyOnTheWire):
    """The policy checked with Python's ssl module: no tool needed."""

    def test_weak_suites_and_versions_refused(self) -> Deferred[None]:
        def check(endpoint: Endpoint) -> list[str]:
            tls12, old = ssl.TLSVersion.TLSv1_2, (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)
            offers = [(suite, offering(suite, tls12)) for suite in WEAK_SUITES[endpoint.kind]]
            offers += [(version.name, offering("ALL", version)) for version in old]
            problems = []
            for what, context in offers:
                try:
                    accepted = endpoint.handshake(context)
                except (ssl.SSLError, ConnectionError):
                    continue
                problems.append(f"{endpoint}: {what} accepted as {accepted}")
            return problems

        return self.probe(check)

    def test_profile_suites_accepted(self) -> Deferred[None]:
        def check(endpoint: Endpoint) -> list[str]:
            auth = "-RSA-" if endpoint.kind == "rsa" else "-ECDSA-"
            problems = []
            for suite in (s for s in INTERMEDIATE_CIPHERS if auth in s):
                got = endpoint.handshake(offering(suite, ssl.TLSVersion.TLSv1_2))
                if got != ("TLSv1.2", suite):
                    problems.append(f"{endpoint}: offered {suite}, got {got}")
            version, _ = endpoint.handshake(offering())
            if version != "TLSv1.3":
                problems.append(f"{endpoint}: {version} where TLS 1.3 was offered")
            return problems

        return self.probe(check)


class ModernPythonProbeTests(PolicyOnTheWire):
    profile = "modern"

    def test_tls_1_2_refused(self) -> Deferred[None]:
        def check(endpoint: Endpoint) -> list[str]:
            try:
                accepted = endpoint.handshake(offering("ALL", ssl.TLSVersion.TLSv1_2))
            except (ssl.SSLError, ConnectionError):
                version, _ = endpoint.handshake(offering())
                return [] if version == "TLSv1.3" else [f"{endpoint}: {version}"]
            return [f"{endpoint}: TLS 1.2 accepted as {accepted}"]

        return self.probe(check)


async def run_tool(executable: str, arguments: list[str]) -> tuple[bytes, bytes, int]:
    """Run a scanner; (stdout, stderr, exit code). Its SIGPIPE is ignored (through ``sh``, as ``exec``
    keeps an ignored signal ignored): sslscan writes to connections a server has already closed — every
    refused handshake — and dies of it otherwise."""
    running = getProcessOutputAndValue(
        "/bin/sh",
        ["-c", 'trap "" PIPE; exec "$0" "$@"', executable, *arguments],
        env=dict(os.environ),
        reactor=reactor,
    )

    def killed(failure: Any) -> None:
        # Twisted fails the Deferred with (stdout, stderr, signal) when a signal ended the process.
        _, err, signal = failure.value if isinstance(failure.value, tuple) else (b"", b"", failure.value)
        raise AssertionError(f"{executable} ended by signal {signal}: {err.decode(errors='replace')[-2000:]}")

    running.addErrback(killed)
    result: tuple[bytes, bytes, int] = await running
    return result


def sslscan_report(xml: bytes) -> ElementTree.Element:
    root = ElementTree.fromstring(xml)
    test = root.find("ssltest")
    if test is None:
        raise AssertionError(f"sslscan reported no test: {xml.decode(errors='replace')[-2000:]}")
    return test


def sslscan_problems(
    endpoint: Endpoint, test: ElementTree.Element, tls12: set[str], versions: set[str]
) -> list[str]:
    """What sslscan's report shows beyond the policy: protocol versions other than ``versions``, TLS 1.2
    suites outside ``tls12``, renegotiation, compression, Heartbleed. An empty report is a problem too."""
    problems = []
    enabled = {f"{p.get('type')}{p.get('version')}" for p in test.iter("protocol") if p.get("enabled") == "1"}
    if enabled - versions:
        problems.append(f"{endpoint}: protocols {sorted(enabled - versions)} enabled")
    ciphers = [(c.get("sslversion"), c.get("cipher")) for c in test.iter("cipher")]
    if not ciphers:
        problems.append(f"{endpoint}: sslscan found no cipher at all (did it reach the listener?)")
    for version, cipher in ciphers:
        if version == "TLSv1.3":
            continue
        if version != "TLSv1.2" or cipher not in tls12:
            problems.append(f"{endpoint}: {version} {cipher} accepted")
    for element in test.iter("renegotiation"):
        if element.get("supported") != "0":
            problems.append(f"{endpoint}: renegotiation supported (secure={element.get('secure')})")
    for element in test.iter("compression"):
        if element.get("supported") != "0":
            problems.append(f"{endpoint}: compression supported")
    for element in test.iter("heartbleed"):
        if element.get("vulnerable") != "0":
            problems.append(f"{endpoint}: Heartbleed on {element.get('sslversion')}")
    return problems


class SslscanTests(PolicyOnTheWire):
    """The policy as an operator checks it (docs/security.md)."""

    if SSLSCAN is None:
        skip = "sslscan is not installed (apt-get install sslscan; `make test-peers` installs it)"

    tls12: set[str] = set(INTERMEDIATE_CIPHERS)
    versions = {"tls1.2", "tls1.3"}

    async def scan(self, endpoint: Endpoint) -> list[str]:
        assert SSLSCAN is not None
        arguments = ["--no-colour", "--xml=-", f"--sni-name={endpoint.server_name}"]
        if endpoint.starttls:
            arguments.append("--starttls-smtp")
        out, err, code = await run_tool(SSLSCAN, [*arguments, f"{LOCAL}:{endpoint.port}"])
        said = (err + out[-1500:]).decode(errors="replace")
        self.assertEqual(code, 0, f"sslscan failed on {endpoint}: {said}")
        xml = out[out.index(b"<?xml") :] if b"<?xml" in out else out
        return sslscan_problems(endpoint, sslscan_report(xml), self.tls12, self.versions)

    async def test_nothing_weaker_than_the_policy(self) -> None:
        problems = []
        for endpoint in self.endpoints:
            problems += await self.scan(endpoint)
        self.assertEqual(problems, [])


class ModernSslscanTests(SslscanTests):
    profile = "modern"
    tls12: set[str] = set()
    versions = {"tls1.3"}


#: testssl.sh severities that fail the test (below them: OK, INFO, WARN, DEBUG).
TESTSSL_FAILING = {"LOW", "MEDIUM", "HIGH", "CRITICAL"}


def testssl_problems(endpoint: Endpoint, findings: list[dict[str, str]], tls12: set[str]) -> list[str]:
    """What testssl.sh's JSON findings show beyond the policy."""
    problems = []
    suites = []
    for finding in findings:
        name, severity, text = finding["id"], finding["severity"], finding["finding"]
        if name.startswith("cipher-"):
            # id "cipher-tls1_2_xc02c", finding "TLS 1.2   xc02c   ECDHE-ECDSA-AES256-GCM-SHA384   ECDH ...".
            protocol, _, code = name.removeprefix("cipher-").rpartition("_")
            tokens = text.split()
            suite = tokens[tokens.index(code) + 1]
            suites.append(suite)
            if protocol != "tls1_3" and (protocol != "tls1_2" or suite not in tls12):
                problems.append(f"{endpoint}: {protocol} {suite} offered")
        elif severity in TESTSSL_FAILING:
            problems.append(f"{endpoint}: {name} {severity}: {text}")
        elif name in ("TLS1", "TLS1_1") and text != "not offered":
            problems.append(f"{endpoint}: {name} {text}")
    if not suites:
        problems.append(f"{endpoint}: testssl.sh found no cipher at all (did it reach the listener?)")
    return problems


class TestsslTests(PolicyOnTheWire):
    """testssl.sh's protocol, per-cipher, renegotiation and LUCKY13 checks (``-p -E -R -L``), about ten
    seconds per listener. No DNS lookups (``--nodns none``, ``--ip``); the SNI name is the URI's host."""

    if TESTSSL is None:
        skip = "testssl.sh is not installed (apt-get install testssl.sh; `make test-peers` installs it)"

    # About ten seconds per listener on a quiet machine; testssl.sh is a shell script of thousands of
    # openssl runs, and on a loaded 2-core machine the three scans took over 180 s.
    timeout = 900

    async def scan(self, endpoint: Endpoint, directory: str) -> list[str]:
        assert TESTSSL is not None
        report = os.path.join(directory, f"{endpoint.port}.json")
        arguments = ["--quiet", "--color", "0", "--warnings", "off", "--nodns", "none", "--jsonfile", report]
        arguments += ["-p", "-E", "-R", "-L"]
        if endpoint.starttls:
            arguments += ["--starttls", "smtp"]
        arguments += ["--ip", LOCAL, f"{endpoint.server_name}:{endpoint.port}"]
        _, err, code = await run_tool(TESTSSL, arguments)
        self.assertEqual(code, 0, f"testssl.sh failed: {err.decode(errors='replace')[-2000:]}")
        with open(report) as handle:
            findings = json.load(handle)
        return testssl_problems(endpoint, findings, set(INTERMEDIATE_CIPHERS))

    async def test_nothing_weaker_than_the_policy(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        problems = []
        for endpoint in self.endpoints:
            problems += await self.scan(endpoint, directory)
        self.assertEqual(problems, [])


class SelfSignedAddressTests(TestCase):
    """Item 9: a client verifying by IP against bindAddress accepts the generated certificate."""

    timeout = 60
    address = "127.0.0.21"

    def setUp(self) -> Deferred[None]:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.cert_path = os.path.join(directory, "tls", "cert.pem")
        (self.implicit,) = free_ports(1)
        options = {
            "smtpConfig": {
                "ports": [self.implicit],
                "bindAddress": self.address,
                "hostname": HOSTNAME,
                "implicitTlsPorts": [self.implicit],
                "submissionPorts": [],
                "queueStorage": "memory",
                "persistentPath": os.path.join(directory, "spool"),
                "tls": {
                    "certPath": self.cert_path,
                    "keyPath": os.path.join(directory, "tls", "key.pem"),
                    "selfSigned": True,
                },
                "domainConfigs": [{"domains": ["example.test"], "targetIPs": [LOCAL], "port": 2626}],
            }
        }
        self.router = DcRouter(options, reactor=reactor)
        self.router.privilegedStartService()
        self.router.startService()
        self.addCleanup(self.router.stopService)
        return self.router.when_ready()

    async def test_verifies_by_ip(self) -> None:
        context = ssl.create_default_context(cafile=self.cert_path)  # checks the host name: here an IP

        def greet() -> int:
            raw = socket.create_connection((self.address, self.implicit), timeout=TIMEOUT)
            with context.wrap_socket(raw, server_hostname=self.address) as tls:
                return SmtpLine(tls).reply()[0]

        self.assertEqual(await deferToThread(greet), 220)
