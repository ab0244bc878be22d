"""SMTP serves the router's certificate store by SNI: DcRouter in-process on 127.0.0.1, certificates made
here, clients on real sockets (Python's ssl, in a thread so the reactor keeps serving) that ask for a server
name with STARTTLS and on the implicit-TLS port."""

from __future__ import annotations

import os
import socket
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from dcrouter import DcRouter
from dcrouter.net.certfiles import generate_self_signed
from dcrouter.net.certstore import CertifiedKey
from tests.integration import free_ports

HOSTNAME = "mx.test"
TIMEOUT = 20


def der(cert_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)


def trusting(cert_pem: bytes, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A client context that trusts exactly ``cert_pem`` (and checks the host name unless told not to)."""
    context = ssl.create_default_context(cadata=cert_pem.decode())
    context.check_hostname = check_hostname
    return context


class SmtpLine:
    """The client side of an SMTP conversation over a socket, plain or TLS."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""

    def reply(self) -> tuple[int, list[str]]:
        lines: list[str] = []
        while True:
            while b"\r\n" not in self._buffer:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionError(f"closed by the server after {lines!r}")
                self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\r\n", 1)
            lines.append(line[4:].decode())
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def command(self, text: str) -> tuple[int, list[str]]:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()

    def quit(self) -> None:
        try:
            self.command("QUIT")
        finally:
            self.sock.close()


def starttls(port: int, server_name: str | None, context: ssl.SSLContext) -> tuple[SmtpLine, bytes]:
    """Greeting, EHLO, STARTTLS asking for ``server_name`` by SNI, EHLO again. Returns the open session and
    the certificate the server presented (DER)."""
    plain = SmtpLine(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
    assert plain.reply()[0] == 220
    code, features = plain.command("EHLO client.test")
    assert code == 250 and "STARTTLS" in features, features
    code, text = plain.command("STARTTLS")
    assert code == 220, text
    session = SmtpLine(context.wrap_socket(plain.sock, server_hostname=server_name))
    code, features = session.command("EHLO client.test")
    assert code == 250 and "STARTTLS" not in features, features
    certificate = session.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
    assert certificate is not None
    return session, certificate


def implicit_tls(port: int, server_name: str | None, context: ssl.SSLContext) -> bytes:
    """TLS from the first byte; the certificate the server presented (DER) once the greeting came."""
    sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT), server_hostname=server_name
    )
    session = SmtpLine(sock)
    assert session.reply()[0] == 220
    certificate = sock.getpeercert(binary_form=True)
    assert certificate is not None
    session.quit()
    return certificate


class SmtpSniTests(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.default_pem, key_pem = generate_self_signed(HOSTNAME)
        cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        for path, data in ((cert_path, self.default_pem), (key_path, key_pem)):
            with open(path, "wb") as handle:
                handle.write(data)
        self.mx, self.implicit = free_ports(2)
        options = {
            "smtpConfig": {
                "ports": [self.mx, self.implicit],
                "bindAddress": "127.0.0.1",
                "hostname": HOSTNAME,
                "implicitTlsPorts": [self.implicit],
                "tls": {"certPath": cert_path, "keyPath": key_path, "minVersion": "TLSv1.3"},
                "domainConfigs": [{"domains": ["example.test"], "targetIPs": ["127.0.0.1"], "port": 2626}],
            }
        }
        self.router = DcRouter(options, reactor=reactor)
        assert self.router.delivery is not None
        self.router.delivery.pause_deliveries()
        self.a_pem, self.a = self.put("a.test")
        self.b_pem, self.b = self.put("b.test")
        self.router.privilegedStartService()
        self.router.startService()
        self.addCleanup(self.router.stopService)
        return self.router.when_ready()

    def put(self, name: str) -> tuple[bytes, CertifiedKey]:
        """A new certificate for ``name`` in the router's store, as the proxy's files or ACME put theirs."""
        cert_pem, key_pem = generate_self_signed(name)
        key = CertifiedKey.from_pem(cert_pem, key_pem)
        self.router.certificates.put(name, key)
        return cert_pem, key

    def test_smtp_certificate_is_the_default(self) -> None:
        default = self.router.certificates.default
        assert default is not None
        self.assertEqual(default.names, (HOSTNAME,))

    def test_starttls_sni_chooses_the_certificate(self) -> Deferred[None]:
        def client() -> list[bytes]:
            seen = []
            for name, pem in (("a.test", self.a_pem), ("b.test", self.b_pem), (HOSTNAME, self.default_pem)):
                session, certificate = starttls(self.mx, name, trusting(pem))
                session.quit()
                seen.append(certificate)
            return seen

        async def go() -> None:
            seen = await deferToThread(client)
            self.assertEqual(seen, [der(self.a_pem), der(self.b_pem), der(self.default_pem)])

        return Deferred.fromCoroutine(go())

    def test_starttls_without_or_with_unknown_sni_gets_the_default(self) -> Deferred[None]:
        def client() -> list[bytes]:
            seen = []
            for name in (None, "unknown.test"):
                context = trusting(self.default_pem, check_hostname=False)
                session, certificate = starttls(self.mx, name, context)
                session.quit()
                seen.append(certificate)
            return seen

        async def go() -> None:
            self.assertEqual(await deferToThread(client), [der(self.default_pem)] * 2)

        return Deferred.fromCoroutine(go())

    def test_implicit_tls_sni(self) -> Deferred[None]:
        def client() -> list[bytes]:
            return [
                implicit_tls(self.implicit, "b.test", trusting(self.b_pem)),
                implicit_tls(self.implicit, None, trusting(self.default_pem, check_hostname=False)),
            ]

        async def go() -> None:
            self.assertEqual(await deferToThread(client), [der(self.b_pem), der(self.default_pem)])

        return Deferred.fromCoroutine(go())

    def test_renewed_certificate_for_next_session_open_one_keeps_working(self) -> Deferred[None]:
        async def go() -> None:
            before, first = await deferToThread(starttls, self.mx, "a.test", trusting(self.a_pem))
            self.addCleanup(before.sock.close)
            renewed_pem, _ = self.put("a.test")  # on the reactor thread, as a renewal hands it over

            def after_renewal() -> tuple[bytes, tuple[int, list[str]]]:
                after, second = starttls(self.mx, "a.test", trusting(renewed_pem))
                after.quit()
                still = before.command("NOOP")
                before.quit()
                return second, still

            second, still = await deferToThread(after_renewal)
            self.assertEqual(first, der(self.a_pem))
            self.assertEqual(second, der(renewed_pem))
            self.assertEqual(still[0], 250, still)

        return Deferred.fromCoroutine(go())

    def test_minimum_version_from_smtp_config(self) -> Deferred[None]:
        """smtpConfig.tls.minVersion holds for every certificate the store serves, not only the default."""

        def client() -> str:
            tls12 = trusting(self.a_pem)
            tls12.maximum_version = ssl.TLSVersion.TLSv1_2
            try:
                implicit_tls(self.implicit, "a.test", tls12)
            except ssl.SSLError as error:
                return str(error.reason)
            return "handshake succeeded"

        async def go() -> None:
            self.assertIn("PROTOCOL_VERSION", await deferToThread(client))

        return Deferred.fromCoroutine(go())
