"""Pool (threads) and AsyncPool (asyncio): warm workers that survive being killed under them."""
import asyncio
import concurrent.futures
import contextlib
import inspect
import json
import logging
import multiprocessing
import os
import random
import re
import signal
import threading
import time

import pytest

import sandbox
from sandbox import (AsyncPool, Pool, PluginCrashed, PluginError, PluginTimeout, PolicyViolation, QueueFull,
                     RestartLimit, UsageError, Worker, WorkerClosed)
from sandbox._host import lifecycle as lc
from sandbox.aio import AsyncWorker
from sandbox.pool import WorkerId, cpu_seconds
import procfs

pytestmark = pytest.mark.unpriv

PLUGIN = """
    import os, sys, time
    from sandbox.plugin import post

    def echo(x):
        return x

    def kw(x, timeout=None, name=None):
        return [x, timeout, name]

    def slow_echo(x, s=0.002):
        time.sleep(s)
        return x

    def nap(s):
        time.sleep(s)
        return s

    def pid():
        from sandbox.child.steps import host_pid  # os.getpid() is 1 in each worker's PID namespace
        return host_pid

    def spin():
        while True:
            pass

    def burn(seconds):
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass
        return pid()

    def sock():
        import socket
        socket.socket()

    def die():
        os._exit(9)

    def progress(n):
        for i in range(n):
            post({"done": i + 1, "of": n})
        return n

    def chatter(tag, kib):
        line = "x" * 1023
        for _ in range(kib):
            print(line)
        print(f"{tag}-end", flush=True)
        return tag

    def fail_on(x, bad):
        if x in bad:
            raise ValueError(f"bad item {x}")
        return x * 2
"""

CRASHER = """
    raise SystemExit("this plugin never loads")
"""


@pytest.fixture
def plugin(make_plugin):
    return make_plugin(PLUGIN, "[limits]\ntimeout = 10\n")


@pytest.fixture
def kill_mode_plugin(make_plugin):
    """The shipped default with kill mode pinned: a forbidden syscall kills (and the pool replaces)."""
    return make_plugin(PLUGIN, '[limits]\ntimeout = 10\n[seccomp]\ndefault_action = "kill"\n')


def _workers(pool):
    return list(pool._core.workers)


_wait = procfs.wait_until


def _wait_live(pool, n, limit=10.0):
    _wait(lambda: pool.stats()["live"] >= n, limit)
    return pool.stats()["live"]


# ---- serving under faults -------------------------------------------------------------------
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
            t.join(120)  # bounded: a call the pool lost fails the test instead of hanging the suite
        stop.set()
        kt.join(10)
        assert not any(t.is_alive() for t in threads), "a caller never got an answer"
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


def _kill_and_wait(pid):
    os.kill(pid, signal.SIGKILL)
    assert _wait(lambda: procfs.ended(pid), 5), "the worker did not die"


def test_idle_worker_killed_from_outside_the_next_50_calls_succeed(plugin):
    path, policy = plugin
    with Pool(path, policy=policy, size=2) as pool:
        for _ in range(3):
            victim = pool._core.idle[0]
            _kill_and_wait(victim.pid)  # dead before the next call is sent: it must never get one
            assert [pool.call("echo", i) for i in range(50)] == list(range(50))
            assert _wait_live(pool, 2) == 2
        s = pool.stats()
        assert s["errors"] == {} and s["ok"] == s["calls"] == 150


def test_async_idle_worker_killed_from_outside_the_next_50_calls_succeed(plugin):
    path, policy = plugin

    async def main():
        async with AsyncPool(path, policy=policy, size=2) as pool:
            for _ in range(3):
                victim = pool._core.idle[0]
                os.kill(victim.pid, signal.SIGKILL)
                while not procfs.ended(victim.pid):
                    await asyncio.sleep(0.002)
                assert [await pool.call("echo", i) for i in range(50)] == list(range(50))
                for _ in range(500):
                    if pool.stats()["live"] == 2:
                        break
                    await asyncio.sleep(0.01)
            assert pool.stats()["errors"] == {}

    asyncio.run(asyncio.wait_for(main(), 60))


