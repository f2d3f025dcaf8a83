"""`sandbox policy lint` and `sandbox policy learn` reach their tools from the one CLI."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unpriv
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sandbox(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "sandbox", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_policy_lint_is_a_subcommand():
    out = _sandbox("policy", "lint", "--json", os.path.join(ROOT, "policies", "textstats.toml"))
    assert out.returncode in (0, 1), out.stderr
    assert json.loads(out.stdout)["file"].endswith("textstats.toml")


def test_policy_lint_of_a_missing_file_is_an_error_exit():
    out = _sandbox("policy", "lint", "/nonexistent/policy.toml")
    assert out.returncode == 2
    assert "not found" in out.stdout + out.stderr


def test_policy_learn_is_a_subcommand_and_fails_cleanly():
    helped = _sandbox("policy", "learn", "--help")
    assert helped.returncode == 0 and "--call" in helped.stdout
    bad = _sandbox("policy", "learn", "/nonexistent/worker.py", "--call", "f", "--out", "/tmp/never-written.toml")
    assert bad.returncode != 0
    assert json.loads(bad.stderr.strip().splitlines()[-1])["error"] == "usage-error"
    assert "Traceback" not in bad.stderr
