"""Third-party scanners, transformations, event subscribers and authentication providers, named in the
configuration (docs/plugins.md).

A ``type`` that is not built in is looked up first as an entry point name in the group ``dcrouter.scanners``,
``dcrouter.transformations``, ``dcrouter.event_subscribers`` or ``dcrouter.auth`` (installed packages declare
them in their ``pyproject.toml``), then as a dotted path, ``package.module:Class`` or
``package.module.Class``. The class must implement :class:`~dcrouter.interfaces.IScanner`,
:class:`~dcrouter.interfaces.ITransformation`, :class:`~dcrouter.events.IEventSink` or
:class:`twisted.cred.checkers.ICredentialsChecker` (declared with ``@implementer``). It may declare
``options_schema``, a frozen dataclass written with :func:`dcrouter.config.schema.option` like dcrouter's
own blocks: the entry's ``options`` table is loaded with it, every error reported with its key path, and the
instance is built as ``Class(options)`` (without a schema, ``Class()`` and any option is an error); a
constructor with a ``reactor`` parameter also gets the router's reactor, for plugins that talk to a daemon.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, Protocol

from twisted.cred.checkers import ICredentialsChecker

from dcrouter.config.schema import Report, build_block, join
from dcrouter.events import IEventSink
from dcrouter.interfaces import IScanner, ITransformation
from dcrouter.net.reactor import IRouterReactor

GROUPS = {
    "scanner": "dcrouter.scanners",
    "transformation": "dcrouter.transformations",
    "subscriber": "dcrouter.event_subscribers",
    "auth": "dcrouter.auth",
}
INTERFACES = {
    "scanner": IScanner,
    "transformation": ITransformation,
    "subscriber": IEventSink,
    "auth": ICredentialsChecker,
}


class PluginEntry(Protocol):
    """A scanner, transformation or auth provider entry of the configuration, as far as plugins read it."""

    @property
    def type(self) -> str: ...

    @property
    def options(self) -> Mapping[str, Any]: ...


class PluginError(Exception):
    """A plugin that cannot be found, loaded or used; the message says which and why."""


def resolve(kind: str, name: str) -> type:
    """The plugin class ``name`` names for ``kind`` (``scanner``, ``transformation`` or ``auth``)."""
    group = GROUPS[kind]
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    try:
        if found:
            target: Any = found[0].load()
        else:
            module_name, sep, attr = name.partition(":")
            if not sep:
                module_name, _, attr = name.rpartition(".")
            if not module_name or not attr:
                raise PluginError(
                    f"unknown {kind} type {name!r}: not built in, no entry point {name!r} in group "
                    f"{group!r}, and not a dotted path (package.module:Class)"
                )
            target = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
    except PluginError:
        raise
    except Exception as e:
        raise PluginError(f"cannot load {kind} plugin {name!r}: {type(e).__name__}: {e}") from e
    interface = INTERFACES[kind]
    if not isinstance(target, type) or not interface.implementedBy(target):
        raise PluginError(f"{kind} plugin {name!r} is not a class implementing {interface.__name__}")
    return target


def load_options(plugin: type, raw: Any, path: str, report: Report) -> Any:
    """The plugin's options loaded with its ``options_schema`` (None without one); errors go to ``report``
    under ``path`` (the entry's ``options`` key path)."""
    schema = getattr(plugin, "options_schema", None)
    if schema is None:
        for key in raw or {}:
            report.error(join(path, key), "this plugin takes no options")
        return None
    return build_block(schema, raw or {}, path, report)


def check_config(kind: str, entry: PluginEntry, path: str, report: Report) -> None:
    """Config-time check of a plugin entry: the type resolves and its options pass the plugin's schema."""
    try:
        plugin = resolve(kind, entry.type)
    except PluginError as e:
        report.error(join(path, "type"), str(e))
        return
    load_options(plugin, entry.options, join(path, "options"), report)


def instantiate(kind: str, entry: PluginEntry, reactor: IRouterReactor | None = None) -> Any:
    """A ready plugin instance for a checked entry (the options are loaded again; they passed at load). A
    plugin whose constructor has a ``reactor`` parameter is given the router's reactor."""
    plugin = resolve(kind, entry.type)
    report = Report()
    options = load_options(plugin, entry.options, "options", report)
    if report.errors:
        raise PluginError("; ".join(report.errors))
    args = (options,) if getattr(plugin, "options_schema", None) is not None else ()
    try:
        wants_reactor = "reactor" in inspect.signature(plugin).parameters
    except (TypeError, ValueError):
        wants_reactor = False
    return plugin(*args, reactor=reactor) if wants_reactor else plugin(*args)
