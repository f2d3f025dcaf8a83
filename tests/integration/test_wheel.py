"""The package as a user gets it: built (sdist, then the wheel from that sdist), installed
non-editable into a fresh virtual environment outside the checkout, used from another folder.

The build and the install happen once per test run (a module fixture); each test then checks
one thing a user relies on. Dependencies come from the package index this machine's pip uses.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

import pytest

from helpers import ROOT

PLUGIN = '''
def add(a, b):
    return a + b
'''

# One xdist worker builds the wheel once for the whole module (a module fixture per worker otherwise).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("wheel")]


def _run(argv, **kw):
    kw.setdefault("timeout", 300)
    # a user's shell: nothing that would put the checkout (or another install) on the venv's path
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return subprocess.run(argv, capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def installed():
    if importlib.util.find_spec("build") is None:
        pytest.skip("the `build` package is missing (it is in the test extra)")
    base = tempfile.mkdtemp(prefix="sandbox-wheel-")
    os.chmod(base, 0o755)  # workers (other uids) read the venv and the plugin
    try:
        # Built from a private copy of the checkout: setuptools writes its egg-info and its
        # release tree into the source folder, and a checkout's own (the editable install's
        # egg-info, anything another process writes there meanwhile) must not leak into the build.
        source = os.path.join(base, "source")
        shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
            ".venv", ".git", "__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache", ".ruff_cache",
            "build", "dist", "*.egg-info", "bench-*.json", "sandbox_plugins-*"))
        dist = os.path.join(base, "dist")
        out = _run([sys.executable, "-m", "build", "--outdir", dist, source], cwd=base)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        venv = os.path.join(base, "venv")
        out = _run([sys.executable, "-m", "venv", venv])
        assert out.returncode == 0, out.stderr
        wheel = next(os.path.join(dist, f) for f in os.listdir(dist) if f.endswith(".whl"))
        sdist = next(os.path.join(dist, f) for f in os.listdir(dist) if f.endswith(".tar.gz"))
        out = _run([os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check", wheel],
                   cwd=base)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        elsewhere = os.path.join(base, "elsewhere")
        os.makedirs(os.path.join(elsewhere, "adder"))
        with open(os.path.join(elsewhere, "adder", "worker.py"), "w") as f:
            f.write(PLUGIN)
        subprocess.run(["chmod", "-R", "a+rX", base], check=True)
        yield {"venv": venv, "bin": os.path.join(venv, "bin"), "cwd": elsewhere, "wheel": wheel, "sdist": sdist,
               "plugin": os.path.join(elsewhere, "adder", "worker.py")}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _py(inst, code):
    return _run([os.path.join(inst["bin"], "python"), "-c", code], cwd=inst["cwd"], timeout=120)


def test_the_installed_package_is_the_wheel_not_the_checkout(installed):
    out = _py(installed, "import sandbox, sandbox.__about__ as a, importlib.metadata as m; "
                         "print(sandbox.__file__); print(sandbox.__version__, m.version(a.__title__)); "
                         "print(m.metadata(a.__title__)['License-Expression'])")
    assert out.returncode == 0, out.stderr
    where, versions, license_ = out.stdout.split("\n")[:3]
    assert where.startswith(installed["venv"]) and not where.startswith(ROOT)
    version, dist_version = versions.split()
    assert version == dist_version
    assert license_ == "MIT"
    out = _run([os.path.join(installed["bin"], "sandbox"), "--version"], cwd=installed["cwd"])
    assert out.returncode == 0 and out.stdout.strip().endswith(f" {version}"), out.stdout + out.stderr


def test_the_wheel_ships_its_data_and_license(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    for needed in ("sandbox/py.typed", "sandbox/policy/default.toml", "sandbox/child/canary_plugin.py",
                   "sandbox/zygote/__main__.py"):
        assert needed in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_the_sdist_carries_a_runnable_test_suite(installed):
    with tarfile.open(installed["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("LICENSE", "tests/conftest.py", "tests/helpers.py", "tests/procfs.py", "tests/security/conftest.py",
                   "tests/security/attack_lab.py", "tests/security/plugins/attacks.py",
                   "tests/integration/test_worker.py", "policies/default.toml",
                   "examples/plugins/textstats/worker.py"):
        assert needed in names, needed
    assert not any("__pycache__" in n for n in names)


def test_doctor_passes_from_the_installed_wheel(installed):
    out = _run([os.path.join(installed["bin"], "sandbox"), "doctor", "--json"], cwd=installed["cwd"], timeout=120)
    results = json.loads(out.stdout)
    assert [r for r in results if not r["ok"]] == [] and out.returncode == 0, out.stderr


def test_cli_call_under_the_shipped_default(installed):
    out = _py(installed, "import importlib.resources as r; print(r.files('sandbox.policy') / 'default.toml')")
    default = out.stdout.strip()
    assert default.startswith(installed["venv"]) and os.path.isfile(default)
    out = _run([os.path.join(installed["bin"], "sandbox"), "call", installed["plugin"], "add", "2", "3",
                "--policy", default], cwd=installed["cwd"], timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "5", out.stderr


def test_worker_call_from_the_installed_wheel(installed):
    out = _py(installed, "import sandbox\n"
                         f"with sandbox.Worker({installed['plugin']!r}) as w:\n"
                         "    print(w.call('add', 40, 2))\n")
    assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr


def test_cli_call_without_a_policy_uses_the_shipped_default(installed):
    out = _run([os.path.join(installed["bin"], "sandbox"), "call", installed["plugin"], "add", "2", "3"],
               cwd=installed["cwd"], timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "5", out.stderr


def test_policy_explain_finds_the_shipped_default_by_name(installed):
    out = _run([os.path.join(installed["bin"], "sandbox"), "policy", "explain", "default", "--json"],
               cwd=installed["cwd"], timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)  # the effective policy, as JSON
