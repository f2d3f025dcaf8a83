import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.unpriv


def test_doctor_proves_every_layer_here():
    out = subprocess.run([sys.executable, "-m", "sandbox", "doctor", "--json"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    results = json.loads(out.stdout)
    failed = [r for r in results if not r["ok"]]
    assert failed == [] and out.returncode == 0
    layers = {r["layer"] for r in results}
    assert {"privileges", "landlock (unlisted path refused)", "seccomp kill mode (forbidden syscall killed and named)",
            "seccomp deny mode, the shipped default (forbidden syscall fails and is reported)"} <= layers


def _loaded_libseccomp() -> str:
    """The file this machine's dynamic loader really maps for libseccomp."""
    import pyseccomp  # noqa: F401  (loads the library into this process)
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1]
            if "libseccomp" in os.path.basename(path):
                return os.path.realpath(path)
    pytest.fail("libseccomp is not mapped after importing pyseccomp")


def _without_libseccomp(argv: list[str]) -> subprocess.CompletedProcess:
    """Run argv where the library file is unusable: /dev/null bind-mounted over it in a mount
    namespace of its own (a root host's own; an unprivileged one inside a user namespace)."""
    lib = _loaded_libseccomp()
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) missing")
    ns = [unshare, "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        ns.insert(1, "--map-root-user")
    script = 'mount --bind /dev/null "$0" && exec "$@"'
    probe = subprocess.run([*ns, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace here: {probe.stderr.decode().strip()}")
    return subprocess.run([*ns, "sh", "-c", script, lib, *argv], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def test_missing_libseccomp_names_the_package_to_install():
    out = _without_libseccomp([sys.executable, "-m", "sandbox", "doctor"])
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert "libseccomp.so.2 cannot be loaded" in last and "apt-get install libseccomp2" in last, out.stderr


def test_missing_libseccomp_in_json_is_one_failed_layer():
    out = _without_libseccomp([sys.executable, "-m", "sandbox", "doctor", "--json"])
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    results = json.loads(out.stdout)
    assert [r["layer"] for r in results] == ["libseccomp"] and not results[0]["ok"]
    assert "libseccomp2" in results[0]["detail"]
