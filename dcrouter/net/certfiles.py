"""Certificates on disk and in memory: the self-signed certificate dcrouter generates when none is configured,
and loading the certificate and key a configuration names (with the file at fault in every error). The TLS
policy they are served under is :mod:`dcrouter.net.tls`."""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from collections.abc import Iterable
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl

from dcrouter.log import logger
from dcrouter.net.certstore import CertifiedKey
from dcrouter.net.tls import TlsPolicy, certificate_options

log = logger(__name__)


def generate_self_signed(
    hostname: str, days: int = 365, addresses: Iterable[str] = ()
) -> tuple[bytes, bytes]:
    """A self-signed P-256 certificate for ``hostname``, valid for 127.0.0.1, ::1 and ``addresses`` too (the
    address a listener is bound to, so that clients verifying by IP accept it; ``0.0.0.0`` and ``::`` name no
    host and are left out). Returns ``(certificate_pem, private_key_pem)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    ips = [x509.IPAddress(ip) for ip in _host_addresses(("127.0.0.1", "::1", *addresses))]
    san = x509.SubjectAlternativeName([x509.DNSName(hostname), *ips])
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


def _host_addresses(addresses: Iterable[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """``addresses`` parsed, without duplicates and without the unspecified ones (``0.0.0.0``, ``::``)."""
    parsed = (ipaddress.ip_address(a) for a in addresses)
    return list(dict.fromkeys(ip for ip in parsed if not ip.is_unspecified))


def server_tls_options(
    cert_pem: bytes,
    key_pem: bytes,
    chain_pem: bytes | None = None,
    min_version: str = "TLSv1.2",
    ciphers: str | None = None,
    profile: str = "intermediate",
) -> ssl.CertificateOptions:
    """A server context factory for one certificate under the policy ``TlsPolicy(profile, min_version,
    ciphers)``, usable for ``transport.startTLS`` and for TLS listening endpoints (tests and peers; the
    router's listeners use :class:`~dcrouter.net.certstore.CertificateStore`). Raises ValueError when the
    material or the policy is unusable (see :meth:`CertifiedKey.from_pem`)."""
    key = CertifiedKey.from_pem(cert_pem, key_pem, chain_pem)
    return certificate_options(key, policy=TlsPolicy(profile, min_version, ciphers))


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


def ensure_self_signed(cert_path: str, key_path: str, hostname: str, addresses: Iterable[str] = ()) -> bool:
    """Generate a self-signed certificate for ``hostname`` (and ``addresses``, see
    :func:`generate_self_signed`) at ``cert_path``/``key_path`` unless both exist.

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
    cert_pem, key_pem = generate_self_signed(hostname, addresses=addresses)
    # Key first: a certificate without its key on disk is what the check above refuses.
    _write_private(key_path, key_pem, 0o600)
    _write_private(cert_path, cert_pem, 0o644)
    return True


class CertificateFiles(Protocol):
    """Where a certificate is (``smtpConfig.tls`` and the top-level ``tls`` block have these keys)."""

    @property
    def cert_path(self) -> str | None: ...
    @property
    def key_path(self) -> str | None: ...
    @property
    def ca_path(self) -> str | None: ...
    @property
    def self_signed(self) -> bool: ...


def load_certified_key(
    config: CertificateFiles, hostname: str, addresses: Iterable[str] = ()
) -> CertifiedKey:
    """The certificate and key named in ``config``, generated first (for ``hostname`` and ``addresses``)
    when ``selfSigned`` is set and they are missing. A self-signed pair generated earlier for other
    addresses is kept, with a warning. Raises TlsMaterialError naming the file at fault."""
    if not config.cert_path or not config.key_path:
        raise TlsMaterialError("TLS needs both certPath and keyPath")
    generated = config.self_signed and ensure_self_signed(
        config.cert_path, config.key_path, hostname, addresses
    )
    try:
        key = CertifiedKey.from_files(config.cert_path, config.key_path, config.ca_path)
    except ValueError as error:
        raise TlsMaterialError(str(error)) from error
    if config.self_signed and not generated:
        _warn_uncovered(config.cert_path, key.certificate, addresses)
    return key


def _warn_uncovered(path: str, certificate: x509.Certificate, addresses: Iterable[str]) -> None:
    """Warn when a self-signed certificate kept from an earlier start does not name ``addresses`` (the
    listener moved since): clients that verify by IP refuse it."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        named = set(san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        named = set()
    missing = [str(ip) for ip in _host_addresses(addresses) if ip not in named]
    if missing:
        log.warn(
            "self-signed certificate {path} does not name {addresses}: clients verifying by IP refuse it; "
            "delete it and its key to have a new one generated",
            path=path,
            addresses=", ".join(missing),
        )
