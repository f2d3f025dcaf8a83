"""Pool (threads) and AsyncPool (asyncio): warm workers that survive being killed under them."""
import asyncio
import os
import random
import signal
import threading
import time

import pytest

from sandbox import (AsyncPool, Pool, PluginCrashed, PluginError, PluginMemoryError, PluginTimeout, PolicyViolation,
                     QueueFull, RestartLimit, WorkerClosed)
from sandbox._host.pool_core import RestartGovernor
from conftest import children_of

pytestmark = pytest.mark.unpriv

PLUGIN = """
    import os, time

    def echo(x):
        return x

    def slow_echo(x, s=0.002):
        time.sleep(s)
        return x

    def nap(s):
        time.sleep(s)
        return s

    def pid():
        return os.getpid()

    def spin():
        while True:
            pass

    def sock():
        import socket
        socket.socket()

    def die():
        os._exit(9)

    def hog():
        hoard = []
        while True:
            hoard.append(bytearray(16 << 20))
"""

CRASHER = """
    raise SystemExit("this plugin never loads")
"""


@pytest.fixture
def plugin(make_plugin):
    return make_plugin(PLUGIN, "[limits]\ntimeout = 10\n")


def _workers(pool):
    return list(pool._core.workers)


def _wait_live(pool, n, limit=5.0):
    end = time.monotonic() + limit
    while pool.stats()["live"] < n and time.monotonic() < end:
        time.sleep(0.01)
    return pool.stats()["live"]


def test_threads_get_their_own_answers_while_workers_are_killed(plugin):
    path, policy = plugin
    with Pool(path, policy=policy, size=3, restart_limit=(1000, 10)) as pool:
        outcomes = {}
        lock = threading.Lock()
        stop = threading.Event()

        def caller(k):
            for j in range(60):
                i = k * 1000 + j
                try:
                    r = pool.call("slow_echo", i)
                except PluginCrashed:  # its worker was SIGKILLed under it
                    r = "crashed"
                with lock:
                    assert i not in outcomes, "answered twice"
                    outcomes[i] = r

        kills = [0]

        def killer():
            while not stop.wait(0.03):
                ws = _workers(pool)
                if ws:
                    try:
                        os.kill(random.choice(ws).pid, signal.SIGKILL)
                        kills[0] += 1
                    except (ProcessLookupError, TypeError):
                        pass

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(12)]
        kt = threading.Thread(target=killer)
        kt.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        kt.join()
        assert len(outcomes) == 12 * 60  # none lost
        wrong = {i: r for i, r in outcomes.items() if r != i and r != "crashed"}
        assert wrong == {}  # never someone else's answer
        assert sum(r == i for i, r in outcomes.items()) > len(outcomes) // 2
        assert kills[0] > 3
        assert _wait_live(pool, 3) == 3
        assert [pool.call("echo", i) for i in range(10)] == list(range(10))  # still serving
        s = pool.stats()
        assert s["restarts"] >= 1 and s["calls"] >= 12 * 60
        assert s["ok"] + sum(s["errors"].values()) == s["calls"]


def test_failures_are_replaced_and_counted(plugin):
    path, policy = plugin
    with Pool(path, policy=policy, size=2) as pool:
        with pytest.raises(PluginTimeout):
            pool.call("spin", timeout=0.2)
        with pytest.raises(PolicyViolation) as e:
            pool.call("sock")
        assert e.value.syscall == "socket"
        with pytest.raises(PluginCrashed):
            pool.call("die")
        with pytest.raises(PluginError):
            pool.call("missing")
        before = {w.pid for w in _workers(pool)}
        with pytest.raises(PluginMemoryError):  # MemoryError inside: its worker is recycled
            pool.call("hog")
        assert _wait_live(pool, 2) == 2
        assert [pool.call("echo", i) for i in range(4)] == [0, 1, 2, 3]
        s = pool.stats()
        assert s["errors"] == {"timeout": 1, "violation": 1, "crashed": 1, "plugin-error": 1, "memory": 1}
        assert s["restarts"] >= 3 and s["recycled"] >= 1
        assert {w.pid for w in _workers(pool)} != before


def test_recycling_after_max_calls(plugin):
    path, policy = plugin
    with Pool(path, policy=policy, size=1, max_calls_per_worker=3) as pool:
        pids = [pool.call("pid") for _ in range(9)]
        assert len(set(pids)) == 3 and pids[0] == pids[2] != pids[3]
        assert pool.stats()["recycled"] >= 2 and pool.stats()["restarts"] == 0


def test_bounded_queue_is_back_pressure(plugin):
    path, policy = plugin
    with Pool(path, policy=policy, size=1, max_queue=2) as pool:
        results, errors = [], []

        def call():
            try:
                results.append(pool.call("nap", 0.4))
            except QueueFull as e:
                errors.append(e)

        threads = [threading.Thread(target=call) for _ in range(5)]
        for t in threads:
            t.start()
            time.sleep(0.03)
        for t in threads:
            t.join()
        assert len(results) == 3 and len(errors) == 2  # 1 running + 2 queued; the rest refused
        assert pool.stats()["queue_full"] == 2


