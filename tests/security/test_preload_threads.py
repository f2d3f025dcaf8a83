"""Threads a preload starts before the filter (OpenBLAS does, at `import numpy`) get the filter
too: no thread of a worker ever runs without seccomp."""
import importlib.util
import os

import pytest

from sandbox import Worker
import procfs

HAS_NUMPY = importlib.util.find_spec("numpy") is not None


def seccomp_modes(pid: int) -> dict[int, str]:
    return {int(st["Pid"]): st["Seccomp"] for st in procfs.task_statuses(pid)}


@pytest.mark.unpriv
@pytest.mark.skipif(not HAS_NUMPY, reason="numpy (a preload that starts threads) is not installed")
def test_every_thread_a_preload_started_is_filtered(make_plugin):
    worker_py, policy = make_plugin("def f():\n    return 1\n",
                                    '[limits]\nprocesses = 4\n[python]\npreload = ["numpy"]\n'
                                    '[environment]\nset = { OPENBLAS_NUM_THREADS = "2" }\n')
    with Worker(worker_py, policy=policy) as w:
        assert w.call("f") == 1
        modes = seccomp_modes(w.pid)
        assert len(modes) > 1, "the preload started no thread: nothing was tested"
        assert set(modes.values()) == {"2"}, modes  # 2 = SECCOMP_MODE_FILTER, in every thread


INSTALL_WITH_A_THREAD = """
import os, sys, tempfile, threading
try:
    import seccomp as sc
except ImportError:
    import pyseccomp as sc
from sandbox.child import seccomp as S
f = sc.SyscallFilter(sc.ALLOW)
f.add_rule(sc.NOTIFY, "mbind")
with tempfile.TemporaryFile() as tmp:
    f.export_bpf(tmp)
    tmp.seek(0)
    bpf = tmp.read()
started, done = threading.Event(), threading.Event()
t = threading.Thread(target=lambda: (started.set(), done.wait()))
t.start()
started.wait()
S.set_no_new_privs()
os.close(S.install_filter(bpf, listener=True))  # as the worker's last step does, with a thread alive
modes = []
for tid in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{tid}/status") as fh:
        modes.append(next(l.split()[1] for l in fh if l.startswith("Seccomp:")))
done.set()
t.join()
print(" ".join(sorted(modes)))
"""


@pytest.mark.unpriv
def test_the_filter_reaches_threads_that_already_run():
    """The same guarantee without numpy: a thread started before install_filter gets the filter."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", INSTALL_WITH_A_THREAD], capture_output=True, text=True,
                         timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "2"]
