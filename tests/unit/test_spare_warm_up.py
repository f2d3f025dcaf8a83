"""The spare's warm-up (zygote/spare.py) runs to the end: it is only a speed-up, so the spare
swallows its errors, and a warm-up broken by a change elsewhere would only show as a slower
start. Here it must raise nothing."""
import os

import pytest

from sandbox.zygote import spare

pytestmark = pytest.mark.unpriv


def test_the_warm_up_runs_to_the_end_and_changes_no_descriptor():
    before = set(os.listdir("/proc/self/fd"))
    spare.warm_up()
    assert set(os.listdir("/proc/self/fd")) == before
