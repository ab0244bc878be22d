"""Value checks: one key's converted value at a time.

A value check returns ``None`` when the value is fine, an error message, or an
:class:`~dcrouter.config.schema.Advice` (a warning message); the loader prefixes either with the key path.
Schemas name them in ``option(check=..., each=...)`` (:func:`dcrouter.config.schema.option`): ``check`` on the
whole value, ``each`` on every item of a list. Plugins use them too (docs/plugins.md). The parsers they
rely on are the ones the router runs with (:mod:`dcrouter.mail`, :mod:`dcrouter.net`), so a value that
passes here parses there.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any

from dcrouter.config.schema import Advice, ValueCheck
from dcrouter.mail.address import AddressError, parse_mail_argument
from dcrouter.mail.dkimkeys import DkimError, load_private_key, read_private_key
from dcrouter.mail.patterns import parse_address_pattern
from dcrouter.net.domains import is_valid_domain_pattern
from dcrouter.net.hostport import split_dns_server

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


def _is_host_name(value: str) -> bool:
    # RFC 1123 host names; a trailing dot (absolute name) is tolerated, an all-numeric last label is not
    # (it would be an IPv4 address written wrongly).
    name = value[:-1] if value.endswith(".") else value
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    return all(_LABEL.match(label) for label in labels) and not labels[-1].isdigit()


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def port(value: int) -> str | None:
    if not 1 <= value <= 65535:
        return f"not a port number (1-65535): {value}"
    return None


def at_least(minimum: int) -> ValueCheck:
    """A check that an integer is at least ``minimum``."""

    def check(value: int) -> str | None:
        if value < minimum:
            return f"must be at least {minimum}: {value}"
        return None

    return check


positive = at_least(1)
non_negative = at_least(0)


def duration(value: int) -> str | None:
    """A positive number of milliseconds; a small one is probably seconds written by mistake."""
    if value < 1:
        return f"must be a positive number of milliseconds: {value}"
    if value < 1000:
        return Advice(f"{value} ms is less than a second; durations are in milliseconds")
    return None


def host_name(value: str) -> str | None:
    if not _is_host_name(value):
        return f"not a valid host name: {value!r}"
    return None


def host_or_ip(value: str) -> str | None:
    if not (_is_ip(value) or _is_host_name(value)):
        return f"not a host name or IP address: {value!r}"
    return None


def ip_address(value: str) -> str | None:
    if not _is_ip(value):
        return f"not an IP address: {value!r}"
    return None


def domain_pattern(value: str) -> str | None:
    """An exact domain or a ``*.`` wildcard, as the SMTP and proxy domain matchers accept them."""
    if not is_valid_domain_pattern(value):
        return f"not a domain name or '*.' wildcard: {value!r}"
    return None


def cidr(value: str) -> str | None:
    """An IPv4/IPv6 network; a bare address is a /32 or /128. Host bits set are refused: ``10.1.2.3/8``
    would silently widen to all of 10/8, which for a relay permission is the dangerous direction."""
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError:
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"not an IP network in CIDR notation: {value!r}"
        return f"host bits set in {value!r}; did you mean {str(network)!r}?"
    return None


def dns_server(value: str) -> str | None:
    """A resolver address for MX lookups: ``IP``, ``IPv4:port`` or ``[IPv6]:port``."""
    try:
        split_dns_server(value)
    except ValueError as exc:
        return str(exc)
    return None


def _address_pattern(value: str, allow_null: bool) -> str | None:
    try:
        parse_address_pattern(value, allow_null=allow_null)
    except ValueError as exc:
        return str(exc)
    return None


def sender_pattern(value: str) -> str | None:
    """A routing rule's sender pattern: ``*@domain``, ``local@domain``, ``*@*.domain`` or ``<>``."""
    return _address_pattern(value, allow_null=True)


def recipient_pattern(value: str) -> str | None:
    """A routing rule's recipient pattern: as for senders, without ``<>``."""
    return _address_pattern(value, allow_null=False)


def mailbox_or_empty(value: str) -> str | None:
    """An envelope address (``local@domain``), or empty for the null sender."""
    if value == "":
        return None
    try:
        address, _ = parse_mail_argument(f"FROM:<{value}>", utf8=True)
    except AddressError:
        return f"not an address: {value!r}"
    if not address.domain or address.is_literal:
        return f"not an address at a domain: {value!r}"
    return None


def one_line(value: str) -> str | None:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return f"must not contain CR, LF or other control characters: {value!r}"
    return None


def file_path(value: str) -> str | None:
    """A name the operating system can take for a file or directory: not empty, no NUL character and nothing
    the file system encoding cannot write (a lone surrogate, which a JSON ``\\ud800`` escape makes). Such a
    value makes ``open()`` raise ValueError rather than OSError, so it must be refused here, by key path."""
    if not value:
        return "must not be empty"
    if "\x00" in value:
        return f"must not contain a NUL character: {value!r}"
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        return f"cannot be written as a file name (invalid Unicode): {value!r}"
    return None


def ca_certificates_file(value: str) -> str | None:
    """A readable PEM file holding at least one certificate that parses (a CA bundle to verify a peer
    against): refused at load rather than found wanting at the first connection."""
    from cryptography import x509

    problem = file_path(value)
    if problem:
        return problem
    try:
        with open(value, "rb") as handle:
            found = x509.load_pem_x509_certificates(handle.read())
    except OSError as error:
        return f"cannot read {value!r}: {error.strerror}"
    except ValueError:
        return f"no PEM certificate in {value!r}"
    return None if found else f"no PEM certificate in {value!r}"


def not_empty(value: Any) -> str | None:
    if len(value) == 0:
        return "must not be empty"
    return None


def unique(value: list[Any]) -> str | None:
    seen: set[Any] = set()
    for item in value:
        norm = item.lower() if isinstance(item, str) else item
        if norm in seen:
            return f"{item!r} is listed twice"
        seen.add(norm)
    return None


def all_of(*checks: ValueCheck) -> ValueCheck:
    """A check running ``checks`` in order and returning the first finding."""

    def check(value: Any) -> str | None:
        for one in checks:
            found = one(value)
            if found is not None:
                return found
        return None

    return check


def dkim_private_key(value: str) -> str | None:
    """A usable DKIM private key: inline PEM or a readable file holding one (RSA of 2048+ bits or Ed25519)."""
    try:
        load_private_key(read_private_key(value))
    except (DkimError, OSError, ValueError) as e:
        return str(e)
    return None