def test_failures_are_replaced_and_counted(kill_mode_plugin):
    path, policy = kill_mode_plugin
    with Pool(path, policy=policy, size=2) as pool:
        with pytest.raises(PluginTimeout):
            pool.invoke("spin", timeout=0.2)
        with pytest.raises(PolicyViolation) as e:
            pool.call("sock")
        assert e.value.syscall == "socket"
        with pytest.raises(PluginCrashed):
            pool.call("die")
        with pytest.raises(PluginError):
            pool.call("missing")
        assert _wait_live(pool, 2) == 2
        assert [pool.call("echo", i) for i in range(4)] == [0, 1, 2, 3]
        s = pool.stats()
        assert s["errors"] == {"timeout": 1, "violation": 1, "crashed": 1, "plugin-error": 1}
        assert s["restarts"] >= 3


def test_a_denial_under_the_default_fails_the_call_and_keeps_the_worker(plugin):
    path, policy = plugin
    seen = []
    unsubscribe = sandbox.events.subscribe(lambda ev: ev.name == "denied" and seen.append(ev))
    try:
        with Pool(path, policy=policy, size=1) as pool:
            with pytest.raises(PluginError) as e:
                pool.call("sock")
            assert e.value.type == "PermissionError"
            assert pool.call("echo", 1) == 1
            s = pool.stats()
            assert s["errors"] == {"plugin-error": 1} and s["restarts"] == 0
        assert procfs.wait_until(lambda: seen, 5)  # (events the hub saw reach subscribers on their own thread)
    finally:
        unsubscribe()
    assert [ev.get("syscall") for ev in seen] == ["socket"]


# Until Worker.call stops taking `timeout` itself, a plugin keyword of that name collides there.
_WORKER_TAKES_TIMEOUT = "timeout" in inspect.signature(Worker.call).parameters


@pytest.mark.xfail(_WORKER_TAKES_TIMEOUT, reason="Worker.call still takes timeout", strict=False)
def test_plugin_keywords_named_timeout_and_name_reach_the_plugin(plugin):
    path, policy = plugin
    with Pool(path, policy=policy, size=1) as pool:
        assert pool.call("kw", 1, timeout=5, name="k") == [1, 5, "k"]
        assert pool.invoke("kw", (2,), {"timeout": 7}, timeout=5) == [2, 7, None]


def test_bad_options_are_usage_errors_before_any_worker_is_used(plugin):
    path, policy = plugin
    with Pool(path, policy=policy, size=1) as pool:
        for bad in (0, -1, float("nan"), "1"):
            with pytest.raises(UsageError):
                pool.invoke("echo", (1,), timeout=bad)
        assert pool.stats()["calls"] == 0
    for bad in ({"restart_limit": (1, 0)}, {"restart_limit": 5}, {"size": 0}, {"max_queue": -1},
                {"call_timeout": float("nan")}):
        with pytest.raises(UsageError):
            Pool(path, policy=policy, **bad)


def test_recycling_after_max_calls(plugin):
    path, policy = plugin
    with Pool(path, policy=policy, size=1, max_calls_per_worker=3) as pool:
        pids = [pool.call("pid") for _ in range(9)]
        assert len(set(pids)) == 3 and pids[0] == pids[2] != pids[3]
        assert pool.stats()["recycled"] >= 2 and pool.stats()["restarts"] == 0


def test_worker_is_recycled_before_its_cpu_budget_runs_out(make_plugin):
    # 1 s of CPU over a worker's life (RLIMIT_CPU); each call burns 0.3 s. Without recycling,
    # the third call on one worker is killed by the kernel.
    path, policy = make_plugin(PLUGIN, "[limits]\ntimeout = 10\ncpu_seconds = 1\n")
    with Pool(path, policy=policy, size=1, restart_limit=(0, 60)) as pool:
        pids = [pool.call("burn", 0.3) for _ in range(6)]
        s = pool.stats()
        assert s["errors"] == {} and s["cpu_recycled"] >= 2, s
        assert max(pids.count(p) for p in set(pids)) <= 2


def test_cpu_seconds_reads_the_kernels_account():
    start = cpu_seconds(os.getpid())
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    assert cpu_seconds(os.getpid()) - start >= 0.15
    assert cpu_seconds(2 ** 22 + 12345) is None


def test_restart_limit_none_keeps_replacing(plugin):
    path, policy = plugin
    with Pool(path, policy=policy, size=1, restart_limit=None) as pool:
        for _ in range(12):  # past the default limit (10 within 60 s)
            with pytest.raises(PluginCrashed):
                pool.call("die")
        assert pool.call("echo", "after") == "after"
        s = pool.stats()
        assert s["restarts"] >= 12 and s["restart_trips"] == 0


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
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a caller never got an answer"
        assert len(results) == 3 and len(errors) == 2  # 1 running + 2 queued; the rest refused
        assert pool.stats()["queue_full"] == 2


