"""dcrouter.net.certstore: loading and checking keys, SNI choice, live replacement, TLS settings — through
real TLS handshakes in memory: Twisted's TLSMemoryBIOProtocol as the server, Python's ssl module over
MemoryBIO as the client (it can leave SNI out, cap its version, offer ALPN)."""

from __future__ import annotations

import datetime
import os
import ssl
import warnings
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.protocols.wire import Echo
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.config.tls import TlsConfig
from dcrouter.net.certfiles import TlsMaterialError, generate_self_signed, load_certified_key
from dcrouter.net.certstore import CertificateStore, CertifiedKey
from dcrouter.net.tls import TlsPolicy

DAY = 86400.0


def pem_pair(name: str, days: int = 90) -> tuple[bytes, bytes]:
    return generate_self_signed(name, days=days)


def certified(name: str, days: int = 90) -> tuple[CertifiedKey, bytes]:
    """A new key for ``name`` and its certificate PEM (the client's trust root)."""
    cert_pem, key_pem = pem_pair(name, days)
    return CertifiedKey.from_pem(cert_pem, key_pem), cert_pem


def der(cert_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)


def wall_clock() -> Clock:
    """A Clock set to the real time: generated certificates are valid from now."""
    clock = Clock()
    clock.advance(datetime.datetime.now(datetime.UTC).timestamp())
    return clock


class Handshake:
    """One client↔server TLS connection in memory. The server is what a listening port builds from
    ``creator`` (TLSMemoryBIOFactory around an echo protocol); the client is an ``ssl.SSLObject``."""

    def __init__(
        self, creator: Any, clock: Clock, server_name: str | None, client: ssl.SSLContext | None = None
    ) -> None:
        self.clock = clock
        if client is None:
            client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            client.check_hostname = False
            client.verify_mode = ssl.CERT_NONE
        factory = TLSMemoryBIOFactory(creator, False, Factory.forProtocol(Echo), clock=clock)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert isinstance(protocol, TLSMemoryBIOProtocol)
        self.server = protocol
        self.wire = StringTransport()
        self.server.makeConnection(self.wire)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)

    def pump(self) -> None:
        """Move bytes both ways until neither side has anything more to say."""
        while True:
            self.clock.advance(0)  # TLSMemoryBIOProtocol aggregates small writes on the clock
            to_server = self.outgoing.read()
            if to_server:
                self.server.dataReceived(to_server)
                self.clock.advance(0)
            to_client = self.wire.value()
            self.wire.clear()
            if to_client:
                self.incoming.write(to_client)
            if not to_server and not to_client:
                return

    def complete(self) -> Handshake:
        """Run the handshake; raises the client's ssl.SSLError when it fails."""
        for _ in range(10):
            try:
                self.client.do_handshake()
                return self
            except ssl.SSLWantReadError:
                self.pump()
        raise AssertionError("the handshake did not finish")

    def peer_der(self) -> bytes:
        certificate = self.client.getpeercert(binary_form=True)
        assert certificate is not None
        return certificate

    def echo(self, data: bytes) -> bytes:
        self.client.write(data)
        self.pump()
        return self.client.read(65536)


def verifying_client(*trusted: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata="".join(p.decode() for p in trusted))
    return context


