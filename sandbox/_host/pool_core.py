"""A pool's bookkeeping without I/O or locking, shared by Pool (threads) and AsyncPool (asyncio).

Who is idle, who waits (FIFO, handed a worker directly so nobody barges), what died, what to
start, the restart limit and the counters. The owner serialises every call (a lock or the loop)
and does the I/O: starting, closing and calling workers, waking its waiters (`Slot.wake`).
"""
import collections
import time

from ..errors import QueueFull, RestartLimit, WorkerClosed


class Slot:
    """One queued call: gets a worker or an error, then `wake()` is called (owner's lock held)."""

    __slots__ = ("worker", "error", "wake", "gone")

    def __init__(self, wake):
        self.worker = None
        self.error = None
        self.wake = wake
        self.gone = False  # the caller gave up (cancelled); skip it


class RestartGovernor:
    """At most `count` replacements of dead workers within `window` seconds. One more death in the
    window trips it: nothing is started for `window` seconds (a crash loop costs `count` forks per
    window, never a storm), then the pool refills and the count starts afresh."""

    def __init__(self, count: int, window: float, clock=time.monotonic):
        if count < 0 or window <= 0:
            raise ValueError("restart_limit must be (count >= 0, window_seconds > 0)")
        self.count, self.window, self.clock = count, float(window), clock
        self.deaths = collections.deque()
        self.tripped_until = 0.0
        self.trips = 0
        self.last_death = None

    def record(self, why) -> None:
        now = self.clock()
        self.last_death = why
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


class PoolCore:
    def __init__(self, name: str, size: int, max_queue: int | None, max_calls: int | None,
                 restart_limit: tuple[int, float]):
        if size < 1:
            raise ValueError("size must be at least 1")
        if max_calls is not None and max_calls < 1:
            raise ValueError("max_calls_per_worker must be at least 1")
        self.name = name
        self.size = size
        self.max_queue = max(0, max_queue if max_queue is not None else 64 * size)
        self.max_calls = max_calls
        self.governor = RestartGovernor(*restart_limit)
        self.workers: set = set()        # live (or not yet known dead) workers of the pool
        self.idle = collections.deque()
        self.waiters = collections.deque()
        self.calls_by: dict = {}
        self.busy = 0
        self.starting = 0
        self.closed = False
        self._owed_restarts = 0          # deaths not yet replaced (vs. recycles)
        self.counters = collections.Counter()
        self.errors = collections.Counter()
        self.deaths = collections.Counter()

    # ---- callers ----------------------------------------------------------------------------
    def acquire(self, slot: Slot):
        """An idle worker (now busy), or None after queueing `slot`; raises if neither is possible."""
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
        if len(self.waiters) >= self.max_queue:
            self.counters["queue_full"] += 1
            raise QueueFull(f"pool {self.name}: {len(self.waiters)} calls already wait for a worker "
                            f"(max_queue={self.max_queue})")
        self.waiters.append(slot)
        return None

    def release(self, w, *, recycle: bool = False):
        """A call on `w` ended. Returns a worker the owner must close (recycled), else None."""
        self.busy -= 1
        n = self.calls_by[w] = self.calls_by.get(w, 0) + 1
        if w not in self.workers or not w.alive:
            return None  # dead: died() does the accounting
        if not self.closed and (recycle or (self.max_calls is not None and n >= self.max_calls)):
            self._forget(w)
            self.counters["recycled"] += 1
            return w
        self._hand(w)
        return None

    def abandon(self, slot: Slot):
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

    def record_call(self, error=None):
        self.counters["calls"] += 1
        if error is None:
            self.counters["ok"] += 1
        else:
            self.errors[getattr(error, "kind", None) or type(error).__name__] += 1

    # ---- supervisor -------------------------------------------------------------------------
    def added(self, w) -> bool:
        """A freshly started worker joins (False: the pool closed meanwhile; the owner closes it)."""
        self.starting -= 1
        if self.closed:
            return False
        self.workers.add(w)
        self.calls_by[w] = 0
        self._hand(w)
        return True

    def start_failed(self, error):
        self.starting -= 1
        self.deaths[getattr(error, "kind", "error")] += 1
        self.counters["start_failures"] += 1
        self._owed_restarts += 1
        self.governor.record(error)
        self._fail_if_starved()

    def died(self, w, death) -> bool:
        """A worker ended (its exit callback, or noticed by the owner). True if it was ours."""
        if w not in self.workers:
            return False
        self._forget(w)
        if not self.closed:
            self.deaths[getattr(death, "kind", "closed") if death is not None else "exit"] += 1
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

    def wake_in(self) -> float | None:
        """When the supervisor should look again even if nothing happens (a trip ending)."""
        if self.governor.tripped() and len(self.workers) + self.starting < self.size:
            return self.governor.remaining() + 0.01
        return None

    def close(self):
        """Mark closed, fail every waiter. Returns the workers still owned (idle and busy)."""
        self.closed = True
        self._fail_waiters(WorkerClosed(f"pool {self.name} is closed"))
        return list(self.workers)

    def stats(self) -> dict:
        return {
            "plugin": self.name, "size": self.size, "live": len(self.workers), "idle": len(self.idle),
            "busy": self.busy, "starting": self.starting, "queued": len(self.waiters),
            "max_queue": self.max_queue, "calls": self.counters["calls"], "ok": self.counters["ok"],
            "errors": dict(self.errors), "restarts": self.counters["restarts"],
            "recycled": self.counters["recycled"], "start_failures": self.counters["start_failures"],
            "queue_full": self.counters["queue_full"], "deaths": dict(self.deaths),
            "restart_limited": self.governor.tripped(), "restart_trips": self.governor.trips,
            "closed": self.closed,
        }

    # ---- internals --------------------------------------------------------------------------
    def _hand(self, w):
        while self.waiters:
            slot = self.waiters.popleft()
            if slot.gone:
                continue
            slot.worker = w
            self.busy += 1
            slot.wake()
            return
        self.idle.append(w)

    def _forget(self, w):
        self.workers.discard(w)
        self.calls_by.pop(w, None)
        try:
            self.idle.remove(w)
        except ValueError:
            pass

    def _starved(self) -> bool:
        return self.governor.tripped() and not self.workers and not self.starting

    def _fail_if_starved(self):
        if self._starved():
            self._fail_waiters(self.governor.error(self.name))

    def _fail_waiters(self, error):
        while self.waiters:
            slot = self.waiters.popleft()
            if not slot.gone:
                slot.error = error
                slot.wake()
