"""Retention of ``orphans/``: body files the durable queues set aside at start-up because no queue entry names
them (``persistentPath/orphans/``, for the disk and the Redis queue alike).

An orphan is the body of a message that was never acknowledged (a crash between storing its body and
committing its entry: the client got no ``250`` and sends it again) or that was already removed (a crash
between removing its entry and unlinking its body). Neither is anyone's mail any more; they are kept only
so that an operator can look at them after a crash. Without a limit they accumulate crash after crash.

- :func:`set_aside` moves a file in and stamps it with the time it was set aside (its modification time), so
  retention counts from then, not from when the message arrived.
- :class:`OrphanSweeper` removes, every :data:`SWEEP_INTERVAL` seconds on the queue's clock (the first time
  when the queue opens), the files of ``orphans/`` set aside more than ``retention`` seconds ago. The work
  runs in a thread; a failure is logged and the next sweep tries again. ``retention`` 0 keeps them forever.

Several processes sharing one directory (the Redis queue) may sweep at once: a file another one removed
first is not an error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from dcrouter.log import logger
from dcrouter.queue.files import unique_path

log = logger(__name__)

#: Seconds between sweeps: retention is counted in days, an hour late is of no consequence.
SWEEP_INTERVAL = 3600.0


def set_aside(path: str, orphans: str) -> str:
    """Move the file ``path`` into the directory ``orphans`` (never over another file: ``name.N``), marked
    with the current time; returns its new path. The caller fsyncs ``orphans``."""
    target = unique_path(orphans, os.path.basename(path))
    os.rename(path, target)
    os.utime(target)
    return target


def remove_older(orphans: str, cutoff: float) -> int:
    """Unlink the regular files in ``orphans`` last modified before ``cutoff`` (seconds since the epoch);
    returns how many. Blocking: run it in a thread."""
    removed = 0
    try:
        entries = list(os.scandir(orphans))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            pass  # another process sharing the directory removed it first
    return removed


class OrphanSweeper:
    """Sweeps ``orphans`` of files set aside more than ``retention`` seconds ago (0: never), every
    :data:`SWEEP_INTERVAL` seconds of ``clock`` from :meth:`start` to :meth:`stop`. ``in_thread(f, *args)``
    runs blocking work off the reactor and returns a Deferred."""

    def __init__(
        self,
        orphans: str,
        retention: float,
        *,
        clock: IReactorTime,
        in_thread: Callable[..., Deferred[Any]],
    ) -> None:
        self.orphans = orphans
        self.retention = retention
        self._clock = clock
        self._in_thread = in_thread
        self._loop: LoopingCall | None = None
        self._sweeping: Deferred[Any] | None = None

    def start(self) -> None:
        if self.retention <= 0 or self._loop is not None:
            return
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = self._clock
        self._loop.start(SWEEP_INTERVAL, now=True)

    def sweep(self) -> Deferred[int]:
        """One sweep; fires with how many files it removed (0 after a failure, which is logged)."""
        cutoff = self._clock.seconds() - self.retention
        d: Deferred[int] = self._in_thread(remove_older, self.orphans, cutoff)

        def removed(count: int) -> int:
            if count:
                log.info(
                    "removed {count} orphaned body files set aside in {directory} more than {days:g} days"
                    " ago (orphanRetention)",
                    count=count,
                    directory=self.orphans,
                    days=self.retention / 86400,
                )
            return count

        def failed(failure: Any) -> int:
            log.failure(
                "sweeping {directory} failed; the next sweep tries again", failure, directory=self.orphans
            )
            return 0

        d.addCallbacks(removed, failed)
        self._sweeping = d
        d.addBoth(self._swept)
        return d

    def _swept(self, result: int) -> int:
        self._sweeping = None
        return result

    def stop(self) -> Deferred[None]:
        """No more sweeps; fires once a sweep under way (in its thread) has finished."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._sweeping is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()

        def finished(result: int) -> int:
            waiter.callback(None)
            return result

        self._sweeping.addCallback(finished)  # the sweep's own errback already turned failures into 0
        return waiter
