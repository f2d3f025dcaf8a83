"""A fresh process per call (sandbox.fresh): nothing one call leaves is seen by the next.

Each scenario runs on both drivers, FreshWorker (threads) and AsyncFreshWorker (asyncio), through
one small adapter, so that the two cannot drift apart.
"""
import asyncio
import os
import threading

import pytest

from sandbox import LoadError, PluginCrashed, SandboxError, UsageError, WorkerClosed
from sandbox.fresh import AsyncFreshWorker, FreshWorker
import procfs
from procfs import children_of

pytestmark = pytest.mark.unpriv

PLUGIN = """
    import builtins, math, os

    calls = 0

    def count():
        global calls
        calls += 1
        return calls

    def set_pi():
        math.pi = 3
        return math.pi

    def get_pi():
        return math.pi

    def break_len():
        builtins.len = lambda x: 0
        return "replaced"

    def length(s):
        return len(s)

    def crash():
        os._exit(7)

    def echo(x, **kw):
        return [x, kw]

    def nap(s):
        import time
        time.sleep(s)
        return s
"""


class SyncDriver:
    def __init__(self, path, policy, **kw):
        self.fw = FreshWorker(path, policy=policy, **kw)

    def call(self, name, *args, **kwargs):
        return self.fw.call(name, *args, **kwargs)

    def invoke(self, name, args=(), kwargs=None, timeout=None):
        return self.fw.invoke(name, args, kwargs, timeout=timeout)

    def close(self):
        self.fw.close()

    shutdown = close


class AsyncDriver:
    """The async driver run on a loop of its own thread, so a test reads like the sync one."""

    def __init__(self, path, policy, **kw):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        try:
            self.fw = self._run(AsyncFreshWorker.start(path, policy=policy, **kw))
        except BaseException:
            self._stop()
            raise

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def call(self, name, *args, **kwargs):
        return self._run(self.fw.call(name, *args, **kwargs))

    def invoke(self, name, args=(), kwargs=None, timeout=None):
        return self._run(self.fw.invoke(name, args, kwargs, timeout=timeout))

    def close(self):
        self._run(self.fw.close())

    def shutdown(self):
        self.close()
        self._stop()

    def _stop(self):
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(params=[SyncDriver, AsyncDriver], ids=["sync", "async"])
def fresh(request, make_plugin):
    """fresh(**options) -> a started driver over PLUGIN; closed after the test."""
    made = []
    path, policy = make_plugin(PLUGIN)

    def make(**kw):
        d = request.param(path, policy, **kw)
        d.path = path
        made.append(d)
        return d

    yield make
    for d in made:
        d.shutdown()


def test_every_call_runs_in_a_process_no_earlier_call_touched(fresh):
    fw = fresh()
    assert [fw.call("count") for _ in range(5)] == [1] * 5


def test_a_module_change_is_invisible_to_the_next_call(fresh):
    fw = fresh()
    assert fw.call("set_pi") == 3
    assert fw.call("get_pi") == pytest.approx(3.141592653589793)


def test_replaced_builtins_do_not_reach_the_next_call(fresh):
    fw = fresh()
    try:
        fw.invoke("break_len", timeout=5)
    except SandboxError:
        pass  # whether the worker survives its own broken builtins is not this mode's concern
    assert fw.call("length", "abc") == 3


def test_a_crash_in_one_call_does_not_affect_the_next(fresh):
    fw = fresh()
    with pytest.raises(PluginCrashed):
        fw.call("crash")
    assert fw.call("count") == 1


def test_arguments_and_keywords_reach_the_plugin(fresh):
    fw = fresh(spares=2)
    assert fw.call("echo", 1, x2=2) == [1, {"x2": 2}]
    assert fw.invoke("echo", (5,), {"k": "v"}, timeout=5) == [5, {"k": "v"}]


class _Pids(list):
    workers: list


@pytest.fixture
def started_pids(monkeypatch):
    """The pid of every worker the fresh workers start in this test (spares included). The
    workers are kept referenced too, so that a leak cannot hide behind garbage collection."""
    import sandbox.fresh as fresh_mod
    pids = _Pids()
    kept = []

    class RecordingWorker(fresh_mod.Worker):
        def _start(self, *a, **kw):
            try:
                return super()._start(*a, **kw)
            finally:
                pids.append(self.pid)
                kept.append(self)

    class RecordingAsyncWorker(fresh_mod.AsyncWorker):
        async def _start(self, *a, **kw):
            try:
                return await super()._start(*a, **kw)
            finally:
                pids.append(self.pid)
                kept.append(self)

    monkeypatch.setattr(fresh_mod, "Worker", RecordingWorker)
    monkeypatch.setattr(fresh_mod, "AsyncWorker", RecordingAsyncWorker)
    pids.workers = kept
    return pids


