"""Which consumer of the shared Redis queue this process is: a name that survives restarts, held by at most
one live process at a time, so that a restarted process may take back the claims of its previous run at
once.

A process takes the first free *slot* ``n`` of its host, ``<body_directory>/consumers/<hostname>.<n>.lock``,
by holding an exclusive ``flock`` on that file for as long as it runs; its consumer name is
``<hostname>/<n>``, the owner written on its leases. The kernel drops the lock when the process ends,
``kill -9`` included, so:

- while a process runs, no other process can take its name (claims under a live name are never touched);
- a name whose lock is free belongs to no live process: its claims are abandoned, and whoever takes the name
  may return them to ready without waiting for their leases to expire;
- one process per host restarts as slot 0 again; with several, a restarted process takes the lowest free
  slot, which is the one a dead process left (with two dead at once, one of their names, either way a name
  no live process holds).

The host name keeps hosts apart even where ``body_directory`` is not one shared file system; where it is
(as big bodies require), the lock is shared too. Hosts sharing one Redis must therefore have different host
names unless their ``body_directory`` is one file system with working locks (NFS with ``nolock`` is not).
The lock files must not be deleted while dcrouter runs: a new file of the same name would lock again.

Everything here blocks; the queue runs it in a thread.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re

from dcrouter.interfaces import QueueUnavailable

#: More slots than this on one host means something else is wrong (a leak of lock files' descriptors).
MAX_SLOTS = 1024

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclasses.dataclass
class ConsumerSlot:
    """A held slot: :attr:`name` is the consumer name, held until :meth:`release` (or the process ends)."""

    name: str
    path: str
    fd: int

    def release(self) -> None:
        """Drop the lock (idempotent): another process may take the name from now on."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def consumers_path(body_directory: str) -> str:
    return os.path.join(body_directory, "consumers")


def take_slot(body_directory: str, hostname: str) -> ConsumerSlot:
    """Lock the lowest free slot of ``hostname`` under ``body_directory``; QueueUnavailable when none is free
    among :data:`MAX_SLOTS`."""
    directory = consumers_path(body_directory)
    os.makedirs(directory, exist_ok=True)
    host = _UNSAFE.sub("_", hostname) or "host"
    for n in range(MAX_SLOTS):
        path = os.path.join(directory, f"{host}.{n}.lock")
        # Read-only is enough for flock, and works on a file another user created.
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        return ConsumerSlot(f"{hostname}/{n}", path, fd)
    raise QueueUnavailable(
        f"Redis queue: all {MAX_SLOTS} consumer slots of {hostname} in {directory} are held"
    )
