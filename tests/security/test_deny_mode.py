"""Deny mode end to end, as the shipped default has it: a forbidden syscall fails with the errno
and the worker goes on, every denial is reported (callback, per-call list, event with the decoded
call and the key that would grant it, the log, the CLI's JSON), a flood of denials is killed
(at the policy's own max_denials), and the syscalls that widen the kernel's attack surface kill
in deny mode too, named as violations."""
import json
import logging
import subprocess
import sys

import pytest

import sandbox
from sandbox import PolicyViolation
from helpers import DEFAULT_POLICY, ROOT
from procfs import wait_until

pytestmark = pytest.mark.unpriv

PLUGIN = """
import ctypes
import socket

def net():
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError as e:
        return e.errno
    return "socket created"

def flood(n):
    for _ in range(n):
        try:
            socket.socket(socket.AF_INET)
        except OSError:
            pass
    return n

def raw_net():
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # the PermissionError surfaces here

def mount():
    return ctypes.CDLL(None, use_errno=True).syscall(165, 0, 0, 0, 0, 0)  # mount(2): dangerous
"""


@pytest.fixture
def denying(make_plugin):
    path, policy = make_plugin(PLUGIN)  # no policy of its own: the shipped default, deny mode
    assert policy == DEFAULT_POLICY
    with sandbox.Worker(path, policy=policy) as w:
        assert w.policy.seccomp.default_action == "deny"
        yield w


def test_a_denied_syscall_fails_with_eperm_and_the_worker_goes_on(denying, caplog):
    import errno
    seen, events = [], []
    denying.on("denied", seen.append)
    unsubscribe = sandbox.events.subscribe(lambda ev: ev.name == "denied" and events.append(ev))
    try:
        with caplog.at_level(logging.WARNING, logger="sandbox"):
            assert denying.call("net") == errno.EPERM
    finally:
        unsubscribe()
    assert [n.name for n in denying.last_denials] == ["socket"]
    assert [n.name for n in seen] == ["socket"]
    assert wait_until(lambda: events, 5) and events[0].fields["syscall"] == "socket"
    f = events[0].fields
    assert f["errno"] == errno.EPERM and f["policy"] == DEFAULT_POLICY and f["plugin"] == denying.name
    assert f["detail"].startswith("socket(AF_INET, SOCK_STREAM"), f
    assert f["grant"] == 'network.allow + network.families = ["inet"]', f
    logged = [r.getMessage() for r in caplog.records if "denied socket(AF_INET" in r.getMessage()]
    assert logged and "EPERM" in logged[0] and "network.families" in logged[0], caplog.text
    assert denying.call("net") == errno.EPERM  # still alive, still denied
    assert denying.alive


def test_a_denial_is_in_the_cli_json(make_plugin):
    """`sandbox call` under the default: the call succeeds (the plugin copes with EPERM), stdout is
    the result, and stderr holds one JSON line per denial; a call that fails lists them in its error."""
    path, _ = make_plugin(PLUGIN + "\ndef net_raises():\n    import socket\n    socket.socket(socket.AF_INET)\n")
    run = [sys.executable, "-m", "sandbox", "call", path]
    out = subprocess.run(run + ["net"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and json.loads(out.stdout) == 1, out.stderr
    lines = [json.loads(x) for x in out.stderr.splitlines() if x.startswith("{")]
    assert [(d["denied"], d["errno"]) for d in lines] == [("socket", "EPERM")], out.stderr
    assert "network.families" in lines[0]["grant"] and lines[0]["policy"].endswith("default.toml")
    out = subprocess.run(run + ["net_raises"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    rec = json.loads(out.stderr.strip().splitlines()[-1])
    assert rec["error"] == "plugin-error" and rec["type"] == "PermissionError", out.stderr
    assert [d["denied"] for d in rec["denials"]] == ["socket"], rec


def test_the_policys_own_denial_budget_is_kept(make_plugin):
    path, policy = make_plugin(PLUGIN, "[seccomp]\nmax_denials = 5\n")
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("flood", 5) == 5  # at the budget
        with pytest.raises(PolicyViolation) as ei:
            w.call("flood", 6)
        assert "more than 5 denied syscalls in one call" in str(ei.value)


def test_a_flood_of_denials_in_one_call_is_killed(denying):
    assert denying.call("flood", 10) == 10  # under the budget
    with pytest.raises(PolicyViolation) as ei:
        denying.call("flood", 1000)
    assert "denied syscalls in one call" in str(ei.value)
    assert not denying.alive


def test_a_dangerous_syscall_kills_in_deny_mode_too(denying):
    with pytest.raises(PolicyViolation) as ei:
        denying.call("mount")
    assert ei.value.syscall == "mount"
    assert "allow_dangerous" in str(ei.value)


def test_a_worker_whose_policy_is_bad_fails_cleanly(make_plugin, monkeypatch):
    """A constructor that fails before the worker exists leaves nothing for __del__ to trip on."""
    import gc
    import sys
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    path, policy = make_plugin(PLUGIN, '[seccomp]\ndefault_action = "nonsense"\n')
    with pytest.raises(sandbox.PolicyError):
        sandbox.Worker(path, policy=policy)
    gc.collect()
    assert unraisable == []


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_an_exception_after_a_denial_names_the_syscall_the_grant_and_the_line(make_plugin, driver):
    """The errno of a denial surfacing as the plugin's exception: the error says which syscall was
    denied, what would grant it and the plugin's line that raised; it survives pickle and JSON."""
    import asyncio
    import pickle
    path, policy = make_plugin(PLUGIN)

    async def run():
        if driver == "sync":
            with sandbox.Worker(path, policy=policy) as w:
                with pytest.raises(sandbox.PluginError) as info:
                    w.call("raw_net")
                assert w.call("net") == 1  # and a call that copes says nothing of it
                return info.value
        async with sandbox.AsyncWorker(path, policy=policy) as w:
            with pytest.raises(sandbox.PluginError) as info:
                await w.call("raw_net")
            return info.value

    e = asyncio.run(run())
    assert e.type == "PermissionError"
    line = PLUGIN.splitlines().index("    return socket.socket(socket.AF_INET, socket.SOCK_STREAM)"
                                     "  # the PermissionError surfaces here") + 1
    assert e.denied and e.denied.startswith("socket(AF_INET, SOCK_STREAM"), e.denied
    assert 'network.families = ["inet"]' in e.denied and f"worker.py:{line}" in e.denied, e.denied
    assert e.denied in str(e)
    again = pickle.loads(pickle.dumps(e))
    assert again.denied == e.denied and str(again) == str(e)
    assert sandbox.SandboxError.from_dict(json.loads(json.dumps(e.to_dict()))).denied == e.denied
