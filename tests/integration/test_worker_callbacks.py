"""Where a Worker's callbacks run: on the worker's own callback thread, in order, never on the
hub thread that supervises every idle worker (real workers, real signals)."""
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import sandbox
import sandbox.events
from helpers import ROOT
from sandbox import PluginCrashed

with open(os.path.join(ROOT, "tests", "plugins", "basic", "worker.py")) as _f:
    BASIC = _f.read()


@pytest.fixture
def plugin(make_plugin):
    return make_plugin(BASIC, "[limits]\nmemory_mb = 512\ntimeout = 20\n")


def _wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _callback_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("sandbox-worker-")]


@pytest.mark.unpriv
def test_a_slow_callback_never_delays_noticing_another_workers_death(plugin):
    """Worker A's log callback sleeps 3 s; idle worker B is SIGKILLed from outside meanwhile: B's
    death is noticed (alive turns False, its exit callback runs) well before A's callback ends."""
    sleeping, slept = threading.Event(), threading.Event()

    def slow_log(line):
        sleeping.set()
        time.sleep(3)
        slept.set()

    with sandbox.Worker(*plugin) as a, sandbox.Worker(*plugin) as b:
        ended = []
        b.on("exit", ended.append)
        a.on("log", slow_log)
        assert a.call("hello") == 1  # prints a line: the hub reads it, A's callback starts
        assert sleeping.wait(10), "A's log callback never ran"
        os.kill(b.pid, signal.SIGKILL)  # from outside, by its pid: only the hub can notice
        t0 = time.monotonic()
        assert _wait_for(lambda: not b.alive and ended, timeout=1.0), \
            f"B's death unnoticed after {time.monotonic() - t0:.2f} s while A's callback slept"
        assert not slept.is_set()  # ... and A's callback was still sleeping all that time
        assert isinstance(ended[0], PluginCrashed) and ended[0].signal == signal.SIGKILL
        assert isinstance(b.death, PluginCrashed)


@pytest.mark.unpriv
def test_callbacks_run_in_order_on_the_workers_callback_thread(plugin):
    seen = []  # (event, payload, thread name)

    def record(event):
        return lambda payload: seen.append((event, payload, threading.current_thread().name))

    w = sandbox.Worker(*plugin)
    w.on("message", record("message")).on("exit", record("exit"))
    assert w.call("tell", 5) == "told"
    # a call returns once the callbacks of what the plugin posted during it have run
    assert [p for _, p, _ in seen] == [{"i": i} for i in range(5)]
    w.post({"n": 1})  # answered between calls: the hub reads it and hands it over
    assert _wait_for(lambda: len(seen) == 6)
    assert w.call("tell", 2) == "told"
    w.close()  # the exit callback has run when close() returns
    assert [e for e, _, _ in seen] == ["message"] * 8 + ["exit"]
    assert [p for _, p, _ in seen][5:8] == [{"echo": {"n": 1}}, {"i": 0}, {"i": 1}]
    assert seen[-1][1] is None  # a clean close
    names = {name for _, _, name in seen}
    assert names == {f"sandbox-worker-{w.name}-callbacks"}, names
    assert "sandbox-hub" not in names and threading.current_thread().name not in names
    assert _wait_for(lambda: not _callback_threads())  # ended with the worker


@pytest.mark.unpriv
def test_log_callbacks_never_run_on_the_hub(plugin):
    where = []
    with sandbox.Worker(*plugin) as w:
        w.on("log", lambda line: where.append(threading.current_thread().name))
        assert w.call("hello") == 1
        assert _wait_for(lambda: where)
    assert where == [f"sandbox-worker-{w.name}-callbacks"]


@pytest.mark.unpriv
def test_a_callback_may_call_its_worker_and_close_it(plugin):
    """A callback runs on the callback thread, outside every lock a call holds: it may call the
    worker (between calls, or while another thread's call waits for its callbacks) and close it."""
    got, ended = [], []
    w = sandbox.Worker(*plugin)

    def on_message(msg):
        if msg == {"echo": "add"}:
            got.append(w.call("add", 2, 3))
        elif msg == {"i": 0}:
            got.append(w.call("add", 1, 1))  # the caller of tell() waits for this callback
        elif msg == {"echo": "close"}:
            w.close()

    w.on("message", on_message).on("exit", ended.append)
    w.post("add")
    assert _wait_for(lambda: got == [5])
    assert w.call("tell", 1) == "told" and got == [5, 2]
    w.post("close")
    assert _wait_for(lambda: ended == [None])
    assert not w.alive


@pytest.mark.unpriv
def test_a_callback_calling_its_worker_never_deadlocks_a_full_backlog(plugin):
    """The caller of tell() waits for room for its messages; the first message's callback calls
    the worker, so it waits for that very caller: the caller stops waiting (and drops) instead."""
    answers = []
    w = sandbox.Worker(*plugin)
    w.on("message", lambda msg: answers.append(w.call("add", msg["i"], 1)))
    w._runner.budget.max_events = 2
    done = []
    t = threading.Thread(target=lambda: done.append(w.call("tell", 50)), daemon=True)
    t.start()
    t.join(30)
    try:
        assert done == ["told"], "the caller and the callback waited for each other"
        assert answers[:1] == [1] and answers == sorted(set(answers))  # in order; some dropped
        assert w.callbacks_dropped > 0
    finally:
        if not t.is_alive():
            w.close()


