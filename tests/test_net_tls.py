"""dcrouter.net.tls: the one TLS policy, proved by handshakes in memory.

Servers are what the router listens with: one-certificate options (tests and peers), the certificate store's
creator (SMTP: STARTTLS and implicit TLS) and the proxy's terminating creator, each with an RSA and an ECDSA
certificate, since the RSA suites (static RSA, ECDHE-RSA) and the ECDSA ones are only offered with their key
type. Clients are Python's ``ssl`` module restricted to one suite or version (at security level 0, so that it
offers the weak ones at all); whatever the policy leaves out must fail to shake hands. The same assertions
against real sockets, with sslscan, are in tests/integration/test_tls_policy.py.
"""

from __future__ import annotations

import datetime
import ssl
import warnings
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.protocols.wire import Echo
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.net.certfiles import generate_self_signed, server_tls_options
from dcrouter.net.certstore import CertificateStore, CertifiedKey
from dcrouter.net.tls import (
    INTERMEDIATE_CIPHERS,
    OPPORTUNISTIC_CIPHERS,
    TlsPolicy,
    client_options,
    verified_client_options,
)
from dcrouter.proxy.routes import RouteTable
from dcrouter.proxy.session import ProxyContext, ProxySettings
from tests.test_net_certstore import Handshake, wall_clock

NAME = "mx.test"

#: TLS 1.2 suites the policy refuses, each with the key type that could serve it: static RSA key exchange
#: (no forward secrecy, CBC or not), CBC with ECDHE (Lucky13), DHE (left out).
WEAK_SUITES = {
    "rsa": (
        "AES128-SHA",
        "AES256-SHA256",
        "AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-SHA",
        "ECDHE-RSA-AES256-SHA384",
        "DHE-RSA-AES128-GCM-SHA256",
    ),
    "ecdsa": ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256"),
}


