"""The rules every queue backend applies the same way, so that swapping ``memory`` for ``disk`` changes where
items live, never what callers see."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from dcrouter.queue.item import QueueItem, QueueItemStatus

#: Statuses an item never leaves on its own: ``purge_expired`` removes these, and they do not count towards
#: ``max_size`` or ``get_item_count``. ``QUARANTINED`` is not final: it waits for an operator.
FINAL_STATUSES = frozenset({QueueItemStatus.DELIVERED, QueueItemStatus.BOUNCED, QueueItemStatus.FAILED})

#: The largest page ``list_items`` hands out.
MAX_PAGE = 1000

#: Queue ids name body files, so they are restricted to characters safe in a file name on every platform.
_ITEM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")

#: Fields ``update`` may change: everything but the id.
UPDATABLE_FIELDS = frozenset(f.name for f in dataclasses.fields(QueueItem)) - {"id"}

K = TypeVar("K")

#: The keys of the dict ``load()`` fires with, each a count; every backend reports each (0: not applicable).
LOAD_COUNT_KEYS = ("items", "live", "claims_returned", "spool_discarded", "damaged", "orphans")


@dataclasses.dataclass(frozen=True)
class QueueFilter:
    """Which items ``list_items`` returns: every given criterion must hold. ``status`` and ``destination``
    are exact; ``sender`` and ``recipient`` are case-insensitive substrings of the envelope's sender and of
    any of its recipients (``"@example.com"`` finds a whole domain)."""

    status: QueueItemStatus | None = None
    destination: str | None = None
    sender: str | None = None
    recipient: str | None = None

    def matches(self, item: QueueItem) -> bool:
        if self.status is not None and item.status != self.status:
            return False
        if self.destination is not None and item.destination != self.destination:
            return False
        if self.sender is not None and self.sender.lower() not in item.envelope.mail_from.lower():
            return False
        if self.recipient is not None:
            needle = self.recipient.lower()
            if not any(needle in r.lower() for r in item.envelope.recipients):
                return False
        return True


@dataclasses.dataclass(frozen=True)
class ItemPage:
    """One page of ``list_items``: items newest first (by arrival in the queue), and the cursor of the next
    page, or None when this is the last."""

    items: list[QueueItem]
    next_cursor: str | None


#: The statuses ``count_by_destination`` counts: mail waiting for a first attempt, and for a retry.
DESTINATION_COUNT_STATUSES = (QueueItemStatus.QUEUED, QueueItemStatus.DEFERRED)
#: Destinations ``count_by_destination`` names, most items first; the rest are summed in ``other``.
DESTINATION_COUNT_TOP = 500


@dataclasses.dataclass(frozen=True)
class DestinationCounts:
    """What ``count_by_destination`` fires with. ``by_destination``: destination → ``{"queued": n,
    "deferred": n}`` for the ``DESTINATION_COUNT_TOP`` destinations with most such items (most first, then by
    name). ``other``: ``{"destinations": k, "queued": n, "deferred": n}`` summed over the destinations left
    out and the items with no destination recorded. ``complete`` is False when the backend counted a bounded
    part of the queue only (Redis, past its budget): the counts are then a lower bound."""

    by_destination: dict[str, dict[str, int]]
    other: dict[str, int]
    complete: bool


def destination_counts(
    rows: Iterable[tuple[str | None, str, int]], complete: bool = True, top: int = DESTINATION_COUNT_TOP
) -> DestinationCounts:
    """``DestinationCounts`` from ``(destination, status value, count)`` rows (a destination may repeat)."""
    statuses = [s.value for s in DESTINATION_COUNT_STATUSES]
    per: dict[str, dict[str, int]] = {}
    other = {"destinations": 0, **dict.fromkeys(statuses, 0)}
    for destination, status, count in rows:
        if status not in other or not count:
            continue
        if destination is None:
            other[status] += count
            continue
        per.setdefault(destination, dict.fromkeys(statuses, 0))[status] += count
    ranked = sorted(per.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    for _destination, counts in ranked[top:]:
        other["destinations"] += 1
        for s in statuses:
            other[s] += counts[s]
    return DestinationCounts(dict(ranked[:top]), other, complete)


_CURSOR = re.compile(r"[0-9]{1,18}\Z")


def check_page(limit: int, cursor: str | None) -> int | None:
    """The arrival number ``cursor`` stands for (None: from the newest item). Raises ValueError for a limit
    outside 1..MAX_PAGE or a cursor that is not one ``list_items`` made. A cursor is the arrival number of
    the last item of the previous page, so paging is stable: items queued meanwhile never show up on later
    pages, and removed ones never shift them."""
    if not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be 1 to {MAX_PAGE}: {limit!r}")
    if cursor is None:
        return None
    if not isinstance(cursor, str) or not _CURSOR.match(cursor):
        raise ValueError(f"not a queue cursor: {cursor!r}")
    return int(cursor)


def is_live(status: QueueItemStatus) -> bool:
    """True when an item in ``status`` still counts as queued (not delivered, bounced or failed)."""
    return status not in FINAL_STATUSES


def check_item_id(item_id: str) -> None:
    """Raise ValueError unless ``item_id`` is 1 to 64 characters from ``[A-Za-z0-9_-]``."""
    if not isinstance(item_id, str) or not _ITEM_ID.match(item_id):
        raise ValueError(f"queue id not usable as a file name: {item_id!r}")


def check_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """Validate the keyword arguments of ``update`` and return them normalised (``status`` as a
    QueueItemStatus). Raises TypeError for a field that does not exist or may not change, ValueError for a
    status that does not exist."""
    unknown = set(changes) - UPDATABLE_FIELDS
    if unknown:
        raise TypeError(f"QueueItem fields that cannot be updated: {', '.join(sorted(unknown))}")
    normalised = dict(changes)
    if "status" in normalised:
        normalised["status"] = QueueItemStatus(normalised["status"])
    return normalised


def new_load_counts(**counts: int) -> dict[str, int]:
    """A ``load()`` result with every key of LOAD_COUNT_KEYS present."""
    result = dict.fromkeys(LOAD_COUNT_KEYS, 0)
    result.update(counts)
    return result


@dataclasses.dataclass(frozen=True)
class ClaimSchedule:
    """How one claim (``get_next``) shares itself between destinations (an item's ``destination``, the route
    its first pending recipient was routed to). Every backend applies it the same way (:func:`pick`): it walks
    due items in get_next order, skips destinations whose limit is 0, keeps at most each destination's limit,
    and hands out round robin over destinations (in the order of each one's oldest due item) up to the count.

    ``limits``: per named destination (its free delivery slots, 0 when full, paused or down); ``default``: any
    other named destination; ``unrouted``: items with no destination (queued before routing was recorded)."""

    limits: Mapping[str, int] = dataclasses.field(default_factory=dict)
    default: int = 1 << 30
    unrouted: int = 1 << 30

    def limit(self, destination: str | None) -> int:
        if destination is None:
            return self.unrouted
        return self.limits.get(destination, self.default)

    def closed(self) -> list[str]:
        """Named destinations this claim takes nothing from (sorted, for a stable SQL text)."""
        return sorted(d for d, n in self.limits.items() if n <= 0)


#: A schedule that is only queue order: what ``get_next`` applies without one.
IN_ORDER = ClaimSchedule()


def scan_window(count: int) -> int:
    """How many due items (of destinations not closed) a scheduled claim of ``count`` looks at, at most. A
    destination whose backlog fills the window and whose limit is below the count lets this claim take less
    than it could; the next claim (that destination now full, so closed) walks past it."""
    return max(4 * count, 256)


#: Walks a scheduled claim makes at most (each past the destinations the ones before filled).
SCAN_ROUNDS = 4


def walk(
    fetch: Callable[[list[str], bool], list[tuple[K, str | None]]], count: int, schedule: ClaimSchedule
) -> list[K]:
    """What a scheduled claim takes, when the backend walks its due items a window at a time:
    ``fetch(closed, unrouted)`` returns up to ``scan_window(count)`` (key, destination) of the due items, in
    get_next order, of destinations not in ``closed`` (and with no destination only when ``unrouted``).
    When a window holds no more than its destinations' limits allow (a backlog of one destination with a
    slot free fills it), the next walk skips those destinations too, so mail behind a backlog is found in
    the same claim."""
    closed = set(schedule.closed())
    unrouted = schedule.unrouted > 0
    window = scan_window(count)
    rows: list[tuple[K, str | None]] = []
    seen: set[K] = set()
    for _ in range(SCAN_ROUNDS):
        batch = fetch(sorted(closed), unrouted)
        for key, destination in batch:
            if key not in seen:
                seen.add(key)
                rows.append((key, destination))
        if len(batch) < window:
            break
        counts: dict[str | None, int] = {}
        for _key, destination in rows:
            counts[destination] = counts.get(destination, 0) + 1
        full = {d for d, n in counts.items() if n >= schedule.limit(d)}
        if sum(min(n, schedule.limit(d)) for d, n in counts.items()) >= count:
            break
        more = {d for d in full if d is not None} - closed
        if not more and not (None in full and unrouted):
            break
        closed |= more
        unrouted = unrouted and None not in full
    return pick(rows, count, schedule)


def pick(rows: Iterable[tuple[K, str | None]], count: int, schedule: ClaimSchedule) -> list[K]:
    """The keys to claim from ``rows`` (key, destination), due items in get_next order: round robin over
    destinations in the order of their first row, each up to ``schedule.limit``, ``count`` in all."""
    if count <= 0:
        return []
    per: dict[str | None, list[K]] = {}
    shut: set[str | None] = set()
    for key, destination in rows:
        keys = per.get(destination)
        if keys is None:
            if destination in shut:
                continue
            if schedule.limit(destination) <= 0:
                shut.add(destination)
                continue
            keys = per[destination] = []
        if len(keys) < schedule.limit(destination):
            keys.append(key)
    picked: list[K] = []
    queues = list(per.values())
    turn = 0
    while queues and len(picked) < count:
        for keys in queues:
            if turn < len(keys):
                picked.append(keys[turn])
                if len(picked) == count:
                    break
        turn += 1
        queues = [keys for keys in queues if len(keys) > turn]
    return picked
