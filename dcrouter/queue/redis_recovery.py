"""What the Redis queue's ``load()`` does before it opens: check durability, then recover.

Other processes may be using the same Redis and body directory while this runs, so recovery never assumes it
is alone (unlike the disk queue's): only claims of this consumer name (whose previous holder is dead: see
:mod:`dcrouter.queue.redis_consumer`) and *expired* claims return to ready (a live process's are valid),
spool and body files younger than :data:`redis_bodies.GRACE_SECONDS` are left alone, and an item is set aside
as damaged only if it has not changed since it was read. In order:

1. ``CONFIG GET appendonly`` and ``appendfsync``: a loud warning unless ``yes`` and ``always``.
2. The directories are created; spool files left by a crashed receiver are discarded.
3. Claims held under this process's consumer name return to ready at once (QUEUED, or DEFERRED when the
   item had attempts): its previous run died, and no live process holds that name. Then expired claims
   of any process return to ready.
4. Every item is verified: its JSON parses into a QueueItem with its own id and a known status, and its
   body exists (inline in Redis, or its file). One that fails is renamed to ``damaged:<id>:<seq>`` (with
   ``damaged-body:<id>:<seq>`` when there is an inline body) and taken out of every index: never deleted.
5. Body files no item names are moved to ``orphans/`` (where :mod:`dcrouter.queue.orphans` keeps them for
   ``orphanRetention``).
"""

from __future__ import annotations

import json

import txredisapi

from dcrouter.log import logger
from dcrouter.queue import redis_bodies as bodies
from dcrouter.queue import redis_scripts as scripts
from dcrouter.queue.contract import new_load_counts
from dcrouter.queue.item import QueueItem, QueueItemStatus
from dcrouter.queue.redis_store import RedisStore

log = logger(__name__)

#: Items one verification step reads.
SCAN_CHUNK = 500


async def recover(store: RedisStore, body_directory: str, address: str, owner: str) -> dict[str, int]:
    """Check and recover the queue in ``store`` whose big bodies live in ``body_directory``, for the consumer
    named ``owner`` (held by this process); ``address`` names the Redis in log lines. Returns the counts of
    LOAD_COUNT_KEYS (``claims_returned`` counts this consumer's and expired ones)."""
    counts = await recover_start(store, body_directory, address, owner)
    damaged, orphans = await verify_items(store, body_directory, address)
    counts.update(damaged=damaged, orphans=orphans)
    counts["items"] = int(await store.call("zcard", store.key("items")))
    counts["live"] = int(await store.call("get", store.key("live")) or 0)
    return counts


async def recover_start(store: RedisStore, body_directory: str, address: str, owner: str) -> dict[str, int]:
    """Steps 1 to 3: what must precede this process's first claim or enqueue. Returns the counts of
    LOAD_COUNT_KEYS with ``damaged`` and ``orphans`` 0 (:func:`verify_items` does steps 4 and 5; the queue
    may run it in the background, as every step already allows other processes to work meanwhile)."""
    await check_durability(store, address)
    await store.in_thread(bodies.prepare, body_directory)
    spool_discarded = await store.in_thread(bodies.discard_stale_spool, body_directory)
    claims_returned = int(await store.script(scripts.RELEASE_OWNED, owner))
    if claims_returned:
        log.info(
            "Redis queue {address}: {n} claims of consumer {owner}'s previous run returned to ready",
            address=address,
            n=claims_returned,
            owner=owner,
        )
    while True:
        # A claim of nothing, for nobody: only its first step runs, returning expired leases to ready.
        reply = await store.script(scripts.CLAIM, "-inf", 0, "", "0", SCAN_CHUNK, 0)
        claims_returned += int(reply[0])
        if int(reply[0]) < SCAN_CHUNK:
            break
    items = int(await store.call("zcard", store.key("items")))
    live = int(await store.call("get", store.key("live")) or 0)
    return new_load_counts(
        items=items, live=live, claims_returned=claims_returned, spool_discarded=spool_discarded
    )


