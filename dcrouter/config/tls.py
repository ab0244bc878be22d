"""The schema of certificates and TLS policy: ``smtpConfig.tls`` and the top-level ``tls`` block.

The block checks load the PEM files a configuration names (certificate, key, CA bundle) and check they match,
so a bad file is an error naming its key at load time rather than a failed listener at start-up; the proxy's
``{certPath, keyPath}`` tables are checked with the same :func:`pem_files`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from dcrouter.config import values
from dcrouter.config.schema import Report, block_check, checked, join, option
from dcrouter.net.tls import INTERMEDIATE_CIPHERS, TlsPolicy


def _read(path: str) -> bytes | str:
    """The file's bytes, or an error message."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except (OSError, ValueError) as e:
        # ValueError: a name open() cannot take (values.file_path refuses those first).
        return f"cannot read {path!r}: {getattr(e, 'strerror', None) or e}"


def _load_pem(file: str, what: str) -> Any:
    data = _read(file)
    if isinstance(data, str):
        return data
    try:
        if what == "key":
            return serialization.load_pem_private_key(data, password=None)
        return x509.load_pem_x509_certificates(data)
    except TypeError:
        return f"the private key in {file!r} is encrypted; dcrouter needs it unencrypted"
    except ValueError:
        noun = "private key" if what == "key" else "certificate"
        return f"no PEM {noun} in {file!r}"


