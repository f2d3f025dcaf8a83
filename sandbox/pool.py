"""Warm workers for one plugin and policy: `Pool` (threads, on Worker) and `AsyncPool` (on AsyncWorker).

    with sandbox.Pool("plugins/resize/worker.py", policy="policies/resize.toml", size=4) as pool:
        pool.call("resize", data, width=64)                  # from any number of threads
        fut = pool.submit("resize", data, width=64)          # a concurrent.futures.Future
        for out in pool.map("resize", images):               # lazily, 2 x size calls in flight
            ...

    async with sandbox.AsyncPool(path, policy=policy, size=4) as pool:
        await pool.call("resize", data, width=64)            # from any number of tasks
        task = pool.submit("resize", data)                   # an asyncio.Task
        async for out in pool.map("resize", images, ordered=False):
            ...

`call(name, /, *args, **kwargs)` passes every keyword to the plugin; `invoke(name, args, kwargs,
timeout=...)` is the same call with the library's options (timeout as `sandbox._host.options`
defines it; None: the pool's `call_timeout`, else the policy's).

Options and their defaults (suited to serving requests):
- `size=4` workers, started by the constructor (a plugin that cannot load fails it).
- `max_queue=64 * size` calls may wait for a worker; one more raises `QueueFull` (back-pressure).
- `restart_limit=(10, 60.0)`: more than 10 deaths within 60 s pause restarts for 60 s; while no
  worker is left, calls fail fast with `RestartLimit`. `None`: no limit.
- `max_calls_per_worker=None`: a worker is recycled after that many calls.
- A worker that has used 80% of its policy's `limits.cpu_seconds` (a lifetime budget the kernel
  enforces) is recycled after its call, so that it is not killed in the middle of a later one.
- A worker that crashes, times out, violates its policy, breaks the protocol, runs out of memory,
  or whose clean-up failed, is replaced by a supervisor (a thread, or a task), never by the caller,
  who gets its error at once. A cancelled call's worker is killed and replaced without counting
  against the restart limit.
- A call is sent to exactly one worker and answered once. It is sent again, to another worker,
  only on evidence that it never reached the first: the worker's process had ended before the
  call was written (its pidfd says so), or the worker refused it with `WorkerClosed`.

A batch configuration (a crash is one failed item, not a reason to stop):

    Pool(path, policy=policy, size=os.cpu_count(), restart_limit=None, max_queue=100_000)

Callbacks: `pool.on("message" | "log" | "denied" | "exit", cb)` calls `cb(worker_id, payload)`, where
`worker_id` is a `WorkerId(pool, number, pid)` (str: "pool-number") and the payload is what the
plugin posted, one log line, or the error that ended the worker (None after a clean close). What a
plugin posts during a pool call is delivered too. A plugin's log is capped per call (1 MiB) and
the drops are logged. In a `Pool` every callback runs on the pool's own callback thread, in
order, never on the thread that watches workers: a slow callback delays only other callbacks;
past 10,000 waiting events (or 64 MiB) new ones are dropped, counted in `stats()` and logged. In
an `AsyncPool` callbacks run on the event loop, scheduled with `call_soon` after the worker's
event is handled (a coroutine function runs as a task).

Fork: a pool that exists when the process forks (gunicorn --preload, Celery prefork,
multiprocessing with fork) is fresh in the child: it owns none of the parent's workers (they stay
the parent's, untouched) and starts its own on first use; the parent's pool is not disturbed.

`close(timeout)` lets calls in flight finish for up to `timeout` s, then kills what is left.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import inspect
import logging
import os
import queue
import threading
import time
import weakref
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

from ._host import options
from ._host.handle import load_policy as _load_policy, plugin_name
from ._host.callbacks import CallbackRunner, approx_size
from ._host.pool_core import KEEP, PoolCore, Slot, Verdict, WorkerId
from ._host.pool_evidence import close_inherited, cpu_seconds, exited, pipe_ids
from .aio import AsyncWorker
from .errors import SandboxError, UsageError, WorkerClosed
from .worker import Worker

__all__ = ["Pool", "AsyncPool", "WorkerId"]

log = logging.getLogger("sandbox")
CLOSE_GRACE = 0.5
EVENTS = ("message", "log", "exit", "denied")
_RESEND = object()  # an attempt's outcome: the call never reached its worker; send it again
_monotonic = time.monotonic

_live_pools: "weakref.WeakSet[_PoolBase]" = weakref.WeakSet()
# A forked child's copies of the parent's workers: kept referenced for the child's whole life, so
# that nothing there (a finaliser, a close) ever acts on a process that is the parent's.
_inherited: list = []


class _Failed:
    """An attempt's outcome: the call ended in `error` (raised by the public method)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


