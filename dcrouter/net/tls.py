"""Server TLS contexts from PEM material, and self-signed certificates for trials and tests."""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.ssl import TLSVersion

from dcrouter.config.options import TlsConfig

_VERSIONS = {"TLSv1.2": TLSVersion.TLSv1_2, "TLSv1.3": TLSVersion.TLSv1_3}


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
    """A server context factory usable for ``transport.startTLS`` and for TLS listening endpoints."""
    certs = x509.load_pem_x509_certificates(cert_pem)
    extra = certs[1:] + (x509.load_pem_x509_certificates(chain_pem) if chain_pem else [])
    key = serialization.load_pem_private_key(key_pem, password=None)
    kwargs = {}
    if ciphers:
        kwargs["acceptableCiphers"] = ssl.AcceptableCiphers.fromOpenSSLCipherString(ciphers)
    return ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
        certificate=crypto.X509.from_cryptography(certs[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in extra],
        raiseMinimumTo=_VERSIONS[min_version],
        **kwargs,
    )


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


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise TlsMaterialError(f"cannot read {what} {path}: {error.strerror or error}") from error


def load_tls_options(config: TlsConfig, hostname: str) -> ssl.CertificateOptions:
    """Server TLS options from the files named in ``config``; generates them first when ``selfSigned`` is set
    and they are missing. Raises TlsMaterialError naming the file at fault."""
    if not config.cert_path or not config.key_path:
        raise TlsMaterialError("TLS needs both certPath and keyPath")
    if config.self_signed:
        ensure_self_signed(config.cert_path, config.key_path, hostname)
    cert_pem = _read(config.cert_path, "certificate")
    key_pem = _read(config.key_path, "private key")
    chain_pem = _read(config.ca_path, "CA bundle") if config.ca_path else None
    try:
        return server_tls_options(cert_pem, key_pem, chain_pem, config.min_version, config.ciphers)
    except Exception as error:  # cryptography and pyOpenSSL raise several unrelated types for bad PEM
        files = ", ".join(p for p in (config.cert_path, config.key_path, config.ca_path) if p)
        raise TlsMaterialError(f"cannot use TLS material ({files}): {error}") from error
