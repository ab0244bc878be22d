"""The Hypothesis profiles of the test suite, and what the fuzz tests (``tests/test_fuzz_*.py``) share.

Importing this module registers two profiles and loads one (``tests/__init__.py`` imports it, so every test
module runs under it, whichever runs first):

- ``ci`` (the default): CI-safe. No deadline (a busy shared machine makes timing meaningless, and a slow
  example is not a defect here), derandomized (each test draws the same examples on every run, so a failure
  reproduces by running the test again and the suite never turns red by luck), no example database, and
  ``too_slow`` suppressed (some strategies build whole MIME messages or SMTP sessions; that is their point).
  Tests keep their own ``max_examples`` where they set one; the fuzz tests scale theirs with :func:`examples`.
- ``fuzz`` (``HYPOTHESIS_PROFILE=fuzz``, what ``make fuzz`` sets): random, many examples, the example
  database kept in ``.hypothesis/fuzz`` at the top of the checkout, so a failure found once is replayed
  first on the next run, and ``print_blob`` so a failure prints the ``@reproduce_failure`` line to paste.

``HYPOTHESIS_FUZZ_EXAMPLES`` sets the fuzz profile's base number of examples per parser (default 100,000);
see docs/fuzzing.md.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
#: Examples per fuzz test at weight 1 in the CI profile: a few seconds per parser on a busy 2-core machine.
CI_EXAMPLES = 100
FUZZ_EXAMPLES = int(os.environ.get("HYPOTHESIS_FUZZ_EXAMPLES", "100000"))

_CHECKOUT = Path(__file__).resolve().parent.parent
_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=_SLOW,
)
settings.register_profile(
    "fuzz",
    deadline=None,
    max_examples=FUZZ_EXAMPLES,
    database=DirectoryBasedExampleDatabase(
        str(Path(__file__).resolve().parent.parent / ".hypothesis" / "fuzz")
    ),
    suppress_health_check=_SLOW,
    print_blob=True,
)
settings.load_profile(PROFILE)


def examples(weight: float = 1.0) -> settings:
    """Settings for one fuzz test: ``weight`` times the profile's base number of examples (a parser whose
    examples are expensive, like a whole SMTP session, takes a smaller share of the fuzz run)."""
    base = FUZZ_EXAMPLES if PROFILE == "fuzz" else CI_EXAMPLES
    return settings(max_examples=max(1, round(base * weight)))


def _apply(base: bytes, edits: list[tuple[int, int, int, bytes]]) -> bytes:
    data = bytearray(base)
    for kind, where, size, insert in edits:
        at = where % (len(data) + 1)
        if kind == 0:  # overwrite one byte
            if at < len(data):
                data[at] = insert[0] if insert else 0
        elif kind == 1:  # insert bytes
            data[at:at] = insert
        elif kind == 2:  # delete a run
            del data[at : at + size]
        elif kind == 3:  # set a byte to a boundary value (lengths are where parsers break)
            if at < len(data):
                data[at] = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)[size % 6]
        else:  # cut here
            del data[at:]
    return bytes(data)


def mutated(base: bytes | st.SearchStrategy[bytes], *, max_edits: int = 4) -> st.SearchStrategy[bytes]:
    """``base`` (bytes, or a strategy of them) with a few random edits: bytes overwritten, inserted or
    deleted, set to boundary values, or cut off. Valid inputs slightly broken find more than random bytes."""
    bases = base if isinstance(base, st.SearchStrategy) else st.just(base)
    edit = st.tuples(
        st.integers(0, 4), st.integers(0, 1 << 16), st.integers(0, 16), st.binary(min_size=1, max_size=8)
    )
    return st.builds(_apply, bases, st.lists(edit, max_size=max_edits))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any integers; they are folded into range) into pieces."""
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]
