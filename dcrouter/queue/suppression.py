"""The suppression list (:class:`~dcrouter.interfaces.ISuppressionList`) of each queue backend, kept where the
queue keeps its state:

- memory: a dict in the process (lost at exit, like the queue);
- disk: a table in ``suppression.sqlite`` beside the queue index, read and written on a thread of its own
  (never the reactor's);
- Redis: one key per address under the queue's prefix (``suppressed:<address>``), expiring by itself
  (``SET ... PX``), so every router sharing the Redis shares the list.

Expiry is by the injected clock: an entry whose ``expires_at`` has passed is never answered, and is deleted
when next touched (memory, disk) or by Redis itself.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from dcrouter.interfaces import ISuppressionList, QueueUnavailable, Suppression
from dcrouter.net.reactor import IRouterReactor

#: Longest address kept (RFC 5321's path limit).
MAX_ADDRESS = 256
#: What an address key may not hold: white space (``str.isspace``, which is re's ``\s`` for str) and controls.
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f]")


def normalize(address: str) -> str:
    """The key of ``address``: lower-cased, without angle brackets. ValueError for one that cannot be an
    envelope address."""
    key = address.strip().removeprefix("<").removesuffix(">").lower()
    if not key or len(key) > MAX_ADDRESS or _SPACE_OR_CONTROL.search(key) or "@" not in key:
        raise ValueError(f"not an address: {address!r}")
    return key


def _sorted(entries: list[Suppression], limit: int) -> list[Suppression]:
    return sorted(entries, key=lambda e: (e.expires_at, e.address))[:limit]


@implementer(ISuppressionList)
class MemorySuppressionList:
    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._entries: dict[str, Suppression] = {}

    def add(self, address: str, reason: str, ttl: float) -> Deferred[Suppression]:
        now = self._clock.seconds()
        entry = Suppression(normalize(address), reason, now, now + ttl)
        self._entries[entry.address] = entry
        return succeed(entry)

    def get(self, address: str) -> Deferred[Suppression | None]:
        key = normalize(address)
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at <= self._clock.seconds():
            del self._entries[key]
            entry = None
        return succeed(entry)

    def remove(self, address: str) -> Deferred[bool]:
        entry = self._entries.pop(normalize(address), None)
        return succeed(entry is not None and entry.expires_at > self._clock.seconds())

    def entries(self, limit: int) -> Deferred[list[Suppression]]:
        now = self._clock.seconds()
        for key in [k for k, e in self._entries.items() if e.expires_at <= now]:
            del self._entries[key]
        return succeed(_sorted(list(self._entries.values()), limit))

    def close(self) -> Deferred[None]:
        return succeed(None)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppression (
    address TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
)
"""


