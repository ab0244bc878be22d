"""How a configuration block is declared, and how one is built from raw data (a parsed TOML or JSON table).

A block is a frozen dataclass whose fields are declared with :func:`option` (file key, documentation, value
checks, whether the feature behind it is built) and whose checks across keys are attached with
:func:`checked`. :func:`build_block` converts a raw table into such a block: every key is converted by the
type it is declared with, then checked; nothing stops at the first mistake, every error is reported through
a :class:`Report`, each prefixed with its key path as written in the file
(``smtpConfig.domainConfigs[1].targetIPs[0]``).

A value check takes the converted value and returns ``None`` when it is fine, an error message, or an
:class:`Advice` (a warning message); the ready ones are in :mod:`dcrouter.config.values`.

A block check (:func:`block_check`) sees one whole block after its keys were converted and reports through a
:class:`Report`. It names the attributes it reads; it runs only when all of them loaded without error, so one
mistake is reported once rather than again by every check that reads the same key.

This module imports no other module of the package: dcrouter's own blocks and plugins' option blocks are
written with it alike.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

_B = TypeVar("_B")

MISSING = dataclasses.MISSING


class Advice(str):
    """A value check's result that is a warning, not an error."""


ValueCheck = Callable[[Any], "str | None"]


class Report:
    """Collects every error and warning of one load, in the order found."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def warning(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}")


@dataclass(frozen=True)
class BlockCheck(Generic[_B]):
    """A check of one block of type ``_B``: ``run(block, path, report)``; ``needs`` are the attributes it
    reads (dotted paths reach into nested blocks: ``smtp_config.ports``)."""

    needs: tuple[str, ...]
    run: Callable[[_B, str, Report], None]


def block_check(*needs: str) -> Callable[[Callable[[_B, str, Report], None]], BlockCheck[_B]]:
    """Decorate ``run(block, path, report)`` into a :class:`BlockCheck` reading the attributes ``needs``.

    ``run`` is given a view of the block with the attributes of its schema class: those in ``needs`` (and
    the blocks on their dotted paths, which are then set, not None) are loaded and checked; another
    attribute is there only if its key loaded too, so a check reads nothing it does not name.
    :func:`set_in_file` tells a key the file sets from one left at its default.
    """

    def wrap(run: Callable[[_B, str, Report], None]) -> BlockCheck[_B]:
        return BlockCheck(needs, run)

    return wrap


def join(path: str, key: str) -> str:
    """The key path of ``key`` inside the block at ``path`` (``""`` for the top level)."""
    return f"{path}.{key}" if path else key


def option(
    default: Any = MISSING,
    *,
    factory: Any = MISSING,
    key: str | None = None,
    doc: str = "",
    addition: bool = False,
    unsupported: str | None = None,
    unsupported_values: Mapping[Any, str] | None = None,
    check: ValueCheck | None = None,
    each: ValueCheck | None = None,
    shown_default: str | None = None,
) -> Any:
    """Declare one configuration key.

    The key in files is ``key``, or the camelCase of the attribute (:func:`file_key`). ``addition``: the key
    is dcrouter's, not the seed's. ``unsupported``: the feature is not built yet; any value other than the
    default is refused with "not supported yet" and this text. ``unsupported_values``: the same for single
    values of the key (or of its list items). ``check`` runs on the loaded value, ``each`` on every item of
    a list (see :mod:`dcrouter.config.values`); both run on defaults too. ``shown_default`` replaces the
    default in the reference where it depends on the machine.
    """
    metadata = {
        "key": key,
        "doc": doc,
        "addition": addition,
        "unsupported": unsupported,
        "unsupported_values": dict(unsupported_values or {}),
        "check": check,
        "each": each,
        "shown_default": shown_default,
    }
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def checked(*checks: BlockCheck[_B]) -> Callable[[type[_B]], type[_B]]:
    """Attach checks across the keys of a block; they run after the block's keys loaded. A type checker
    refuses a check written for another block."""

    def attach(cls: type[_B]) -> type[_B]:
        # setattr, not assignment: an arbitrary class has no declared attribute for mypy to check against.
        setattr(cls, "__config_checks__", checks)  # noqa: B010
        return cls

    return attach


def block_checks(cls: type) -> tuple[BlockCheck[Any], ...]:
    """The block checks attached to a schema class with :func:`checked`."""
    return tuple(getattr(cls, "__config_checks__", ()))


def set_in_file(block: object, attr: str) -> bool:
    """Whether the file sets the key of attribute ``attr`` of the block a block check sees (False: the
    attribute holds its default)."""
    return attr in vars(block)["_given"]


def file_key(f: dataclasses.Field[Any]) -> str:
    """The key of a schema field in files: its declared ``key`` or the camelCase of its attribute."""
    declared = f.metadata.get("key")
    if declared:
        return str(declared)
    head, *rest = f.name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


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


def build_block(cls: type[_B], raw: Any, path: str, report: Report) -> _B | None:
    """A block of schema dataclass ``cls`` loaded from ``raw``, with every error reported under ``path``;
    None when anything in it is wrong. The loader builds the whole configuration with it, and plugins their
    own options blocks."""
    value = _build(cls, raw, path, report)
    return None if isinstance(value, _Invalid) else value


# --- building ----------------------------------------------------------------------------------------------


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
    if tp is str and type(value) is str and "\x00" in value:
        # No setting can hold a NUL: a path would be cut short by the OS (or raise at start-up), a name would
        # reach a peer or a log truncated.
        report.error(path, "contains a NUL character (\\x00)")
        return _INVALID
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
    # A JSON object that saw a key twice says so (see dcrouter.config.load); json would keep the last one.
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
    ``_given``, the attributes whose keys the file sets (the rest are defaults; see :func:`set_in_file`)."""
    fields = {k: _view(v.values) if isinstance(v, _Partial) else v for k, v in values.items()}
    return types.SimpleNamespace(_given=given, **fields)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _field_value(
    f: dataclasses.Field[Any], tp: Any, raw: Mapping[str, Any], path: str, report: Report
) -> Any:
    """The converted and checked value of one field, or ``_INVALID`` after reporting."""
    default = _default(f)
    if file_key(f) in raw:
        value = _convert(tp, raw[file_key(f)], path, report)
    elif default is MISSING:
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
