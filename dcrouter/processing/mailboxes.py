"""Mailboxes of the From, To and Cc fields, parsed strictly: an address is kept only when two parsers agree.

``email.headerregistry`` is cross-checked against ``email.utils`` (the checks of CVE-2023-27043's fix done
here because Python 3.11 before 3.11.10 has no ``strict=True``): an address that parses differently, or not at
all, is left out rather than guessed, and an ambiguous ``From`` is reported as such.

Internationalised addresses (RFC 6532: a UTF-8 local part, a U-label domain) are addresses like any other:
``email.headerregistry`` reports a UTF-8 local part as a defect because RFC 5322 alone does not allow it, and
that one defect is not held against the address. An address with a non-ASCII character that shows as nothing
or as white space (controls, format characters such as bidi overrides, separators such as U+00A0, unassigned
code points) is left out: two readers could show it as different addresses.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from email.errors import NonASCIILocalPartDefect
from email.headerregistry import HeaderRegistry
from email.utils import getaddresses

_REGISTRY = HeaderRegistry()
_MAX_ADDRESS_CHARS = 2048  # email.headerregistry is quadratic in places: each item parsed on its own, bounded
#: Addresses read from each of To and Cc; the rest are left out (a defect).
MAX_ADDRESSES = 1000
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f\ufffd]")  # NUL, CR, LF, ..., and bytes that were not UTF-8
#: Unicode categories that no internationalised address may hold: controls, format characters (bidi
#: overrides, zero-width), private use, surrogates, unassigned, and separators (white space other than SP).
_INVISIBLE = frozenset({"Cc", "Cf", "Co", "Cs", "Cn", "Zs", "Zl", "Zp"})
_ADDRESS_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|\((?:[^()\\]|\\.)*\)?|[<>,:;]|[^"<>,:;(]+', re.DOTALL)


def split_address_list(value: str) -> list[str]:
    """Split at the commas that separate addresses (not in quotes, comments, angle brackets or groups)."""
    items = [""]
    angle = group = False
    for token in _ADDRESS_TOKENS.findall(value):
        if token == "," and not angle and not group:
            items.append("")
            continue
        if token == "<":
            angle = True
        elif token == ">":
            angle = False
        elif token == ":" and not angle:
            group = True
        elif token == ";" and not angle:
            group = False
        items[-1] += token
    return [item.strip() for item in items if item.strip()]


def strict_mailboxes(value: str) -> list[str] | None:
    """The addr-specs of one address (or group); None if it is invalid or two parsers read it differently."""
    if len(value) > _MAX_ADDRESS_CHARS or value.count("(") > 8 or _CONTROL.search(value):
        return None
    try:
        header = _REGISTRY("to", value)
    except Exception:  # noqa: BLE001 (hostile input: a parser failure means "not a valid address")
        return None
    # A UTF-8 local part is RFC 6532's, not a defect; any other defect is.
    if any(not isinstance(defect, NonASCIILocalPartDefect) for defect in header.defects):
        return None
    found = []
    for address in getattr(header, "addresses", ()):
        if not address.username or not address.domain:
            return None
        spec = address.addr_spec
        if not spec.isascii() and any(
            not ch.isascii() and unicodedata.category(ch) in _INVISIBLE for ch in spec
        ):
            return None
        found.append(spec)
    legacy = [spec for _, spec in getaddresses([value]) if spec]
    if legacy != found:
        return None
    return found


def originators(values: list[str], defect: Callable[[str], None]) -> tuple[tuple[str, ...], bool]:
    """The addr-specs of the From fields ``values``, and whether the author is ambiguous: not exactly one From
    field with exactly one strictly parsed mailbox. ``defect`` is told of each field not parsed."""
    found: list[str] = []
    ambiguous = len(values) != 1
    for value in values:
        items = split_address_list(value)
        mailboxes = strict_mailboxes(value) if len(items) == 1 else None
        if mailboxes is None:
            ambiguous = True
            defect("From field not strictly parsable as one mailbox")
        else:
            found += mailboxes
    if len(found) != 1:
        ambiguous = True
    return tuple(found), ambiguous


def recipients(name: str, values: list[str], defect: Callable[[str], None]) -> tuple[str, ...]:
    """The addr-specs of the fields ``values`` (all named ``name``: ``to``, ``cc``), up to
    :data:`MAX_ADDRESSES`; ``defect`` is told of what was left out."""
    found: list[str] = []
    for value in values:
        for item in split_address_list(value):
            if len(found) >= MAX_ADDRESSES:
                defect(f"{name}: more than {MAX_ADDRESSES} addresses, the rest not parsed")
                return tuple(found)
            addresses = strict_mailboxes(item)
            if addresses is None:
                defect(f"{name}: an address not strictly parsable was left out")
            else:
                found += addresses
    return tuple(found)
