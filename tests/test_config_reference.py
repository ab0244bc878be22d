"""Tests for dcrouter.config.reference and docs/configuration.md: the documentation says what the code
does."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import sys
from collections.abc import Iterator
from typing import Any, get_type_hints

from twisted.trial import unittest

from dcrouter.config import load_options
from dcrouter.config.options import DcRouterOptions
from dcrouter.config.reference import BEGIN, END, _block_type, main, render, splice
from dcrouter.config.schema import file_key

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "configuration.md")


def _keys(cls: type, path: str) -> Iterator[tuple[str, str, dataclasses.Field[Any]]]:
    """(block path, key, field) of every declared key."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        yield path, file_key(f), f
        inner, is_list = _block_type(hints[f.name])
        if inner is not None:
            sub = f"{path}.{file_key(f)}" if path else file_key(f)
            yield from _keys(inner, sub + ("[]" if is_list else ""))


def _section(text: str, path: str) -> str:
    heading = f"### `{path}`" if path else "### Top level"
    start = text.index(heading + "\n")
    end = text.find("\n### ", start + 1)
    return text[start : end if end > 0 else len(text)]


class RenderTests(unittest.TestCase):
    def test_every_key_documented(self) -> None:
        text = render()
        for path, key, f in _keys(DcRouterOptions, ""):
            rows = _section(text, path).splitlines()
            row = next((line for line in rows if line.startswith(f"| `{key}` |")), None)
            self.assertIsNotNone(row, f"{path}.{key} missing from the reference")
            assert row is not None
            self.assertEqual("*dcrouter addition.*" in row, bool(f.metadata["addition"]), row)
            self.assertEqual(
                "**Not supported yet:**" in row,
                bool(f.metadata["unsupported"] or f.metadata["unsupported_values"]),
                row,
            )

    def test_rows(self) -> None:
        smtp = _section(render(), "smtpConfig")
        self.assertIn("| `ports` | list of integers | `[25, 587, 465]` | Ports to accept SMTP on. |", smtp)
        self.assertIn("| `hostname` | string | the machine's fully qualified name |", smtp)
        self.assertIn('| `queueStorage` | one of "memory", "disk", "redis" | `"disk"` |', smtp)
        self.assertIn("`redis` shares one queue", smtp)
        users = _section(render(), "smtpConfig.auth.users[]")
        self.assertIn("| `password` | string | **required** |", users)

    def test_stable(self) -> None:
        """Nothing machine-dependent (such as this host's name) leaks into the reference."""
        import socket

        self.assertNotIn(f'`"{socket.getfqdn()}"`', render())
        self.assertEqual(render(), render())


class DocumentTests(unittest.TestCase):
    def read(self) -> str:
        with open(DOC, encoding="utf-8") as f:
            return f.read()

    def test_reference_up_to_date(self) -> None:
        text = self.read()
        self.assertEqual(
            text,
            splice(text, render()),
            "docs/configuration.md is out of date: run python -m dcrouter.config.reference --update "
            "docs/configuration.md",
        )

    def test_example_loads(self) -> None:
        """The complete TOML example in the document passes every check without a warning."""
        import tomllib

        blocks = re.findall(r"```toml\n(.*?)```", self.read(), re.S)
        self.assertEqual(len(blocks), 1)
        self.assertEqual(load_options(tomllib.loads(blocks[0])).warnings, [])

    def test_splice(self) -> None:
        self.assertEqual(splice(f"a\n{BEGIN}\nold\n{END}\nb", "new\n"), f"a\n{BEGIN}\nnew\n{END}\nb")
        self.assertRaises(ValueError, splice, "no markers", "x")
        self.assertRaises(ValueError, splice, f"{END}\n{BEGIN}", "x")

    def test_update(self) -> None:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"intro\n{BEGIN}\nstale\n{END}\n")
        self.assertEqual(main(["--update", path]), 0)
        with open(path, encoding="utf-8") as f:
            self.assertEqual(f.read(), f"intro\n{BEGIN}\n{render()}{END}\n")

    def test_print(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(main([]), 0)
        self.assertEqual(out.getvalue(), render())
