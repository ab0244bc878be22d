"""Debian's ``pebble`` ACME test server and ``pebble-challtestsrv`` per test, on free 127.0.0.1 ports.

Pebble validates HTTP-01 by fetching ``http://<name>:<httpPort>/.well-known/acme-challenge/<token>``; the
name is resolved through challtestsrv's mock DNS, which answers every A query with 127.0.0.1, so any test name
(``acme-test.example``) reaches the responder the test listens with on ``http_port``. Pebble serves its
directory over HTTPS with a certificate we generate here (Debian's package ships none), so the test's ACME
client trusts :attr:`PebbleServer.ca_bundle` for it. ``PEBBLE_VA_NOSLEEP=1`` drops pebble's random
validation delay, ``PEBBLE_VA_ALWAYS_VALID`` is left unset so validation really happens,
``PEBBLE_WFE_NONCEREJECT=0`` stops it rejecting good nonces at random (it does, to test clients' retries).

Where pebble is not installed, test cases using it are skipped with :data:`SKIP_REASON` (``make test``
installs it on Debian when run as root).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration import free_ports


def _binary(name: str) -> str | None:
    path = f"/usr/bin/{name}"
    return shutil.which(name) or (path if os.access(path, os.X_OK) else None)


PEBBLE = _binary("pebble")
CHALLTESTSRV = _binary("pebble-challtestsrv")

#: Why the pebble tests are skipped, or None when they can run.
SKIP_REASON: str | None = (
    None
    if PEBBLE and CHALLTESTSRV
    else "pebble is not installed: run `apt-get install pebble` (or `make test` as root) to run the ACME"
    " tests"
)

#: Seconds a start may take before the fixture gives up.
START_TIMEOUT = 15.0


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_listener_certificate(directory: str) -> tuple[str, str, str]:
    """A throwaway CA and a certificate for 127.0.0.1/localhost signed by it, for pebble's HTTPS listener.
    Returns the paths ``(ca.pem, cert.pem, key.pem)``."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dcrouter test pebble listener CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = tuple(os.path.join(directory, n) for n in ("ca.pem", "cert.pem", "key.pem"))
    for path, data in zip(paths, (_pem(ca), _pem(certificate), _key_pem(key)), strict=True):
        with open(path, "wb") as f:
            f.write(data)
    return paths  # type: ignore[return-value]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class PebbleServer:
    """pebble and pebble-challtestsrv, started by :meth:`start` and stopped by :meth:`stop`.

    ``http_port`` is where pebble looks for HTTP-01 answers: the port the test's responder listens on.
    """

    def __init__(self, directory: str, http_port: int, dns_server: str | None = None) -> None:
        assert PEBBLE and CHALLTESTSRV, SKIP_REASON
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.http_port = http_port
        # DNS-01 tests point pebble at dcrouter's own DNS server instead of challtestsrv's mock.
        self.dns_server = dns_server
        # Held open together and never ``http_port``: one at a time, the kernel may hand out a port twice, or
        # the one a test has chosen for its responder but not bound yet.
        ports = [port for port in free_ports(6) if port != http_port][:5]
        self.port, self.management_port, self.dns_port, self.challtestsrv_management_port, tls_port = ports
        self.ca_bundle, cert, key = write_listener_certificate(self.directory)
        self.config_path = os.path.join(self.directory, "pebble-config.json")
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": cert,
                "privateKey": key,
                "httpPort": http_port,
                "tlsPort": tls_port,  # TLS-ALPN-01 is not used; a free port keeps it from colliding
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        with open(self.config_path, "w") as f:
            json.dump(config, f)
        self._processes: list[tuple[str, subprocess.Popen[bytes], Any]] = []

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = open(os.path.join(self.directory, f"{name}.log"), "wb")  # noqa: SIM115 (closed in stop)
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.directory
        )
        self._processes.append((name, process, log))

    def start(self) -> None:
        assert PEBBLE and CHALLTESTSRV
        if self.dns_server is None:
            self._start_challtestsrv()
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0")
        dns_server = self.dns_server or f"127.0.0.1:{self.dns_port}"
        self._spawn("pebble", [PEBBLE, "-config", self.config_path, "-dnsserver", dns_server], env=env)
        deadline = time.monotonic() + START_TIMEOUT
        ready_ports = [self.port] if self.dns_server else [self.port, self.challtestsrv_management_port]
        while not all(_listening(port) for port in ready_ports):
            dead = [name for name, p, _ in self._processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{', '.join(dead) or 'pebble'} did not start: {self.log_tail()}")
            time.sleep(0.05)

    def _start_challtestsrv(self) -> None:
        # Only the mock DNS is wanted from challtestsrv; its own challenge servers are switched off.
        self._spawn(
            "challtestsrv",
            [
                CHALLTESTSRV,
                "-defaultIPv4", "127.0.0.1",
                "-defaultIPv6", "",
                "-dns01", f"127.0.0.1:{self.dns_port}",
                "-http01", "",
                "-https01", "",
                "-tlsalpn01", "",
                "-management", f"127.0.0.1:{self.challtestsrv_management_port}",
            ],
        )  # fmt: skip

    def stop(self) -> None:
        for _, process, log in self._processes:
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
        self._processes = []

    def log_tail(self) -> str:
        tails = []
        for name in ("pebble", "challtestsrv"):
            try:
                with open(os.path.join(self.directory, f"{name}.log"), errors="replace") as f:
                    tails.append(f"--- {name}\n{f.read()[-2000:]}")
            except OSError:
                pass
        return "\n".join(tails)


def start_pebble(test: Any, http_port: int, dns_server: str | None = None) -> PebbleServer:
    """A running pebble for ``test`` (a trial TestCase) validating HTTP-01 on ``http_port``, stopped in its
    cleanup; ``dns_server`` (``127.0.0.1:port``) is the DNS server its lookups go to (default: challtestsrv's
    mock answering 127.0.0.1 for every name)."""
    server = PebbleServer(test.mktemp(), http_port, dns_server)
    server.start()
    test.addCleanup(server.stop)
    return server


def trust_pebble(test: Any, pebble: PebbleServer) -> None:
    """Make ``requests`` (under ``acme``) trust ``pebble``'s directory certificate for the rest of ``test``:
    REQUESTS_CA_BUNDLE is set, and put back as it was in the test's cleanup."""
    previous = os.environ.get("REQUESTS_CA_BUNDLE")
    os.environ["REQUESTS_CA_BUNDLE"] = pebble.ca_bundle

    def restore() -> None:
        if previous is None:
            os.environ.pop("REQUESTS_CA_BUNDLE", None)
        else:
            os.environ["REQUESTS_CA_BUNDLE"] = previous

    test.addCleanup(restore)
