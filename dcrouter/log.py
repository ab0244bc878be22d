"""Structured logs: one JSON object per line, for log shippers.

``twistd --logger dcrouter.log.json_observer -n dcrouter --config FILE`` writes every event to standard
output as ``{"time": ..., "level": ..., "namespace": ..., "message": ..., "fields": {...}}``. ``fields``
holds the event's own keys (``queue_id``, ``peer``, ``port``, …) whose values are JSON-serialisable; what
emitters put in an event is their responsibility (dcrouter never logs passwords or message bodies).
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import Any, TextIO

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

#: Keys of Twisted's own bookkeeping (new and legacy logging) that are not the event's fields.
_INTERNAL = frozenset({"format", "message", "time", "system", "isError", "why", "failure", "printed"})


def _fields(event: dict[str, Any]) -> dict[str, Any]:
    fields = {}
    for key, value in event.items():
        if key.startswith("log_") or key in _INTERNAL:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue  # objects (protocols, factories) say nothing useful in a log line
        fields[key] = value
    return fields


@implementer(ILogObserver)
class JsonLinesObserver:
    """Writes each event at ``level`` or above to ``out`` as one JSON line, flushed."""

    def __init__(self, out: TextIO, level: LogLevel = LogLevel.info) -> None:
        self._out = out
        self._level = level

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        if level < self._level:
            return
        when = event.get("log_time") or event.get("time")
        record: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat()
            if when is not None
            else None,
            "level": level.name,
            "namespace": event.get("log_namespace", "-"),
            "message": formatEvent(event),
            "fields": _fields(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self._out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._out.flush()


def json_observer() -> JsonLinesObserver:
    """The factory twistd's ``--logger`` calls (no arguments): JSON lines on standard output."""
    return JsonLinesObserver(sys.stdout)
