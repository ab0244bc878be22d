"""Bodies kept in Redis in chunks: how the Redis queue stores a big message in Redis and reads it back without
ever holding it whole in memory.

A body above the queue's inline limit (1 MiB) becomes the list ``body:<id>`` of :data:`CHUNK_SIZE` pieces, in
order. What a caller may rely on:

- :func:`store_chunks` streams a message in, one chunk per script call (each awaited before the next is read
  from the spool file, so at most one chunk is in memory). Every call renews the list's expiry
  (:data:`EXPIRY_SECONDS`): a list whose item is never written (the process died, or Redis failed, before the
  enqueue script ran; no ``250`` was sent) disappears by itself, so no recovery scan is needed. The enqueue
  script checks that the list is there and removes its expiry in the same atomic step that writes the item,
  so an acknowledged item always has its whole body.
- :func:`open_chunks` streams a body out into an anonymous temporary file in the spool directory (unlinked
  from the start: nothing to clean up, even after ``kill -9``), one chunk at a time, and returns it rewound.

Why a list of chunks and not one string: a 50 MB value would be one reply held whole in our memory, and one
write that ``appendfsync always`` makes the single-threaded server fsync while every other client waits;
256 KiB pieces keep both bounded (about 1 ms of Redis time each on the development VM).
"""

from __future__ import annotations

import tempfile
from typing import Any, BinaryIO

from dcrouter.interfaces import DuplicateItem, QueueUnavailable
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.queue import redis_scripts as scripts
from dcrouter.queue.redis_bodies import GRACE_SECONDS
from dcrouter.queue.redis_store import RedisStore

#: Bytes per chunk.
CHUNK_SIZE = 256 * 1024
#: Seconds a chunk list without its item survives after its last chunk was written.
EXPIRY_SECONDS = int(GRACE_SECONDS)


async def store_chunks(
    store: RedisStore, item_id: str, message: SpooledMessage, chunk_size: int = CHUNK_SIZE
) -> int:
    """Write the body of ``message`` (its file or its in-memory data) as the chunk list of ``item_id``;
    returns how many chunks (the enqueue script checks the list holds exactly that many). DuplicateItem when
    a body of that id exists already (nothing written); QueueUnavailable when Redis or the spool file fails,
    or a chunk finds the list without all the chunks before it (what was written expires). Does not consume
    ``message``."""
    if message.path is None:
        data = message.data or b""
        pieces = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]
        for n, piece in enumerate(pieces):
            await _append(store, item_id, piece, n)
        return len(pieces)
    f: BinaryIO = await store.in_thread(open, message.path, "rb")
    try:
        n = 0
        while True:
            piece = await store.in_thread(f.read, chunk_size)
            if not piece and n > 0:
                return n
            await _append(store, item_id, piece, n)
            n += 1
            if len(piece) < chunk_size:
                return n
    finally:
        await store.in_thread(f.close)


async def _append(store: RedisStore, item_id: str, piece: bytes, index: int) -> None:
    result = await store.script(scripts.APPEND_CHUNK, item_id, piece, EXPIRY_SECONDS, index)
    if result == b"exists":
        raise DuplicateItem(f"queue id already stored: {item_id} (a body exists)")
    if result == b"gap":
        raise QueueUnavailable(f"Redis queue: chunks of {item_id} written before this one are missing")


async def open_chunks(store: RedisStore, item_id: str, spool_directory: str) -> BinaryIO:
    """The chunked body of ``item_id`` copied into an unlinked temporary file, rewound. QueueUnavailable when
    the body is missing (or was removed meanwhile with its item) and on a Redis or file failure."""
    key = store.key("body:", item_id)
    count = int(await store.call("llen", key))
    if count == 0:
        raise QueueUnavailable(f"Redis queue: the body of {item_id} is missing")
    f: Any = await store.in_thread(_temporary_file, spool_directory)
    try:
        for n in range(count):
            piece = await store.call("lindex", key, n)
            if piece is None:
                raise QueueUnavailable(f"Redis queue: the body of {item_id} went away while it was read")
            await store.in_thread(f.write, piece)
        await store.in_thread(f.seek, 0)
    except BaseException:
        await store.in_thread(f.close)
        raise
    return f  # type: ignore[no-any-return]


def _temporary_file(directory: str) -> BinaryIO:
    return tempfile.TemporaryFile("w+b", prefix="body-", dir=directory)
