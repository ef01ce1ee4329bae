"""Shared test configuration."""

import os

import pytest
from hypothesis import settings

# The fuzz tests (tests/test_data_bad.py) draw the same examples on every run by default, so that CI's
# verdict depends on the code alone, not on which random inputs a run happened to draw. Searching for
# new failures is a separate, deliberate run: `make fuzz` (HYPOTHESIS_PROFILE=explore: fresh random
# examples, many more of them). A failure it finds becomes a plain regression test.
# print_blob: a failure prints the @reproduce_failure line that replays it. The examples also depend
# on which modules pytest collected (hypothesis draws constants from them), so reproduce a failure of
# `make test` with that line rather than by running tests/test_data_bad.py alone.
settings.register_profile("ci", max_examples=150, derandomize=True, database=None, print_blob=True)
# Based on hypothesis's own default, not on the active profile (which is its "ci" when $CI is set).
settings.register_profile("explore", settings.get_profile("default"), max_examples=5000, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# helpers.py holds asserts (``_train_refused``): have pytest rewrite them as it does in test files, for their messages.
pytest.register_assert_rewrite("helpers")

from helpers import TINY  # noqa: E402  (after the rewrite is registered)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """A finished 3-epoch tiny run, trained once per session and shared by the tests of several files.

    Read it only: a test that changes a run copies this one first (``helpers._copy_run``).
    """
    from resnetlab.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    return train("fast", out=out, **{**TINY, "epochs": 3, "subset": 2048})
