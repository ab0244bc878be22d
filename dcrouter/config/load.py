"""Loading DcRouter options from TOML, JSON or a mapping, driven by the declarations in ``options.py``.

Every key is converted by the type it is declared with, then checked (``option(check=..., each=...)`` and the
block checks attached with ``@checked``). Nothing stops at the first mistake: the whole document is walked and
every error is reported, each prefixed with its key path as written in the file
(``smtpConfig.domainConfigs[1].targetIPs[0]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from dcrouter.config.checks import Advice, Report, join
from dcrouter.config.options import DcRouterOptions, block_checks


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


def load_options(raw: Mapping[str, Any]) -> ConfigResult:
    """Load a DcRouter options object (the seed's camelCase keys) from a mapping such as parsed JSON.

    Raises :class:`ConfigError` listing every error; otherwise the result holds frozen options.
    """
    report = Report()
    options = _build(DcRouterOptions, raw, "", report)
    if report.errors or isinstance(options, _Invalid):
        raise ConfigError(report.errors, report.warnings)
    return ConfigResult(options, report.warnings)


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
    return load_options(raw)


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


class _Invalid:
    def __repr__(self) -> str:
        return "<invalid>"


class _Partial(_Invalid):
    """A block with errors: the fields that did load, so checks of the enclosing block that read only
    those (``needs=("smtp_config.ports",)``) can still run."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values


#: What a conversion returns after it reported an error; the caller then skips checks that read the value.
_INVALID: Any = _Invalid()

_MISSING = dataclasses.MISSING


def file_key(f: dataclasses.Field[Any]) -> str:
    """The key of a schema field in files: its declared ``key`` or the camelCase of its attribute."""
    declared = f.metadata.get("key")
    if declared:
        return str(declared)
    head, *rest = f.name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "a list"
    kinds = {int: "an integer", float: "a number", str: "a string"}
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kinds.get(type(value), 'a ' + type(value).__name__)} {text}"


def type_name(tp: Any) -> str:
    """A reader's name for a declared type, as used in error messages and the reference."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return " or ".join(type_name(a) for a in inner)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in get_args(tp))
    if origin is list:
        inner = get_args(tp)[0]
        if get_origin(inner) is Literal:
            return f"list of strings, each {type_name(inner)}"
        return f"list of {type_name(inner)}s"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "table"
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    return names.get(tp, "any value")


def _convert(tp: Any, value: Any, path: str, report: Report) -> Any:
    """``value`` as type ``tp``, or ``_INVALID`` after reporting why not."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(get_args(tp)):
            return None
        return _convert(args[0], value, path, report)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, report)  # type: ignore[arg-type]
    if origin is list:
        if not isinstance(value, list):
            return _wrong(tp, value, path, report)
        items = [_convert(get_args(tp)[0], v, f"{path}[{i}]", report) for i, v in enumerate(value)]
        return _INVALID if any(isinstance(v, _Invalid) for v in items) else items
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            return _wrong(tp, value, path, report)
        converted = {k: _convert(get_args(tp)[1], v, join(path, k), report) for k, v in value.items()}
        return _INVALID if any(isinstance(v, _Invalid) for v in converted.values()) else converted
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in get_args(tp)):
            return value
        return _wrong(tp, value, path, report)
    if tp is float and type(value) in (int, float):
        return float(value)
    if tp in (bool, int, str) and type(value) is tp:
        return value
    return _wrong(tp, value, path, report)


def _wrong(tp: Any, value: Any, path: str, report: Report) -> Any:
    report.error(path, f"expected {type_name(tp)}, got {_describe(value)}")
    return _INVALID


def _unknown_keys(raw: Mapping[str, Any], known: list[str], path: str, report: Report) -> None:
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            report.error(join(path, str(key)), f"unknown key{hint}")
    for key in getattr(raw, "duplicates", ()):
        report.error(join(path, key), "key given twice")


