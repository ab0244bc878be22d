"""Real ACME issuance from Debian's pebble (tests/pebble.py) on 127.0.0.1.

Pebble resolves the test names through pebble-challtestsrv to 127.0.0.1 and fetches HTTP-01 answers on the
port it is configured with. Two layers:

- the AcmeService alone, the answers served by a small twisted.web resource over the
  :class:`ChallengeResponder`: the certificate lands in the store and under the state directory, for the
  names ordered;
- a whole DcRouter from its configuration: a terminating route with ``certificate = "auto"`` whose plain-HTTP
  port answers pebble's challenges, and whose TLS port then presents the issued certificate by SNI.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat

from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from dcrouter import DcRouter
from dcrouter.acme.challenges import ChallengeResponder
from dcrouter.acme.service import AcmeService, CertificateOrder
from dcrouter.net.certstore import CertificateStore
from tests.integration import free_ports
from tests.pebble import SKIP_REASON, start_pebble, trust_pebble

NAMES = ("acme-test.example", "www.acme-test.example")


class ChallengeResource(Resource):
    """Answers ``GET /.well-known/acme-challenge/<token>`` from the responder; 404 otherwise."""

    isLeaf = True

    def __init__(self, responder: ChallengeResponder) -> None:
        super().__init__()
        self.responder = responder
        self.requests: list[str] = []

    def render_GET(self, request: Request) -> bytes:
        path = request.uri.decode("ascii", "replace")
        self.requests.append(path)
        body = self.responder.response_for(path)
        if body is None:
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader(b"content-type", b"application/octet-stream")
        return body


class PebbleIssuanceTests(TestCase):
    skip = SKIP_REASON
    timeout = 90

    async def _issue(self) -> None:
        responder = ChallengeResponder()
        resource = ChallengeResource(responder)
        listening = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)
        pebble = start_pebble(self, listening.getHost().port)
        store = CertificateStore(clock=reactor)  # type: ignore[arg-type]
        state_directory = self.mktemp()
        service = AcmeService(
            [CertificateOrder(NAMES, "test")],
            store=store,
            responder=responder,
            state_directory=state_directory,
            directory_url=pebble.directory_url,
            email="admin@acme-test.example",
            renew_threshold_days=30,
            reactor=reactor,
            ca_bundle=pebble.ca_bundle,
        )
        service.startService()
        self.addCleanup(service.stopService)
        await service.when_settled()

        state = service.states[NAMES[0]]
        self.assertEqual(state.failures, 0, pebble.log_tail())
        key = store.lookup("www.acme-test.example")
        self.assertIsNotNone(key, pebble.log_tail())
        assert key is not None
        self.assertIs(store.lookup("acme-test.example"), key)
        self.assertEqual(set(key.names), set(NAMES))
        # Pebble really fetched both challenges from our responder (each possibly from several
        # "perspectives"), and they were withdrawn afterwards.
        tokens = {p for p in resource.requests if p.startswith("/.well-known/acme-challenge/")}
        self.assertEqual(len(tokens), len(NAMES))
        self.assertEqual(len(responder), 0)

        where = service.state.certificate_directory(state.order)
        with open(os.path.join(where, "cert.pem"), "rb") as f:
            leaf = x509.load_pem_x509_certificate(f.read())
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(set(san.get_values_for_type(x509.DNSName)), set(NAMES))
        self.assertEqual(leaf.not_valid_after_utc, key.not_after)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(where, "key.pem")).st_mode), 0o600)
        account_key = os.path.join(service.state.path, "account.key")
        self.assertEqual(stat.S_IMODE(os.stat(account_key).st_mode), 0o600)
        self.assertTrue(os.path.getsize(os.path.join(where, "chain.pem")) > 0)
        self.assertIsNotNone(state.next_check)

    def test_issues_certificate(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._issue())


def _peer_certificate(port: int, server_name: str) -> bytes:
    """The DER certificate a TLS server on 127.0.0.1:``port`` presents for ``server_name`` (not verified:
    the test checks what it is, pebble's roots are random per run)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


class RouterIssuanceTests(TestCase):
    skip = SKIP_REASON
    timeout = 90

    async def _obtain_and_serve(self) -> None:
        https_port, http_port = free_ports(2)
        pebble = start_pebble(self, http_port)
        trust_pebble(self, pebble)
        state_directory = os.path.abspath(self.mktemp())
        options = {
            "smartProxyConfig": {
                "bindAddress": "127.0.0.1",
                "acme": {
                    "enabled": True,
                    "accountEmail": "admin@acme-test.example",
                    "directoryUrl": pebble.directory_url,
                    "stateDirectory": state_directory,
                    "port": http_port,
                    "renewThresholdDays": 30,
                },
                "routes": [
                    {
                        "name": "www",
                        "match": {"ports": [https_port, http_port], "domains": list(NAMES)},
                        "action": {"type": "forward", "target": {"host": "127.0.0.1", "port": 9}},
                        "tls": {"mode": "terminate", "certificate": "auto"},
                    }
                ],
            }
        }
        router = DcRouter(options, reactor=reactor)
        router.privilegedStartService()
        router.startService()
        self.addCleanup(router.stopService)
        await router.when_ready()
        assert router.acme is not None
        await router.acme.when_settled()
        key = router.certificates.lookup("www.acme-test.example")
        self.assertIsNotNone(key, pebble.log_tail())
        assert key is not None
        self.assertEqual(set(key.names), set(NAMES))
        where = router.acme.state.certificate_directory(router.acme.states[NAMES[0]].order)
        self.assertTrue(os.path.exists(os.path.join(where, "key.pem")))

        der = await deferToThread(_peer_certificate, https_port, "www.acme-test.example")
        served = x509.load_der_x509_certificate(der)
        san = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(set(san.get_values_for_type(x509.DNSName)), set(NAMES))
        self.assertEqual(served, key.certificate)

    def test_router_obtains_and_serves(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._obtain_and_serve())
