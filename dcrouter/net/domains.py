"""Domain names: normalisation to one comparable form, and matching against exact and ``*.`` wildcard
patterns.

Shared by SMTP (which recipient domains are ours) and the TCP/SNI proxy (which backend serves a host name), so
nothing here knows about either.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Generic, TypeVar

import idna

T = TypeVar("T")

# RFC 1035 / RFC 5321 §4.1.2 "sub-domain": letters, digits and inner hyphens; 1 to 63 octets.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_MAX_NAME = 253  # octets in text form without the trailing dot (255 on the wire)


# A pure function asked several times per message and per proxied connection (recipient domains, routes, SNI)
# for few distinct names; a name that raises is not kept.
@functools.lru_cache(maxsize=4096)
def normalize_domain(name: str) -> str:
    """The comparable form of a host or domain name: lower-case ASCII, IDNA A-labels, no trailing dot.

    ``"Bücher.Example."`` becomes ``"xn--bcher-kva.example"``. Only letter-digit-hyphen labels of 1 to 63
    octets and names up to 253 octets are accepted; an ``xn--`` label must be a valid A-label. Raises
    ValueError, with the reason, for anything else (empty names, ``*``, underscores, address literals,
    spaces, ...).
    """
    text = name[:-1] if name.endswith(".") else name
    if not text:
        raise ValueError(f"{name!r}: empty domain name")
    if text.isascii():
        text = text.lower()
    else:
        try:
            # UTS 46 maps case, full-width dots and the like the way browsers and resolvers do.
            text = idna.encode(text, uts46=True).decode("ascii")
        except UnicodeError as exc:  # idna.IDNAError is one
            raise ValueError(f"{name!r}: invalid internationalised domain name ({exc})") from None
    if len(text) > _MAX_NAME:
        raise ValueError(f"{name!r}: domain name longer than {_MAX_NAME} octets")
    for label in text.split("."):
        if not _LABEL.match(label):
            raise ValueError(f"{name!r}: invalid label {label!r}")
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except UnicodeError as exc:
                raise ValueError(f"{name!r}: invalid A-label {label!r} ({exc})") from None
    return text


def is_valid_domain_pattern(pattern: str) -> bool:
    """True for a domain name (``example.com``) or a wildcard over its sub-domains (``*.example.com``).

    A bare ``*``, a ``*`` anywhere but as the whole first label, and invalid names are False.
    """
    try:
        _split_pattern(pattern)
    except ValueError:
        return False
    return True


def _split_pattern(pattern: str) -> tuple[bool, str]:
    """(is_wildcard, normalised name) of a pattern; ValueError naming it when it is not one."""
    wildcard = pattern.startswith("*.")
    name = pattern[2:] if wildcard else pattern
    if "*" in name:
        raise ValueError(f"{pattern!r}: '*' is only allowed as the whole first label ('*.example.com')")
    try:
        return wildcard, normalize_domain(name)
    except ValueError as exc:
        raise ValueError(f"{pattern!r}: not a domain pattern: {exc}") from None


class DomainMatcher(Generic[T]):
    """Maps domain patterns to values; a lookup costs one dict probe per label of the name asked about.

    ``match(name)`` tries the exact names first, then wildcards from the most specific: with ``*.example.com``
    and ``*.b.example.com``, ``a.b.example.com`` gets the second. ``*.example.com`` matches ``a.example.com``
    and ``a.b.example.com`` but not ``example.com`` itself. When one pattern is given twice, the first wins
    (as the first matching entry of a config list would). Patterns and names are compared normalised
    (case, trailing dot, IDNA), so ``Bücher.example`` and ``xn--bcher-kva.example`` are the same name.
    """

    def __init__(self, patterns: Iterable[tuple[str, T]]) -> None:
        """Raises ValueError naming the first invalid pattern."""
        self._exact: dict[str, T] = {}
        self._wildcard: dict[str, T] = {}
        for pattern, value in patterns:
            wildcard, name = _split_pattern(pattern)
            table = self._wildcard if wildcard else self._exact
            table.setdefault(name, value)

    def __len__(self) -> int:
        return len(self._exact) + len(self._wildcard)

    def match(self, name: str) -> T | None:
        """The value of the best pattern for ``name``, or None when none matches or ``name`` is not a valid
        domain name."""
        try:
            key = normalize_domain(name)
        except ValueError:
            return None
        found = self._exact.get(key)
        if found is not None or key in self._exact:
            return found
        dot = key.find(".")
        while dot != -1:
            key = key[dot + 1 :]
            found = self._wildcard.get(key)
            if found is not None or key in self._wildcard:
                return found
            dot = key.find(".")
        return None