class _Job:
    """One call as the pool carries it from attempt to attempt."""

    __slots__ = ("name", "args", "kwargs", "timeout", "attempt", "future", "slot", "started")

    def __init__(self, name: str, args, kwargs, timeout):
        self.name, self.args, self.kwargs, self.timeout = name, tuple(args), dict(kwargs or {}), timeout
        self.attempt = 0
        self.future: concurrent.futures.Future | None = None
        self.slot: Slot | None = None
        self.started = False  # its future was told it runs (or that it was cancelled)


def _unwrap(outcome):
    if type(outcome) is _Failed:
        # Raised without the frames it crossed: they hold the worker, and a dead worker must not
        # stay alive through the error that explains its death.
        raise outcome.error.with_traceback(None)
    return outcome


def _after_fork_in_child() -> None:
    for pool in list(_live_pools):
        pool._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _PoolBase:
    _worker_class: type = Worker  # tests substitute a subclass to inject faults

    def __init__(self, worker_py, policy=None, *, size: int = 4, max_queue: int | None = None,
                 max_calls_per_worker: int | None = None, restart_limit: tuple | None = (10, 60.0),
                 call_timeout: float | None = None, name: str | None = None,
                 start_timeout: float | None = None):
        self.plugin = os.path.abspath(os.fspath(worker_py))
        self.name = name or plugin_name(self.plugin)
        self.policy = _load_policy(policy)  # parsed and compiled once for every worker
        if call_timeout is not None:
            options.timeout(call_timeout, None, "call_timeout")
        if start_timeout is not None:
            options.timeout(start_timeout, None, "start_timeout")
        self.call_timeout = call_timeout
        self.start_timeout = start_timeout
        limits = self.policy.limits
        self._core = PoolCore(self.name, size, max_queue, max_calls_per_worker, restart_limit,
                              cpu_budget=getattr(limits, "cpu_seconds", None),
                              cpu_parallel=1 + (getattr(limits, "processes", 0) or 0))
        self._listeners: dict[str, list[Callable]] = {e: [] for e in EVENTS}
        self._exports: tuple[str, ...] | None = None
        self._pipes: dict = {}       # worker -> its pipes' identities (see close_inherited)
        self._log_seen: dict = {}    # worker -> log bytes dropped that were already reported
        self._pollers: dict = {}     # worker -> a poll object on its pidfd
        _live_pools.add(self)

    # ---- public, shared -----------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._core.size

    @property
    def exports(self) -> tuple[str, ...] | None:
        """The names the plugin exports (from its workers' READY), or None while unknown."""
        return self._exports

    def stats(self) -> dict:
        """Live workers, restarts, calls, errors by kind, queue depth: plain data for metrics."""
        with self._guard:
            return self._core.stats() | {"callbacks_dropped": self._callbacks_dropped()}

    def on(self, event: str, callback: Callable) -> "_PoolBase":
        """`callback(worker_id, payload)` for every message, log line, denied syscall or exit of every worker."""
        if event not in EVENTS:
            raise UsageError(f"unknown event {event!r} (message, exit, log, denied)")
        with self._guard:
            if not self._listeners[event] and event != "exit":
                for w in self._core.workers:  # the ones already running start forwarding now
                    self._forward(w, event, self._worker_id(w))
            self._listeners[event].append(callback)
        return self

    def __repr__(self) -> str:
        s = self._core.stats()
        return f"<{type(self).__name__} {self.name} live={s['live']}/{s['size']} busy={s['busy']}>"

    # ---- shared internals ---------------------------------------------------------------------
    def _job(self, name: str, args, kwargs, timeout) -> _Job:
        timeout = self.call_timeout if timeout is None else timeout
        if timeout is not None:
            options.timeout(timeout, None)  # a bad value fails before any queueing
        return _Job(name, args, kwargs, timeout)

    def _worker_id(self, w) -> WorkerId:
        return self._core.ids.get(w) or WorkerId(self.name, 0, getattr(w, "pid", None))

    def _before_call(self, w) -> bool:
        """True if the call may be sent to w; False: w's process has already ended."""
        if exited(w, self._pollers):
            return False
        if hasattr(w, "_log_bytes"):
            w._log_bytes = 0  # the worker's log budget is per call in a pool, not per lifetime
        return True

    def _conclude(self, w, job: _Job, result, error: BaseException | None, began: float = 0.0):
        """Account for one attempt: the result, _Failed(error), or _RESEND."""
        never_sent = error is not None and isinstance(error, WorkerClosed) and getattr(error, "never_sent", True)
        alive = w.alive
        took = _monotonic() - began if began else 0.0
        core = self._core
        cpu = cpu_seconds(w.pid) if alive and core.cpu_budget and core.cpu_reading_due(w, took) else None
        with self._guard:
            verdict = core.settle(w, error, alive=alive, never_sent=never_sent, cpu_used=cpu, call_seconds=took,
                                  death=w.death if error is not None else None, attempt=job.attempt)
            if verdict is not KEEP or core.busy == 0 or core.waiters or not alive:
                self._settled(verdict)
        if w.log_dropped:
            self._report_log_drops(w)
        if verdict.resend:
            job.attempt += 1
            return _RESEND
        return result if error is None else _Failed(error)

    def _gone_before_send(self, w, job: _Job):
        return self._conclude(w, job, None, WorkerClosed(f"worker {self.name} had ended before the call was sent"))

    def _report_log_drops(self, w) -> None:
        dropped = getattr(w, "log_dropped", 0)
        seen = self._log_seen.get(w, 0)
        if dropped > seen:
            self._log_seen[w] = dropped
            log.warning("pool %s: worker %s: %d bytes of log output dropped (over %d bytes in one call)",
                        self.name, self._worker_id(w), dropped - seen, 1 << 20)

    def _joined(self, w) -> bool:
        """A started worker joins the pool: callbacks wired, identity given, handed out."""
        self._pipes[w] = pipe_ids(w)
        if self._exports is None and getattr(w, "exports", None) is not None:
            self._exports = tuple(w.exports)
        with self._guard:  # on() sees either the worker or its listeners, never neither
            wid = WorkerId(self.name, self._core.number(), w.pid)
            # (the pool's own listeners: they run where the event is seen, and only record and hand over)
            w._listen("exit", lambda death, w=w, wid=wid: self._on_exit(w, wid, death))
            for event in ("message", "log", "denied"):
                if self._listeners[event]:
                    self._forward(w, event, wid)
            joined = self._core.added(w, wid)
            self._settled(Verdict(False, None))
        if joined and not w.alive:
            self._on_exit(w, wid, getattr(w, "death", None))  # it ended before its callback was in place
        return joined

    def _forward(self, w, event: str, wid: WorkerId) -> None:
        w._listen(event, lambda payload, wid=wid, event=event: self._emit(event, wid, payload))

    def _on_exit(self, w, wid: WorkerId, death) -> None:
        with self._guard:
            ours = self._core.died(w, death)
            self._settled(Verdict(False, None))
        self._pipes.pop(w, None)
        self._log_seen.pop(w, None)
        self._pollers.pop(w, None)
        if ours or w not in self._core.workers:
            self._emit("exit", wid, death)

    def _forget_workers(self) -> None:
        self._pipes.clear()
        self._log_seen.clear()
        self._pollers.clear()

    def _after_fork_in_child(self) -> None:
        """The parent's workers are the parent's: keep them untouched, close our copies of their
        pipes, and start afresh (workers are started on first use)."""
        for w, ids in list(self._pipes.items()):
            _inherited.append(w)
            close_inherited(ids)
        _inherited.extend(self._core.workers)
        self._forget_workers()
        self._exports = None
        self._core = self._core.fresh()
        self._reset_driver()

    # ---- what each driver provides ------------------------------------------------------------
    _guard: Any

    def _settled(self, verdict: Verdict) -> None:
        raise NotImplementedError

    def _emit(self, event: str, wid: WorkerId, payload) -> None:
        raise NotImplementedError

    def _callbacks_dropped(self) -> int:
        return 0

    def _reset_driver(self) -> None:
        raise NotImplementedError


