"""The security suite's attack harness, imported as a plain module (`from security.attack_lab import intact`).

Escape attempts, tried against real workers. Each test says which layer must stop the attack
and checks: (1) it failed with the expected error, (2) its effect did not happen, (3) the host is
intact (answers, no leaked fd, no zombie), (4) a sibling worker started before the attack still
answers. The `lab` fixture (conftest.py) gives the folder and a policy maker these use.
"""
import contextlib
import errno
import os

import pytest

import sandbox
import sandbox.events
from sandbox import PluginError, PolicyViolation
from sandbox.policy.dangerous import DANGEROUS
from helpers import DEFAULT_POLICY
from procfs import open_fds, rss_kib, wait_until, zombies_of

PLUGIN_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins", "attacks.py")


def base(parent: str = DEFAULT_POLICY) -> str:
    return f'extends = "{parent}"\n[python]\npreload = ["ctypes"]\n[filesystem]\nread_only = ["/proc/self"]\n'


BASE = base()
# The two answers a policy can give a forbidden syscall. "deny" is the shipped default; "kill" is
# pinned by a one-line policy that extends it, for the tests that prove the filter itself kills.
MODES = ("kill", "deny")
KILL_PIN = '[seccomp]\ndefault_action = "kill"\n'

__all__ = ["BASE", "KILL_PIN", "MODES", "PLUGIN_SRC", "base", "denied", "intact", "rss_kib", "stopped",
           "violation"]


@contextlib.contextmanager
def intact(lab, extra="", scratch=False, mode=None):
    """Yield a worker to attack; afterwards prove the host and a sibling are unharmed. `mode`:
    None or "deny" for the shipped default, "kill" for the default with kill mode pinned."""
    d, policy = lab
    sibling = sandbox.Worker(os.path.join(d, "attacks.py"), policy=policy())
    fds_before = open_fds()
    w = sandbox.Worker(os.path.join(d, "attacks.py"), policy=policy(extra, scratch, mode))
    try:
        yield w
    finally:
        w.close()
    assert sibling.call("sys", 39)[0] == 1  # getpid through ctypes: the sibling is fine (pid 1 of its namespace)
    sibling.close()
    fresh = sandbox.Worker(os.path.join(d, "attacks.py"), policy=policy())
    assert fresh.call("read", "/proc/self/status")[:5] == b"Name:"
    fresh.close()
    # closing is synchronous, but give a descriptor a hub thread still holds a moment to go
    assert wait_until(lambda: open_fds() <= fds_before, 5), open_fds() - fds_before  # nothing leaked
    assert wait_until(lambda: zombies_of(os.getpid()) == [], 5), zombies_of(os.getpid())


def violation(w, fn, *args, syscall=None):
    with pytest.raises(PolicyViolation) as ei:
        w.call(fn, *args)
    if syscall is not None:
        assert ei.value.syscall == syscall
    return ei.value


def denied(w, fn, *args, syscall):
    """Deny mode: the attack's syscall failed, the host was told (the per-call list and a "denied"
    event naming the syscall, its errno, the plugin's policy and the key that would grant it) and
    the worker carries on. Returns what the call returned, or the PluginError it raised."""
    seen = []
    unsubscribe = sandbox.events.subscribe(
        lambda ev: ev.name == "denied" and ev.get("pid") == w.pid and seen.append(ev))
    try:
        try:
            result = w.call(fn, *args)
        except PluginError as e:
            result = e
        assert syscall in [n.name for n in w.last_denials], (syscall, w.last_denials)
        assert wait_until(lambda: any(ev.get("syscall") == syscall for ev in seen), 5), seen
    finally:
        unsubscribe()
    ev = next(ev for ev in seen if ev.get("syscall") == syscall)
    assert ev.get("errno") == errno.EPERM and ev.get("grant"), ev.fields
    assert ev.get("policy") == w.policy.path and ev.get("detail", "").startswith(syscall), ev.fields
    assert w.alive and w.call("sys", 39)[0] == 1  # not killed: it answers (getpid: pid 1 of its namespace)
    return result


def stopped(w, mode, fn, *args, syscall):
    """The attack fails in either mode. kill: PolicyViolation naming the syscall. deny: the syscall
    fails with EPERM and is reported (`denied`); a dangerous syscall still kills, by name."""
    if mode == "kill" or syscall in DANGEROUS:
        return violation(w, fn, *args, syscall=syscall)
    result = denied(w, fn, *args, syscall=syscall)
    if isinstance(result, list):  # a raw syscall through ctypes: [return value, errno]
        assert result == [-1, errno.EPERM], result
    else:
        assert isinstance(result, PluginError), result
    return result
