"""PoolCore without processes: every decision a pool makes, from fake workers and a fake clock."""
import pytest

from sandbox.errors import (PluginCrashed, PluginError, PluginMemoryError, QueueFull, RestartLimit, UsageError,
                            WorkerClosed)
from sandbox._host.pool_core import (CPU_RECYCLE_AT, MAX_RESENDS, CallbackBudget, PoolCore, RestartGovernor, Slot,
                                     WorkerId, governor_from)


class FakeWorker:
    def __init__(self, n):
        self.n = n
        self.alive = True

    def __repr__(self):
        return f"w{self.n}"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make(size=2, max_queue=None, max_calls=None, restart_limit=(10, 60.0), cpu_budget=None):
    clock = Clock()
    core = PoolCore("p", size, max_queue, max_calls, restart_limit, cpu_budget, clock)
    workers = []
    for _ in range(core.starts_due()):
        w = FakeWorker(len(workers))
        workers.append(w)
        assert core.added(w, WorkerId("p", core.number(), 100 + w.n))
    return core, workers, clock


def queued():
    woken = []
    slot = Slot(None)
    slot.wake = lambda: woken.append(slot)
    return slot, woken


def test_idle_workers_first_then_fifo_with_direct_hand_over():
    core, (a, b), _ = make()
    assert core.acquire(Slot(None)) is a and core.acquire(Slot(None)) is b
    s1, woken1 = queued()
    s2, woken2 = queued()
    assert core.acquire(s1) is None and core.acquire(s2) is None
    assert core.settle(a, None, alive=True) == (False, None)
    assert woken1 == [s1] and s1.worker is a and woken2 == []  # the oldest waiter, nobody barges
    assert core.busy == 2 and list(core.idle) == []


def test_queue_full_and_a_resent_call_never_meets_it():
    core, (a,), _ = make(size=1, max_queue=1)
    core.acquire(Slot(None))
    first, _ = queued()
    assert core.acquire(first) is None
    with pytest.raises(QueueFull):
        core.acquire(Slot(None))
    resent, woken = queued()
    assert core.acquire(resent, resend=True) is None  # admitted earlier: goes first, no QueueFull
    core.settle(a, None, alive=True)
    assert woken == [resent] and core.stats()["queue_full"] == 1


def test_a_dead_idle_worker_is_never_handed_out():
    core, (a, b), _ = make()
    a.alive = False
    assert core.acquire(Slot(None)) is b


def test_outcomes_count_and_recycle():
    core, (a, b), _ = make(max_calls=2)
    core.acquire(Slot(None))
    assert core.settle(a, PluginError("ValueError", "x"), alive=True) == (False, None)
    core.acquire(Slot(None))
    core.acquire(Slot(None))
    assert core.settle(a, None, alive=True) == (False, a)  # its second call: max_calls reached
    assert core.settle(b, PluginMemoryError("oom"), alive=True) == (False, b)  # memory: start clean
    s = core.stats()
    assert s["calls"] == 3 and s["ok"] == 1 and s["errors"] == {"plugin-error": 1, "memory": 1}
    assert s["recycled"] == 2 and s["live"] == 0
    assert core.starts_due() == 2 and core.stats()["restarts"] == 0  # recycles are not restarts


def test_a_worker_found_dead_after_its_call_is_replaced_without_its_exit_callback():
    core, (a, b), _ = make()
    core.acquire(Slot(None))
    a.alive = False
    err = PluginCrashed("died")
    assert core.settle(a, err, alive=False, death=err) == (False, None)
    assert a not in core.workers and core.start_due()
    assert core.starts_due() == 1 and core.stats()["restarts"] == 1
    assert core.died(a, err) is False  # the exit callback arriving later changes nothing


def test_never_sent_calls_are_resent_a_bounded_number_of_times():
    core, (a, b), _ = make()
    core.acquire(Slot(None))
    verdict = core.settle(a, WorkerClosed("gone"), alive=False, never_sent=True)
    assert verdict.resend and core.stats()["calls"] == 0 and core.stats()["resent"] == 1
    core.acquire(Slot(None), resend=True)
    verdict = core.settle(b, WorkerClosed("gone"), alive=False, never_sent=True, attempt=MAX_RESENDS)
    assert not verdict.resend and core.stats()["errors"] == {"closed": 1}


def test_no_resend_once_closed():
    core, (a, _), _ = make()
    core.acquire(Slot(None))
    core.close()
    assert not core.settle(a, WorkerClosed("closed"), alive=False, never_sent=True).resend


@pytest.mark.parametrize("calls, expect", [
    ([(0.3, 0.3)], [False]),                           # 0.3 used + a 0.3 s call < 0.8
    ([(0.3, 0.3), (0.6, 0.3)], [False, True]),         # 0.6 + 0.3 >= 0.8: the next like these would not fit
    ([(0.05, 0.05), (0.1, 0.05), (0.15, 0.5), (0.35, 0.01)], [False, False, False, True]),  # the costliest counts
])
def test_cpu_budget_recycles_before_the_next_call_could_run_out(calls, expect):
    core, (a,), _ = make(size=1, cpu_budget=1.0)
    got = []
    for used, took in calls:
        core.acquire(Slot(None))
        got.append(core.settle(a, None, alive=True, cpu_used=used, call_seconds=took).close is a)
    assert got == expect
    assert CPU_RECYCLE_AT == 0.8 and core.stats()["cpu_recycled"] == sum(expect)


