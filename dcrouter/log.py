"""dcrouter's logging: a level filter in front of every dcrouter logger, and JSON lines for log shippers.

Levels: dcrouter's modules make their loggers with :func:`logger`, whose events pass :data:`levels` (info and
above by default, ``logLevel`` in the configuration) before they reach Twisted's global log publisher. Events
below the level are dropped where they are made, so twistd's observers never spend time formatting them (the
outbound SMTP client's per-command debug events would otherwise be written for every delivery).

Structured logs: one JSON object per line.

``logFormat = "json"`` in the configuration (or ``twistd --logger dcrouter.log.json_observer``) writes every
event as ``{"time": ..., "level": ..., "namespace": ..., "message": ..., "queueId": ..., "sessionId": ...,
"fields": {...}}``. ``queueId`` and ``sessionId`` are the correlation ids, there when the event carries
``queue_id``/``session_id`` (every line about a message or an SMTP session does); ``fields`` holds the
event's own keys (``queue_id``, ``peer``, ``port``, …) whose values are JSON-serialisable. What emitters put
in an event is their responsibility: dcrouter never logs passwords or message bodies.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import Any, TextIO, cast

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
    timeFormatRFC3339,
)
from zope.interface import implementer


class _Levels(LogLevelFilterPredicate):
    """Twisted's level predicate with each namespace's answer kept until a level is set or cleared (it is
    asked for every event made and by :func:`enabled`, several times per message; the search walks the
    namespace's segments). Levels are changed only through ``setLogLevelForNamespace``/``clearLogLevels``."""

    _CACHE_LIMIT = 4096

    def __init__(self, defaultLogLevel: Any = LogLevel.info) -> None:
        self._cache: dict[str, Any] = {}
        super().__init__(defaultLogLevel)

    def logLevelForNamespace(self, namespace: str) -> Any:
        try:
            return self._cache[namespace]
        except KeyError:
            level = super().logLevelForNamespace(namespace)
            if len(self._cache) < self._CACHE_LIMIT:
                self._cache[namespace] = level
            return level
        except TypeError:  # not hashable: Twisted's answer, uncached
            return super().logLevelForNamespace(namespace)

    def setLogLevelForNamespace(self, namespace: str, level: Any) -> None:
        super().setLogLevelForNamespace(namespace, level)
        self._cache.clear()

    def clearLogLevels(self) -> None:
        super().clearLogLevels()
        self._cache.clear()


#: Minimum levels of dcrouter's loggers, by namespace (a namespace's setting covers its children).
levels = _Levels(defaultLogLevel=LogLevel.info)
_filtered = FilteringLogObserver(globalLogPublisher, [levels])

#: The names ``logLevel`` accepts.
LEVEL_NAMES = ("debug", "info", "warn", "error", "critical")


def logger(namespace: str) -> Logger:
    """A Logger for one of dcrouter's modules (``namespace`` is its ``__name__``, so a level set for a package
    covers its modules); its events below the configured level are dropped at once."""
    return Logger(namespace=namespace, observer=_filtered)


#: The levels set by :func:`set_level`, by namespace (what :func:`level_settings` shows).
_settings: dict[str, str] = {}


def set_level(level: LogLevel | str, namespace: str = "dcrouter") -> None:
    """Log ``namespace`` (and the namespaces under it) from ``level`` up; takes effect immediately."""
    chosen = LogLevel.levelWithName(level) if isinstance(level, str) else level
    levels.setLogLevelForNamespace(namespace, chosen)
    _settings[namespace] = chosen.name


def level_settings() -> dict[str, str]:
    """Namespace → level name, for every namespace a level was set for (``dcrouter`` is the global one)."""
    return dict(_settings)


def level_for(namespace: str) -> str:
    """The level in effect for ``namespace`` (its own, or its nearest parent's)."""
    return str(levels.logLevelForNamespace(namespace).name)


def enabled(namespace: str, level: LogLevel = LogLevel.debug) -> bool:
    """Whether ``namespace``'s events at ``level`` pass the filter now. A hot path guards its debug events
    with it (``if enabled(__name__): log.debug(...)``) so that nothing of them is built while debug is off: a
    dropped event still costs its arguments, the event dict and the filter. Cheap (a dict look-up per
    namespace segment) and always current, so a level set at run time (:func:`set_level`) applies at once."""
    return bool(level >= levels.logLevelForNamespace(namespace))


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
        }
        for key, name in (("queue_id", "queueId"), ("session_id", "sessionId")):
            value = event.get(key)
            if isinstance(value, str) and value:
                record[name] = value
        record["fields"] = _fields(event)
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self._out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._out.flush()


