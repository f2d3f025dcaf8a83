"""Threads a preload starts before the filter (OpenBLAS does, at `import numpy`) get the filter
too: no thread of a worker ever runs without seccomp."""
import importlib.util
import os

import pytest

from sandbox import Worker

HAS_NUMPY = importlib.util.find_spec("numpy") is not None


def seccomp_modes(pid: int) -> dict[int, str]:
    modes = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            modes[int(tid)] = next(line.split()[1] for line in f if line.startswith("Seccomp:"))
    return modes


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
