"""The router's one TLS policy, for every listener and every client (below), and TLS material from the
configuration (SMTP's certificate, generated self-signed on request), with one-certificate server options for
tests and peers. Choosing a certificate by SNI is :mod:`dcrouter.net.certstore`'s job; it builds every server
context through :func:`certificate_options`, so SMTP (STARTTLS and implicit TLS), the proxy's terminating
routes and the outbound clients all get their settings here. docs/security.md says the same for operators.

The policy:

- **Versions**: TLS 1.2 and 1.3 (profile ``intermediate``, Mozilla's profile of that name, guidelines 5.7),
  or TLS 1.3 only (``modern``). ``minVersion`` can only raise a profile's minimum.
- **TLS 1.2 suites**: ECDHE key exchange with an AEAD cipher only (AES-GCM, ChaCha20-Poly1305), in
  Mozilla's order. No static RSA key exchange (no forward secrecy), no CBC (Lucky13 and its kin). No DHE
  either, although Mozilla lists three DHE-RSA suites: every client that can do TLS 1.2 with AEAD also does
  ECDHE, and DHE would need finite-field parameters set on every context for nothing. ``ciphers`` is an
  expert override of this list (the configuration warns when it lets weaker suites in).
- **TLS 1.3 suites**: OpenSSL's defaults, in OpenSSL's order (all are AEAD with forward secrecy).
- **Server cipher preference** (Twisted sets it), **no compression** (CRIME; Twisted sets it), **no
  renegotiation** (``OP_NO_RENEGOTIATION``: neither a client's nor a server's request; OpenSSL 3 already
  refuses client-initiated renegotiation by default, this holds whatever OpenSSL build is underneath).
- **No session resumption**: no session tickets (``OP_NO_TICKET``) and no server-side session cache. OpenSSL's
  ticket key is made once per ``SSL_CTX`` and never rotated, and the router's contexts live as long as the
  process: anyone who got that key could decrypt every ticket-resumed session recorded meanwhile, forward
  secrecy gone. Rotating it would mean replacing the contexts of every listener on a timer. The stateful
  alternative, OpenSSL's in-process session cache, is what Twisted's ``CertificateOptions`` documents as
  crash-prone (its ticket 9764); a gateway that segfaults loses more than a handshake. So every connection
  makes a full handshake: measured in one process, both ends together, 0.8 ms with a P-256 certificate and
  1.1 ms with RSA-2048. (TLS 1.3 clients are still sent tickets, which pyOpenSSL cannot turn off; without
  a session cache they resume nothing.)

Outbound (``client_options``, ``verified_client_options``): the same code, with one wider profile,
``opportunistic``, for STARTTLS to mail servers that neither require TLS nor are verified: there the
alternative to a weak suite is plaintext (RFC 7435; Postfix's ``smtp_tls_security_level = may`` takes any
suite for the same reason), so CBC and static-RSA suites are accepted after the strong ones. TLS that is
required (``useTls``) or verified (``verifyCertificates``), and TLS to the proxy's backends, use
``intermediate``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import TLSVersion
from zope.interface import implementer

from dcrouter.log import logger

if TYPE_CHECKING:
    # certstore builds its contexts with this module's policy, so it is imported where used, not at the top.
    from twisted.internet._sslverify import IOpenSSLTrustRoot

    from dcrouter.net.certstore import CertifiedKey

log = logger(__name__)

#: Minimum versions a configuration may name (``minVersion``, ``tlsMinVersion``), lowest first.
TLS_VERSIONS = {"TLSv1.2": TLSVersion.TLSv1_2, "TLSv1.3": TLSVersion.TLSv1_3}

#: The profiles a listener or a proxy route may name (``tlsProfile``).
PROFILES = ("modern", "intermediate")

#: TLS 1.2 suites of ``intermediate``: Mozilla's intermediate list (guidelines 5.7) without its DHE suites.
INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
)

#: TLS 1.2 suites of the client-only ``opportunistic`` profile: the strong ones first, then what Mozilla's
#: "old" profile adds, less 3DES (Sweet32). Better than plaintext, which is the alternative.
OPPORTUNISTIC_CIPHERS = (
    *INTERMEDIATE_CIPHERS,
    "ECDHE-ECDSA-AES128-SHA256",
    "ECDHE-RSA-AES128-SHA256",
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA384",
    "ECDHE-RSA-AES256-SHA384",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES256-SHA",
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-SHA256",
    "AES256-SHA256",
    "AES128-SHA",
    "AES256-SHA",
)

_MINIMUM = {"modern": "TLSv1.3", "intermediate": "TLSv1.2", "opportunistic": "TLSv1.2"}
_CIPHERS = {
    "modern": INTERMEDIATE_CIPHERS,  # never used: TLS 1.2 is not accepted
    "intermediate": INTERMEDIATE_CIPHERS,
    "opportunistic": OPPORTUNISTIC_CIPHERS,
}

#: Set on every context and connection of the policy, on top of what Twisted's CertificateOptions sets
#: (no compression, no tickets, no session cache, server preference, single-use ECDH keys).
_EXTRA_OPTIONS = SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET


@dataclass(frozen=True)
class TlsPolicy:
    """What a TLS endpoint accepts: a profile (``modern``, ``intermediate``, or for clients only
    ``opportunistic``), a minimum version that can only raise the profile's, and ``ciphers``, an OpenSSL
    cipher string replacing the profile's TLS 1.2 suites. Raises ValueError for an unknown profile or
    version, or for ``ciphers`` where TLS 1.2 is not accepted at all (it would have no effect)."""

    profile: str = "intermediate"
    min_version: str = "TLSv1.2"
    ciphers: str | None = None

    def __post_init__(self) -> None:
        if self.profile not in _MINIMUM:
            raise ValueError(f"TLS profile {self.profile!r}: expected one of {', '.join(PROFILES)}")
        if self.min_version not in TLS_VERSIONS:
            raise ValueError(
                f"minimum TLS version {self.min_version!r}: expected one of {', '.join(TLS_VERSIONS)}"
            )
        if self.ciphers and self.minimum_version == "TLSv1.3":
            raise ValueError(
                f"ciphers {self.ciphers!r}: no effect, only TLS 1.3 is accepted (its suites are OpenSSL's)"
            )

    @property
    def minimum_version(self) -> str:
        """The lowest version accepted: the profile's or ``min_version``, whichever is higher."""
        order = list(TLS_VERSIONS)
        return max(_MINIMUM[self.profile], self.min_version, key=order.index)

    @property
    def tls12_ciphers(self) -> str:
        """The OpenSSL cipher string for TLS 1.2 (unused when only TLS 1.3 is accepted)."""
        return self.ciphers or ":".join(_CIPHERS[self.profile])


