"""Envelope address patterns (``*@domain``, ``local@domain``, ``*@*.domain``, ``<>``), as routing rules and
other configuration name senders and recipients."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dcrouter.net.domains import DomainMatcher, is_valid_domain_pattern, normalize_domain

NULL_SENDER = "<>"


@dataclass(frozen=True)
class AddressPattern:
    """One parsed routing pattern. ``null`` is the ``<>`` pattern; otherwise ``local`` is None for ``*`` and
    ``domain`` is an exact domain or a ``*.`` wildcard, normalised."""

    null: bool = False
    local: str | None = None
    domain: str = ""


def parse_address_pattern(text: str, *, allow_null: bool = True) -> AddressPattern:
    """Parse ``*@domain``, ``local@domain``, ``*@*.domain`` or (when ``allow_null``) ``<>``.

    Raises ValueError with the reason for anything else. The local part is kept as written (compared
    case-sensitively); the domain is normalised (case, IDNA, trailing dot).
    """
    if text == NULL_SENDER:
        if not allow_null:
            raise ValueError("'<>' (the null sender) never is a recipient")
        return AddressPattern(null=True)
    local, at, domain = text.rpartition("@")
    if not at or not local:
        raise ValueError(f"{text!r}: expected 'local@domain', '*@domain' or '*@*.domain'")
    if local != "*" and "*" in local:
        raise ValueError(f"{text!r}: '*' is only allowed as the whole local part")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in local):
        raise ValueError(f"{text!r}: control characters in the local part")
    quoted = len(local) > 1 and local.startswith('"') and local.endswith('"')
    if " " in local and not quoted:
        # Envelope addresses keep such local parts minimally quoted ('"a b"@x'), so the pattern must too.
        raise ValueError(f"{text!r}: a local part with spaces must be quoted, as in '\"a b\"@example.com'")
    if domain == "*":
        raise ValueError(f"{text!r}: a bare '*' domain matches everything; leave the list empty instead")
    if not is_valid_domain_pattern(domain):
        raise ValueError(f"{text!r}: {domain!r} is not a domain name or '*.' wildcard")
    wildcard = domain.startswith("*.")
    name = normalize_domain(domain[2:] if wildcard else domain)
    return AddressPattern(local=None if local == "*" else local, domain=("*." if wildcard else "") + name)


class AddressPatterns:
    """A set of :class:`AddressPattern`; ``matches(address)`` is True when any pattern matches.

    ``address`` is an envelope address as the queue stores it: ``local@domain``, ``""`` for the null sender.
    An empty set matches nothing (callers treat an empty config list as "any" themselves).
    """

    def __init__(self, patterns: Iterable[str], *, allow_null: bool = True) -> None:
        """Raises ValueError naming the first invalid pattern."""
        parsed = [parse_address_pattern(p, allow_null=allow_null) for p in patterns]
        self._null = any(p.null for p in parsed)
        # One matcher for '*' local parts and one per literal local part: DomainMatcher answers with the
        # single best pattern, so patterns with different local parts must not compete inside one matcher.
        self._any_local = DomainMatcher((p.domain, True) for p in parsed if not p.null and p.local is None)
        by_local: dict[str, list[str]] = {}
        for p in parsed:
            if p.local is not None:
                by_local.setdefault(p.local, []).append(p.domain)
        self._by_local = {local: DomainMatcher((d, True) for d in ds) for local, ds in by_local.items()}

    def matches(self, address: str) -> bool:
        if not address:
            return self._null
        local, at, domain = address.rpartition("@")
        if not at:
            return False
        if self._any_local.match(domain):
            return True
        matcher = self._by_local.get(local)
        return matcher is not None and bool(matcher.match(domain))
