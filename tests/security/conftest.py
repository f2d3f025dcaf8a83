"""Fixtures of the security suite; its harness (intact, violation, denied, stopped) is security/attack_lab.py."""
import os
import shutil
import subprocess
import tempfile

import pytest

from helpers import DEFAULT_POLICY
from security.attack_lab import KILL_PIN, MODES, PLUGIN_SRC, base


@pytest.fixture(scope="module")
def lab():
    d = tempfile.mkdtemp(prefix="sandbox-attacks-")
    os.chmod(d, 0o755)
    shutil.copy(PLUGIN_SRC, os.path.join(d, "attacks.py"))
    os.chmod(os.path.join(d, "attacks.py"), 0o644)
    kill = os.path.join(d, "default-kill.toml")  # the shipped default, kill mode pinned
    with open(kill, "w") as f:
        f.write(f'extends = "{DEFAULT_POLICY}"\n' + KILL_PIN)

    def policy(extra="", scratch=False, mode=None):
        assert mode in (None,) + MODES, mode
        path = os.path.join(d, f"p{abs(hash((extra, scratch, mode)))}.toml")
        with open(path, "w") as f:
            f.write(base(kill if mode == "kill" else DEFAULT_POLICY) + ("scratch = true\n" if scratch else "") + extra)
        return path

    yield d, policy
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=MODES)
def mode(request):
    """Each test that takes it runs twice: kill mode pinned, and the shipped default (deny)."""
    return request.param


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()
