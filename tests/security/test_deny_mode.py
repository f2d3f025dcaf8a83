"""Deny mode end to end: a forbidden syscall fails with the errno and the worker goes on, every
denial is reported (callback, per-call list, event), a flood of denials is killed, and the
syscalls that widen the kernel's attack surface kill in deny mode too, named as violations."""
import pytest

import sandbox
from sandbox import PolicyViolation

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

def mount():
    return ctypes.CDLL(None, use_errno=True).syscall(165, 0, 0, 0, 0, 0)  # mount(2): dangerous
"""
DENY = '[seccomp]\ndefault_action = "deny"\n'


@pytest.fixture
def denying(make_plugin):
    path, policy = make_plugin(PLUGIN, DENY)
    with sandbox.Worker(path, policy=policy) as w:
        yield w


def test_a_denied_syscall_fails_with_eperm_and_the_worker_goes_on(denying):
    import errno
    seen, events = [], []
    denying.on("denied", seen.append)
    unsubscribe = sandbox.events.subscribe(lambda ev: ev.name == "denied" and events.append(ev))
    try:
        assert denying.call("net") == errno.EPERM
    finally:
        unsubscribe()
    assert [n.name for n in denying.last_denials] == ["socket"]
    assert [n.name for n in seen] == ["socket"]
    assert events and events[0].fields["syscall"] == "socket"
    assert denying.call("net") == errno.EPERM  # still alive, still denied
    assert denying.alive


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
