"""dcrouter's tests. Importing the package loads the Hypothesis profile of tests/fuzzing.py, so every test
module runs under the same one, whichever module trial imports first."""

import tests.fuzzing  # noqa: F401