def test_cpu_is_read_only_when_it_could_be_near_the_recycle_point():
    core, (a,), clock = make(size=1, cpu_budget=10.0)
    assert core.cpu_reading_due(a)  # never read yet
    core.acquire(Slot(None))
    core.settle(a, None, alive=True, cpu_used=1.0, call_seconds=1.0)  # room: 8 - 1 - 1 = 6 s
    clock.now = 5.0
    assert not core.cpu_reading_due(a, 0.5)
    assert core.cpu_reading_due(a, 1.0)  # 5 + 1 s: it could be there
    core.acquire(Slot(None))
    core.settle(a, None, alive=True, call_seconds=3.0)  # unread, but a costlier call: look sooner
    assert core.cpu_reading_due(a)
    assert not make(cpu_budget=None)[0].cpu_reading_due(a)


def test_cancelled_call_replaces_its_worker_outside_the_restart_limit():
    core, (a, b), _ = make(restart_limit=(0, 60))
    core.acquire(Slot(None))
    core.acquire(Slot(None))
    core.cancelled(a, alive=False)
    core.cancelled(b, alive=True)  # its reply had arrived: it simply goes back
    s = core.stats()
    assert s["cancel_replaced"] == 1 and s["errors"] == {"cancelled": 2} and list(core.idle) == [b]
    assert not s["restart_limited"] and core.starts_due() == 1 and core.stats()["restarts"] == 0


def test_restart_governor_window():
    clock = Clock()
    g = RestartGovernor(2, 10, clock=clock)
    g.record("a")
    g.record("b")
    assert not g.tripped()
    clock.now = 11  # the first two left the window
    g.record("c")
    g.record("d")
    assert not g.tripped()
    g.record("e")
    assert g.tripped() and g.trips == 1 and "(last: e)" in str(g.error("p"))
    clock.now = 21.5
    assert not g.tripped()


def test_no_restart_limit():
    g = governor_from(None)
    for i in range(1000):
        g.record(i)
    assert not g.tripped() and g.trips == 0


@pytest.mark.parametrize("bad", [(1, 0), (-1, 5), 5, (1, float("nan")), ("1", 5), (True, 5), (1, 2, 3)])
def test_bad_restart_limits_are_usage_errors(bad):
    with pytest.raises(UsageError):
        governor_from(bad)


def test_crash_loop_trips_fails_waiters_and_pauses_starts():
    core, (a, b), clock = make(restart_limit=(1, 30))
    core.acquire(Slot(None))
    core.acquire(Slot(None))
    waiter, woken = queued()
    core.acquire(waiter)
    core.settle(a, PluginCrashed("x"), alive=False)
    core.settle(b, PluginCrashed("y"), alive=False)
    assert core.stats()["restart_limited"] and core.starts_due() == 0
    assert woken == [waiter] and isinstance(waiter.error, RestartLimit)
    with pytest.raises(RestartLimit):
        core.acquire(Slot(None))
    assert 29 < core.wake_in() <= 30.01
    clock.now = 30.5
    assert core.starts_due() == 2


def test_start_failures_count_toward_the_limit():
    core, _, _ = make(size=1, restart_limit=(2, 30))
    core.died(next(iter(core.workers)), PluginCrashed("x"))
    assert core.starts_due() == 1
    core.start_failed(PluginError("ImportError", "no"))
    assert core.starts_due() == 1
    core.start_failed(PluginError("ImportError", "no"))
    assert core.starts_due() == 0 and core.stats()["start_failures"] == 2


def test_abandoned_slot_gives_its_worker_back():
    core, (a,), _ = make(size=1)
    core.acquire(Slot(None))
    slot, woken = queued()
    core.acquire(slot)
    core.settle(a, None, alive=True)
    assert slot.worker is a
    core.abandon(slot)
    assert list(core.idle) == [a] and core.busy == 0


def test_close_fails_waiters_and_refuses_calls():
    core, _, _ = make(size=1)
    core.acquire(Slot(None))
    slot, woken = queued()
    core.acquire(slot)
    core.close()
    assert isinstance(slot.error, WorkerClosed) and woken == [slot]
    with pytest.raises(WorkerClosed):
        core.acquire(Slot(None))
    assert core.starts_due() == 0


def test_fresh_core_for_a_forked_child_keeps_the_configuration_only():
    core, (a, b), _ = make(size=2, max_queue=7, max_calls=3, restart_limit=(4, 9), cpu_budget=5)
    core.acquire(Slot(None))
    child = core.fresh()
    assert child.workers == set() and child.busy == 0 and child.stats()["calls"] == 0
    assert (child.size, child.max_queue, child.max_calls, child.cpu_budget) == (2, 7, 3, 5)
    assert (child.governor.count, child.governor.window) == (4, 9)
    assert child.starts_due() == 2


def test_worker_ids():
    wid = WorkerId("resize", 3, 1234)
    assert str(wid) == "resize-3" and wid.pid == 1234


def test_bad_sizes_are_usage_errors():
    for kwargs in ({"size": 0}, {"size": 1.5}, {"max_queue": -1}, {"max_calls": 0}):
        with pytest.raises(UsageError):
            make(**kwargs)


def test_callback_budget_drops_past_either_cap():
    b = CallbackBudget(max_events=2, max_bytes=100)
    assert b.admit(10) and b.admit(10) and not b.admit(1)  # events cap
    b.done(10)
    assert not b.admit(95) and b.admit(80)  # bytes cap
    assert b.dropped == 2 and b.take_unreported() == 2 and b.take_unreported() == 0