@pytest.mark.unpriv
def test_drops_past_the_backlog_are_counted_and_logged(plugin, caplog):
    """The hub never waits for callbacks: past the backlog, log lines are dropped for the
    callbacks (still kept in w.logs), counted and logged."""
    release = threading.Event()
    with sandbox.Worker(*plugin) as w:
        w.on("log", lambda line: release.wait(20))
        assert w._runner is not None
        w._runner.budget.max_events = 3  # a small backlog, to pass it quickly
        with caplog.at_level(logging.WARNING, logger="sandbox"):
            assert w.call("noisy") == "still fine"  # 20,000 lines
            assert _wait_for(lambda: w.callbacks_dropped > 100)
        release.set()
        assert any("callback events dropped" in r.getMessage() and w.name in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
        assert w.call("add", 1, 2) == 3  # supervision and calls went on
        assert w.logs and w.logs[-1] == "x" * 200


@pytest.mark.slow
def test_start_terminate_cycles_leave_no_thread_behind(plugin):
    """1,000 workers with callbacks, each started and terminated: the thread count is unchanged
    (close/terminate drain the callbacks and end the thread). (Root run only: ~15 s.)"""
    with sandbox.Worker(*plugin) as warm:  # the hub and the zygote exist from here on
        warm.on("exit", lambda death: None)
    before = threading.active_count()
    ends = []
    for i in range(1000):
        w = sandbox.Worker(*plugin)
        w.on("exit", ends.append)
        if i % 50 == 0:
            w.on("message", lambda msg: None)
            assert w.call("tell", 2) == "told"
        w.terminate()
        assert threading.active_count() <= before, (i, _callback_threads())
    assert len(ends) == 1000
    assert not _callback_threads()
    assert threading.active_count() <= before


FORKER = r"""
import json, os, sys, threading, time
sys.path.insert(0, {root!r})
import sandbox
import sandbox.events
from sandbox._host.callbacks import CallbackRunner
path, policy = sys.argv[1:3]
parent_pid = os.getpid()
ran = []  # (pid, what)
w = sandbox.Worker(path, policy=policy)
w.on("message", lambda m: ran.append((os.getpid(), "parent-worker")))
assert w.call("tell", 1) == "told"  # its callback thread runs
bare = CallbackRunner("test", "test-runner")
bare.put([lambda: None], (), 0)
bare.barrier()
r, wr = os.pipe()
bare._cv.acquire()  # held by the parent at the fork: a child reusing it would wait forever
pid = os.fork()
if pid == 0:
    os.close(r)
    res = {{}}
    try:
        bare.put([lambda: ran.append((os.getpid(), "bare"))], (), 0)
        bare.barrier()
        res["bare_ran_in_child"] = (os.getpid(), "bare") in ran
        mine = sandbox.Worker(path, policy=policy)
        names = []
        mine.on("message", lambda m: names.append(threading.current_thread().name))
        assert mine.call("tell", 2) == "told"
        res["own_worker_callbacks"] = names
        mine.close()
        res["parent_worker_ran_here"] = any(p == os.getpid() and what == "parent-worker" for p, what in ran)
    except BaseException as e:
        res["error"] = repr(e)
    os.write(wr, json.dumps(res).encode())
    os._exit(0)
bare._cv.release()
os.close(wr)
deadline = time.monotonic() + 20
while not os.waitpid(pid, os.WNOHANG)[0]:
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        break
    time.sleep(0.01)
child = json.loads(os.read(r, 65536) or b"{{}}")
assert w.call("tell", 1) == "told"  # the parent's worker and its callback thread carry on
w.close()
print(json.dumps({{"child": child, "parent_ran": sum(1 for p, _ in ran if p == parent_pid)}}))
"""


@pytest.mark.unpriv
def test_fork_gives_the_child_callback_threads_of_its_own(plugin, plugin_dir):
    script = os.path.join(plugin_dir, "forker.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent(FORKER.format(root=ROOT)))
    out = subprocess.run([sys.executable, script, *plugin], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["child"] == {"bare_ran_in_child": True, "own_worker_callbacks": [
        "sandbox-worker-p1-callbacks"] * 2, "parent_worker_ran_here": False}, got
    assert got["parent_ran"] == 2


@pytest.mark.unpriv
def test_a_slow_event_subscriber_never_delays_noticing_a_death(plugin):
    """A sandbox.events subscriber that sleeps 3 s on the first death the hub sees: a second idle
    worker's death is still noticed at once (the hub hands events over, it never runs subscribers)."""
    sleeping, slept = threading.Event(), threading.Event()

    def slow(ev):
        if ev.name == "ended" and not sleeping.is_set():
            sleeping.set()
            time.sleep(3)
            slept.set()

    unsubscribe = sandbox.events.subscribe(slow)
    try:
        with sandbox.Worker(*plugin) as a, sandbox.Worker(*plugin) as b:
            a.call("hello"), b.call("hello")
            os.kill(a.pid, signal.SIGKILL)  # idle: only the hub notices, and emits "ended"
            assert sleeping.wait(10), "no 'ended' event for A"
            os.kill(b.pid, signal.SIGKILL)
            t0 = time.monotonic()
            assert _wait_for(lambda: not b.alive, timeout=1.0), \
                f"B's death unnoticed after {time.monotonic() - t0:.2f} s while a subscriber slept"
            assert not slept.is_set()
    finally:
        unsubscribe()
