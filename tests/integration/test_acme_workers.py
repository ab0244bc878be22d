"""ACME with ``workers = 2`` through a real ``twistd -n dcrouter`` supervisor and Debian's pebble: worker 0
orders (HTTP-01 on the shared port 80 stand-in, answered by whichever worker the kernel hands pebble's
request to, from the tokens shared under ``<stateDirectory>/http-01``), worker 1 takes the stored certificate
from the state directory, and every TLS connection, whichever worker accepts it, presents the issued
certificate. The follower's schedule on a Clock: tests/test_acme.py."""

from __future__ import annotations

import os
import re
import socket
import ssl

from cryptography import x509
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.integration import TwistdProcess, free_ports
from tests.pebble import SKIP_REASON, start_pebble, trust_pebble

NAMES = ("acme-test.example", "www.acme-test.example")
WAIT = 60.0


def served_certificates(port: int, count: int) -> list[bytes]:
    """The DER certificate presented on ``count`` fresh TLS connections to ``port`` (call in a thread)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    served = []
    for _ in range(count):
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=NAMES[1]) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            served.append(der)
    return served


class AcmeWorkersTests(TestCase):
    skip = SKIP_REASON
    timeout = 120

    async def until(self, process: TwistdProcess, pattern: bytes) -> None:
        for _ in range(int(WAIT / 0.05)):
            if re.search(pattern, process.output) or process.exit_code is not None:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertIsNotNone(
            re.search(pattern, process.output),
            f"{pattern!r} not seen; output:\n" + process.output.decode("utf-8", "replace")[-6000:],
        )

    async def test_worker_0_orders_and_both_serve(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        https_port, http_port = free_ports(2)
        pebble = start_pebble(self, http_port)
        trust_pebble(self, pebble)  # the twistd child inherits the environment
        state = os.path.join(directory, "acme")
        config = os.path.join(directory, "router.toml")
        with open(config, "w") as handle:
            handle.write(
                "workers = 2\n"
                "[smartProxyConfig]\n"
                'bindAddress = "127.0.0.1"\n'
                "[smartProxyConfig.acme]\n"
                "enabled = true\n"
                'accountEmail = "admin@acme-test.example"\n'
                f'directoryUrl = "{pebble.directory_url}"\n'
                f'stateDirectory = "{state}"\n'
                f"port = {http_port}\n"
                "[[smartProxyConfig.routes]]\n"
                'name = "www"\n'
                f"match = {{ ports = [{https_port}], domains = {list(NAMES)!r} }}\n".replace("'", '"')
                + 'action = { type = "forward", target = { host = "127.0.0.1", port = 9 } }\n'
                'tls = { mode = "terminate", certificate = "auto" }\n'
            )
        process = TwistdProcess.spawn(
            reactor, ["-n", "--pidfile=", "dcrouter", "--config", config], directory
        )
        self.addCleanup(process.kill_on_cleanup)
        await self.until(process, rb"worker 0: [^\n]*ACME: obtained a certificate for")
        await self.until(
            process, rb"worker 1: [^\n]*ACME: serving the certificate for [^\n]* stored by worker 0"
        )
        self.assertNotIn(b"worker 1: ACME: ordering", process.output)  # only worker 0 orders
        self.assertEqual(os.listdir(os.path.join(state, "http-01")), [])  # tokens withdrawn

        served = await deferToThread(served_certificates, https_port, 16)
        self.assertEqual(len(set(served)), 1, "every worker presents the same certificate")
        leaf = x509.load_der_x509_certificate(served[0])
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(set(san.get_values_for_type(x509.DNSName)), set(NAMES))
        self.assertIn("Pebble", leaf.issuer.rfc4514_string())

        process.signal("TERM")
        await process.ended.addTimeout(WAIT, reactor)