def test_crash_loop_hits_the_restart_limit(plugin, make_plugin):
    path, policy = plugin
    with Pool(path, policy=policy, size=2, restart_limit=(2, 30)) as pool:
        forks = []
        for _ in range(6):
            try:
                pool.call("die")
            except PluginCrashed:
                forks.append(1)
            except RestartLimit as e:
                assert "restarts are paused" in str(e) and "died more than 2 times" in str(e)
                break
            _wait_live(pool, 1, 1.0)
        else:
            pytest.fail("no RestartLimit")
        time.sleep(0.2)
        s = pool.stats()
        assert s["restart_limited"] and s["restarts"] <= 2 and s["live"] == 0  # no restart storm
        with pytest.raises(RestartLimit):
            pool.call("echo", 1)  # fails fast while nothing can serve


def test_restart_governor_window():
    now = [0.0]
    g = RestartGovernor(2, 10, clock=lambda: now[0])
    g.record("a")
    g.record("b")
    assert not g.tripped()
    now[0] = 11  # the first two left the window
    g.record("c")
    g.record("d")
    assert not g.tripped()
    g.record("e")
    assert g.tripped() and g.trips == 1 and "(last: e)" in str(g.error("p"))
    now[0] = 21.5
    assert not g.tripped()


def test_load_error_fails_the_constructor(make_plugin):
    path, policy = make_plugin(CRASHER)
    with pytest.raises(PluginError):
        Pool(path, policy=policy, size=2)
    assert [p for p in children_of(os.getpid()) if _is_worker(p)] == []


def test_close_is_bounded_and_leaves_nothing(plugin):
    path, policy = plugin
    pool = Pool(path, policy=policy, size=2)
    pids = [w.pid for w in _workers(pool)]
    outcome = []
    t = threading.Thread(target=lambda: _catch(outcome, pool.call, "spin"))
    t.start()
    time.sleep(0.1)
    started = time.monotonic()
    pool.close(timeout=0.3)
    assert time.monotonic() - started < 3
    t.join(5)
    assert outcome and isinstance(outcome[0], WorkerClosed)
    with pytest.raises(WorkerClosed):
        pool.call("echo", 1)
    assert all(not os.path.exists(f"/proc/{p}") or _is_zombie_free(p) for p in pids)


def test_async_pool_tasks_get_their_own_answers_while_killed(plugin):
    path, policy = plugin

    async def main():
        async with AsyncPool(path, policy=policy, size=3, max_queue=1000, restart_limit=(1000, 10)) as pool:
            stop = asyncio.Event()

            async def killer():
                n = 0
                while True:
                    await asyncio.sleep(0.03)
                    if stop.is_set():
                        return n
                    ws = _workers(pool)
                    if ws:
                        try:
                            os.kill(random.choice(ws).pid, signal.SIGKILL)
                            n += 1
                        except (ProcessLookupError, TypeError):
                            pass

            async def one(i):
                try:
                    return await pool.call("slow_echo", i)
                except PluginCrashed:
                    return "crashed"

            k = asyncio.ensure_future(killer())
            got = await asyncio.gather(*(one(i) for i in range(600)))
            stop.set()
            kills = await k
            assert len(got) == 600
            assert all(r == i or r == "crashed" for i, r in enumerate(got))
            assert sum(r == i for i, r in enumerate(got)) > 300
            assert kills > 3
            for _ in range(200):
                if pool.stats()["live"] == 3:
                    break
                await asyncio.sleep(0.01)
            assert await asyncio.gather(*(pool.call("echo", i) for i in range(20))) == list(range(20))
            s = pool.stats()
            assert s["live"] == 3 and s["restarts"] >= 1 and s["ok"] + sum(s["errors"].values()) == s["calls"]

            # cancelling a running call kills (and replaces) its worker; a queued one just leaves
            t = asyncio.ensure_future(pool.call("nap", 5))
            await asyncio.sleep(0.1)
            t.cancel()
            await asyncio.gather(t, return_exceptions=True)
            assert await pool.call("echo", "after") == "after"

            with pytest.raises(PolicyViolation):
                await pool.call("sock")
            with pytest.raises(PluginTimeout):
                await pool.call("spin", timeout=0.2)
            assert await pool.call("echo", 7) == 7
        with pytest.raises(WorkerClosed):
            await pool.call("echo", 1)
        assert pool.stats()["live"] == 0

    asyncio.run(asyncio.wait_for(main(), 60))


def test_async_pool_queue_full_and_restart_limit(plugin):
    path, policy = plugin

    async def main():
        pool = await AsyncPool.start(path, policy=policy, size=1, max_queue=1, restart_limit=(1, 30))
        running = asyncio.ensure_future(pool.call("nap", 0.3))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(pool.call("echo", 2))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await pool.call("echo", 3)
        assert await running == 0.3 and await queued == 2
        with pytest.raises(PluginCrashed):
            await pool.call("die")
        for _ in range(100):
            if pool.stats()["live"] == 1:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(PluginCrashed):
            await pool.call("die")
        with pytest.raises(RestartLimit):
            await pool.call("echo", 1)
        await pool.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def _catch(out, fn, *args):
    try:
        out.append(fn(*args))
    except Exception as e:  # noqa: BLE001
        out.append(e)


def _is_worker(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"zygote" not in f.read()
    except OSError:
        return False


def _is_zombie_free(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
