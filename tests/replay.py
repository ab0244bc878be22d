"""Replays one fuzz test outside trial, to see a failure in full (docs/fuzzing.md):

HYPOTHESIS_PROFILE=fuzz .venv/bin/python -m tests.replay tests.test_fuzz_mime.MimeFuzzTests.test_rewriter
"""

from __future__ import annotations

import importlib
import sys
import unittest

from tests import fuzzing


def replay(name: str) -> int:
    """Run one test method (``tests.test_fuzz_mime.MimeFuzzTests.test_rewriter``) outside trial and print
    its failure in full: Hypothesis attaches the failing example and the ``@reproduce_failure`` line to the
    exception as notes, which trial's report leaves out. Under the fuzz profile the example database replays
    the last failure first."""
    module_name, class_name, method = name.rsplit(".", 2)
    case = getattr(importlib.import_module(module_name), class_name)(method)
    result = unittest.TestResult()
    case.run(result)
    for _test, text in result.errors + result.failures:
        print(text, file=sys.stderr)
    if not result.wasSuccessful():
        return 1
    print(f"{name}: passed under the {fuzzing.PROFILE!r} profile")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m tests.replay tests.test_fuzz_X.SomeTests.test_y", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(replay(sys.argv[1]))