class CertifiedKeyTests(SynchronousTestCase):
    def test_from_pem_reads_names_and_expiry(self) -> None:
        cert_pem, key_pem = pem_pair("Mail.Example.TEST", days=10)
        key = CertifiedKey.from_pem(cert_pem, key_pem)
        self.assertEqual(key.names, ("mail.example.test",))
        self.assertEqual(key.not_after.tzinfo, datetime.UTC)
        remaining = key.not_after - datetime.datetime.now(datetime.UTC)
        self.assertTrue(datetime.timedelta(days=9) < remaining <= datetime.timedelta(days=10))
        self.assertEqual(len(key.fingerprint), 64)
        self.assertEqual(key.chain, ())

    def test_wildcard_names_kept(self) -> None:
        key, _ = certified("*.W.test")
        self.assertEqual(key.names, ("*.w.test",))
        self.assertTrue(key.covers("x.w.test"))
        self.assertFalse(key.covers("a.x.w.test"))
        self.assertFalse(key.covers("w.test"))

    def test_chain_from_bundle_and_from_certificate_file(self) -> None:
        cert_pem, key_pem = pem_pair("a.test")
        intermediate, _ = pem_pair("ca.test")
        self.assertEqual(len(CertifiedKey.from_pem(cert_pem, key_pem, intermediate).chain), 1)
        self.assertEqual(len(CertifiedKey.from_pem(cert_pem + intermediate, key_pem).chain), 1)

    def test_key_mismatch_is_a_clear_error(self) -> None:
        cert_pem, _ = pem_pair("a.test")
        _, other_key = pem_pair("a.test")
        error = self.assertRaises(ValueError, CertifiedKey.from_pem, cert_pem, other_key)
        self.assertEqual(str(error), "private key: does not match the certificate")

    def test_not_pem(self) -> None:
        cert_pem, key_pem = pem_pair("a.test")
        error = self.assertRaises(ValueError, CertifiedKey.from_pem, b"junk", key_pem)
        self.assertIn("certificate: not a PEM certificate", str(error))
        error = self.assertRaises(ValueError, CertifiedKey.from_pem, cert_pem, cert_pem)
        self.assertIn("private key: not a PEM private key", str(error))
        error = self.assertRaises(ValueError, CertifiedKey.from_pem, cert_pem, key_pem, b"junk")
        self.assertIn("chain: not a PEM certificate bundle", str(error))

    def test_encrypted_key_refused(self) -> None:
        cert_pem, key_pem = pem_pair("a.test")
        private = serialization.load_pem_private_key(key_pem, None)
        encrypted = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        error = self.assertRaises(ValueError, CertifiedKey.from_pem, cert_pem, encrypted)
        self.assertIn("encrypted", str(error))

    def test_from_files_names_the_files(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        cert_pem, _ = pem_pair("a.test")
        other_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        with open(cert_path, "wb") as handle:
            handle.write(cert_pem)
        with open(key_path, "wb") as handle:
            handle.write(other_key)
        error = self.assertRaises(ValueError, CertifiedKey.from_files, cert_path, key_path)
        self.assertEqual(str(error), f"{cert_path}, {key_path}: private key: does not match the certificate")
        missing = os.path.join(directory, "missing.pem")
        error = self.assertRaises(ValueError, CertifiedKey.from_files, missing, key_path)
        self.assertIn(f"cannot read certificate {missing}", str(error))
        # The configuration path: the same message, as the error type router start-up turns into StartupError.
        config = TlsConfig(cert_path=cert_path, key_path=key_path)
        error = self.assertRaises(TlsMaterialError, load_certified_key, config, "a.test")
        self.assertIn("does not match the certificate", str(error))


class LookupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = CertificateStore(clock=wall_clock())
        self.default, _ = certified("mx.test")
        self.a, _ = certified("a.test")
        self.wild, _ = certified("*.w.test")
        self.store.set_default(self.default)
        self.store.put("A.Test.", self.a)
        self.store.put("*.w.test", self.wild)

    def test_exact_wildcard_default(self) -> None:
        self.assertIs(self.store.lookup("a.test"), self.a)
        self.assertIs(self.store.lookup("A.TEST"), self.a)
        self.assertIs(self.store.lookup("x.w.test"), self.wild)
        self.assertIs(self.store.lookup("w.test"), self.default)
        self.assertIs(self.store.lookup("other.test"), self.default)
        self.assertIs(self.store.lookup(None), self.default)
        self.assertIs(self.store.lookup("not a name"), self.default)
        self.assertEqual(self.store.names(), ["*.w.test", "a.test"])

    def test_exact_beats_wildcard(self) -> None:
        exact, _ = certified("y.w.test")
        self.store.put("y.w.test", exact)
        self.assertIs(self.store.lookup("y.w.test"), exact)
        self.assertIs(self.store.lookup("x.w.test"), self.wild)

    def test_remove_falls_back(self) -> None:
        self.store.remove("a.test")
        self.assertIs(self.store.lookup("a.test"), self.default)
        self.store.remove("a.test")  # nothing held: nothing happens
        self.store.set_default(None)
        self.assertIsNone(self.store.lookup("a.test"))

    def test_invalid_name_refused(self) -> None:
        self.assertRaises(ValueError, self.store.put, "a b.test", self.a)
        self.assertRaises(ValueError, self.store.put, "*", self.a)
        self.assertRaises(ValueError, self.store.remove, "")

    def test_on_change(self) -> None:
        seen: list[str] = []

        def broken(name: str) -> None:
            raise RuntimeError("listener bug")

        self.store.on_change(broken)
        self.store.on_change(seen.append)
        self.store.put("B.test", self.a)
        self.store.remove("*.w.test")
        self.store.remove("absent.test")
        self.assertEqual(seen, ["b.test", "*.w.test"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_expiring(self) -> None:
        clock = wall_clock()
        store = CertificateStore(clock=clock)
        soon, _ = certified("soon.test", days=5)
        later, _ = certified("later.test", days=60)
        store.put("later.test", later)
        store.put("soon.test", soon)
        store.set_default(certified("mx.test", days=1)[0])  # not renewable: never listed
        self.assertEqual(store.expiring(10 * DAY), [("soon.test", soon)])
        clock.advance(59 * DAY)
        self.assertEqual(store.expiring(10 * DAY), [("soon.test", soon), ("later.test", later)])

    def test_expired_and_misnamed_certificates_logged(self) -> None:
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        clock = wall_clock()
        clock.advance(100 * DAY)
        store = CertificateStore(clock=clock)
        store.put("c.test", self.a)  # expired by the clock, and for another name
        formats = [
            e.get("log_format", "") for e in events if e.get("log_namespace") == "dcrouter.net.certstore"
        ]
        self.assertTrue(any("does not name it" in f for f in formats), formats)
        self.assertTrue(any("expired" in f for f in formats), formats)
        self.assertIs(store.lookup("c.test"), self.a)  # served anyway


class HandshakeTests(SynchronousTestCase):
    """What a client actually receives."""

    def setUp(self) -> None:
        self.clock = wall_clock()
        self.store = CertificateStore(clock=self.clock)
        self.default, self.default_pem = certified("mx.test")
        self.a, self.a_pem = certified("a.test")
        self.b, self.b_pem = certified("b.test")
        self.wild, self.wild_pem = certified("*.w.test")
        self.store.set_default(self.default)
        self.store.put("a.test", self.a)
        self.store.put("b.test", self.b)
        self.store.put("*.w.test", self.wild)
        self.options = self.store.server_options()

    def connect(self, name: str | None, client: ssl.SSLContext | None = None) -> Handshake:
        return Handshake(self.options, self.clock, name, client).complete()

    def test_is_a_server_connection_creator(self) -> None:
        self.assertTrue(IOpenSSLServerConnectionCreator.providedBy(self.options))

    def test_each_name_gets_its_certificate(self) -> None:
        self.assertEqual(self.connect("a.test").peer_der(), der(self.a_pem))
        self.assertEqual(self.connect("b.test").peer_der(), der(self.b_pem))
        self.assertEqual(self.connect("x.w.test").peer_der(), der(self.wild_pem))

    def test_clients_that_verify_accept_them(self) -> None:
        for name, pem in (("a.test", self.a_pem), ("b.test", self.b_pem), ("x.w.test", self.wild_pem)):
            connection = self.connect(name, verifying_client(pem))
            self.assertEqual(connection.echo(b"hello"), b"hello")

    def test_no_or_unknown_sni_gets_the_default(self) -> None:
        self.assertEqual(self.connect(None).peer_der(), der(self.default_pem))
        self.assertEqual(self.connect("unknown.test").peer_der(), der(self.default_pem))
        self.assertEqual(self.connect("w.test").peer_der(), der(self.default_pem))

    def test_no_default_and_no_match_is_refused(self) -> None:
        self.store.set_default(None)
        self.assertRaises(ssl.SSLError, self.connect, "unknown.test")
        self.assertEqual(self.connect("a.test").peer_der(), der(self.a_pem))

    def test_replacement_served_to_next_handshake_existing_connection_kept(self) -> None:
        before = self.connect("a.test")
        self.assertEqual(before.peer_der(), der(self.a_pem))
        renewed, renewed_pem = certified("a.test")
        self.store.put("a.test", renewed)
        after = self.connect("a.test")
        self.assertEqual(after.peer_der(), der(renewed_pem))
        # The connection made before keeps its session, and its certificate, and still carries data.
        self.assertEqual(before.echo(b"still here"), b"still here")
        self.assertEqual(before.peer_der(), der(self.a_pem))
        self.assertEqual(after.echo(b"new"), b"new")

    def test_options_made_before_a_certificate_is_added_see_it(self) -> None:
        c, c_pem = certified("c.test")
        self.assertEqual(self.connect("c.test").peer_der(), der(self.default_pem))
        self.store.put("c.test", c)
        self.assertEqual(self.connect("c.test").peer_der(), der(c_pem))
        new_default, new_default_pem = certified("mx2.test")
        self.store.set_default(new_default)
        self.assertEqual(self.connect(None).peer_der(), der(new_default_pem))

    def test_contexts_reused_and_dropped_with_their_key(self) -> None:
        self.connect("a.test")
        self.connect("a.test")
        self.connect("b.test")
        self.assertEqual(len(self.store._contexts), 2)
        self.store.remove("b.test")
        self.assertEqual(len(self.store._contexts), 1)

    def test_minimum_version_enforced(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Python deprecates naming TLS 1.1 at all
            old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            old.check_hostname = False
            old.verify_mode = ssl.CERT_NONE
            old.set_ciphers("DEFAULT:@SECLEVEL=0")  # so the client can offer TLS 1.1 at all
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        error = self.assertRaises(ssl.SSLError, self.connect, "a.test", old)
        self.assertIn("PROTOCOL_VERSION", error.reason or str(error))

        tls12 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls12.check_hostname = False
        tls12.verify_mode = ssl.CERT_NONE
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        self.assertEqual(self.connect("a.test", tls12).client.version(), "TLSv1.2")
        self.options = self.store.server_options(policy=TlsPolicy(min_version="TLSv1.3"))
        error = self.assertRaises(ssl.SSLError, self.connect, "a.test", tls12)
        self.assertIn("PROTOCOL_VERSION", error.reason or str(error))
        self.assertEqual(self.connect("a.test").client.version(), "TLSv1.3")

    def test_ciphers_apply_to_every_certificate(self) -> None:
        self.options = self.store.server_options(policy=TlsPolicy(ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"))
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        client.maximum_version = ssl.TLSVersion.TLSv1_2
        for name in ("a.test", None):
            cipher = self.connect(name, client).client.cipher()
            assert cipher is not None
            self.assertEqual(cipher[0], "ECDHE-ECDSA-AES128-GCM-SHA256")

    def test_bad_settings_refused(self) -> None:
        self.assertRaises(ValueError, TlsPolicy, min_version="TLSv1.1")
        error = self.assertRaises(
            ValueError, self.store.server_options, policy=TlsPolicy(ciphers="NO-SUCH-CIPHER")
        )
        self.assertIn("NO-SUCH-CIPHER", str(error))

    def test_alpn(self) -> None:
        self.options = self.store.server_options(alpn=(b"h2", b"http/1.1"))
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        client.set_alpn_protocols(["http/1.1"])
        connection = self.connect("b.test", client)
        self.assertEqual(connection.client.selected_alpn_protocol(), "http/1.1")
        self.assertEqual(connection.peer_der(), der(self.b_pem))
