"""TLS material from the configuration (SMTP's certificate, generated self-signed on request), and
one-certificate server options for tests and peers. Choosing by SNI is :mod:`dcrouter.net.certstore`'s job."""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl

from dcrouter.config.options import TlsConfig
from dcrouter.net.certstore import CertifiedKey, certificate_options


def generate_self_signed(hostname: str, days: int = 365) -> tuple[bytes, bytes]:
    """A self-signed P-256 certificate for ``hostname`` (also valid for 127.0.0.1 and ::1).
    Returns ``(certificate_pem, private_key_pem)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName(hostname),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        # Clients that verify strictly (Python 3.13's default context, VERIFY_X509_STRICT) want these on a
        # certificate that is its own trust anchor.
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def server_tls_options(
    cert_pem: bytes,
    key_pem: bytes,
    chain_pem: bytes | None = None,
    min_version: str = "TLSv1.2",
    ciphers: str | None = None,
) -> ssl.CertificateOptions:
    """A server context factory for one certificate, usable for ``transport.startTLS`` and for TLS listening
    endpoints (tests and peers; the router's listeners use :class:`~dcrouter.net.certstore.CertificateStore`).
    Raises ValueError when the material is unusable (see :meth:`CertifiedKey.from_pem`)."""
    key = CertifiedKey.from_pem(cert_pem, key_pem, chain_pem)
    return certificate_options(key, min_version=min_version, ciphers=ciphers)


class TlsMaterialError(Exception):
    """A certificate or key named in the configuration cannot be used; the message names the file."""


def _write_private(path: str, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename) with ``mode`` from the start, so
    a key is never readable by others, not even for a moment, and a crash never leaves half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def ensure_self_signed(cert_path: str, key_path: str, hostname: str) -> bool:
    """Generate a self-signed certificate for ``hostname`` at ``cert_path``/``key_path`` unless both exist.

    Directories are created (0700 for new ones); the key file is mode 0600. Returns True if files were
    written.
    Refuses (TlsMaterialError) when only one of the two exists: overwriting a real key or certificate would be
    worse than failing to start.
    """
    cert_exists, key_exists = os.path.exists(cert_path), os.path.exists(key_path)
    if cert_exists and key_exists:
        return False
    if cert_exists != key_exists:
        present, missing = (cert_path, key_path) if cert_exists else (key_path, cert_path)
        raise TlsMaterialError(
            f"{missing} is missing but {present} exists; refusing to generate a self-signed pair over it"
        )
    for path in (cert_path, key_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    cert_pem, key_pem = generate_self_signed(hostname)
    # Key first: a certificate without its key on disk is what the check above refuses.
    _write_private(key_path, key_pem, 0o600)
    _write_private(cert_path, cert_pem, 0o644)
    return True


def load_certified_key(config: TlsConfig, hostname: str) -> CertifiedKey:
    """The certificate and key named in ``config``, generated first when ``selfSigned`` is set and they are
    missing. Raises TlsMaterialError naming the file at fault."""
    if not config.cert_path or not config.key_path:
        raise TlsMaterialError("TLS needs both certPath and keyPath")
    if config.self_signed:
        ensure_self_signed(config.cert_path, config.key_path, hostname)
    try:
        return CertifiedKey.from_files(config.cert_path, config.key_path, config.ca_path)
    except ValueError as error:
        raise TlsMaterialError(str(error)) from error
