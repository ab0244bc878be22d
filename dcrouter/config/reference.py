"""The Markdown reference of every configuration key, rendered from the schema's declarations, walked from
:class:`~dcrouter.config.options.DcRouterOptions` down through every block.

``python -m dcrouter.config.reference`` (or ``dcrouter config-reference``) prints it; ``--update FILE``
rewrites the part of FILE between :data:`BEGIN` and :data:`END` (``docs/configuration.md``), and a test
fails when that part is out of date, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeGuard, get_args, get_origin, get_type_hints

from dcrouter.config.options import DcRouterOptions
from dcrouter.config.schema import file_key, type_name

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

BEGIN = (
    "<!-- BEGIN GENERATED REFERENCE (python -m dcrouter.config.reference --update docs/configuration.md) -->"
)
END = "<!-- END GENERATED REFERENCE -->"


def _is_block(tp: Any) -> TypeGuard[type[DataclassInstance]]:
    # A type hint is a class, never a dataclass instance; isinstance says so to the type checker.
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _block_type(tp: Any) -> tuple[type[DataclassInstance] | None, bool]:
    """``(dataclass, is_list)`` when ``tp`` is a block, an optional block or a list of blocks."""
    args = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) is not list else []
    if len(args) == 1 and get_origin(tp) is not dict:
        tp = args[0]
    if get_origin(tp) is list:
        inner = get_args(tp)[0]
        return (inner, True) if _is_block(inner) else (None, False)
    return (tp, False) if _is_block(tp) else (None, False)


def _blocks(cls: type[DataclassInstance], path: str) -> Iterator[tuple[str, type[DataclassInstance]]]:
    """Every block under ``cls`` (itself first) with its key path; list items are written ``key[]``."""
    yield path, cls
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        inner, is_list = _block_type(hints[f.name])
        if inner is not None:
            sub = f"{path}.{file_key(f)}" if path else file_key(f)
            yield from _blocks(inner, sub + ("[]" if is_list else ""))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(f: dataclasses.Field[Any]) -> str:
    meta = f.metadata
    if meta.get("shown_default"):
        return str(meta["shown_default"])
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "**required**"
    if value is None:
        return "not set"
    if dataclasses.is_dataclass(value):
        return "all defaults"
    return f"`{json.dumps(value)}`"


def _type(tp: Any, path: str, key: str) -> str:
    inner, is_list = _block_type(tp)
    if inner is not None:
        sub = f"{path}.{key}" if path else key
        return f"list of tables (`{sub}[]`)" if is_list else f"table (`{sub}`)"
    return type_name(tp)


def _description(f: dataclasses.Field[Any]) -> str:
    meta = f.metadata
    parts = [meta.get("doc") or ""]
    parts.append("*dcrouter addition.*" if meta.get("addition") else "")
    if meta.get("unsupported"):
        parts.append(f"**Not supported yet:** {meta['unsupported']}")
    for value, why in (meta.get("unsupported_values") or {}).items():
        parts.append(f"**Not supported yet:** `{json.dumps(value)}`: {why}")
    return " ".join(p for p in parts if p)


def _table(cls: type, path: str) -> list[str]:
    hints = get_type_hints(cls)
    rows = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = file_key(f)
        cells = [f"`{key}`", _type(hints[f.name], path, key), _default(f), _description(f)]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return rows


def render() -> str:
    """The reference of every key, as Markdown: one table per block, in declaration order."""
    lines = [
        "## Reference",
        "",
        (
            "Generated from `dcrouter/config/options.py`. Keys are as written in the file; `x[]` stands for "
            "each item of the list `x`. *dcrouter addition* marks keys that are not in the seed's "
            "`ISmtpConfig` / `IDcRouterOptions`. A key whose feature is not built yet is refused unless it "
            "keeps its default."
        ),
    ]
    for path, cls in _blocks(DcRouterOptions, ""):
        lines += ["", f"### `{path}`" if path else "### Top level", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            lines += [cls.__doc__.strip(), ""]
        lines += _table(cls, path)
    return "\n".join(lines) + "\n"


def splice(document: str, generated: str) -> str:
    """``document`` with the text between :data:`BEGIN` and :data:`END` replaced by ``generated``.

    Raises ValueError when the markers are missing or out of order.
    """
    start, end = document.find(BEGIN), document.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the document lacks the markers {BEGIN!r} ... {END!r}")
    return document[: start + len(BEGIN)] + "\n" + generated + document[end:]


def main(argv: list[str] | None = None) -> int:
    """Print the reference, or with ``--update FILE`` splice it into FILE. Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m dcrouter.config.reference", description="Print the configuration key reference."
    )
    parser.add_argument("--update", metavar="FILE", help="rewrite the generated part of FILE in place")
    args = parser.parse_args(argv)
    if args.update is None:
        sys.stdout.write(render())
        return 0
    with open(args.update, encoding="utf-8") as f:
        document = f.read()
    try:
        updated = splice(document, render())
    except ValueError as e:
        print(f"{args.update}: {e}", file=sys.stderr)
        return 1
    if updated != document:
        with open(args.update, "w", encoding="utf-8") as f:
            f.write(updated)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
