"""LDAP URLs (RFC 4516) as ``smtpConfig.auth.ldapUrl`` takes them: ``ldap://host[:port]/base-dn`` or
``ldaps://host[:port]/base-dn``. Attributes, scope, filter and extensions are not taken: dcrouter's search
is configured with its own keys."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

DEFAULT_PORTS = {"ldap": 389, "ldaps": 636}


class LdapUrlError(ValueError):
    """The URL is not one dcrouter can use; the message says why."""


@dataclass(frozen=True)
class LdapUrl:
    scheme: str
    host: str
    port: int
    base_dn: str

    @property
    def tls(self) -> bool:
        """TLS from the first byte (``ldaps://``)."""
        return self.scheme == "ldaps"

    @property
    def loopback(self) -> bool:
        """The directory is on this host (an address in 127.0.0.0/8 or ::1, or ``localhost``)."""
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_ldap_url(text: str) -> LdapUrl:
    """Parse ``text``; raises :class:`LdapUrlError` for anything but ``ldap[s]://host[:port]/base-dn``."""
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise LdapUrlError(f"expected ldap:// or ldaps://, got {text!r}")
    if parts.query or parts.fragment or "?" in text:
        raise LdapUrlError(
            "attributes, scope, filter and extensions are not taken in the URL (use auth.ldap)"
        )
    if parts.username is not None or parts.password is not None:
        raise LdapUrlError("credentials do not belong in the URL (use auth.ldap.bindDn and bindPassword)")
    host = parts.hostname
    if not host:
        raise LdapUrlError(f"no host in {text!r}")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as e:
        raise LdapUrlError(f"bad port in {text!r}: {e}") from None
    base_dn = unquote(parts.path.lstrip("/"))
    if not base_dn:
        raise LdapUrlError(
            "no base DN: the URL's path names where users are searched (ldap://host/ou=people,...)"
        )
    return LdapUrl(scheme, host, port, base_dn)
