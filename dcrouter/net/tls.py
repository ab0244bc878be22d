"""Server TLS contexts from PEM material, and self-signed certificates for trials and tests."""

from __future__ import annotations

import datetime
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.ssl import TLSVersion

_VERSIONS = {"TLSv1.2": TLSVersion.TLSv1_2, "TLSv1.3": TLSVersion.TLSv1_3}


def generate_self_signed(hostname: str, days: int = 365) -> tuple[bytes, bytes]:
    """A self-signed P-256 certificate for ``hostname`` (also valid for 127.0.0.1 and ::1).
    Returns ``(certificate_pem, private_key_pem)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
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
