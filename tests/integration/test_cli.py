"""The CLI contract: JSON on stdout, one JSON error object as stderr's last line, one exit code per kind."""
import json
import os
import subprocess
import sys

import pytest

from sandbox.cli import EXIT_CODES
from conftest import ROOT

pytestmark = pytest.mark.unpriv

PLUGIN = """
    def add(a, b):
        return a + b

    def fail():
        raise ValueError("bad input")

    def spin():
        while True:
            pass

    def net():
        import socket
        socket.socket()

    def crash():
        import os
        os._exit(3)

    def blob():
        return b"\\x00\\x01"
"""


def run(*args):
    return subprocess.run([sys.executable, "-m", "sandbox", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


@pytest.fixture
def plugin(make_plugin):
    return make_plugin(PLUGIN)


def last_json(stderr):
    return json.loads(stderr.strip().splitlines()[-1])


def test_success_prints_json(plugin):
    path, policy = plugin
    out = run("call", path, "add", "2", "40", "--policy", policy)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == 42
    out = run("call", path, "blob", "--policy", policy)
    assert json.loads(out.stdout) == {"$bytes": "AAE="}


@pytest.mark.parametrize("function,kind,extra", [
    ("fail", "plugin-error", {"type": "ValueError"}),
    ("spin", "timeout", {}),
    ("net", "violation", {"syscall": "socket"}),
    ("crash", "crashed", {"exit_code": 3}),
])
def test_failures_have_a_kind_and_exit_code(plugin, function, kind, extra):
    path, policy = plugin
    out = run("call", path, function, "--policy", policy, "--timeout", "1")
    rec = last_json(out.stderr)
    assert rec["error"] == kind
    for k, v in extra.items():
        assert rec[k] == v
    assert out.returncode == EXIT_CODES[kind]


def test_exit_codes_are_distinct():
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)
    assert 0 not in EXIT_CODES.values() and 2 not in EXIT_CODES.values()  # 2 is argparse's usage error


def test_policy_error_and_load_error(plugin, plugin_dir):
    path, _ = plugin
    bad = os.path.join(plugin_dir, "bad.toml")
    with open(bad, "w") as f:
        f.write("[limits]\ntimeout = 'soon'\n")
    out = run("call", path, "add", "1", "2", "--policy", bad)
    rec = last_json(out.stderr)
    assert rec["error"] == "policy-error" and "timeout" in rec["detail"] and "bad.toml" in rec["detail"]
    assert out.returncode == EXIT_CODES["policy-error"]
    out = run("call", os.path.join(plugin_dir, "nope.py"), "f", "--policy", plugin[1])
    assert last_json(out.stderr)["error"] == "load-error"
    assert out.returncode == EXIT_CODES["load-error"]


@pytest.mark.parametrize("args", [[], ["call"], ["call", "x.py"], ["call", "x.py", "f", "{bad json", "--policy", "p"],
                                  ["call", "x.py", "f", "--timeout", "-1", "--policy", "p"], ["frobnicate"]])
def test_bad_command_lines_get_usage_not_traceback(args):
    out = run(*args)
    assert out.returncode == 2
    assert "usage:" in out.stderr and "Traceback" not in out.stderr
