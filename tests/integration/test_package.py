"""What `import sandbox` costs and what type checkers see of it."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT

pytestmark = pytest.mark.unpriv


def test_import_sandbox_stays_light():
    # The zygote and every worker import this package: the host's side must stay out of it.
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import sandbox; print(sandbox.__version__); "
            "print(sorted(m for m in ('threading', 'logging', 'seccomp', 'pyseccomp', 'prctl', 'msgpack', "
            "'sandbox.worker', 'sandbox.policy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=30,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    version, loaded = out.stdout.splitlines()
    assert version and loaded == "[]"


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is in the lint extra")
def test_type_checkers_see_the_real_classes(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent("""
        import sandbox
        reveal_type(sandbox.Worker("w.py"))
        reveal_type(sandbox.AsyncWorker)
        reveal_type(sandbox.Pool)
        reveal_type(sandbox.Policy)
        reveal_type(sandbox.__version__)
    """))
    out = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--follow-imports=silent",
                          "--cache-dir", str(tmp_path / "mypy-cache"),
                          "--config-file", os.path.join(ROOT, "pyproject.toml"), str(probe)],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    revealed = [line.split("Revealed type is ", 1)[1] for line in out.stdout.splitlines() if "Revealed type" in line]
    assert len(revealed) == 5, out.stdout + out.stderr
    assert revealed[0] == '"sandbox.worker.Worker"'
    assert "sandbox.aio.AsyncWorker" in revealed[1] and "sandbox.pool.Pool" in revealed[2]
    assert "sandbox.policy.Policy" in revealed[3] and revealed[4] in ('"str"', '"builtins.str"')
