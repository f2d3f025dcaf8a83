"""A preload that fails is a load error naming the module, whatever the import raised."""
import importlib.util
import os

import pytest

from sandbox import Worker
from sandbox.errors import LoadError

HAS_NUMPY = importlib.util.find_spec("numpy") is not None


@pytest.mark.unpriv
def test_a_missing_preload_is_a_load_error_naming_it(make_plugin):
    worker_py, policy = make_plugin("def f():\n    return 1\n", '[python]\npreload = ["no_such_module_xyz"]\n')
    with pytest.raises(LoadError) as info:
        Worker(worker_py, policy=policy)
    assert "preload 'no_such_module_xyz' failed: ModuleNotFoundError" in str(info.value)


@pytest.mark.skipif(not HAS_NUMPY, reason="numpy is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="root mode: RLIMIT_NPROC of the worker's own uid stops the thread")
def test_numpy_without_threads_is_named_not_a_keyboard_interrupt_in_worker_py(make_plugin):
    """OpenBLAS, unable to start its threads (no threads granted), raises SIGINT mid-import."""
    worker_py, policy = make_plugin("def f():\n    return 1\n", '[python]\npreload = ["numpy"]\n')
    with pytest.raises(LoadError) as info:
        Worker(worker_py, policy=policy)
    assert "preload 'numpy' failed: KeyboardInterrupt" in str(info.value)
    assert "OPENBLAS_NUM_THREADS" in str(info.value)


@pytest.mark.unpriv
@pytest.mark.skipif(not HAS_NUMPY, reason="numpy is not installed")
def test_numpy_preloads_with_one_blas_thread(make_plugin):
    worker_py, policy = make_plugin("def f():\n    import numpy\n    return int(numpy.arange(4).sum())\n",
                                    '[python]\npreload = ["numpy"]\n'
                                    '[environment]\nset = { OPENBLAS_NUM_THREADS = "1" }\n')
    with Worker(worker_py, policy=policy) as w:
        assert w.call("f") == 6