def _build(cls: type, raw: Any, path: str, report: Report) -> Any:
    """An instance of the schema dataclass ``cls`` from ``raw``, or ``_INVALID`` if anything in it is wrong.

    Block checks still run when other keys of the block are wrong, as long as the keys they read are fine.
    """
    if not isinstance(raw, Mapping):
        report.error(path, f"expected a table, got {_describe(raw)}")
        return _INVALID
    errors_before = len(report.errors)
    hints = get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    _unknown_keys(raw, [file_key(f) for f in fields], path, report)
    values: dict[str, Any] = {}
    for f in fields:
        value = _field_value(f, hints[f.name], raw, join(path, file_key(f)), report)
        if value is not _INVALID:
            values[f.name] = value
    given = frozenset(f.name for f in fields if file_key(f) in raw)
    for check in block_checks(cls):
        if all(not isinstance(_resolve(values, need), _Invalid) for need in check.needs):
            check.run(_view(values, given), path, report)
    if len(report.errors) > errors_before:
        return _Partial(values)
    return cls(**values)


def build_block(cls: type, raw: Any, path: str, report: Report) -> Any:
    """A block of schema dataclass ``cls`` loaded from ``raw``, with errors reported under ``path``; None when
    anything in it is wrong. Plugins use it to check their own options blocks."""
    value = _build(cls, raw, path, report)
    return None if isinstance(value, _Invalid) else value


def _resolve(values: dict[str, Any], need: str) -> Any:
    """The value at the dotted attribute path ``need``, or ``_INVALID`` when it (or a block on the way)
    failed."""
    head, _, rest = need.partition(".")
    value = values.get(head, _INVALID)
    if not rest or value is _INVALID:
        return value
    if isinstance(value, _Partial):
        return _resolve(value.values, rest)
    if value is None:
        return _INVALID
    return _resolve(vars(value), rest)


def _view(values: dict[str, Any], given: frozenset[str] = frozenset()) -> types.SimpleNamespace:
    """The block as block checks see it: loaded fields as attributes, failed blocks as partial views, and
    ``_given``, the attributes whose keys the file sets (the rest are defaults)."""
    fields = {k: _view(v.values) if isinstance(v, _Partial) else v for k, v in values.items()}
    return types.SimpleNamespace(_given=given, **fields)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def _field_value(
    f: dataclasses.Field[Any], tp: Any, raw: Mapping[str, Any], path: str, report: Report
) -> Any:
    """The converted and checked value of one field, or ``_INVALID`` after reporting."""
    default = _default(f)
    if file_key(f) in raw:
        value = _convert(tp, raw[file_key(f)], path, report)
    elif default is _MISSING:
        report.error(path, "required")
        return _INVALID
    else:
        value = default
    if isinstance(value, _Invalid):
        if isinstance(raw[file_key(f)], list):
            _check_loadable_items(f, tp, raw[file_key(f)], path, report)
        return value
    meta = f.metadata
    if meta.get("unsupported") and value != default:
        report.error(path, f"not supported yet: {meta['unsupported']}")
        return _INVALID
    findings = _findings(meta, value, path)
    for where, finding in findings:
        if isinstance(finding, Advice):
            report.warning(where, finding)
        else:
            report.error(where, finding)
    return _INVALID if any(not isinstance(x, Advice) for _, x in findings) else value


def _findings(meta: Mapping[str, Any], value: Any, path: str) -> list[tuple[str, str]]:
    """What the field's value checks say: ``(key path, message or Advice)`` pairs."""
    found: list[tuple[str, str]] = []
    items = list(enumerate(value)) if isinstance(value, list) else []
    refused = meta.get("unsupported_values") or {}
    for where, v in [(f"{path}[{i}]", v) for i, v in items] or [(path, value)]:
        if isinstance(v, str) and v in refused:
            found.append((where, f"not supported yet: {v!r}: {refused[v]}"))
    if found:
        return found
    check, each = meta.get("check"), meta.get("each")
    if check is not None and value is not None:
        message = check(value)
        if message is not None:
            found.append((path, message))
    if each is not None:
        for i, v in items:
            message = each(v)
            if message is not None:
                found.append((f"{path}[{i}]", message))
    return found


def _check_loadable_items(
    f: dataclasses.Field[Any], tp: Any, items: list[Any], path: str, report: Report
) -> None:
    """Run ``each`` on the items of a list that did load while others did not, so a bad port is reported
    next to a port that is not even a number."""
    each = f.metadata.get("each")
    if each is None or get_origin(tp) is not list:
        return
    for i, item in enumerate(items):
        value = _convert(get_args(tp)[0], item, "", Report())
        message = None if isinstance(value, _Invalid) else each(value)
        if message is not None and not isinstance(message, Advice):
            report.error(f"{path}[{i}]", message)
