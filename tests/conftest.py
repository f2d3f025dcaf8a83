import os
import shutil
import sys
import tempfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICIES = os.path.join(ROOT, "policies")
DEFAULT_POLICY = os.path.join(POLICIES, "default.toml")
IS_ROOT = os.geteuid() == 0


if not os.access(ROOT, os.W_OK):  # the unprivileged run can't keep hypothesis' example database
    from hypothesis import settings
    settings.register_profile("readonly", database=None)
    settings.load_profile("readonly")


def pytest_configure(config):
    config.addinivalue_line("markers", "unpriv: also run as an unprivileged user by `make test`")


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


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def children_of(pid: int) -> list[int]:
    """Every live process whose parent chain reaches `pid`."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out = []
    for p in parents:
        q = p
        while q in parents and q not in (0, 1):
            q = parents[q]
            if q == pid:
                out.append(p)
                break
    return out


def zombies_of(pid: int) -> list[int]:
    out = []
    for p in children_of(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    out.append(p)
        except OSError:
            pass
    return out


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