#: The default policy of listeners and of required or verified outbound TLS.
INTERMEDIATE = TlsPolicy()


def certificate_options(
    key: CertifiedKey | None,
    *,
    policy: TlsPolicy = INTERMEDIATE,
    alpn: Iterable[bytes] = (),
    context_for_server_name: Callable[[bytes | None], SSL.Context | None] | None = None,
) -> ssl.CertificateOptions:
    """Twisted's TLS options (a server creator, and an unverified client creator that sends no SNI) for
    ``key`` under ``policy``; without a certificate when ``key`` is None (a base context that switches by
    SNI, or a client).

    The context is made here, once, and every connection of the returned options uses it (Twisted caches it
    in ``getContext``), so what this adds to Twisted's settings holds for each of them. Raises ValueError for
    a ``ciphers`` string OpenSSL knows no cipher in.
    """
    extra: dict[str, object] = {}
    if key is not None:
        extra["privateKey"] = crypto.PKey.from_cryptography_key(key.private_key)  # type: ignore[arg-type]
        extra["certificate"] = crypto.X509.from_cryptography(key.certificate)
        extra["extraCertChain"] = [crypto.X509.from_cryptography(c) for c in key.chain]
    protocols = list(alpn)
    try:
        options = ssl.CertificateOptions(
            contextForServerName=context_for_server_name,
            acceptableProtocols=protocols or None,
            **_twisted_settings(policy),
            **extra,  # type: ignore[arg-type]
        )
    except ValueError as error:
        # Twisted's message for an empty cipher selection is generic; say which setting caused it.
        raise ValueError(f"ciphers {policy.ciphers!r}: {error}" if policy.ciphers else str(error)) from None
    options.getContext().set_options(_EXTRA_OPTIONS)
    return options


def client_options(policy: TlsPolicy) -> ssl.CertificateOptions:
    """An outbound TLS creator under ``policy`` that does not verify the server (and sends no SNI): for
    opportunistic STARTTLS. One object serves any number of connections."""
    return certificate_options(None, policy=policy)


def verified_client_options(
    policy: TlsPolicy, hostname: str, trust_root: IOpenSSLTrustRoot
) -> IOpenSSLClientConnectionCreator:
    """An outbound TLS creator under ``policy`` that sends ``hostname`` by SNI and verifies the server's
    certificate against ``trust_root`` and ``hostname`` (Twisted's ``optionsForClientTLS``)."""
    creator = ssl.optionsForClientTLS(
        hostname, trustRoot=trust_root, extraCertificateOptions=_twisted_settings(policy)
    )
    return _WithPolicyOptions(creator)


def _twisted_settings(policy: TlsPolicy) -> dict[str, Any]:
    return {
        "raiseMinimumTo": TLS_VERSIONS[policy.minimum_version],
        "acceptableCiphers": ssl.AcceptableCiphers.fromOpenSSLCipherString(policy.tls12_ciphers),
        "enableSessions": False,
        "enableSessionTickets": False,
    }


@implementer(IOpenSSLClientConnectionCreator)
class _WithPolicyOptions:
    """A client creator whose context this module did not make (``optionsForClientTLS`` keeps it): the
    policy's extra options are set on each connection instead, before its handshake."""

    def __init__(self, creator: IOpenSSLClientConnectionCreator) -> None:
        self._creator = creator

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._creator.clientConnectionForTLS(tlsProtocol)
        connection.set_options(_EXTRA_OPTIONS)
        return connection