async def verify_items(store: RedisStore, body_directory: str, address: str) -> tuple[int, int]:
    """Steps 4 and 5; returns how many items were set aside as damaged, and how many files as orphans."""
    damaged, ids = await _verify(store, body_directory)
    orphans = await store.in_thread(bodies.set_aside_orphans, body_directory, ids)
    if damaged or orphans:
        log.warn(
            "Redis queue {address}: {damaged} damaged items set aside as {prefix}damaged:<id>:<seq>,"
            " {orphans} body files without an item moved to {directory}/orphans (kept for inspection:"
            " damaged items for good, orphans for orphanRetention)",
            address=address,
            damaged=damaged,
            prefix=store.key(),
            orphans=orphans,
            directory=body_directory,
        )
    return damaged, orphans


async def check_durability(store: RedisStore, address: str) -> None:
    """Warn loudly unless Redis fsyncs every write before acknowledging it."""
    settings: dict[bytes, bytes] = {}
    try:
        for name in ("appendonly", "appendfsync"):
            reply = await store.call("execute_command", "CONFIG", "GET", name, refusal_expected=True)
            settings.update(zip(reply[0::2], reply[1::2], strict=True))
    except txredisapi.ResponseError as e:
        log.warn(
            "Redis at {address} refused CONFIG GET ({error}), so dcrouter cannot check that it runs with"
            " appendonly yes and appendfsync always. Without both, a message acknowledged with 250 can be"
            " lost when Redis crashes or the machine loses power: check the server's configuration.",
            address=address,
            error=str(e),
        )
        return
    appendonly = settings.get(b"appendonly", b"?").decode(errors="replace")
    appendfsync = settings.get(b"appendfsync", b"?").decode(errors="replace")
    if (appendonly, appendfsync) != ("yes", "always"):
        log.warn(
            "DURABILITY WARNING: Redis at {address} runs with appendonly {appendonly} and appendfsync"
            " {appendfsync}. A message acknowledged with 250 can be LOST when Redis crashes or the machine"
            " loses power. Set `appendonly yes` and `appendfsync always` in redis.conf.",
            address=address,
            appendonly=appendonly,
            appendfsync=appendfsync,
        )


async def _verify(store: RedisStore, body_directory: str) -> tuple[int, set[str]]:
    """Set aside every item that fails verification. Returns how many, and the ids of every item seen."""
    seen: set[str] = set()
    damaged = 0
    after = "0"
    while True:
        reply = await store.script(scripts.SCAN, after, SCAN_CHUNK)
        records = [reply[i : i + 6] for i in range(0, len(reply), 6)]
        if not records:
            return damaged, seen
        file_ids = [r[0].decode() for r in records if r[4] == b"file"]
        present = await store.in_thread(_existing, body_directory, file_ids)
        for raw_id, seq, text, status, kind, inline_present in records:
            item_id = raw_id.decode()
            seen.add(item_id)
            problem = _problem(item_id, text, status, kind, int(inline_present), item_id in present)
            if problem is not None:
                moved = await store.script(scripts.SET_ASIDE, item_id, seq, problem)
                damaged += int(moved)
        after = records[-1][1].decode()
        if len(records) < SCAN_CHUNK:
            return damaged, seen


def _existing(body_directory: str, item_ids: list[str]) -> set[str]:
    return {i for i in item_ids if bodies.body_exists(body_directory, i)}


def _problem(item_id: str, text: bytes, status: bytes, kind: bytes, inline: int, file: bool) -> str | None:
    if not text:
        return "item hash missing"
    try:
        item = QueueItem.from_dict(json.loads(text))
        QueueItemStatus(status.decode())
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
        return f"item does not parse: {e!r}"
    if item.id != item_id:
        return f"item id {item.id!r} differs from the key's id"
    if kind == b"inline" and not inline:
        return "inline body missing"
    if kind == b"chunks" and not inline:
        return "body chunks missing"
    if kind == b"file" and not file:
        return "body file missing"
    if kind not in (b"inline", b"chunks", b"file"):
        return f"unknown body kind {kind!r}"
    return None