def test_crash_loop_hits_the_restart_limit(plugin):
    path, policy = plugin
    with Pool(path, policy=policy, size=2, restart_limit=(2, 30)) as pool:
        for _ in range(6):
            try:
                pool.call("die")
            except PluginCrashed:
                pass
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


class _Recorded(Worker):
    """A worker that notes its pid, even when its start fails (the pid exists from the fork on)."""
    pids: list[int] = []

    def __init__(self, *args, **kwargs):
        try:
            super().__init__(*args, **kwargs)
        finally:
            if getattr(self, "pid", None) is not None:
                self.pids.append(self.pid)


def test_load_error_fails_the_constructor_and_leaves_no_worker(make_plugin):
    bad, bad_policy = make_plugin(CRASHER)
    pool_class = type("RecordedPool", (Pool,), {"_worker_class": _Recorded})
    _Recorded.pids = started = []
    with pytest.raises(PluginError):
        pool_class(bad, policy=bad_policy, size=2)
    assert started, "no worker was ever forked: the test proves nothing"
    # every worker the failed constructor started is gone, not left running beside the spare
    assert _wait(lambda: all(procfs.gone(p) for p in started), 10), [(p, procfs.state(p)) for p in started]


def test_close_is_bounded_and_leaves_nothing(plugin):
    path, policy = plugin
    pool = Pool(path, policy=policy, size=2)
    pids = [w.pid for w in _workers(pool)]
    assert all(not procfs.ended(p) for p in pids)
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
    assert _wait(lambda: all(procfs.ended(p) for p in pids), 5), [(p, procfs.state(p)) for p in pids]


class _CloseFails(Worker):
    """A worker whose clean-up raises, as a real one did on a scratch tree too deep to remove."""

    def close(self, grace: float = 1.0) -> None:
        super().close(grace)
        raise RecursionError("clean-up failed")


def test_a_worker_whose_close_fails_is_still_replaced(plugin, caplog):
    path, policy = plugin
    pool_class = type("FaultyPool", (Pool,), {"_worker_class": _CloseFails})
    with pool_class(path, policy=policy, size=1, max_calls_per_worker=1) as pool:
        # every call recycles (closes) its worker; a wedged supervisor would leave them waiting
        pids = [pool.submit("pid").result(timeout=10) for _ in range(6)]
        assert len(set(pids)) == 6
        assert pool._thread.is_alive()
        assert "closing worker" in caplog.text and "clean-up failed" in caplog.text
        assert _wait(lambda: all(procfs.ended(p) for p in pids[:-1]), 5)


class _AsyncCloseFails(AsyncWorker):
    async def close(self, grace: float = 1.0) -> None:
        await super().close(grace)
        raise RecursionError("clean-up failed")


def test_an_async_worker_whose_close_fails_is_still_replaced(plugin, caplog):
    path, policy = plugin
    pool_class = type("FaultyAsyncPool", (AsyncPool,), {"_worker_class": _AsyncCloseFails})

    async def main():
        async with pool_class(path, policy=policy, size=1, max_calls_per_worker=1) as pool:
            pids = [await asyncio.wait_for(pool.call("pid"), 10) for _ in range(6)]
            assert len(set(pids)) == 6 and not pool._task.done()
        assert "closing worker" in caplog.text and "clean-up failed" in caplog.text

    asyncio.run(asyncio.wait_for(main(), 60))


# ---- futures -----------------------------------------------------------------------------------
def test_submit_map_and_as_completed(plugin):
    path, policy = plugin
    with Pool(path, policy=policy, size=3, max_queue=5) as pool:
        futures = {pool.submit("slow_echo", i): i for i in range(8)}  # 3 run + 5 wait
        got = {futures[f]: f.result() for f in concurrent.futures.as_completed(futures, timeout=30)}
        assert got == {i: i for i in range(8)}
        assert list(pool.map("echo", range(100))) == list(range(100))  # 100 > max_queue: windowed
        assert sorted(pool.map("slow_echo", range(30), ordered=False)) == list(range(30))
        out = list(pool.map("nap", [0.001] * 3, timeout=5))
        assert out == [0.001] * 3

        over = [pool.submit("nap", 0.3) for _ in range(3 + 5 + 2)]
        refused = [f for f in over if f.done() and isinstance(f.exception(), QueueFull)]
        assert len(refused) == 2
        queued = over[-3]
        assert queued.cancel() and queued.cancelled()
        concurrent.futures.wait(over, timeout=30)
        assert sum(1 for f in over if not f.cancelled() and f.exception(timeout=0) is None) == 7
        assert pool.call("echo", "after") == "after"  # the cancelled call gave its place back


