"""Shared fixtures of the security suite (one module per group of ../shared/ATTACKS.md).

Escape attempts from ATTACKS.md, tried against real workers.

Each test says which layer must stop the attack and checks: (1) it failed with the expected
error, (2) its effect did not happen, (3) the host is intact (answers, no leaked fd, no zombie),
(4) a sibling worker started before the attack still answers. The item numbers are ATTACKS.md's.
"""
import contextlib
import os
import shutil
import subprocess
import tempfile
import time

import pytest

import sandbox
from sandbox import PolicyViolation
from conftest import DEFAULT_POLICY, open_fds, zombies_of

PLUGIN_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins", "attacks.py")
BASE = f'extends = "{DEFAULT_POLICY}"\n[python]\npreload = ["ctypes"]\n[filesystem]\nread_only = ["/proc/self"]\n'


@pytest.fixture(scope="module")
def lab():
    d = tempfile.mkdtemp(prefix="sandbox-attacks-")
    os.chmod(d, 0o755)
    shutil.copy(PLUGIN_SRC, os.path.join(d, "attacks.py"))
    os.chmod(os.path.join(d, "attacks.py"), 0o644)

    def policy(extra="", scratch=False):
        path = os.path.join(d, f"p{abs(hash((extra, scratch)))}.toml")
        with open(path, "w") as f:
            f.write(BASE + ("scratch = true\n" if scratch else "") + extra)
        return path

    yield d, policy
    shutil.rmtree(d, ignore_errors=True)


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
    time.sleep(0.05)
    assert open_fds() <= fds_before | set()  # nothing leaked by the attack
    assert zombies_of(os.getpid()) == []


def violation(w, fn, *args, syscall=None):
    with pytest.raises(PolicyViolation) as ei:
        w.call(fn, *args)
    if syscall is not None:
        assert ei.value.syscall == syscall
    return ei.value


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