@implementer(ISuppressionList)
class SqliteSuppressionList:
    """The table ``suppression`` in ``path`` (created on first use), on one thread of its own."""

    def __init__(self, path: str, *, reactor: IRouterReactor, clock: IReactorTime) -> None:
        self.path = path
        self._reactor = reactor
        self._clock = clock
        self._pool = ThreadPool(minthreads=0, maxthreads=1, name=f"dcrouter-suppression:{path}")
        self._db: sqlite3.Connection | None = None

    def _run(self, work: Any, *args: Any) -> Deferred[Any]:
        if not self._pool.started:
            self._pool.start()
        d = deferToThreadPool(self._reactor, self._pool, self._in_thread, work, *args)

        def unavailable(failure: Failure) -> Failure:
            if failure.check(sqlite3.Error, OSError):
                error = QueueUnavailable(f"suppression list {self.path}: {failure.getErrorMessage()}")
                error.__cause__ = failure.value
                return Failure(error)
            return failure

        return d.addErrback(unavailable)

    def _in_thread(self, work: Any, *args: Any) -> Any:
        if self._db is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(_SCHEMA)
            self._db = db
        return work(self._db, *args)

    def add(self, address: str, reason: str, ttl: float) -> Deferred[Suppression]:
        now = self._clock.seconds()
        entry = Suppression(normalize(address), reason, now, now + ttl)

        def write(db: sqlite3.Connection) -> Suppression:
            db.execute(
                "INSERT OR REPLACE INTO suppression VALUES (?, ?, ?, ?)",
                (entry.address, entry.reason, entry.created_at, entry.expires_at),
            )
            return entry

        return self._run(write)

    def get(self, address: str) -> Deferred[Suppression | None]:
        key, now = normalize(address), self._clock.seconds()

        def read(db: sqlite3.Connection) -> Suppression | None:
            row = db.execute(
                "SELECT address, reason, created_at, expires_at FROM suppression WHERE address = ?", (key,)
            ).fetchone()
            if row is None:
                return None
            if row[3] <= now:
                db.execute("DELETE FROM suppression WHERE address = ? AND expires_at <= ?", (key, now))
                return None
            return Suppression(*row)

        return self._run(read)

    def remove(self, address: str) -> Deferred[bool]:
        key, now = normalize(address), self._clock.seconds()

        def delete(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT expires_at FROM suppression WHERE address = ?", (key,)).fetchone()
            db.execute("DELETE FROM suppression WHERE address = ?", (key,))
            return row is not None and row[0] > now

        return self._run(delete)

    def entries(self, limit: int) -> Deferred[list[Suppression]]:
        now = self._clock.seconds()

        def read(db: sqlite3.Connection) -> list[Suppression]:
            db.execute("DELETE FROM suppression WHERE expires_at <= ?", (now,))
            rows = db.execute(
                "SELECT address, reason, created_at, expires_at FROM suppression "
                "ORDER BY expires_at, address LIMIT ?",
                (limit,),
            ).fetchall()
            return [Suppression(*row) for row in rows]

        return self._run(read)

    def close(self) -> Deferred[None]:
        if not self._pool.started:
            return succeed(None)

        def shut(db: sqlite3.Connection) -> None:
            db.close()
            self._db = None

        d = self._run(shut) if self._db is not None else succeed(None)
        d.addBoth(lambda result: self._pool.stop())
        return d


@implementer(ISuppressionList)
class RedisSuppressionList:
    """Keys ``<prefix>suppressed:<address>`` holding the entry as JSON, expiring at its end. ``call(method,
    *args)`` is the queue's txredisapi call (with its deadline) and ``key(*parts)`` its key under the
    prefix."""

    def __init__(self, call: Any, key: Any, *, clock: IReactorTime) -> None:
        self._call = call
        self._key = key
        self._clock = clock

    async def _add(self, entry: Suppression) -> Suppression:
        value = json.dumps([entry.reason, entry.created_at, entry.expires_at])
        key = self._key("suppressed:", entry.address)
        # Redis forgets the key when the entry ends (by its own clock; get() also checks the router's).
        ttl_ms = max(1, round((entry.expires_at - entry.created_at) * 1000))
        await self._call("set", key, value, None, ttl_ms)
        return entry

    def add(self, address: str, reason: str, ttl: float) -> Deferred[Suppression]:
        now = self._clock.seconds()
        return Deferred.fromCoroutine(self._add(Suppression(normalize(address), reason, now, now + ttl)))

    async def _get(self, key: str) -> Suppression | None:
        raw = await self._call("get", self._key("suppressed:", key))
        if raw is None:
            return None
        reason, created, expires = json.loads(raw)
        if expires <= self._clock.seconds():
            return None
        return Suppression(key, reason, created, expires)

    def get(self, address: str) -> Deferred[Suppression | None]:
        return Deferred.fromCoroutine(self._get(normalize(address)))

    async def _remove(self, key: str) -> bool:
        found = await self._get(key)
        await self._call("delete", self._key("suppressed:", key))
        return found is not None

    def remove(self, address: str) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._remove(normalize(address)))

    async def _entries(self, limit: int) -> list[Suppression]:
        prefix = self._key("suppressed:")
        found: list[Suppression] = []
        cursor = 0
        while True:
            cursor, keys = await self._call("scan", cursor, prefix + "*", 500)
            for key in keys:
                name = key.decode() if isinstance(key, bytes) else key
                entry = await self._get(name[len(prefix) :])
                if entry is not None:
                    found.append(entry)
            if int(cursor) == 0:
                return _sorted(found, limit)

    def entries(self, limit: int) -> Deferred[list[Suppression]]:
        return Deferred.fromCoroutine(self._entries(limit))

    def close(self) -> Deferred[None]:
        return succeed(None)
