"""The rules every queue backend applies the same way, so that swapping ``memory`` for ``disk`` changes where
items live, never what callers see."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from dcrouter.queue.item import QueueItem, QueueItemStatus

#: Statuses an item never leaves on its own: ``purge_expired`` removes these, and they do not count towards
#: ``max_size`` or ``get_item_count``. ``QUARANTINED`` is not final: it waits for an operator.
FINAL_STATUSES = frozenset({QueueItemStatus.DELIVERED, QueueItemStatus.BOUNCED, QueueItemStatus.FAILED})

#: Queue ids name body files, so they are restricted to characters safe in a file name on every platform.
_ITEM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")

#: Fields ``update`` may change: everything but the id.
UPDATABLE_FIELDS = frozenset(f.name for f in dataclasses.fields(QueueItem)) - {"id"}

#: The keys of the dict ``load()`` fires with, each a count; every backend reports each (0: not applicable).
LOAD_COUNT_KEYS = ("items", "live", "claims_returned", "spool_discarded", "damaged", "orphans")


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