class Pool(_PoolBase):
    """A pool of sync Workers; `call()`, `submit()` and `map()` are safe from any number of threads."""

    # the driver's state, set by _reset_driver (again in a forked child)
    _lock: threading.Lock
    _wake: threading.Condition
    _drained: threading.Condition
    _to_close: list
    _thread: threading.Thread | None
    _jobs: queue.SimpleQueue
    _dispatchers: int
    _callbacks: CallbackRunner

    def __init__(self, worker_py, policy=None, **options):
        super().__init__(worker_py, policy, **options)
        self._reset_driver()
        with self._lock:
            n = self._core.starts_due()
        try:
            for _ in range(n):
                self._start_one()  # a plugin that can't load fails here, loudly
        except BaseException:
            self.close()
            raise
        with self._lock:
            self._start_supervisor()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, name: str, /, *args, **kwargs):
        """Call the plugin's `name(*args, **kwargs)` on a free worker; every keyword is the plugin's."""
        return self.invoke(name, args, kwargs)

    def invoke(self, name: str, args=(), kwargs=None, *, timeout: float | None = None):
        """`call` with the library's options beside the plugin's arguments."""
        job = self._job(name, args, kwargs, timeout)
        while (outcome := self._attempt(self._acquire(job), job)) is _RESEND:
            pass
        return _unwrap(outcome)

    def submit(self, name: str, /, *args, **kwargs) -> concurrent.futures.Future:
        """The call as a `concurrent.futures.Future` (works with `as_completed` and `wait`); it
        waits in the pool's queue (QueueFull past max_queue arrives through the future)."""
        return self._submit(self._job(name, args, kwargs, None))

    def map(self, name: str, iterable: Iterable, *, timeout: float | None = None, ordered: bool = True,
            return_exceptions: bool = False) -> Iterator:
        """`name(item)` for each item, lazily, with at most 2 x size calls in flight. Results come
        in input order (or as they complete, `ordered=False`); an error is raised when its result
        is reached, or yielded in its place with `return_exceptions=True`. `timeout` is each call's."""
        window = self.size + min(self.size, self._core.max_queue)
        items = iter(iterable)
        pending: collections.deque = collections.deque()
        try:
            while True:
                while len(pending) < window:
                    try:
                        item = next(items)
                    except StopIteration:
                        break
                    pending.append(self._submit(self._job(name, (item,), None, timeout)))
                if not pending:
                    return
                if ordered:
                    fut = pending.popleft()
                else:
                    done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    fut = next(iter(done))
                    pending.remove(fut)
                error = fut.exception()
                if error is None:
                    yield fut.result()
                elif return_exceptions:
                    yield error
                else:
                    raise error
        finally:
            for fut in pending:
                fut.cancel()

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking calls; let calls in flight finish for up to `timeout` s; then end every worker."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._core.close()
            self._wake.notify_all()
            while self._core.busy > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._drained.wait(left)
            idle = set(self._core.idle)
            workers, self._to_close = list(self._core.workers) + self._to_close, []
            dispatchers, self._dispatchers = self._dispatchers, 0
        for w in workers:
            self._end(w, gently=w in idle)
        for _ in range(dispatchers):
            self._jobs.put(None)
        self._callbacks.stop(max(0.5, deadline - time.monotonic()))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(max(1.0, deadline - time.monotonic()))

    # ---- driver internals -------------------------------------------------------------------
    def _reset_driver(self) -> None:
        self._lock = threading.Lock()
        self._guard = self._lock
        self._wake = threading.Condition(self._lock)      # the supervisor's
        self._drained = threading.Condition(self._lock)   # close() waits for calls in flight
        self._to_close = []
        self._thread = None
        self._jobs = queue.SimpleQueue()  # (job, slot) for the dispatchers
        self._dispatchers = 0
        self._callbacks = CallbackRunner(f"pool {self.name}", f"sandbox-pool-{self.name}-callbacks")

    def _start_supervisor(self) -> None:
        """(lock held) The supervisor thread; after a fork, the child's first call starts it."""
        if self._thread is None and not self._core.closed:
            self._thread = threading.Thread(target=self._supervise, name=f"sandbox-pool-{self.name}", daemon=True)
            self._thread.start()

    def _attempt(self, w, job: _Job):
        if not self._before_call(w):
            return self._gone_before_send(w, job)
        began = _monotonic()
        try:
            result = w.invoke(job.name, job.args, job.kwargs, timeout=job.timeout)
        except BaseException as e:  # noqa: BLE001 - every outcome is counted, then re-raised
            return self._conclude(w, job, None, e, began)
        return self._conclude(w, job, result, None, began)

    def _acquire(self, job: _Job):
        with self._lock:
            self._start_supervisor()
            slot = Slot(None)
            w = self._core.acquire(slot, resend=job.attempt > 0)
            if w is not None:
                return w
            cond = threading.Condition(self._lock)
            slot.wake = cond.notify
            try:
                while slot.worker is None and slot.error is None:
                    cond.wait()
            except BaseException:
                self._core.abandon(slot)  # interrupted (KeyboardInterrupt): give back what came
                raise
            if slot.error is not None:
                raise slot.error
            return slot.worker

    # submit: a queued job is handed its worker by the core (slot.wake, lock held), then run by
    # one of `size` dispatcher threads; a job holds a worker while queued, so `size` is enough.
    def _submit(self, job: _Job, future: concurrent.futures.Future | None = None) -> concurrent.futures.Future:
        fut = job.future = future or concurrent.futures.Future()
        slot = job.slot = Slot(None)
        with self._lock:
            try:
                self._start_supervisor()
                w = self._core.acquire(slot, resend=job.attempt > 0)
            except BaseException as e:  # noqa: BLE001 - refused (QueueFull, RestartLimit, closed)
                fut.set_exception(e)
                return fut
            slot.wake = lambda: self._jobs.put(job)
            if w is not None:
                slot.worker = w
                self._jobs.put(job)
            while self._dispatchers < self.size:
                self._dispatchers += 1
                threading.Thread(target=self._dispatch, name=f"sandbox-pool-{self.name}-submit", daemon=True).start()
        if job.attempt == 0:
            def abandon_if_cancelled(f: concurrent.futures.Future) -> None:
                if f.cancelled():
                    self._abandon(job)
            fut.add_done_callback(abandon_if_cancelled)
        return fut

    def _abandon(self, job: _Job) -> None:
        """A submitted call was cancelled before it ran: its place (or worker) goes back, and
        its future is told, so that `wait()` and `as_completed()` see it done."""
        assert job.slot is not None and job.future is not None  # _submit sets both before it can be cancelled
        with self._lock:
            self._core.abandon(job.slot)
            if not job.started:
                job.started = True
                job.future.set_running_or_notify_cancel()

    def _dispatch(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, slot = job.future, job.slot
            with self._lock:
                if not job.started:
                    job.started = True
                    if not fut.set_running_or_notify_cancel():
                        continue  # cancelled while queued: _abandon gives its worker back
                elif fut.cancelled():
                    continue  # _abandon already told the future; set_exception would kill this thread
                w, error, slot.worker = slot.worker, slot.error, None
            if w is None:
                fut.set_exception(error or WorkerClosed(f"pool {self.name} is closed"))
                continue
            outcome = self._attempt(w, job)
            del w
            if outcome is _RESEND:
                self._submit(job, fut)
            elif type(outcome) is _Failed:
                fut.set_exception(outcome.error.with_traceback(None))
            else:
                fut.set_result(outcome)

    def _settled(self, verdict: Verdict) -> None:
        # (lock held) Closing is slow: the supervisor does it, never the caller.
        if verdict.close is not None:
            self._to_close.append(verdict.close)
        if verdict.close is not None or self._core.start_due():
            self._wake.notify()
        if self._core.busy == 0:
            self._drained.notify_all()

    def _emit(self, event: str, wid: WorkerId, payload) -> None:
        callbacks = self._listeners[event]
        if callbacks:
            size = len(payload) if event == "log" else approx_size(payload) if event == "message" else 0
            self._callbacks.put(list(callbacks), (wid, payload), size, must=event == "exit")

    def _callbacks_dropped(self) -> int:
        return self._callbacks.budget.dropped

    def _end(self, w, gently: bool) -> None:
        """Close (or kill) a worker; a clean-up that fails is logged, never stops the pool."""
        try:
            w.close(CLOSE_GRACE) if gently else w.terminate()
        except BaseException:  # noqa: BLE001 - the supervisor must outlive any worker's clean-up
            log.exception("pool %s: closing worker %s failed", self.name, self._worker_id(w))
            with contextlib.suppress(BaseException):
                w.terminate()

    def _start_one(self) -> None:
        try:
            w = self._worker_class(self.plugin, self.policy, name=self.name, start_timeout=self.start_timeout)
        except BaseException as e:
            with self._lock:
                self._core.start_failed(e)
            raise
        if not self._joined(w):
            self._end(w, gently=True)

    def _supervise(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._core.closed:
                        return
                    n = self._core.starts_due()
                    if n or self._to_close:
                        break
                    self._wake.wait(self._core.wake_in())
                to_close, self._to_close = self._to_close, []
            for w in to_close:
                self._end(w, gently=True)
            for _ in range(n):
                try:
                    self._start_one()
                except SandboxError as e:
                    log.warning("pool %s: a replacement worker did not start: %s", self.name, e)
                except Exception:
                    log.exception("pool %s: a replacement worker did not start", self.name)


class AsyncPool(_PoolBase):
    """A pool of AsyncWorkers on the running loop: `pool = await AsyncPool.start(path, ...)` or
    `async with AsyncPool(path, ...) as pool`. Cancelling a call that runs kills its worker (it is
    replaced); cancelling one that waits in the queue just leaves the queue."""

    _worker_class = AsyncWorker

    # the driver's state, set by _reset_driver (again in a forked child)
    _wake: asyncio.Event
    _drained: asyncio.Event
    _task: asyncio.Task | None
    _opening: asyncio.Future | None
    _to_close: list
    _closers: set

    def __init__(self, worker_py, policy=None, **options):
        super().__init__(worker_py, policy, **options)
        self._reset_driver()

    @classmethod
    async def start(cls, worker_py, policy=None, **options) -> "AsyncPool":
        pool = cls(worker_py, policy, **options)
        await pool._ensure_open()
        return pool

    async def __aenter__(self) -> "AsyncPool":
        await self._ensure_open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def call(self, name: str, /, *args, **kwargs):
        """Call the plugin's `name(*args, **kwargs)` on a free worker; every keyword is the plugin's."""
        return await self.invoke(name, args, kwargs)

    async def invoke(self, name: str, args=(), kwargs=None, *, timeout: float | None = None):
        """`call` with the library's options beside the plugin's arguments."""
        job = self._job(name, args, kwargs, timeout)
        await self._ensure_open()
        while (outcome := await self._attempt(await self._acquire(job), job)) is _RESEND:
            pass
        return _unwrap(outcome)

    def submit(self, name: str, /, *args, **kwargs) -> asyncio.Task:
        """The call as an asyncio Task on the running loop (for `asyncio.as_completed`, `wait`)."""
        return asyncio.get_running_loop().create_task(self.invoke(name, args, kwargs))

    async def map(self, name: str, iterable, *, timeout: float | None = None, ordered: bool = True,
                  return_exceptions: bool = False) -> AsyncIterator:
        """`async for r in pool.map(name, items)`: like Pool.map; `iterable` may be async."""
        window = self.size + min(self.size, self._core.max_queue)
        items = aiter(iterable) if hasattr(iterable, "__aiter__") else None
        plain = iter(iterable) if items is None else iter(())  # the one not read stays empty
        pending: collections.deque = collections.deque()
        loop = asyncio.get_running_loop()
        try:
            while True:
                while len(pending) < window:
                    try:
                        item = await anext(items) if items is not None else next(plain)
                    except (StopIteration, StopAsyncIteration):
                        break
                    pending.append(loop.create_task(self.invoke(name, (item,), None, timeout=timeout)))
                if not pending:
                    return
                if ordered:
                    task = pending.popleft()
                    await asyncio.wait([task])
                else:
                    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    task = next(iter(done))
                    pending.remove(task)
                if task.cancelled() or task.exception() is None:
                    yield task.result()
                elif return_exceptions:
                    yield task.exception()
                else:
                    raise task.exception()
        finally:
            for task in pending:
                task.cancel()

    async def close(self, timeout: float = 5.0) -> None:
        """Stop taking calls; let calls in flight finish for up to `timeout` s; then end every worker."""
        if self._core.closed and self._task is None:
            return
        self._core.close()
        self._wake.set()
        if self._core.busy > 0:
            self._drained.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        idle = set(self._core.idle)
        workers, self._to_close = list(self._core.workers) + self._to_close, []
        await asyncio.gather(*(self._end(w, gently=w in idle) for w in workers), *self._closers,
                             return_exceptions=True)

    # ---- driver internals -------------------------------------------------------------------
    def _reset_driver(self) -> None:
        self._guard = contextlib.nullcontext()  # the loop serialises everything
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._task = None
        self._opening = None
        self._to_close = []
        self._closers = set()

    async def _ensure_open(self) -> None:
        """Start the workers and the supervisor once (also lazily, e.g. in a forked child)."""
        if self._task is not None or self._core.closed:
            return
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        try:
            await asyncio.shield(self._opening)
        finally:
            if self._opening is not None and self._opening.done():
                self._opening = None

    async def _open(self) -> None:
        self._wake, self._drained = asyncio.Event(), asyncio.Event()  # bound to this loop
        n = self._core.starts_due()
        results = await asyncio.gather(*(self._start_one() for _ in range(n)), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.close()
            raise failed[0]  # a plugin that can't load fails here, loudly
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name=f"sandbox-pool-{self.name}")

    async def _attempt(self, w, job: _Job):
        if not self._before_call(w):
            return self._gone_before_send(w, job)
        began = _monotonic()
        try:
            result = await w.invoke(job.name, job.args, job.kwargs, timeout=job.timeout)
        except asyncio.CancelledError:
            # A call still running was cancelled: its worker is being killed and is replaced,
            # without counting against the restart limit (the caller ended it, not the plugin).
            self._core.cancelled(w, alive=w.alive)
            self._settled(Verdict(False, None))
            raise
        except BaseException as e:  # noqa: BLE001
            return self._conclude(w, job, None, e, began)
        return self._conclude(w, job, result, None, began)

    async def _acquire(self, job: _Job):
        slot = Slot(None)
        w = self._core.acquire(slot, resend=job.attempt > 0)
        if w is not None:
            return w
        fut = asyncio.get_running_loop().create_future()
        def wake() -> None:
            if not fut.done():
                fut.set_result(None)
        slot.wake = wake
        try:
            await fut
        except asyncio.CancelledError:
            self._core.abandon(slot)
            raise
        if slot.error is not None:
            raise slot.error
        return slot.worker

    def _settled(self, verdict: Verdict) -> None:
        if verdict.close is not None:
            t = asyncio.ensure_future(self._end(verdict.close, gently=True))
            self._closers.add(t)
            t.add_done_callback(self._closers.discard)
        if self._core.start_due():
            self._wake.set()
        if self._core.busy == 0:
            self._drained.set()

    def _emit(self, event: str, wid: WorkerId, payload) -> None:
        for cb in self._listeners[event]:
            asyncio.get_running_loop().call_soon(self._run_callback, cb, wid, payload)

    def _run_callback(self, cb: Callable, wid: WorkerId, payload) -> None:
        try:
            result = cb(wid, payload)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._closers.add(task)
                task.add_done_callback(self._callback_done)
        except Exception:
            log.exception("pool %s: callback %r failed", self.name, cb)

    def _callback_done(self, task: asyncio.Task) -> None:
        self._closers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("pool %s: callback failed", self.name, exc_info=task.exception())

    async def _end(self, w, gently: bool) -> None:
        """Close (or kill) a worker; a clean-up that fails is logged, never stops the pool."""
        try:
            await (w.close(CLOSE_GRACE) if gently else w.terminate())
        except BaseException:  # noqa: BLE001 - the supervisor must outlive any worker's clean-up
            log.exception("pool %s: closing worker %s failed", self.name, self._worker_id(w))
            with contextlib.suppress(BaseException):
                await w.terminate()

    async def _start_one(self) -> None:
        try:
            w = self._worker_class(self.plugin, self.policy, name=self.name, start_timeout=self.start_timeout)
            try:
                await w._start()
            except asyncio.CancelledError:
                await w.terminate()
                raise
        except asyncio.CancelledError:
            self._core.start_abandoned()
            raise
        except BaseException as e:
            self._core.start_failed(e)
            raise
        if not self._joined(w):
            await self._end(w, gently=True)

    async def _supervise(self) -> None:
        while not self._core.closed:
            n = self._core.starts_due()
            if n:
                for r in await asyncio.gather(*(self._start_one() for _ in range(n)), return_exceptions=True):
                    if isinstance(r, SandboxError):
                        log.warning("pool %s: a replacement worker did not start: %s", self.name, r)
                    elif isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                        log.error("pool %s: a replacement worker did not start", self.name, exc_info=r)
                continue
            to_close, self._to_close = self._to_close, []
            for w in to_close:
                await self._end(w, gently=True)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._core.wake_in())
