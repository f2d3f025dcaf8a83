"""A pool's decisions without I/O, threads or an event loop: shared by Pool and AsyncPool.

Which worker serves a call (idle first, else a FIFO queue that hands a freed worker straight to
the oldest waiter, so nobody barges), what a call's outcome means (count it, recycle the worker,
replace a dead one, send the call again when it never reached its worker), when to start
workers, the restart governor, and the budget of what waits for the pool's callbacks.

The owner serialises every method (a lock, or the loop) and does all the I/O: starting, calling
and closing workers, reading their CPU time, waking its waiters (`Slot.wake`). Nothing here
touches a worker beyond its `alive` flag, so every rule can be tested without a process.
"""
from __future__ import annotations

import collections
import time
from typing import Any, Callable, NamedTuple

from ..errors import PluginMemoryError, QueueFull, RestartLimit, UsageError, WorkerClosed

# A pooled worker whose CPU time, plus what its costliest call so far may have used, reaches this
# share of its lifetime budget (limits.cpu_seconds, an RLIMIT_CPU the kernel enforces by killing
# it) is recycled after its call: a next call like the ones before finishes before the budget runs
# out. (The kernel's own account can end a worker a little before its nominal budget: hence 80%.)
# The owner reads a worker's CPU time only when it might be near: a process cannot use more CPU
# than `cpu_parallel` x the wall time that passed since the last reading.
CPU_RECYCLE_AT = 0.8
# How often one call is sent again after it was found never to have reached its worker (the
# worker died first). Each try waits for a live worker; the restart governor bounds the rest.
MAX_RESENDS = 5
# What may wait for the pool's callbacks at once (events, and bytes as estimated by the owner).
CALLBACK_EVENTS = 10_000
CALLBACK_BYTES = 64 << 20


class WorkerId(NamedTuple):
    """Which worker of which pool: what pool callbacks get first. str() is "pool-number"."""

    pool: str
    number: int
    pid: int | None

    def __str__(self) -> str:
        return f"{self.pool}-{self.number}"


class Slot:
    """One queued call: gets a worker or an error, then `wake()` is called (owner's lock held)."""

    __slots__ = ("worker", "error", "wake", "gone")

    def __init__(self, wake: Callable[[], Any] | None):
        self.worker: Any = None
        self.error: BaseException | None = None
        self.wake = wake
        self.gone = False  # the caller gave up (cancelled); skip it


class RestartGovernor:
    """At most `count` replacements of dead workers within `window` seconds. One more death in the
    window trips it: nothing is started for `window` seconds (a crash loop costs `count` forks per
    window, never a storm), then the pool refills and the count starts afresh. `count=None`: no
    limit (batch work, where a crash is one failed item, not a reason to stop)."""

    def __init__(self, count: int | None, window: float, clock: Callable[[], float] = time.monotonic):
        self.count, self.window, self.clock = count, float(window), clock
        self.deaths: collections.deque[float] = collections.deque()
        self.tripped_until = 0.0
        self.trips = 0
        self.last_death: Any = None

    def record(self, why: Any) -> None:
        self.last_death = why
        if self.count is None:
            return
        now = self.clock()
        while self.deaths and self.deaths[0] <= now - self.window:
            self.deaths.popleft()
        self.deaths.append(now)
        if len(self.deaths) > self.count and not self.tripped():
            self.tripped_until = now + self.window
            self.trips += 1
            self.deaths.clear()

    def tripped(self) -> bool:
        return self.clock() < self.tripped_until

    def remaining(self) -> float:
        return max(0.0, self.tripped_until - self.clock())

    def error(self, plugin: str) -> RestartLimit:
        return RestartLimit(
            f"pool {plugin}: workers died more than {self.count} times within {self.window:g} s "
            f"(last: {self.last_death}); restarts are paused for {self.remaining():.1f} s")


def governor_from(restart_limit: Any, clock: Callable[[], float] = time.monotonic) -> RestartGovernor:
    """`restart_limit` as the public API takes it: None (no limit) or (count >= 0, window_s > 0)."""
    if restart_limit is None:
        return RestartGovernor(None, 1.0, clock)
    try:
        count, window = restart_limit
    except (TypeError, ValueError):
        raise UsageError(f"restart_limit must be None or (count, window_seconds), not {restart_limit!r}") from None
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise UsageError(f"restart_limit count must be an int >= 0, not {count!r}")
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not window > 0 or window == float("inf"):
        raise UsageError(f"restart_limit window must be a number of seconds > 0, not {window!r}")
    return RestartGovernor(count, window, clock)


