"""The CLI contract: JSON on stdout, one JSON error object as stderr's last line, one exit code per kind."""
import json
import os
import subprocess
import sys

import pytest

from sandbox.cli import EXIT_CODES
from helpers import ROOT

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

    def shout():
        raise ValueError("\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202eevil\\nsecond line")

    def floats():
        return [float("nan"), float("inf"), -float("inf")]
"""


def run(*args):
    return subprocess.run([sys.executable, "-m", "sandbox", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


@pytest.fixture
def plugin(make_plugin):
    """The plugin under the shipped default with kill mode pinned: a forbidden syscall is a violation."""
    return make_plugin(PLUGIN, '[seccomp]\ndefault_action = "kill"\n')


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


def test_call_without_policy_uses_the_shipped_default(plugin):
    path, _ = plugin
    for extra in ([], ["--policy", "default"]):
        out = run("call", path, "add", "2", "40", *extra)
        assert out.returncode == 0 and json.loads(out.stdout) == 42, out.stderr
    out = run("call", path, "net")  # deny mode: socket() fails in the plugin, and the denial is reported
    rec = last_json(out.stderr)
    assert rec["error"] == "plugin-error" and rec["type"] == "PermissionError", out.stderr
    assert [(d["denied"], d["errno"]) for d in rec["denials"]] == [("socket", "EPERM")], rec
    assert rec["denials"][0]["policy"].endswith("default.toml")
    assert out.returncode == EXIT_CODES["plugin-error"]


def test_explain_default_groups_and_version():
    out = run("policy", "explain", "default")
    assert out.returncode == 0 and "policy default" in out.stdout and "@python-runtime" in out.stdout
    e = json.loads(run("policy", "explain", "default", "--json").stdout)
    assert e["name"] == "default" and e["facts"] == {"may_fork": False, "may_thread": False, "may_network": False}
    text = run("policy", "groups").stdout
    assert "@file-attributes" in text and "compared:" in text and "ioctl fails with ENOTTY" in text
    groups = json.loads(run("policy", "groups", "--json").stdout)
    assert "fchmod" in groups["@file-attributes"]["allow"] and groups["@threads"]["why"]
    from importlib.metadata import version
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"sandbox {version('sandbox-plugins')}"


def test_plugin_text_cannot_drive_the_terminal(plugin):
    path, policy = plugin
    out = run("call", path, "shout", "--policy", policy)
    human = [line for line in out.stderr.splitlines() if line.startswith("sandbox: ")]
    assert len(human) == 1, out.stderr
    for bad in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert bad not in human[0]
    assert "\\x1b]0;pwned" in human[0] and "\\nsecond line" in human[0]
    assert all(ord(c) < 128 for c in out.stderr.splitlines()[-1])  # the JSON line: JSON's own escapes
    rec = last_json(out.stderr)
    assert rec["message"] == "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202eevil\nsecond line"  # exact


def test_stdout_is_strict_json(plugin):
    path, policy = plugin
    out = run("call", path, "floats", "--policy", policy)
    assert out.stdout == "" and out.returncode == EXIT_CODES["not-json"]
    assert last_json(out.stderr)["error"] == "not-json"
    out = run("call", path, "add", "NaN", "1", "--policy", policy)  # nor taken in
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_worker_py_that_is_not_a_regular_file(plugin_dir):
    fifo = os.path.join(plugin_dir, "worker.py")
    os.mkfifo(fifo)
    out = run("call", fifo, "f")
    assert last_json(out.stderr)["error"] == "load-error" and "regular file" in out.stderr


def test_malformed_command_lines_end_in_usage_or_the_json_contract(plugin, plugin_dir):
    """Bounded: 200 random command lines, in-process, each with a deadline."""
    import contextlib
    import io
    import signal

    from hypothesis import HealthCheck, given, settings, strategies as st

    from sandbox.cli import main

    path, policy = plugin
    fifo = os.path.join(plugin_dir, "fifo")
    os.mkfifo(fifo)
    vocab = ["call", "policy", "explain", "groups", "--policy", "--timeout", "--json", "--version", "--help",
             "default", path, policy, fifo, plugin_dir, "/nonexistent.py", "add", "fail", "shout", "floats",
             "1", "-1", "0", "nan", "inf", "1e999", "{", "[1,", '"\x1b"', "[]", "{}", "--", "-", "\udcff", ""]

    def alarm(*_):
        raise TimeoutError("a command line hung")

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.lists(st.one_of(st.sampled_from(vocab), st.text(max_size=6)), max_size=7))
    def one(argv):
        out, err = io.StringIO(), io.StringIO()
        old = signal.signal(signal.SIGALRM, alarm)
        signal.alarm(60)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as e:
                    code = e.code
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        # a bare traceback of ours starts a line; a plugin's own traceback travels inside the JSON
        # record (one line, its newlines escaped), which is the contract
        assert not any(line.startswith("Traceback") for line in err.getvalue().splitlines())
        if code == 2:
            return  # argparse's usage error
        if code not in (0, None):
            rec = json.loads(err.getvalue().strip().splitlines()[-1])
            assert rec["error"] in EXIT_CODES and EXIT_CODES[rec["error"]] == code
            assert rec["error"] != "error", rec  # no internal error

    one()
