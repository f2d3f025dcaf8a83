"""Paths and facts every test module shares, imported as a plain module (`from helpers import ROOT`).

Fixtures live in conftest.py; what is not a fixture lives here or, for /proc, in procfs.py.
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
PLUGINS = os.path.join(TESTS, "plugins")
POLICIES = os.path.join(ROOT, "policies")
DEFAULT_POLICY = os.path.join(POLICIES, "default.toml")
IS_ROOT = os.geteuid() == 0


def plugin(name: str) -> str:
    """The worker.py of tests/plugins/<name>."""
    return os.path.join(PLUGINS, name, "worker.py")
