"""Recipient files (``recipientsFile``): read at start and again whenever they change, off the reactor thread.
What an entry means is :mod:`dcrouter.mail.recipients`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from dcrouter.log import logger
from dcrouter.mail.address import Address
from dcrouter.mail.recipients import RecipientTable, read_recipients_file

log = logger(__name__)

#: Seconds between two looks (a ``stat``) at whether a recipients file changed.
FILE_CHECK_INTERVAL = 1.0

#: Runs a blocking function in a thread; the router passes ``deferToThreadPool`` bound to its pool.
DeferToThread = Callable[[Callable[[], Any]], "Deferred[Any]"]


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