def test_map_errors_raise_at_their_place_or_come_back(plugin):
    path, policy = plugin
    with Pool(path, policy=policy, size=2) as pool:
        it = pool.map("nosuch", [1, 2, 3])
        with pytest.raises(PluginError):
            next(it)
        futures = [pool.submit("fail_on", i, [2, 4]) for i in range(6)]
        got = [f.exception(timeout=30) or f.result() for f in futures]  # bounded: a lost call fails, never hangs
        assert [g if not isinstance(g, Exception) else "err" for g in got] == [0, 2, "err", 6, "err", 10]
        got = list(pool.map("nosuch", [1, 2], return_exceptions=True))
        assert len(got) == 2 and all(isinstance(g, PluginError) for g in got)


def test_async_submit_and_map(plugin):
    path, policy = plugin

    async def main():
        async with AsyncPool(path, policy=policy, size=3) as pool:
            tasks = [pool.submit("slow_echo", i) for i in range(10)]
            done = [await t for t in asyncio.as_completed(tasks)]
            assert sorted(done) == list(range(10))
            assert [x async for x in pool.map("echo", range(50))] == list(range(50))

            async def source():
                for i in range(20):
                    yield i

            assert sorted([x async for x in pool.map("slow_echo", source(), ordered=False)]) == list(range(20))
            got = [x async for x in pool.map("nosuch", [1, 2], return_exceptions=True)]
            assert all(isinstance(g, PluginError) for g in got)

    asyncio.run(asyncio.wait_for(main(), 60))


# ---- callbacks ---------------------------------------------------------------------------------
def test_callbacks_get_messages_logs_and_exits_with_the_workers_identity(plugin):
    path, policy = plugin
    got = {"message": [], "log": [], "exit": []}
    threads = set()
    done = threading.Event()

    def on(event):
        def cb(wid, payload):
            threads.add(threading.current_thread().name)
            got[event].append((wid, payload))
            if event == "exit":
                done.set()
        return cb

    with Pool(path, policy=policy, size=2) as pool:
        for event in got:
            pool.on(event, on(event))
        pid = pool.call("pid")
        assert pool.call("progress", 5) == 5
        assert pool.call("chatter", "t1", 1) == "t1"
        with pytest.raises(PluginCrashed):
            pool.call("die")
        assert done.wait(10)
        assert _wait(lambda: any(p == "t1-end" for _, p in got["log"]), 10)
    assert [p for _, p in got["message"]] == [{"done": i, "of": 5} for i in range(1, 6)]
    wids = {wid for wid, _ in got["message"]}
    assert len(wids) == 1 and isinstance(next(iter(wids)), WorkerId)
    wid = next(iter(wids))
    assert wid.pool == pool.name and str(wid) == f"{pool.name}-{wid.number}" and wid.pid is not None
    assert any(isinstance(death, PluginCrashed) for _, death in got["exit"])
    assert threads == {f"sandbox-pool-{pool.name}-callbacks"}
    assert pid in {w.pid for w, _ in got["message"] + got["log"] + got["exit"]}


def test_a_slow_callback_never_delays_supervision(plugin):
    path, policy = plugin
    release = threading.Event()
    with Pool(path, policy=policy, size=2) as pool:
        pool.on("log", lambda wid, line: release.wait(5))  # stuck on the first line
        a, b = _workers(pool)
        pool.call("chatter", "slow", 1)  # lines for the stuck callback
        os.kill(b.pid if pool._core.idle[0] is b else a.pid, signal.SIGKILL)
        started = time.monotonic()
        assert _wait(lambda: pool.stats()["restarts"] >= 1 and pool.stats()["live"] == 2, 4)
        assert time.monotonic() - started < 4
        release.set()


