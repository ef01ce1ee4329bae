"""Shared test configuration."""

import os

from hypothesis import settings

# The fuzz tests (tests/test_data_bad.py) draw the same examples on every run by default, so that CI's
# verdict depends on the code alone, not on which random inputs a run happened to draw. Searching for
# new failures is a separate, deliberate run: `make fuzz` (HYPOTHESIS_PROFILE=explore: fresh random
# examples, many more of them). A failure it finds becomes a plain regression test.
settings.register_profile("ci", max_examples=150, derandomize=True, database=None)
settings.register_profile("explore", max_examples=5000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
