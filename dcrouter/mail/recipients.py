"""Recipient lists: which addresses of a ``domainConfigs`` entry exist (``verifyRecipients = "list"``, as
Postfix's ``relay_recipient_maps``).

An entry (an item of ``recipients``, or a line of ``recipientsFile``) is one of:

- ``alice@example.com``: that address;
- ``alice``: that local part at every domain of the ``domainConfigs`` entry;
- ``@example.com`` (or ``*@example.com``): every address at that domain, a catch-all;
- a local part with ``*``, matching any run of characters: ``sales-*@example.com``, ``alice+*`` (all of
  alice's sub-addresses; there is no implicit ``+`` handling), ``*``.

Decisions a caller may rely on:

- Local parts and domains compare case-insensitively (Postfix lowercases its table lookups too); domains
  are compared in their normalised form (IDNA A-labels), so ``Bücher.example`` and ``xn--bcher-kva.example``
  are one domain. A quoted local part is written as the envelope carries it, minimally quoted
  (``"john smith"@example.com``). ``*`` is always a wildcard.
- A domain in an entry must be served by the ``domainConfigs`` entry (an exact name there, or under one of
  its ``*.`` wildcards): anything else could never match and is refused as a mistake. Entries name exact
  domains, not wildcards; write the local part alone to cover every domain of the entry.
- A file is UTF-8, one entry per line; blank lines and lines starting with ``#`` are ignored, and anything
  after the first blank on a line is ignored, so the source of a Postfix table (``alice@example.com OK``)
  works as it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from dcrouter.mail.address import Address
from dcrouter.net.domains import DomainMatcher, normalize_domain


def _parse_entry(text: str, domains: DomainMatcher[bool]) -> tuple[str, str | None]:
    """``(local pattern, domain or None)``, lower-cased; ValueError with the reason."""
    if not text:
        raise ValueError("empty entry")
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise ValueError(f"{text!r}: control characters")
    local, at, domain = text.rpartition("@")
    if not at:
        local, domain = text, ""
    quoted = len(local) > 1 and local.startswith('"') and local.endswith('"')
    if " " in local and not quoted:
        raise ValueError(f"{text!r}: a local part with spaces must be quoted, as in '\"a b\"@example.com'")
    if not at:
        return local.lower(), None
    if domain.startswith("*."):
        raise ValueError(f"{text!r}: name an exact domain, or give the local part alone for every domain")
    try:
        name = normalize_domain(domain)
    except ValueError:
        raise ValueError(f"{text!r}: {domain!r} is not a domain name") from None
    if domains.match(name) is None:
        raise ValueError(f"{text!r}: {name} is not one of this entry's domains")
    return (local or "*").lower(), name


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(
        "".join(".*" if part == "*" else re.escape(part) for part in re.split(r"(\*)", pattern))
    )


class RecipientTable:
    """The recipients of one ``domainConfigs`` entry; ``knows(address)`` answers whether one is listed.

    Exact addresses and local parts cost a set lookup whatever the table's size; wildcard entries are tried
    one after the other (tables hold few of them)."""

    def __init__(self, entries: Iterable[str], domains: Sequence[str]) -> None:
        """``domains``: the entry's ``domains`` patterns. Raises ValueError naming the first bad entry."""
        served: DomainMatcher[bool] = DomainMatcher((pattern, True) for pattern in domains)
        self._addresses: set[tuple[str, str]] = set()
        self._locals: set[str] = set()
        self._domains: set[str] = set()
        self._globs: list[tuple[re.Pattern[str], str | None]] = []
        self._size = 0
        for entry in entries:
            local, domain = _parse_entry(entry, served)
            self._size += 1
            if local == "*" and domain is not None:
                self._domains.add(domain)
            elif "*" in local:
                self._globs.append((_glob(local), domain))
            elif domain is None:
                self._locals.add(local)
            else:
                self._addresses.add((local, domain))

    def __len__(self) -> int:
        return self._size

    def knows(self, address: Address) -> bool:
        """True when ``address`` (a recipient at one of the entry's domains) is listed."""
        local, domain = address.local.lower(), address.domain
        if (local, domain) in self._addresses or local in self._locals or domain in self._domains:
            return True
        return any(pattern.fullmatch(local) and (d is None or d == domain) for pattern, d in self._globs)


def parse_recipients_file(data: bytes, path: str, domains: Sequence[str]) -> RecipientTable:
    """The table a recipients file describes (see the module docstring). Raises ValueError naming
    ``path:line`` of the first bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8: {error}") from None
    entries: list[str] = []
    numbers: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split(None, 1)
        if not fields or fields[0].startswith("#"):
            continue
        entries.append(fields[0])
        numbers.append(number)
    try:
        return RecipientTable(entries, domains)
    except ValueError as error:
        # Find the line again: the table stops at the first bad entry.
        for entry, number in zip(entries, numbers, strict=True):
            try:
                RecipientTable([entry], domains)
            except ValueError:
                raise ValueError(f"{path}:{number}: {error}") from None
        raise


def read_recipients_file(path: str, domains: Sequence[str]) -> RecipientTable:
    """Read and parse ``path`` (blocking). Raises OSError or ValueError."""
    with open(path, "rb") as handle:
        return parse_recipients_file(handle.read(), path, domains)
