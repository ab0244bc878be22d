"""Fuzzing the configuration loader (dcrouter.config.load): documents built from the schema itself (every
block, every key, values of the declared type or of any other), mutations of the example configuration, and
random bytes as a TOML or JSON file.

Whatever the input: the loader returns options or raises ConfigError, never another exception, and every
error starts with the key path it is about (or is about the file as a whole)."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import tomllib
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.config.load import ConfigError, ConfigResult, load_file, load_options
from dcrouter.config.options import DcRouterOptions
from dcrouter.config.schema import file_key
from tests.fuzzing import examples

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(_ROOT, "etc", "dcrouter.example.toml"), "rb") as _f:
    EXAMPLE = tomllib.load(_f)

#: Strings the checks look into: names, addresses, networks, ports, durations, paths (none that exists as a
#: certificate, so no real file is read by accident beyond a directory).
_STRINGS = st.sampled_from(
    [
        "",
        "example.org",
        "*.example.org",
        "*",
        "localhost",
        "mx.example.test",
        "127.0.0.1",
        "::1",
        "10.0.0.0/8",
        "10.0.0.1/33",
        "1.2.3.4:25",
        "[::1]:25",
        "a@example.org",
        "user",
        "memory",
        "disk",
        "redis",
        "v1",
        "v2",
        "none",
        "terminate",
        "passthrough",
        "intermediate",
        "modern",
        "PLAIN",
        "LOGIN",
        "reject",
        "tag",
        "quarantine",
        "info",
        "debug",
        "clamav",
        "spamassassin",
        "rspamd",
        "var/x",
        ".",
        "/",
        "/nonexistent/x.pem",
        "redis://127.0.0.1:1",
        "ü.example",
        "xn--",
        "0",
        "-1",
        "1e3",
        "30s",
        "a\x00b",
        "\ud800x",
        "a" * 300,
    ]
)
_text = st.one_of(_STRINGS, _STRINGS, st.text(max_size=12))
_ints = st.one_of(
    st.sampled_from([0, -1, 1, 25, 465, 587, 65535, 65536, 2**31, 2**63, -(2**63)]), st.integers()
)
_floats = st.one_of(st.sampled_from([0.0, -0.5, 1.5, float("inf"), float("nan")]), st.floats())
any_value = st.recursive(
    st.one_of(st.none(), st.booleans(), _ints, _floats, _text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_text, inner, max_size=3)),
    max_leaves=6,
)


#: Values for keys that name a file or directory: what open() and os.makedirs refuse included (NUL, a lone
#: surrogate from a JSON escape, a directory where a file is expected).
_PATHS = st.sampled_from(["a\x00b", "\ud800.pem", "\udcff", "", ".", "/", "/nonexistent/x.pem", "var/x", "~"])
_PATH_KEYS = ("Path", "File", "Directory")


def value_of(tp: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values for a declared type: mostly of that type (its edge cases included), sometimes anything."""
    return st.one_of(*[_typed(tp, depth)] * 5, any_value)


def _typed(tp: Any, depth: int) -> st.SearchStrategy[Any]:
    origin = get_origin(tp)
    if tp is Any:
        return any_value
    if origin is Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return st.one_of([value_of(a, depth) for a in get_args(tp) if a is not type(None)] + [st.none()])
    if dataclasses.is_dataclass(tp):
        return block(tp, depth + 1) if depth < 4 else st.just({})
    if origin is list:
        return st.lists(value_of(get_args(tp)[0], depth), max_size=3)
    if origin is dict:
        return st.dictionaries(_text, value_of(get_args(tp)[1], depth), max_size=3)
    if origin is Literal:
        return st.sampled_from(get_args(tp))
    if tp is bool:
        return st.booleans()
    if tp is int:
        return _ints
    if tp is float:
        return st.one_of(_floats, _ints)
    if tp is str:
        return _text
    return any_value


