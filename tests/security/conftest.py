"""Fixtures of the security suite; its harness (intact, violation) is security/attack_lab.py."""
import os
import shutil
import subprocess
import tempfile

import pytest

from security.attack_lab import BASE, PLUGIN_SRC


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


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()