def rsa_self_signed(name: str) -> tuple[bytes, bytes]:
    """A self-signed RSA-2048 certificate for ``name``: (certificate PEM, key PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


#: One certificate of each key type for the whole module (RSA keys take a moment to make).
PAIRS = {"rsa": rsa_self_signed(NAME), "ecdsa": generate_self_signed(NAME)}


def offering(
    ciphers: str = "DEFAULT",
    version: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A client that offers only ``ciphers`` (TLS 1.2 suites, client preference in that order) and only
    ``version`` (or up to ``maximum``); not verifying, since the suite is what is tried here."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python deprecates naming TLS 1.0/1.1 at all
        if version is not None:
            client.minimum_version = client.maximum_version = version
        if maximum is not None:
            client.maximum_version = maximum
    client.set_ciphers(f"{ciphers}:@SECLEVEL=0")
    return client


def one_certificate(kind: str, policy: TlsPolicy) -> Any:
    return server_tls_options(*PAIRS[kind], profile=policy.profile, min_version=policy.min_version)


def smtp_store(kind: str, policy: TlsPolicy) -> Any:
    """What the router's SMTP ports listen with: the store, SMTP's certificate as its default."""
    store = CertificateStore(clock=wall_clock())
    store.set_default(CertifiedKey.from_pem(*PAIRS[kind]))
    return store.server_options(policy=policy)


def proxy_route(kind: str, policy: TlsPolicy) -> Any:
    """What a terminating proxy route with ``tlsProfile = policy.profile`` terminates with."""
    store = CertificateStore(clock=wall_clock())
    store.put(NAME, CertifiedKey.from_pem(*PAIRS[kind]))
    context = ProxyContext(RouteTable(()), ProxySettings(), wall_clock(), certificates=store)
    return context.server_creator(policy.profile)


LISTENERS: dict[str, Callable[[str, TlsPolicy], Any]] = {
    "one certificate": one_certificate,
    "SMTP (store)": smtp_store,
    "proxy route": proxy_route,
}


class ListenerPolicyTests(SynchronousTestCase):
    """Every kind of listener, with either key type, accepts what the profile says and nothing else."""

    def handshake(self, creator: Any, client: ssl.SSLContext) -> Handshake:
        return Handshake(creator, wall_clock(), NAME, client).complete()

    def refused(self, creator: Any, client: ssl.SSLContext, what: str) -> None:
        try:
            connection = self.handshake(creator, client)
        except ssl.SSLError:
            return
        self.fail(f"{what}: accepted as {connection.client.version()} {connection.client.cipher()}")

    def each_listener(self, policy: TlsPolicy) -> list[tuple[str, str, Any]]:
        return [
            (f"{listener}, {kind}", kind, make(kind, policy))
            for listener, make in LISTENERS.items()
            for kind in PAIRS
        ]

    def test_intermediate_refuses_weak_suites(self) -> None:
        for where, kind, creator in self.each_listener(TlsPolicy("intermediate")):
            for suite in WEAK_SUITES[kind]:
                self.refused(creator, offering(suite, ssl.TLSVersion.TLSv1_2), f"{where}: {suite}")

    def test_intermediate_refuses_tls_1_0_and_1_1(self) -> None:
        for where, _, creator in self.each_listener(TlsPolicy("intermediate")):
            for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
                self.refused(creator, offering("ALL", version), f"{where}: {version.name}")

    def test_intermediate_accepts_each_of_its_suites(self) -> None:
        for where, kind, creator in self.each_listener(TlsPolicy("intermediate")):
            marker = "-RSA-" if kind == "rsa" else "-ECDSA-"
            for suite in (s for s in INTERMEDIATE_CIPHERS if marker in s):
                connection = self.handshake(creator, offering(suite, ssl.TLSVersion.TLSv1_2))
                self.assertEqual(connection.client.cipher()[0], suite, where)  # type: ignore[index]
                self.assertEqual(connection.echo(b"ping"), b"ping")

    def test_intermediate_speaks_tls_1_3(self) -> None:
        for where, _, creator in self.each_listener(TlsPolicy("intermediate")):
            connection = self.handshake(creator, offering())
            self.assertEqual(connection.client.version(), "TLSv1.3", where)

    def test_server_preference_decides(self) -> None:
        """The client prefers ChaCha20; the server's first choice, AES-128-GCM, is what it gets."""
        for where, kind, creator in self.each_listener(TlsPolicy("intermediate")):
            auth = "RSA" if kind == "rsa" else "ECDSA"
            client = offering(
                f"ECDHE-{auth}-CHACHA20-POLY1305:ECDHE-{auth}-AES128-GCM-SHA256", ssl.TLSVersion.TLSv1_2
            )
            cipher = self.handshake(creator, client).client.cipher()
            self.assertEqual(cipher[0], f"ECDHE-{auth}-AES128-GCM-SHA256", where)  # type: ignore[index]

    def test_modern_is_tls_1_3_only(self) -> None:
        for where, kind, creator in self.each_listener(TlsPolicy("modern")):
            strongest = next(s for s in INTERMEDIATE_CIPHERS if ("-RSA-" in s) == (kind == "rsa"))
            self.refused(creator, offering(strongest, ssl.TLSVersion.TLSv1_2), f"{where}: TLS 1.2")
            self.assertEqual(self.handshake(creator, offering()).client.version(), "TLSv1.3", where)

    def test_no_session_resumption(self) -> None:
        """Neither a TLS 1.2 ticket nor a session id nor a TLS 1.3 ticket resumes: every connection makes a
        full handshake (see the module docstring of dcrouter.net.tls for why)."""
        for where, _, creator in self.each_listener(TlsPolicy("intermediate")):
            for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
                client = offering("DEFAULT", version)
                first = self.handshake(creator, client)
                first.echo(b"x")  # a TLS 1.3 ticket comes after the handshake
                session = first.client.session
                self.assertIsNotNone(session)
                if version is ssl.TLSVersion.TLSv1_2:
                    self.assertFalse(session.has_ticket, where)  # type: ignore[union-attr]
                second = Handshake(creator, wall_clock(), NAME, client)
                second.client = client.wrap_bio(
                    second.incoming, second.outgoing, server_hostname=NAME, session=session
                )
                second.complete()
                self.assertFalse(second.client.session_reused, f"{where}: {version.name}")


