"""The example configuration shows both halves: etc/dcrouter.example.toml run as it is (only its ports moved
to free ones and its var/ paths into a temporary directory) answers plain HTTP and, TLS terminated with the
self-signed certificate SMTP uses, HTTPS, fetched with ``curl`` as the README's quick start says.
"""

from __future__ import annotations

import os
import shutil
import ssl
import tomllib
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from dcrouter import DcRouter
from tests.integration import CHECKOUT, free_ports

EXAMPLE = os.path.join(CHECKOUT, "etc", "dcrouter.example.toml")
README = os.path.join(CHECKOUT, "README.md")


def example_options(directory: str) -> tuple[dict[str, Any], dict[int, int]]:
    """The example's options with every port (SMTP, proxy, API, DNS, metrics) replaced by a free one
    (returned: example port → free port) and its var/ paths under ``directory``."""
    with open(EXAMPLE, "rb") as handle:
        options = tomllib.load(handle)
    smtp = options["smtpConfig"]
    proxy_routes = options["smartProxyConfig"]["routes"]
    api = options.get("apiConfig")
    dns = options.get("dnsServerConfig")
    metrics = options.get("metricsConfig")
    example_ports = list(smtp["ports"]) + [r["match"]["ports"] for r in proxy_routes]
    for block, key in ((api, "port"), (dns, "udpPort"), (metrics, "port")):
        if block is not None and key in block:
            example_ports.append(block[key])
    moved = dict(zip(example_ports, free_ports(len(example_ports)), strict=True))
    for key in ("ports", "implicitTlsPorts", "submissionPorts"):
        smtp[key] = [moved[p] for p in smtp[key]]
    for route in proxy_routes:
        route["match"]["ports"] = moved[route["match"]["ports"]]
    for block, key in ((api, "port"), (dns, "udpPort"), (metrics, "port")):
        if block is not None and key in block:
            block[key] = moved[block[key]]
    smtp["persistentPath"] = os.path.join(directory, "queue")
    smtp["tls"]["certPath"] = os.path.join(directory, "tls", "cert.pem")
    smtp["tls"]["keyPath"] = os.path.join(directory, "tls", "key.pem")
    return options, moved


class ExampleServesHttpAndHttpsTests(TestCase):
    timeout = 60

    async def test_curl_gets_both_routes(self) -> None:
        if shutil.which("curl") is None:
            raise SkipTest("curl is not installed")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        options, moved = example_options(directory)
        router = DcRouter(options, reactor=reactor)
        assert router.delivery is not None
        router.delivery.pause_deliveries()  # nothing is sent; example.test's target is not running
        router.privilegedStartService()
        router.startService()
        self.addCleanup(router.stopService)
        await router.when_ready()

        async def curl(*args: str) -> bytes:
            out, err, code = await getProcessOutputAndValue("curl", ["-sS", *args], env=os.environ)
            self.assertEqual(code, 0, err)
            return out

        http, https = moved[8080], moved[8443]
        self.assertEqual(
            await curl(f"http://127.0.0.1:{http}/"),
            b"dcrouter: plain HTTP on 8080 answered by a static route\n",
        )
        # As the README says (curl -k https://localhost:8443/); --resolve keeps name lookups out of it.
        body = await curl("-k", "--resolve", f"localhost:{https}:127.0.0.1", f"https://localhost:{https}/")
        self.assertEqual(body, b"dcrouter: HTTPS on 8443, TLS terminated by dcrouter\n")
        # The certificate is the one SMTP uses: the self-signed smtpConfig.tls certificate, CN localhost.
        served = await deferToThread(ssl.get_server_certificate, ("127.0.0.1", https), timeout=10)
        with open(options["smtpConfig"]["tls"]["certPath"]) as handle:
            self.assertEqual(ssl.PEM_cert_to_DER_cert(served), ssl.PEM_cert_to_DER_cert(handle.read()))

    def test_the_readme_quick_start_says_so(self) -> None:
        with open(README) as handle:
            text = handle.read()
        self.assertIn("curl -k https://localhost:8443/", text)
        self.assertIn("curl http://localhost:8080/", text)