_BLOCKS: dict[tuple[type, int], st.SearchStrategy[dict[str, Any]]] = {}


def block(cls: type, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Tables of schema block ``cls``: any subset of its keys, with values as above, and now and then an
    unknown key."""
    if (cls, depth) not in _BLOCKS:
        hints = get_type_hints(cls)
        optional = {
            file_key(f): st.deferred(lambda t=hints[f.name]: value_of(t, depth))
            for f in dataclasses.fields(cls)
        }
        # The keys naming files together (certPath with keyPath): a check reads them as a pair.
        paths = st.fixed_dictionaries({key: _PATHS for key in optional if key.endswith(_PATH_KEYS)})
        _BLOCKS[cls, depth] = st.builds(
            lambda known, files, unknown: {**unknown, **known, **files},
            st.fixed_dictionaries({}, optional=optional),
            st.one_of(st.just({}), paths),
            st.one_of(st.just({}), st.just({}), st.just({}), st.dictionaries(_text, any_value, max_size=1)),
        )
    return _BLOCKS[cls, depth]


def _mutate(document: dict[str, Any], path: list[int], value: Any, delete: bool) -> dict[str, Any]:
    """The example with one value replaced (or deleted) at a position picked by ``path``."""
    copy = json.loads(json.dumps(document))
    node: Any = copy
    for step in path:
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        if not children:
            break
        key, child = children[step % len(children)]
        if not isinstance(child, (dict, list)) or not child or step % 3 == 0:
            if delete and isinstance(node, dict):
                del node[key]
            else:
                node[key] = value
            return copy
        node = child
    return copy


def _top_level_blocks() -> list[st.SearchStrategy[dict[str, Any]]]:
    """A document holding one top-level block (or list of blocks), so each is reached often."""
    hints = get_type_hints(DcRouterOptions)
    found = []
    for f in dataclasses.fields(DcRouterOptions):
        key = file_key(f)
        found.append(_typed(hints[f.name], 0).map(lambda value, key=key: {key: value}))
    return found


documents = st.one_of(
    block(DcRouterOptions),
    *_top_level_blocks(),
    st.builds(
        _mutate,
        st.just(EXAMPLE),
        st.lists(st.integers(0, 50), min_size=1, max_size=5),
        any_value,
        st.booleans(),
    ),
    any_value.filter(lambda v: isinstance(v, dict)),
)


def check_errors(test: SynchronousTestCase, raw: dict[str, Any], error: ConfigError) -> None:
    test.assertTrue(error.errors)
    for message in error.errors:
        # "<key path>: <what is wrong>", the path starting at a key of the document or of the schema.
        test.assertIsInstance(message, str)
        starts = [str(k) for k in raw] + [file_key(f) for f in dataclasses.fields(DcRouterOptions)]
        test.assertTrue(message.startswith(": ") or any(message.startswith(k) for k in starts), message)


class ConfigLoaderFuzzTests(SynchronousTestCase):
    @examples(1)
    @given(documents)
    def test_documents(self, raw: dict[str, Any]) -> None:
        try:
            result = load_options(raw)
        except ConfigError as error:
            check_errors(self, raw, error)
        else:
            self.assertIsInstance(result, ConfigResult)

    @examples(0.3)
    @given(
        st.one_of(
            st.binary(max_size=200),
            st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
            documents.map(lambda d: json.dumps(d).encode()),
        ),
        st.sampled_from([".toml", ".json"]),
    )
    def test_files(self, data: bytes, ext: str) -> None:
        fd, path = tempfile.mkstemp(suffix=ext, dir=self.mktemp_dir())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            load_file(path)
        except ConfigError as error:
            self.assertTrue(error.errors)
        finally:
            os.unlink(path)

    def mktemp_dir(self) -> str:
        if not hasattr(self, "_dir"):
            self._dir = self.mktemp()
            os.makedirs(self._dir)
        return self._dir