class ContextOptionsTests(SynchronousTestCase):
    """The flags behind the policy, on the context every connection of a listener is made from."""

    def test_listener_contexts(self) -> None:
        for listener, make in LISTENERS.items():
            for policy in (TlsPolicy("intermediate"), TlsPolicy("modern")):
                context = make("ecdsa", policy).getContext()
                options = context.set_options(0)  # returns the options in force
                for flag in ("OP_NO_RENEGOTIATION", "OP_NO_COMPRESSION", "OP_NO_TICKET"):
                    self.assertTrue(options & getattr(SSL, flag), f"{listener}: {flag}")
                self.assertTrue(options & SSL.OP_CIPHER_SERVER_PREFERENCE, listener)
                self.assertEqual(context.get_session_cache_mode(), SSL.SESS_CACHE_OFF, listener)


class PolicyTests(SynchronousTestCase):
    def test_min_version_raises_never_lowers(self) -> None:
        self.assertEqual(TlsPolicy("intermediate").minimum_version, "TLSv1.2")
        self.assertEqual(TlsPolicy("intermediate", "TLSv1.3").minimum_version, "TLSv1.3")
        self.assertEqual(TlsPolicy("modern", "TLSv1.2").minimum_version, "TLSv1.3")

    def test_profile_suites(self) -> None:
        self.assertEqual(TlsPolicy().tls12_ciphers, ":".join(INTERMEDIATE_CIPHERS))
        self.assertEqual(TlsPolicy("opportunistic").tls12_ciphers, ":".join(OPPORTUNISTIC_CIPHERS))
        self.assertEqual(TlsPolicy(ciphers="ECDHE+AESGCM").tls12_ciphers, "ECDHE+AESGCM")
        for suite in INTERMEDIATE_CIPHERS:
            self.assertTrue(suite.startswith("ECDHE-"), suite)
            self.assertTrue("GCM" in suite or "CHACHA20-POLY1305" in suite, suite)

    def test_refused(self) -> None:
        self.assertRaises(ValueError, TlsPolicy, "old")
        self.assertRaises(ValueError, TlsPolicy, "intermediate", "TLSv1.1")
        error = self.assertRaises(ValueError, TlsPolicy, "modern", ciphers="ECDHE+AESGCM")
        self.assertIn("no effect", str(error))
        self.assertRaises(ValueError, TlsPolicy, "intermediate", "TLSv1.3", "ECDHE+AESGCM")

    def test_expert_ciphers_override_the_profile(self) -> None:
        """``ciphers`` is the way to let a weak suite in, deliberately."""
        creator = server_tls_options(*PAIRS["rsa"], ciphers="AES128-SHA")
        connection = Handshake(creator, wall_clock(), NAME, offering("AES128-SHA", ssl.TLSVersion.TLSv1_2))
        self.assertEqual(connection.complete().client.cipher()[0], "AES128-SHA")  # type: ignore[index]


class _Silent(Protocol):
    pass


def connect(server_creator: Any, client_creator: Any) -> tuple[TLSMemoryBIOProtocol, TLSMemoryBIOProtocol]:
    """A Twisted TLS client and server wired in memory, handshake run; (client, server)."""
    address = IPv4Address("TCP", "127.0.0.1", 25)
    server_factory = TLSMemoryBIOFactory(server_creator, False, Factory.forProtocol(Echo))
    client_factory = TLSMemoryBIOFactory(client_creator, True, Factory.forProtocol(_Silent))

    def server() -> TLSMemoryBIOProtocol:
        return server_factory.buildProtocol(address)  # type: ignore[return-value]

    def client() -> TLSMemoryBIOProtocol:
        return client_factory.buildProtocol(address)  # type: ignore[return-value]

    client_protocol, server_protocol, pump = connectedServerAndClient(server, client)
    pump.flush()
    return client_protocol, server_protocol


def negotiated(protocol: TLSMemoryBIOProtocol) -> str | None:
    """The suite of a finished handshake; None when it failed (the connection is gone)."""
    if protocol.disconnected or protocol.disconnecting:  # type: ignore[attr-defined]
        return None
    name = protocol.getHandle().get_cipher_name()
    return str(name) if name else None


