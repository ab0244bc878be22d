"""Loading DcRouter options from TOML, JSON or a mapping.

The whole document is built as a :class:`~dcrouter.config.options.DcRouterOptions` block by
:func:`dcrouter.config.schema.build_block`: every key converted and checked, every error reported with its key
path as written in the file (``smtpConfig.domainConfigs[1].targetIPs[0]``), nothing stopping at the first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dcrouter.config.options import DcRouterOptions
from dcrouter.config.schema import Report, build_block


class ConfigError(Exception):
    """The configuration cannot be used. ``errors`` lists every problem, each starting with its key path;
    ``str()`` gives them one per line. ``warnings`` are those found in the same load (a file with errors
    may have warnings too, and ``--check`` shows both)."""

    def __init__(self, errors: list[str], warnings: list[str] | None = None) -> None:
        super().__init__(errors)
        self.errors = list(errors)
        self.warnings = list(warnings or [])

    def __str__(self) -> str:
        return "\n".join(self.errors)


@dataclass(frozen=True)
class ConfigResult:
    """Options that passed every check, and the warnings (each starting with its key path) found on the
    way."""

    options: DcRouterOptions
    warnings: list[str] = field(default_factory=list)
    #: The mapping the options were built from (the file's own keys), and the file it was read from.
    raw: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    path: str | None = None


def load_options(raw: Mapping[str, Any]) -> ConfigResult:
    """Load a DcRouter options object (the seed's camelCase keys) from a mapping such as parsed JSON.

    Raises :class:`ConfigError` listing every error; otherwise the result holds frozen options.
    """
    report = Report()
    options = build_block(DcRouterOptions, raw, "", report)
    if report.errors or options is None:
        raise ConfigError(report.errors, report.warnings)
    return ConfigResult(options, report.warnings, raw=raw)


def load_file(path: str | os.PathLike[str]) -> ConfigResult:
    """Load options from a ``.toml`` or ``.json`` file (chosen by the extension).

    Raises :class:`ConfigError` when the file cannot be read or parsed, or for every error in its content.
    """
    name = os.fspath(path)
    ext = os.path.splitext(name)[1].lower()
    if ext not in (".toml", ".json"):
        shown = ext or "(no extension)"
        raise ConfigError([f"{name}: unknown configuration format {shown!r}; use .toml or .json"])
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([f"{name}: cannot read: {e.strerror or e}"]) from None
    try:
        text = data.decode("utf-8")
        raw = tomllib.loads(text) if ext == ".toml" else json.loads(text, object_pairs_hook=_JsonObject.of)
    except UnicodeDecodeError as e:
        raise ConfigError([f"{name}: not UTF-8: {e}"]) from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError([f"{name}: not valid {ext[1:].upper()}: {e}"]) from None
    if not isinstance(raw, Mapping):
        raise ConfigError([f"{name}: the top level must be an object"])
    return dataclasses.replace(load_options(raw), path=name)


class _JsonObject(dict[str, Any]):
    """A JSON object that remembers keys it saw twice (``json`` would silently keep the last one)."""

    duplicates: list[str]

    @classmethod
    def of(cls, pairs: list[tuple[str, Any]]) -> _JsonObject:
        obj = cls()
        obj.duplicates = []
        for k, v in pairs:
            if k in obj:
                obj.duplicates.append(k)
            obj[k] = v
        return obj