def test_close_leaves_no_process(fresh, started_pids):
    fw = fresh(spares=3)
    zygote = procfs.parent_of(started_pids[0])  # the constructor's worker: alive until a call takes it
    for _ in range(10):
        fw.call("count")
    for _ in range(500):  # until a spare has started again (the check must be able to see them)
        if set(started_pids) & set(children_of(zygote)):
            break
        threading.Event().wait(0.01)
    else:
        pytest.fail("no spare was ever seen as the zygote's child")
    fw.close()
    assert len(started_pids) >= 11
    assert set(started_pids) & set(children_of(zygote)) == set()


def test_close_during_a_call_ends_the_call_and_leaves_no_process(fresh, started_pids):
    fw = fresh()
    outcome = []

    def napper():
        try:
            outcome.append(fw.invoke("nap", (60,), timeout=120))
        except SandboxError as e:
            outcome.append(e)

    t = threading.Thread(target=napper)
    t.start()
    zygote = procfs.parent_of(started_pids[0])
    for _ in range(500):  # until the call has taken its worker (the spare started after it)
        if len(started_pids) >= 2:
            break
        threading.Event().wait(0.01)
    fw.close()
    t.join(timeout=30)
    assert not t.is_alive() and isinstance(outcome[0], SandboxError), outcome
    assert set(started_pids) & set(children_of(zygote)) == set()


def test_a_spare_that_died_while_waiting_is_skipped(fresh, started_pids):
    import signal
    fw = fresh(spares=1)
    spare = started_pids.workers[0]  # started by the constructor, not yet used
    os.kill(spare.pid, signal.SIGKILL)  # our own worker, by its pid
    for _ in range(1000):  # until the host has seen it die (the reap reaches it through the zygote)
        if not spare.alive:
            break
        threading.Event().wait(0.01)
    assert not spare.alive
    assert fw.call("count") == 1


def test_calls_after_close_raise_worker_closed(fresh):
    fw = fresh()
    fw.close()
    with pytest.raises(WorkerClosed):
        fw.call("count")


def test_concurrent_calls_each_get_a_fresh_worker(make_plugin):
    path, policy = make_plugin(PLUGIN)
    with FreshWorker(path, policy=policy, spares=2) as fw:
        results = []

        def many():
            for _ in range(8):
                results.append(fw.call("count"))

        threads = [threading.Thread(target=many) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert results == [1] * 32


def test_async_concurrent_calls_each_get_a_fresh_worker(make_plugin):
    path, policy = make_plugin(PLUGIN)

    async def main():
        async with AsyncFreshWorker(path, policy=policy, spares=2) as fw:
            return await asyncio.gather(*(fw.call("count") for _ in range(16)))

    assert asyncio.run(main()) == [1] * 16


def test_a_plugin_that_cannot_load_fails_the_constructor(make_plugin):
    bad, policy = make_plugin("raise RuntimeError('no import for you')\n")
    with pytest.raises(LoadError):
        FreshWorker(bad, policy=policy)

    async def main():
        await AsyncFreshWorker.start(bad, policy=policy)

    with pytest.raises(LoadError):
        asyncio.run(main())


def _replace(path: str, source: str) -> None:
    """Atomically, so that a start in progress reads the old file or the new one, never half."""
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write(source)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def test_a_spare_that_failed_to_start_fails_the_call_that_would_use_it(fresh):
    d = fresh(spares=1)
    good = open(d.path).read()
    _replace(d.path, "raise RuntimeError('broken after the first start')\n")
    assert d.call("count") == 1      # the worker started before the change
    with pytest.raises(LoadError):
        d.call("count")              # its replacement, started after it was taken, could not load
    _replace(d.path, good)
    for _ in range(3):               # at most one more spare was started from the broken file
        try:
            assert d.call("count") == 1
            break
        except LoadError:
            continue
    else:
        pytest.fail("the fresh worker did not recover once the plugin loaded again")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", 1000])
def test_spares_must_be_a_small_positive_integer(bad, make_plugin):
    path, policy = make_plugin(PLUGIN)
    with pytest.raises(UsageError):
        FreshWorker(path, policy=policy, spares=bad)
    with pytest.raises(UsageError):
        AsyncFreshWorker(path, policy=policy, spares=bad)