def json_observer() -> JsonLinesObserver:
    """The factory twistd's ``--logger`` calls (no arguments): JSON lines on standard output."""
    return JsonLinesObserver(sys.stdout)


def twistd_json_observer(server_options: Any) -> JsonLinesObserver:
    """JSON lines where twistd would have written text, given twistd's own options: ``--logfile FILE``
    (rotated by size as twistd's are), standard output with ``-n`` and no ``--logfile`` (or ``-``), otherwise
    ``twistd.log``."""
    from twisted.python.logfile import LogFile

    name = server_options.get("logfile") if server_options is not None else None
    nodaemon = bool(server_options.get("nodaemon")) if server_options is not None else True
    if name == "-" or (nodaemon and not name):
        return JsonLinesObserver(sys.stdout)
    return JsonLinesObserver(cast(TextIO, LogFile.fromFullPath(name or "twistd.log")))


class TextLinesObserver(FileLogObserver):
    """twistd's text lines (``textFileLogObserver``: ``TIME [namespace#level] message``), the same
    characters, written with less work per line: the time prefix is made once per second (not a timezone
    lookup and ``strftime`` per line) and a plain format string (no ``{name()}`` calls) is filled by
    ``str.format_map`` (not ``string.Formatter``, which parses the format in Python on every line). Events
    this shortcut does not cover exactly (a failure, a legacy ``log_system``, a flattened or bytes format, a
    format that does not fill) take Twisted's own formatter, so their text is Twisted's too."""

    def __init__(self, out: TextIO) -> None:
        super().__init__(out, self._format)
        self._second: int | None = None
        self._stamp = ""

    def _time(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            self._stamp = formatTime(when, timeFormatRFC3339)
            self._second = second
        return self._stamp

    def _format(self, event: dict[str, Any]) -> str | None:
        fmt = event.get("log_format")
        when = event.get("log_time")
        if (
            type(fmt) is not str
            or "()" in fmt
            or "log_failure" in event
            or "log_system" in event
            or "log_flattened" in event
            or type(when) is not float
            or when < 0
            or when - int(when) >= 0.999999  # datetime may round it up into the next second
        ):
            return _classic_text(event)
        try:
            text = fmt.format_map(event)
        except Exception:  # noqa: BLE001 (Twisted's formatter says what could not be formatted)
            return _classic_text(event)
        if not text:
            return None
        level = event.get("log_level")
        namespace = event.get("log_namespace", "-")
        line = f"{self._time(when)} [{namespace}#{'-' if level is None else level.name}] {text}"
        return line.replace("\n", "\n\t") + "\n"


def _classic_text(event: dict[str, Any]) -> str | None:
    return formatEventAsClassicLogText(event, formatTime=lambda when: formatTime(when, timeFormatRFC3339))


def twistd_text_observer(server_options: Any) -> TextLinesObserver | None:
    """The text observer for twistd's standard output (``-n`` without ``--logfile``, or ``--logfile -``);
    None for any other destination (a log file, ``--syslog``), which twistd's own observer keeps."""
    if server_options is None:
        return None
    name = server_options.get("logfile")
    if server_options.get("syslog") or not (name == "-" or (server_options.get("nodaemon") and not name)):
        return None
    return TextLinesObserver(sys.stdout)
