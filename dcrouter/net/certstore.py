"""The router's certificates, chosen by SNI: one store shared by SMTP (STARTTLS, implicit TLS), the proxy's
terminating routes and ACME.

A :class:`CertifiedKey` is one certificate chain with its private key, parsed and checked with `cryptography`
when it is loaded, so a bad file is refused at start-up or renewal, never at a client's handshake.

A :class:`CertificateStore` maps host names and ``*.`` wildcards to keys, plus a default. Its
:meth:`~CertificateStore.server_options` are a Twisted TLS creator whose SSL context switches, in pyOpenSSL's
servername callback (through Twisted's ``contextForServerName``), to the context of the key the store holds
for the client's SNI *at that handshake*. So replacing a key (a renewal) changes what the next handshake gets,
while connections already established keep the context, and so the certificate, they started with.

All methods are meant to be called from the reactor thread (a renewal running in a worker thread hands the
new key over with ``reactor.callFromThread``).
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IReactorTime

from dcrouter.log import logger
from dcrouter.net.domains import DomainMatcher, normalize_domain
from dcrouter.net.tls import INTERMEDIATE, TlsPolicy, certificate_options

log = logger(__name__)

# The key types pyOpenSSL can put into a context.
_SUPPORTED_KEYS = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


@dataclass(frozen=True, eq=False)
class CertifiedKey:
    """One certificate chain and its private key, checked to belong together.

    Build it with :meth:`from_pem` or :meth:`from_files`. Instances compare by identity: each load is its own
    key, so a store can tell a renewed certificate from the one it replaces even when the names are equal.
    """

    #: DNS names of the certificate's subjectAltName, normalised (``*.`` kept for wildcards); the subject CN
    #: when there is no subjectAltName at all. For lookups and logs.
    names: tuple[str, ...]
    #: End of validity (UTC, timezone-aware).
    not_after: datetime.datetime
    #: The end-entity certificate, then the intermediates to send with it.
    certificate: x509.Certificate = field(repr=False)
    chain: tuple[x509.Certificate, ...] = field(repr=False)
    private_key: PrivateKeyTypes = field(repr=False)
    #: SHA-256 of the end-entity certificate (hex), to name it in logs.
    fingerprint: str = ""

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes, chain_pem: bytes | None = None) -> CertifiedKey:
        """Parse a PEM certificate (optionally followed by its intermediates), an unencrypted PEM private key
        and an optional PEM bundle of further intermediates.

        Raises ValueError with a message saying which part is wrong: not PEM, an encrypted or unsupported
        key, or a key that does not match the certificate. An expired certificate is accepted (the store logs
        it when it is put in use): refusing it would take TLS down entirely rather than degrade it.
        """
        try:
            certificates = x509.load_pem_x509_certificates(cert_pem)
        except ValueError as error:
            raise ValueError(f"certificate: not a PEM certificate ({error})") from None
        try:
            private_key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:
            raise ValueError(
                "private key: encrypted; dcrouter needs an unencrypted PEM private key"
            ) from None
        except (ValueError, UnsupportedAlgorithm) as error:
            raise ValueError(f"private key: not a PEM private key ({error})") from None
        if not isinstance(private_key, _SUPPORTED_KEYS):
            raise ValueError(f"private key: unsupported key type {type(private_key).__name__}")
        chain = list(certificates[1:])
        if chain_pem:
            try:
                chain += x509.load_pem_x509_certificates(chain_pem)
            except ValueError as error:
                raise ValueError(f"chain: not a PEM certificate bundle ({error})") from None
        leaf = certificates[0]
        if _public_der(leaf.public_key()) != _public_der(private_key.public_key()):
            raise ValueError("private key: does not match the certificate")
        return cls(
            names=_certificate_names(leaf),
            not_after=leaf.not_valid_after_utc,
            certificate=leaf,
            chain=tuple(chain),
            private_key=private_key,
            fingerprint=hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
        )

    @classmethod
    def from_files(cls, cert_path: str, key_path: str, chain_path: str | None = None) -> CertifiedKey:
        """:meth:`from_pem` over files. Raises ValueError naming the file that cannot be read or used."""
        cert_pem = _read(cert_path, "certificate")
        key_pem = _read(key_path, "private key")
        chain_pem = _read(chain_path, "chain") if chain_path else None
        try:
            return cls.from_pem(cert_pem, key_pem, chain_pem)
        except ValueError as error:
            files = ", ".join(p for p in (cert_path, key_path, chain_path) if p)
            raise ValueError(f"{files}: {error}") from None

    def covers(self, name: str) -> bool:
        """True when a client verifying the certificate for ``name`` (normalised, or a ``*.`` pattern)
        would find it in :attr:`names`; a wildcard certificate covers exactly one label (RFC 6125 §6.4.3)."""
        if name in self.names:
            return True
        parent = name.partition(".")[2]
        return bool(parent) and f"*.{parent}" in self.names


@dataclass(frozen=True)
class _Settings:
    policy: TlsPolicy
    alpn: tuple[bytes, ...]


class CertificateStore:
    """Certificates of the whole router, chosen by SNI, replaceable while running (new handshakes use the new
    one; existing connections keep theirs).

    Names are exact host names or ``*.`` wildcards, compared normalised (case, trailing dot, IDNA) with the
    same matcher SMTP routing and the proxy use: exact first, then the most specific wildcard, then the
    default. ``clock`` is the time :meth:`expiring` and the expiry warnings measure against.
    """

    def __init__(self, *, clock: IReactorTime) -> None:
        self._clock = clock
        self._default: CertifiedKey | None = None
        self._named: dict[str, CertifiedKey] = {}
        self._matcher: DomainMatcher[CertifiedKey] = DomainMatcher(())
        self._contexts: dict[tuple[_Settings, CertifiedKey], SSL.Context] = {}
        self._listeners: list[Callable[[str], None]] = []

    # -- contents ----------------------------------------------------------------------------------------

    @property
    def default(self) -> CertifiedKey | None:
        """The key served when SNI is absent or matches no name."""
        return self._default

    def set_default(self, key: CertifiedKey | None) -> None:
        """Serve ``key`` when SNI is absent or matches nothing; None: refuse such handshakes."""
        self._default = key
        if key is not None:
            self._warn_if_expired("(default)", key)
        self._forget_unused_contexts()

    def put(self, name: str, key: CertifiedKey) -> None:
        """Serve ``key`` for ``name`` (an exact host or ``*.example.com``) from the next handshake on,
        replacing what was there. Raises ValueError for a name that is not a host name or wildcard pattern.
        Listeners registered with :meth:`on_change` are called with the normalised name."""
        canonical = _canonical(name)
        self._named[canonical] = key
        self._rebuild()
        if not key.covers(canonical):
            log.warn(
                "certificate for {name} does not name it (it names {names}); verifying clients refuse it",
                name=canonical,
                names=", ".join(key.names) or "nothing",
            )
        self._warn_if_expired(canonical, key)
        self._notify(canonical)

    def remove(self, name: str) -> None:
        """Stop serving a certificate for ``name`` (the next handshake for it gets a wildcard's or the
        default); nothing happens when none is held. Raises ValueError for an invalid name."""
        canonical = _canonical(name)
        if self._named.pop(canonical, None) is None:
            return
        self._rebuild()
        self._notify(canonical)

    def names(self) -> list[str]:
        """The names (normalised patterns) that have their own certificate, sorted."""
        return sorted(self._named)

    def lookup(self, server_name: str | None) -> CertifiedKey | None:
        """The key for a client's SNI: exact name, then wildcard, then the default (also for an absent or
        invalid name). None when nothing matches and there is no default."""
        if server_name:
            found = self._matcher.match(server_name)
            if found is not None:
                return found
        return self._default

    def expiring(self, within_seconds: float) -> list[tuple[str, CertifiedKey]]:
        """``(name, key)`` for every named certificate that ends within ``within_seconds`` of the clock's now
        (already expired ones included), soonest first. The default is not listed: it comes from files the
        operator manages, not from a renewal."""
        limit = self._now() + datetime.timedelta(seconds=within_seconds)
        due = [(name, key) for name, key in self._named.items() if key.not_after <= limit]
        return sorted(due, key=lambda item: (item[1].not_after, item[0]))

    def on_change(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(name)`` after every :meth:`put` and :meth:`remove` (``name`` normalised). An
        exception from a callback is logged and does not stop the others."""
        self._listeners.append(callback)

    # -- TLS ---------------------------------------------------------------------------------------------

    def server_options(
        self, *, policy: TlsPolicy = INTERMEDIATE, alpn: tuple[bytes, ...] = ()
    ) -> ssl.CertificateOptions:
        """A server TLS creator (an ``IOpenSSLServerConnectionCreator``, usable with ``TLSMemoryBIOFactory``
        and ``transport.startTLS``) that serves, at each handshake, the key :meth:`lookup` gives for the
        client's SNI at that moment, under ``policy`` (:mod:`dcrouter.net.tls`). A handshake for which the
        store has no key (no match and no default) is refused.

        Contexts are built once per (key, settings) and dropped when their key leaves the store; every
        context of one creator has the same settings, so the policy holds whichever certificate is chosen.
        Raises ValueError for ``ciphers`` OpenSSL cannot use.
        """
        settings = _Settings(policy, tuple(alpn))

        def context_for(server_name: bytes | None) -> SSL.Context | None:
            return self._context_for_name(server_name, settings)

        # The base context has no certificate: the servername callback runs for every ClientHello (with None
        # when there is no SNI) and always switches, so no handshake completes on it.
        return certificate_options(None, policy=policy, alpn=alpn, context_for_server_name=context_for)

    def _context_for_name(self, server_name: bytes | None, settings: _Settings) -> SSL.Context | None:
        try:
            name = server_name.decode("ascii") if server_name else None
        except UnicodeDecodeError:
            name = None  # not a host name: treated as no SNI
        key = self.lookup(name)
        if key is None:
            log.warn(
                "TLS handshake refused: no certificate for {name} and no default", name=name or "(no SNI)"
            )
            return None
        return self._context(key, settings)

    def _context(self, key: CertifiedKey, settings: _Settings) -> SSL.Context:
        cached = self._contexts.get((settings, key))
        if cached is None:
            options = certificate_options(key, policy=settings.policy, alpn=settings.alpn)
            cached = self._contexts[(settings, key)] = options.getContext()
        return cached

    # -- internals ---------------------------------------------------------------------------------------

    def _rebuild(self) -> None:
        self._matcher = DomainMatcher(self._named.items())
        self._forget_unused_contexts()

    def _forget_unused_contexts(self) -> None:
        # A replaced key's context stays alive as long as connections made with it do (they hold it); the
        # store only stops handing it out.
        live = set(self._named.values())
        if self._default is not None:
            live.add(self._default)
        self._contexts = {k: v for k, v in self._contexts.items() if k[1] in live}

    def _notify(self, name: str) -> None:
        for callback in list(self._listeners):
            try:
                callback(name)
            except Exception:  # noqa: BLE001 (one listener's bug must not hide the change from the others)
                log.failure("certificate change listener failed for {name}", name=name)

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.UTC)

    def _warn_if_expired(self, name: str, key: CertifiedKey) -> None:
        if key.not_after <= self._now():
            log.warn(
                "certificate for {name} expired on {not_after} (sha256 {fingerprint}); serving it anyway",
                name=name,
                not_after=key.not_after.isoformat(),
                fingerprint=key.fingerprint[:16],
            )


def _canonical(name: str) -> str:
    """``name`` or ``*.name`` normalised; ValueError naming it otherwise."""
    wildcard = name.startswith("*.")
    bare = name[2:] if wildcard else name
    try:
        normal = normalize_domain(bare)
    except ValueError as error:
        raise ValueError(f"certificate name {name!r}: {error}") from None
    return f"*.{normal}" if wildcard else normal


def _certificate_names(certificate: x509.Certificate) -> tuple[str, ...]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        raw = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        raw = [str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    names: list[str] = []
    for item in raw:
        try:
            names.append(_canonical(item))
        except ValueError:
            continue  # a name no client can ask for by SNI
    return tuple(dict.fromkeys(names))


def _public_der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {error.strerror or error}") from None