class ClientPolicyTests(SynchronousTestCase):
    """The outbound side: delivery's STARTTLS and the proxy's backends."""

    def weak_server(self) -> Any:
        """A server stuck with TLS 1.2 and a CBC static-RSA suite, as old mail servers are (made with the
        expert override)."""
        server = server_tls_options(*PAIRS["rsa"], ciphers="AES128-SHA")
        server.getContext().set_max_proto_version(SSL.TLS1_2_VERSION)
        return server

    def test_opportunistic_accepts_an_old_server(self) -> None:
        client, _ = connect(self.weak_server(), client_options(TlsPolicy("opportunistic")))
        self.assertEqual(negotiated(client), "AES128-SHA")

    def test_opportunistic_still_prefers_strong_suites(self) -> None:
        client, _ = connect(server_tls_options(*PAIRS["rsa"]), client_options(TlsPolicy("opportunistic")))
        self.assertIn(negotiated(client), ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"))
        capped = TlsPolicy("opportunistic")
        server = server_tls_options(*PAIRS["rsa"], ciphers=":".join(OPPORTUNISTIC_CIPHERS))
        server.getContext().set_max_proto_version(SSL.TLS1_2_VERSION)
        client, _ = connect(server, client_options(capped))
        self.assertEqual(negotiated(client), "ECDHE-RSA-AES128-GCM-SHA256")

    def test_intermediate_client_refuses_an_old_server(self) -> None:
        client, _ = connect(self.weak_server(), client_options(TlsPolicy("intermediate")))
        self.assertIsNone(negotiated(client))

    def test_verified_client_follows_the_policy(self) -> None:
        trust = Certificate.loadPEM(PAIRS["rsa"][0])
        verified = verified_client_options(TlsPolicy("intermediate"), NAME, trust)
        client, _ = connect(self.weak_server(), verified)
        self.assertIsNone(negotiated(client))
        client, _ = connect(server_tls_options(*PAIRS["rsa"]), verified)
        self.assertIsNotNone(negotiated(client))
        self.assertTrue(client.getHandle().set_options(0) & SSL.OP_NO_RENEGOTIATION)

    def test_client_refuses_renegotiation_by_the_server(self) -> None:
        """A TLS 1.2 server asking to renegotiate (HelloRequest) is refused: the client starts no second
        handshake. (Twisted's own client options would: see the last line.)"""
        trust = Certificate.loadPEM(PAIRS["ecdsa"][0])
        for creator in (
            client_options(TlsPolicy("opportunistic")),
            client_options(TlsPolicy("intermediate")),
            verified_client_options(TlsPolicy(), NAME, trust),
        ):
            self.assertEqual(renegotiations_after_hello_request(creator), 0)
        self.assertEqual(renegotiations_after_hello_request(CertificateOptions(verify=False)), 1)


def renegotiations_after_hello_request(creator: Any) -> int:
    """Connect a client made by ``creator`` to a TLS 1.2 server that allows renegotiation, have the server
    ask for one, and return how many renegotiations the client started. Both ends are pyOpenSSL connections
    over memory BIOs (Twisted's TLS protocol does not let a server start one)."""
    own = PrivateCertificate.loadPEM(PAIRS["ecdsa"][0] + PAIRS["ecdsa"][1])
    server_options = CertificateOptions(
        privateKey=own.privateKey.original,
        certificate=own.original,
        lowerMaximumSecurityTo=TLSVersion.TLSv1_2,
    )
    server = SSL.Connection(server_options.getContext(), None)
    server.set_accept_state()
    # The creator wants the TLS protocol it works for (ALPN, verification callbacks); it is not started.
    protocol = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(_Silent)).buildProtocol(
        IPv4Address("TCP", "127.0.0.1", 25)
    )
    client = creator.clientConnectionForTLS(protocol)
    client.set_connect_state()

    def step(action: Callable[[], object]) -> None:
        try:
            action()
        except SSL.WantReadError:
            pass
        for source, sink in ((client, server), (server, client), (client, server)):
            try:
                sink.bio_write(source.bio_read(65536))
            except SSL.WantReadError:
                pass

    for _ in range(4):
        step(client.do_handshake)
        step(server.do_handshake)
    assert client.get_protocol_version_name() == "TLSv1.2"
    server.renegotiate()
    for _ in range(4):
        step(server.do_handshake)
        step(lambda: client.recv(100))
    return int(client.total_renegotiations())
