"""The security suite's attack harness, imported as a plain module (`from security.attack_lab import intact`).

Escape attempts, tried against real workers. Each test says which layer must stop the attack
and checks: (1) it failed with the expected error, (2) its effect did not happen, (3) the host is
intact (answers, no leaked fd, no zombie), (4) a sibling worker started before the attack still
answers. The `lab` fixture (conftest.py) gives the folder and a policy maker these use.
"""
import contextlib
import os

import pytest

import sandbox
from sandbox import PolicyViolation
from helpers import DEFAULT_POLICY
from procfs import open_fds, rss_kib, wait_until, zombies_of

PLUGIN_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins", "attacks.py")
BASE = f'extends = "{DEFAULT_POLICY}"\n[python]\npreload = ["ctypes"]\n[filesystem]\nread_only = ["/proc/self"]\n'

__all__ = ["BASE", "PLUGIN_SRC", "intact", "rss_kib", "violation"]


@contextlib.contextmanager
def intact(lab, extra="", scratch=False):
    """Yield a worker to attack; afterwards prove the host and a sibling are unharmed."""
    d, policy = lab
    sibling = sandbox.Worker(os.path.join(d, "attacks.py"), policy=policy())
    fds_before = open_fds()
    w = sandbox.Worker(os.path.join(d, "attacks.py"), policy=policy(extra, scratch))
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