def test_log_budget_is_per_call_and_drops_are_logged(plugin, caplog):
    path, policy = plugin
    ends = []
    caplog.set_level(logging.WARNING, logger="sandbox")
    with Pool(path, policy=policy, size=1) as pool:
        pool.on("log", lambda wid, line: line.endswith("-end") and ends.append(line))
        for i in range(4):  # 4 x 600 KiB: more than a worker's 1 MiB, one call at a time
            pool.call("chatter", f"c{i}", 600)
            assert _wait(lambda i=i: len(ends) == i + 1, 10), (i, ends)
        assert ends == ["c0-end", "c1-end", "c2-end", "c3-end"]
        pool.call("chatter", "big", 1500)  # past the budget within one call
        assert _wait(lambda: "bytes of log output dropped" in caplog.text, 10)


# ---- fork safety -------------------------------------------------------------------------------
_FORK_POOL = None  # a pool as a module global: what a preloading server has when it forks


def _child_report(pool, tag, n=20):
    parent_pids = {w.pid for w in _workers(pool)}  # inherited bookkeeping (empty after the reset)
    answers = [pool.invoke("echo", (f"{tag}-{i}",), timeout=10) for i in range(n)]
    pids = {pool.invoke("pid", timeout=10) for _ in range(4)}
    zygotes = {procfs.parent_of(p) for p in pids}
    # The child's own watcher (the hub) notices an idle worker's death, with no call made.
    victim = pool._core.idle[0]
    os.kill(victim.pid, signal.SIGKILL)
    noticed = _wait(lambda: pool.stats()["deaths"] != {}, 10)
    return {"ok": answers == [f"{tag}-{i}" for i in range(n)], "pids": sorted(pids),
            "inherited": sorted(parent_pids), "zygotes": sorted(zygotes), "noticed": noticed}


def _fork_child(tag, wfd):
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.write(wfd, (json.dumps(_child_report(_FORK_POOL, tag)) + "\n").encode())
        _FORK_POOL.close()
        code = 0
    except BaseException as e:  # noqa: BLE001
        os.write(wfd, (json.dumps({"error": repr(e)}) + "\n").encode())
    finally:
        os._exit(code)


def _reap(pid, limit):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hung"


def test_a_pool_survives_fork_in_parent_and_children(plugin):
    global _FORK_POOL
    path, policy = plugin
    _FORK_POOL = pool = Pool(path, policy=policy, size=2)
    try:
        assert pool.call("echo", "before") == "before"
        parent_pids = {w.pid for w in _workers(pool)}
        r, w = os.pipe()
        kids = [_fork_child(tag, w) for tag in ("a", "b")]
        os.close(w)
        parent_answers = [pool.invoke("echo", (i,), timeout=10) for i in range(200)]
        codes = [_reap(k, 60) for k in kids]
        with os.fdopen(r) as f:
            reports = [json.loads(line) for line in f]
        assert codes == [0, 0], (codes, reports)
        assert len(reports) == 2 and all(rep.get("ok") for rep in reports), reports
        parent_zygotes = {procfs.parent_of(p) for p in parent_pids}
        for rep in reports:
            assert rep["inherited"] == []                      # the child owns none of the parent's
            assert not set(rep["pids"]) & parent_pids          # and its answers came from its own
            assert not set(rep["zygotes"]) & parent_zygotes    # workers, from its own zygote
            assert rep["noticed"]                              # which its own hub watches
        assert parent_answers == list(range(200))
        assert {w.pid for w in _workers(pool)} == parent_pids  # the parent was not disturbed
        assert pool.stats()["errors"] == {} and pool.stats()["restarts"] == 0
        assert pool.call("echo", "after") == "after"
    finally:
        _FORK_POOL = None
        pool.close()


def _mp_task(tag):
    return _child_report(_FORK_POOL, tag, n=10)


def test_a_pool_survives_multiprocessing_fork(plugin):
    global _FORK_POOL
    path, policy = plugin
    _FORK_POOL = pool = Pool(path, policy=policy, size=2)
    try:
        assert pool.call("echo", 1) == 1
        parent_pids = {w.pid for w in _workers(pool)}
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(2) as mp:
            res = mp.map_async(_mp_task, ["m1", "m2", "m3"])
            assert [pool.invoke("echo", (i,), timeout=10) for i in range(100)] == list(range(100))
            reports = res.get(timeout=60)
        assert all(rep["ok"] and rep["noticed"] and not set(rep["pids"]) & parent_pids for rep in reports), reports
        assert {w.pid for w in _workers(pool)} == parent_pids
        assert pool.stats()["errors"] == {}
    finally:
        _FORK_POOL = None
        pool.close()


