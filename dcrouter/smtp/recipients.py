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

import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from dcrouter.log import logger
from dcrouter.mail.address import Address
from dcrouter.net.domains import DomainMatcher, normalize_domain

log = logger("dcrouter.smtp")

#: Seconds between two looks (a ``stat``) at whether a recipients file changed.
FILE_CHECK_INTERVAL = 1.0

#: Runs a blocking function in a thread; the router passes ``deferToThreadPool`` bound to its pool.
DeferToThread = Callable[[Callable[[], Any]], "Deferred[Any]"]


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


def _signature(path: str) -> tuple[int, int, int, int]:
    """What tells one version of a file from the next: a rewrite changes the time or size, a replacement by
    rename (how careful tools write) the inode."""
    status = os.stat(path)
    return status.st_mtime_ns, status.st_size, status.st_ino, status.st_dev


class RecipientsFile:
    """A ``recipientsFile``: read at start, and again whenever it changes.

    - At most once per :data:`FILE_CHECK_INTERVAL` seconds on the clock, a lookup has the file ``stat``-ed in
      a thread; when it changed, the new version is read and parsed in that thread too, and replaces the
      table in one step. Lookups meanwhile wait for that one check; between checks a lookup is a set lookup
      on the reactor, with no Deferred.
    - A version that cannot be read or parsed is not used: the last good table stays, and the error is
      logged once for that version.
    """

    def __init__(
        self,
        path: str,
        domains: Sequence[str],
        *,
        clock: IReactorTime,
        defer_to_thread: DeferToThread,
    ) -> None:
        """Reads the file now (blocking: this runs at start-up). Raises OSError or ValueError when it cannot
        be read or parsed."""
        self.path = path
        self._domains = list(domains)
        self._clock = clock
        self._defer_to_thread = defer_to_thread
        self._signature: object = _signature(path)
        self.table = read_recipients_file(path, self._domains)
        self._next_check = clock.seconds() + FILE_CHECK_INTERVAL
        self._checking: Deferred[None] | None = None
        self._waiting: list[Deferred[None]] = []
        self._failed: object = None

    def knows(self, address: Address) -> bool | Deferred[bool]:
        """Whether ``address`` is listed: at once between checks, else once the file has been checked."""
        if self._clock.seconds() < self._next_check:
            return self.table.knows(address)
        waiter: Deferred[None] = Deferred()
        self._waiting.append(waiter)
        if self._checking is None:
            self._checking = self._defer_to_thread(self._reload_if_changed)
            self._checking.addCallbacks(self._checked, self._check_failed)
        return waiter.addCallback(lambda _: self.table.knows(address))

    def _reload_if_changed(self) -> tuple[object, RecipientTable | None]:
        """In a thread: ``(signature, new table or None when unchanged)``. Raises :class:`_VersionError`."""
        try:
            signature: object = _signature(self.path)
        except OSError as error:
            # A missing file is a state of its own, reported once like a broken version.
            raise _VersionError(("stat", error.errno), error) from error
        if signature == self._signature:
            return signature, None
        try:
            return signature, read_recipients_file(self.path, self._domains)
        except (OSError, ValueError) as error:
            raise _VersionError(signature, error) from error

    def _checked(self, result: tuple[object, RecipientTable | None]) -> None:
        signature, table = result
        self._failed = None
        if table is not None:
            self.table = table
            self._signature = signature
            log.info("recipients file {path} reloaded: {count} entries", path=self.path, count=len(table))
        self._done()

    def _check_failed(self, failure: Failure) -> None:
        error = failure.value
        if not isinstance(error, _VersionError):
            log.failure("recipients file {path} could not be checked", failure, path=self.path)
        elif error.signature != self._failed:
            self._failed = error.signature
            log.error(
                "recipients file {path} not reloaded, the previous version stays in use: {reason}",
                path=self.path,
                reason=str(error.error),
            )
        self._done()

    def _done(self) -> None:
        self._checking = None
        self._next_check = self._clock.seconds() + FILE_CHECK_INTERVAL
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)


class _VersionError(Exception):
    """A version of the file (``signature``) that could not be used, and why."""

    def __init__(self, signature: object, error: Exception) -> None:
        super().__init__(str(error))
        self.signature = signature
        self.error = error
