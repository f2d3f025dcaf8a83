import os
import shutil
import sys
import tempfile
import textwrap

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # helpers and procfs, as plain modules

# Fixtures only: test modules import what they share from `helpers` and `procfs`, never from here.
from helpers import DEFAULT_POLICY, ROOT  # noqa: E402


if not os.access(ROOT, os.W_OK):  # the unprivileged run can't keep hypothesis' example database
    from hypothesis import settings
    settings.register_profile("readonly", database=None)
    settings.load_profile("readonly")


@pytest.fixture
def plugin_dir():
    """A world-readable folder (workers run under uids of their own) removed afterwards."""
    d = tempfile.mkdtemp(prefix="sandbox-test-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_plugin(plugin_dir):
    """make_plugin(source, policy_toml=None) -> (worker_py, policy_path)."""
    counter = [0]

    def make(source: str, policy: str | None = None, name: str | None = None):
        counter[0] += 1
        name = name or f"p{counter[0]}"
        folder = os.path.join(plugin_dir, name)
        os.makedirs(folder, mode=0o755)
        path = os.path.join(folder, "worker.py")
        with open(path, "w") as f:
            f.write(textwrap.dedent(source))
        os.chmod(path, 0o644)
        policy_path = DEFAULT_POLICY
        if policy is not None:
            policy_path = os.path.join(plugin_dir, f"{name}.toml")
            with open(policy_path, "w") as f:
                f.write(f'extends = "{DEFAULT_POLICY}"\n' + textwrap.dedent(policy))
        return path, policy_path

    return make