class Verdict(NamedTuple):
    """What the owner does after a call on a worker."""

    resend: bool            # the call never reached the worker: acquire another and send it again
    close: Any              # a worker to close now (recycled), or None


KEEP = Verdict(False, None)  # the usual verdict: nothing for the owner to do
RESEND = Verdict(True, None)


class CallbackBudget:
    """Events waiting for the pool's callbacks: admitted while under both caps, else dropped and
    counted (the owner logs drops; a callback never makes the pool wait)."""

    def __init__(self, max_events: int = CALLBACK_EVENTS, max_bytes: int = CALLBACK_BYTES):
        self.max_events, self.max_bytes = max_events, max_bytes
        self.events = 0
        self.bytes = 0
        self.dropped = 0
        self.unreported = 0  # drops not yet logged

    def admit(self, size: int) -> bool:
        if self.events >= self.max_events or self.bytes + size > self.max_bytes:
            self.dropped += 1
            self.unreported += 1
            return False
        self.events += 1
        self.bytes += size
        return True

    def done(self, size: int) -> None:
        self.events -= 1
        self.bytes -= size

    def take_unreported(self) -> int:
        n, self.unreported = self.unreported, 0
        return n


class PoolCore:
    def __init__(self, name: str, size: int, max_queue: int | None, max_calls: int | None,
                 restart_limit: Any, cpu_budget: float | None = None,
                 clock: Callable[[], float] = time.monotonic, cpu_parallel: int = 1):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise UsageError(f"size must be an int >= 1, not {size!r}")
        if max_calls is not None and (isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 1):
            raise UsageError(f"max_calls_per_worker must be None or an int >= 1, not {max_calls!r}")
        if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0):
            raise UsageError(f"max_queue must be None or an int >= 0, not {max_queue!r}")
        self.name = name
        self.size = size
        self.max_queue = max_queue if max_queue is not None else 64 * size
        self.max_calls = max_calls
        self.cpu_budget = cpu_budget
        self.cpu_parallel = max(1, cpu_parallel)  # threads that may burn CPU at once in a worker
        self.governor = governor_from(restart_limit, clock)
        self.workers: set = set()        # live (or not yet known dead) workers of the pool
        self.idle: collections.deque = collections.deque()
        self.waiters: collections.deque[Slot] = collections.deque()
        self.calls_by: dict = {}
        self.ids: dict = {}
        # worker -> [CPU s at the last reading, when the bound may reach the recycle point, costliest
        # call's CPU bound]: see cpu_reading_due
        self.cpu_seen: dict = {}
        self.calls = 0                   # hot counters as plain ints; the rest in `counters`
        self.ok = 0
        self.busy = 0
        self.starting = 0
        self.closed = False
        self._numbers = 0
        self._owed_restarts = 0          # deaths not yet replaced (vs. recycles)
        self.counters: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.deaths: collections.Counter = collections.Counter()

    # ---- callers ----------------------------------------------------------------------------
    def acquire(self, slot: Slot, *, resend: bool = False):
        """An idle worker (now busy), or None after queueing `slot`; raises if neither is possible.
        A call sent again (`resend`) was admitted before: it goes first and never meets QueueFull."""
        if self.closed:
            raise WorkerClosed(f"pool {self.name} is closed")
        while self.idle:
            w = self.idle.popleft()
            if w.alive:
                self.busy += 1
                return w
            # died while idle: its exit report (died()) is on its way; never hand it out
        if self._starved():
            raise self.governor.error(self.name)
        if resend:
            self.waiters.appendleft(slot)
            return None
        if len(self.waiters) >= self.max_queue:
            self.counters["queue_full"] += 1
            raise QueueFull(f"pool {self.name}: {len(self.waiters)} calls already wait for a worker "
                            f"(max_queue={self.max_queue})")
        self.waiters.append(slot)
        return None

    def cpu_reading_due(self, w, call_seconds: float = 0.0) -> bool:
        """Should the owner read w's CPU time now (after a call that took `call_seconds`)? Not
        while the CPU it can have used since the last reading keeps it under the recycle point."""
        if not self.cpu_budget:
            return False
        seen = self.cpu_seen.get(w)
        return seen is None or self.governor.clock() + call_seconds >= seen[1]

    def settle(self, w, error: BaseException | None, *, alive: bool, never_sent: bool = False,
               cpu_used: float | None = None, call_seconds: float = 0.0, death: Any = None,
               attempt: int = 0) -> Verdict:
        """A call on `w` ended with `error` (None: success). `alive`: the worker is still alive;
        `never_sent`: there is evidence the call never reached it; `cpu_used`: its lifetime CPU
        seconds, if read after the call (see cpu_reading_due); `call_seconds`: the call's wall
        time; `death`: why it ended, if it did."""
        self.busy -= 1
        if error is None:
            self.calls += 1
            self.ok += 1
        elif never_sent and not self.closed and attempt < MAX_RESENDS:
            self.died(w, death if death is not None else error)
            self.counters["resent"] += 1
            return RESEND
        else:
            self._record_error(error)
        if w not in self.workers:
            return KEEP
        if not alive:
            # Replaced now, whether or not its exit callback ever runs (a failed clean-up must
            # never leave the pool one worker short).
            self.died(w, death if death is not None else error)
            return KEEP
        n = self.calls_by[w] = self.calls_by.get(w, 0) + 1
        if not self.closed and self._recycle_due(w, error, n, cpu_used, call_seconds):
            self._forget(w)
            self.counters["recycled"] += 1
            return Verdict(False, w)
        if self.waiters:
            self._hand(w)
        else:
            self.idle.append(w)
        return KEEP

    def abandon(self, slot: Slot) -> None:
        """A queued caller gave up; a worker it was handed meanwhile goes back."""
        slot.gone = True
        try:
            self.waiters.remove(slot)
        except ValueError:
            pass
        if slot.worker is not None:
            w, slot.worker = slot.worker, None
            self.busy -= 1
            if w in self.workers and w.alive:
                self._hand(w)

    def cancelled(self, w, *, alive: bool) -> None:
        """A call that ran was cancelled. Its worker, being killed (not `alive`), is replaced
        without counting against the restart limit: the caller ended it, not the plugin (a client
        that hangs up must never make the plugin look like a crash loop). One whose reply had
        already arrived is still alive and simply goes back."""
        self.busy -= 1
        self.calls += 1
        self.errors["cancelled"] += 1
        if w not in self.workers:
            return
        if alive:
            self._hand(w)
        else:
            self._forget(w)
            self.counters["cancel_replaced"] += 1

    # ---- supervisor -------------------------------------------------------------------------
    def number(self) -> int:
        """The next worker's number within the pool (for its WorkerId)."""
        self._numbers += 1
        return self._numbers

    def added(self, w, wid: WorkerId | None = None) -> bool:
        """A freshly started worker joins (False: the pool closed meanwhile; the owner closes it)."""
        self.starting -= 1
        if self.closed:
            return False
        self.workers.add(w)
        self.calls_by[w] = 0
        self.cpu_seen.pop(w, None)
        if wid is not None:
            self.ids[w] = wid
        self._hand(w)
        return True

    def start_abandoned(self) -> None:
        """A start was cancelled (the pool is closing): not a failure of the plugin."""
        self.starting -= 1

    def start_failed(self, error: BaseException) -> None:
        self.starting -= 1
        self.deaths[getattr(error, "kind", "error")] += 1
        self.counters["start_failures"] += 1
        self._owed_restarts += 1
        self.governor.record(error)
        self._fail_if_starved()

    def died(self, w, death: Any) -> bool:
        """A worker ended (its exit callback, or noticed by the owner). True if it was ours."""
        if w not in self.workers:
            return False
        self._forget(w)
        if not self.closed:
            self.deaths[getattr(death, "kind", None) or ("exit" if death is None else str(death))] += 1
            self._owed_restarts += 1
            self.governor.record(death)
            self._fail_if_starved()
        return True

    def starts_due(self) -> int:
        """How many workers to start now (already counted as starting)."""
        if self.closed or self.governor.tripped():
            return 0
        n = self.size - len(self.workers) - self.starting
        if n <= 0:
            return 0
        self.starting += n
        restarts = min(n, self._owed_restarts)
        self._owed_restarts -= restarts
        self.counters["restarts"] += restarts
        return n

    def start_due(self) -> bool:
        """A worker should be started now (the supervisor has work)."""
        return (len(self.workers) + self.starting < self.size and not self.closed
                and not self.governor.tripped())

    def wake_in(self) -> float | None:
        """When the supervisor should look again even if nothing happens (a trip ending)."""
        if self.governor.tripped() and len(self.workers) + self.starting < self.size:
            return self.governor.remaining() + 0.01
        return None

    def close(self) -> list:
        """Mark closed, fail every waiter. Returns the workers still owned (idle and busy)."""
        self.closed = True
        self._fail_waiters(WorkerClosed(f"pool {self.name} is closed"))
        return list(self.workers)

    def fresh(self) -> "PoolCore":
        """The same configuration with none of this state: for a forked child, whose inherited
        workers belong to the parent."""
        core = PoolCore(self.name, self.size, self.max_queue, self.max_calls, None, self.cpu_budget,
                        self.governor.clock, self.cpu_parallel)
        core.governor = RestartGovernor(self.governor.count, self.governor.window, self.governor.clock)
        core.closed = self.closed
        return core

    def stats(self) -> dict:
        return {
            "plugin": self.name, "size": self.size, "live": len(self.workers), "idle": len(self.idle),
            "busy": self.busy, "starting": self.starting, "queued": len(self.waiters),
            "max_queue": self.max_queue, "calls": self.calls, "ok": self.ok,
            "errors": dict(self.errors), "restarts": self.counters["restarts"],
            "recycled": self.counters["recycled"], "cpu_recycled": self.counters["cpu_recycled"],
            "resent": self.counters["resent"], "start_failures": self.counters["start_failures"],
            "queue_full": self.counters["queue_full"], "deaths": dict(self.deaths),
            "restart_limited": self.governor.tripped(), "restart_trips": self.governor.trips,
            "cancel_replaced": self.counters["cancel_replaced"], "closed": self.closed,
        }

    # ---- internals --------------------------------------------------------------------------
    def _record_error(self, error: BaseException) -> None:
        self.calls += 1
        self.errors[getattr(error, "kind", None) or type(error).__name__] += 1

    def _recycle_due(self, w, error, n: int, cpu_used: float | None, call_seconds: float) -> bool:
        if isinstance(error, PluginMemoryError):
            return True  # what it holds may be why: a fresh worker starts clean
        if self.max_calls is not None and n >= self.max_calls:
            return True
        if not self.cpu_budget:
            return False
        # A call cannot have used more CPU than its wall time x the threads that may run at once.
        seen = self.cpu_seen.get(w)
        bound = call_seconds * self.cpu_parallel
        if cpu_used is None:
            if seen is not None and bound > seen[2]:
                seen[1] -= (bound - seen[2]) / self.cpu_parallel  # a costlier call: look sooner
                seen[2] = bound
            return False
        costliest = max(seen[2] if seen is not None else 0.0, bound)
        room = CPU_RECYCLE_AT * self.cpu_budget - cpu_used - costliest
        if room <= 0:
            self.counters["cpu_recycled"] += 1
            return True
        self.cpu_seen[w] = [cpu_used, self.governor.clock() + room / self.cpu_parallel, costliest]
        return False

    def _hand(self, w) -> None:
        while self.waiters:
            slot = self.waiters.popleft()
            if slot.gone:
                continue
            slot.worker = w
            self.busy += 1
            slot.wake()
            return
        self.idle.append(w)

    def _forget(self, w) -> None:
        self.workers.discard(w)
        self.calls_by.pop(w, None)
        self.ids.pop(w, None)
        self.cpu_seen.pop(w, None)
        try:
            self.idle.remove(w)
        except ValueError:
            pass

    def _starved(self) -> bool:
        return self.governor.tripped() and not self.workers and not self.starting

    def _fail_if_starved(self) -> None:
        if self._starved():
            self._fail_waiters(self.governor.error(self.name))

    def _fail_waiters(self, error: BaseException) -> None:
        while self.waiters:
            slot = self.waiters.popleft()
            if not slot.gone:
                slot.error = error
                slot.wake()