def _public(key: Any) -> bytes:
    return bytes(
        key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


@block_check("cert_path", "key_path", "ca_path", "self_signed")
def tls_material(tls: TlsConfig, path: str, report: Report) -> None:
    """certPath and keyPath come as a pair; files that are meant to exist must hold matching PEM."""
    if tls.self_signed and tls.cert_path is None and tls.key_path is None:
        report.error(join(path, "certPath"), "required with selfSigned: where the certificate is generated")
        return
    pem_files(tls.cert_path, tls.key_path, tls.ca_path, tls.self_signed, path, report)


@block_check("ciphers", "min_version", "tls_profile")
def tls_ciphers(tls: TlsConfig, path: str, report: Report) -> None:
    """``ciphers`` replaces the profile's TLS 1.2 suites: it must name some, TLS 1.2 must be accepted at all,
    and suites the profile leaves out (without forward secrecy, without AEAD, DHE) are worth a warning."""
    if tls.ciphers is None:
        return
    ciphers = join(path, "ciphers")
    if TlsPolicy(tls.tls_profile, tls.min_version).minimum_version == "TLSv1.3":
        reason = (
            f'{join(path, "tlsProfile")} is "modern"'
            if tls.tls_profile == "modern"
            else f'{join(path, "minVersion")} is "TLSv1.3"'
        )
        report.error(ciphers, f"has no effect: {reason}, so TLS 1.2 is not accepted; remove it")
        return
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.set_cipher_list(tls.ciphers.encode("ascii", "replace"))
    except SSL.Error:
        report.error(ciphers, f"OpenSSL knows no cipher in {tls.ciphers!r}")
        return
    # TLS 1.3 suites (TLS_*) are listed too; they are not the override's and are all strong.
    chosen = SSL.Connection(context, None).get_cipher_list()
    weaker = [name for name in chosen if not name.startswith("TLS_") and name not in INTERMEDIATE_CIPHERS]
    if weaker:
        report.warning(
            ciphers,
            f"lets in TLS 1.2 suites that {join(path, 'tlsProfile')} leaves out (it keeps ECDHE with AEAD "
            f"only): {', '.join(weaker)}",
        )


@block_check("cert_path", "key_path")
def shared_tls_material(tls: SharedTlsConfig, path: str, report: Report) -> None:
    pem_files(tls.cert_path, tls.key_path, None, False, path, report)


def pem_files(
    cert: str | None, key: str | None, ca: str | None, generated: bool, path: str, report: Report
) -> None:
    """Report under ``path`` what is wrong with a certificate file, its key file and a CA bundle: one of
    the pair without the other, a file that is not readable PEM, a key that does not match the certificate.
    ``generated``: the pair is generated on first start, so a missing certificate or key is expected."""
    if (cert is None) != (key is None):
        missing = "keyPath" if key is None else "certPath"
        report.error(join(path, missing), "required when the other of certPath/keyPath is set")
        return
    loaded: dict[str, Any] = {}
    for name, file, what in (("certPath", cert, "cert"), ("keyPath", key, "key"), ("caPath", ca, "cert")):
        # A self-signed pair is generated on first start, so only its absence is expected.
        if file is None or (generated and name != "caPath" and not os.path.exists(file)):
            continue
        result = _load_pem(file, what)
        if isinstance(result, str):
            report.error(join(path, name), result)
        else:
            loaded[name] = result
    if (
        "certPath" in loaded
        and "keyPath" in loaded
        and _public(loaded["certPath"][0].public_key()) != _public(loaded["keyPath"].public_key())
    ):
        report.error(join(path, "keyPath"), f"does not match the certificate in {join(path, 'certPath')}")


@checked(tls_material, tls_ciphers)
@dataclass(frozen=True)
class TlsConfig:
    cert_path: str | None = option(
        None,
        doc="PEM certificate chain for STARTTLS and implicit TLS (a file path; relative paths are "
        "relative to the working directory).",
        check=values.file_path,
    )
    key_path: str | None = option(
        None, doc="PEM private key matching certPath, unencrypted.", check=values.file_path
    )
    ca_path: str | None = option(
        None, doc="PEM bundle of CAs sent as the chain (intermediates).", check=values.file_path
    )
    min_version: Literal["TLSv1.2", "TLSv1.3"] = option(
        "TLSv1.2", doc="Lowest TLS version accepted; raises tlsProfile's minimum, never lowers it."
    )
    tls_profile: Literal["modern", "intermediate"] = option(
        "intermediate",
        addition=True,
        doc="TLS policy of every SMTP port (docs/security.md): `intermediate` accepts TLS 1.3 and TLS 1.2 "
        "with ECDHE and AEAD suites only (Mozilla's intermediate profile, without DHE); `modern` accepts "
        "TLS 1.3 only.",
    )
    ciphers: str | None = option(
        None,
        addition=True,
        doc="Expert override: an OpenSSL cipher string replacing tlsProfile's TLS 1.2 suites (TLS 1.3 suites "
        "are OpenSSL's defaults). An error where TLS 1.2 is not accepted; a warning names the suites it lets "
        "in that the profile leaves out.",
    )
    self_signed: bool = option(
        False,
        addition=True,
        doc="Generate a self-signed certificate at certPath/keyPath on first start when they do not exist "
        "(for trials; use a real certificate in production).",
    )
    acme: bool = option(
        False,
        addition=True,
        doc="Obtain the certificate for `smtpConfig.hostname` from `smartProxyConfig.acme` (which must be "
        'enabled; with `challenge = "dns-01"` the name must lie in `dnsServerConfig.zones`) and serve it to '
        "every client, with or without SNI. Until it is obtained, the files (or a generated self-signed "
        "certificate) are served.",
    )


@checked(shared_tls_material)
@dataclass(frozen=True)
class SharedTlsConfig:
    contact_email: str | None = option(
        None,
        doc="Contact for certificate authorities (ACME).",
        unsupported="ACME is configured under smartProxyConfig.acme (accountEmail); this block takes "
        "certificate files only.",
    )
    domain: str | None = option(
        None, doc="The router's own domain name.", unsupported="Nothing uses the router's own domain yet."
    )
    cert_path: str | None = option(
        None,
        doc="PEM certificate used when a service has none of its own (SMTP: when smtpConfig.tls names "
        "no certificate).",
        check=values.file_path,
    )
    key_path: str | None = option(
        None, doc="PEM private key for certPath, unencrypted.", check=values.file_path
    )
