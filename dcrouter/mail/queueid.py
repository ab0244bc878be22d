"""Queue ids: the correlation id of a message in every log line, reply and event after its DATA."""

from __future__ import annotations

import secrets


def new_queue_id() -> str:
    """A queue id: 20 upper-case hex digits, unique without coordination, safe in file names."""
    return secrets.token_hex(10).upper()
