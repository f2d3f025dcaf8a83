import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.unpriv


def test_doctor_proves_every_layer_here():
    out = subprocess.run([sys.executable, "-m", "sandbox", "doctor", "--json"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    results = json.loads(out.stdout)
    failed = [r for r in results if not r["ok"]]
    assert failed == [] and out.returncode == 0
    layers = {r["layer"] for r in results}
    assert {"privileges", "landlock (unlisted path refused)", "seccomp (forbidden syscall killed and named)"} <= layers