# ---- AsyncPool ---------------------------------------------------------------------------------
def test_async_pool_tasks_get_their_own_answers_while_killed(kill_mode_plugin):
    path, policy = kill_mode_plugin

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

            # cancelling a running call kills (and replaces) its worker, not held against the plugin
            trips, restarts = s["restart_trips"], s["restarts"]
            t = asyncio.ensure_future(pool.call("nap", 5))
            await asyncio.sleep(0.1)
            t.cancel()
            await asyncio.gather(t, return_exceptions=True)
            assert await pool.call("echo", "after") == "after"
            s = pool.stats()
            assert s["cancel_replaced"] == 1 and s["restarts"] == restarts and s["restart_trips"] == trips

            with pytest.raises(PolicyViolation):
                await pool.call("sock")
            with pytest.raises(PluginTimeout):
                await pool.invoke("spin", timeout=0.2)
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
        with pytest.raises(UsageError):
            await pool.invoke("echo", (1,), timeout=float("nan"))
        await pool.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_async_pool_callbacks_run_on_the_loop(plugin):
    path, policy = plugin

    async def main():
        got = []
        async with AsyncPool(path, policy=policy, size=1) as pool:
            loop_thread = threading.current_thread()
            pool.on("message", lambda wid, m: got.append((wid.pool, m, threading.current_thread() is loop_thread)))
            assert await pool.call("progress", 3) == 3
            for _ in range(100):
                if len(got) == 3:
                    break
                await asyncio.sleep(0.01)
        assert got == [(pool.name, {"done": i, "of": 3}, True) for i in (1, 2, 3)]

    asyncio.run(asyncio.wait_for(main(), 30))


def test_batch_progress_example(tmp_path):
    import subprocess
    import sys
    from helpers import ROOT
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "batch_progress.py"), "--calls", "200",
                          "--size", "2"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "200 calls in" in out.stdout and "0 failed" in out.stdout and "200/200" in out.stderr + out.stdout
    sent = sum(int(n) for n in re.findall(r"'textstats-\d+': (\d+)", out.stdout))
    assert sent == 200  # one progress post per call, each delivered with its worker's identity


def _catch(out, fn, *args):
    try:
        out.append(fn(*args))
    except Exception as e:  # noqa: BLE001
        out.append(e)


def test_an_abandoned_async_start_ends_through_the_core(plugin, caplog):
    """A start cancelled while the zygote's fork runs in its thread: when the fork completes
    after all, the worker is killed and ended like any death (nothing waits on it forever, no
    timer fires on a handle set aside)."""

    path, policy = plugin

    async def main():
        for _ in range(10):
            w = AsyncWorker(path, policy=policy)
            task = asyncio.ensure_future(w._start())
            await asyncio.sleep(0)  # the spawn is in its thread now
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.wait_for(w.terminate(), 10)  # never waits forever
            for _ in range(200):
                if w._core is None or w._core.state is lc._ENDED:
                    break
                await asyncio.sleep(0.01)
            assert w._core is None or w._core.state is lc._ENDED
        await asyncio.sleep(0.3)

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(asyncio.wait_for(main(), 60))
    assert not [r for r in caplog.records if "Exception in callback" in r.getMessage()]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_pool_denied_callbacks_name_the_worker_and_the_syscall(plugin, kind):
    """Under the default (deny mode) a pool's workers report each denied syscall to
    pool.on("denied") with the worker's identity; the call fails, the worker serves on."""
    path, policy = plugin
    got = []

    def on_denied(wid, n):
        got.append((wid.pool, n.name))

    if kind == "sync":
        with Pool(path, policy=policy, size=1) as pool:
            pool.on("denied", on_denied)
            with pytest.raises(sandbox.PluginError):
                pool.call("sock")
            assert pool.call("echo", 1) == 1
            name = pool.name
    else:
        async def main():
            async with AsyncPool(path, policy=policy, size=1) as pool:
                pool.on("denied", on_denied)
                with pytest.raises(sandbox.PluginError):
                    await pool.call("sock")
                assert await pool.call("echo", 1) == 1
                for _ in range(100):
                    if got:
                        break
                    await asyncio.sleep(0.01)
                return pool.name
        name = asyncio.run(asyncio.wait_for(main(), 30))
    assert got and got[0] == (name, "socket"), got
