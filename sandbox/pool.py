"""Warm workers for one plugin and policy: `Pool` (threads, on Worker) and `AsyncPool` (on AsyncWorker).

    with sandbox.Pool("plugins/resize/worker.py", policy="policies/resize.toml", size=4) as pool:
        pool.call("resize", data, width=64)          # from any number of threads

    async with sandbox.AsyncPool(path, policy=policy, size=4) as pool:
        await pool.call("resize", data, width=64)    # from any number of tasks

A call goes to an idle worker, or waits in a bounded FIFO queue (`QueueFull` past `max_queue`).
A worker that crashes, times out, violates its policy, breaks the protocol or runs out of memory
is replaced by a supervisor (a thread, or a task) — never by the caller, who gets its error at
once. More than `restart_limit[0]` deaths within `restart_limit[1]` seconds pause restarts for one
window; while no worker is left, calls fail fast with `RestartLimit`. A worker is recycled after
`max_calls_per_worker` calls. A call is sent to exactly one worker and answered once: it is retried
on another worker only when it never reached the first one (that worker was found dead first).
`close(timeout)` lets calls in flight finish for up to `timeout` s, then kills what is left.
"""
import asyncio
import logging
import os
import threading
import time

from ._host.pool_core import PoolCore, Slot
from .aio import AsyncWorker
from .errors import PluginMemoryError, SandboxError, WorkerClosed
from .protocol import NotPlainData
from ._host.handle import load_policy as _load_policy, plugin_name
from .worker import Worker

log = logging.getLogger("sandbox")
CLOSE_GRACE = 0.5


class _PoolBase:
    def __init__(self, worker_py, policy=None, *, size: int = 4, max_queue: int | None = None,
                 max_calls_per_worker: int | None = None, restart_limit: tuple = (10, 60.0),
                 call_timeout: float | None = None, name: str | None = None,
                 start_timeout: float | None = None):
        self.plugin = os.path.abspath(os.fspath(worker_py))
        self.name = name or plugin_name(self.plugin)
        self.policy = _load_policy(policy)  # parsed and compiled once for every worker
        self.call_timeout = call_timeout
        self.start_timeout = start_timeout
        self._core = PoolCore(self.name, size, max_queue, max_calls_per_worker, tuple(restart_limit))

    @property
    def size(self) -> int:
        return self._core.size

    def stats(self) -> dict:
        """Live workers, restarts, calls, errors by kind, queue depth: plain data for metrics."""
        return self._core.stats()

    def _outcome(self, w, error):
        """(error to raise, recycle?) after a call on w. None error: success."""
        if error is None:
            return None, False
        if isinstance(error, TypeError) and not isinstance(error, NotPlainData) and not w.alive:
            # Worker.terminate() from close() during a call ends it with death=None (see report)
            error = WorkerClosed(f"pool {self.name} was closed while the call ran")
        return error, isinstance(error, PluginMemoryError) and w.alive

    def __repr__(self):
        s = self._core.stats()
        return f"<{type(self).__name__} {self.name} live={s['live']}/{s['size']} busy={s['busy']}>"


class Pool(_PoolBase):
    """A pool of sync Workers; `call()` is safe from any number of threads."""

    def __init__(self, worker_py, policy=None, **options):
        super().__init__(worker_py, policy, **options)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)      # the supervisor's
        self._drained = threading.Condition(self._lock)   # close() waits for calls in flight
        self._to_close = []
        self._thread = None
        with self._lock:
            n = self._core.starts_due()
        try:
            for _ in range(n):
                self._start_one(initial=True)  # a plugin that can't load fails here, loudly
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._supervise, name=f"sandbox-pool-{self.name}", daemon=True)
        self._thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, name: str, *args, timeout: float | None = None, **kwargs):
        timeout = self.call_timeout if timeout is None else timeout
        while True:
            w = self._acquire()
            try:
                result = w.invoke(name, args, kwargs, timeout=timeout)
                error = None
            except BaseException as e:  # noqa: BLE001 - every outcome is counted, then re-raised
                error = e
                if _never_sent(w, e) and not self._core.closed:
                    self._release(w, False)  # it ended before the call reached it: try another
                    continue
            error, recycle = self._outcome(w, error)
            self._release(w, recycle, error, counted=True)
            if error is not None:
                raise error
            return result

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
        for w in workers:
            (w.close(CLOSE_GRACE) if w in idle else w.terminate())
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(max(1.0, deadline - time.monotonic()))

    # ---- internals --------------------------------------------------------------------------
    def _acquire(self):
        with self._lock:
            slot = Slot(None)
            w = self._core.acquire(slot)
            if w is not None:
                return w
            cond = threading.Condition(self._lock)
            slot.wake = cond.notify
            while slot.worker is None and slot.error is None:
                cond.wait()
            if slot.error is not None:
                raise slot.error
            return slot.worker

    def _release(self, w, recycle, error=None, counted=False):
        with self._lock:
            if counted:
                self._core.record_call(error)
            old = self._core.release(w, recycle=recycle)
            if old is not None:
                self._to_close.append(old)
                self._wake.notify()
            if self._core.busy == 0:
                self._drained.notify_all()

    def _on_exit(self, w, death):
        with self._lock:
            if self._core.died(w, death):
                self._wake.notify()

    def _start_one(self, initial=False):
        try:
            w = Worker(self.plugin, self.policy, name=self.name, start_timeout=self.start_timeout)
        except BaseException as e:
            with self._lock:
                self._core.start_failed(e)
            raise
        w.on("exit", lambda death, w=w: self._on_exit(w, death))
        with self._lock:
            joined = self._core.added(w)
        if not joined:
            w.close(CLOSE_GRACE)
        elif not w.alive:
            self._on_exit(w, w.death)  # it may have ended before the callback was in place

    def _supervise(self):
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
                w.close(CLOSE_GRACE)
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

    def __init__(self, worker_py, policy=None, **options):
        super().__init__(worker_py, policy, **options)
        self._wake: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None
        self._task = None
        self._to_close = []
        self._closers = set()

    @classmethod
    async def start(cls, worker_py, policy=None, **options) -> "AsyncPool":
        pool = cls(worker_py, policy, **options)
        await pool._open()
        return pool

    async def __aenter__(self):
        if self._task is None:
            await self._open()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def call(self, name: str, *args, timeout: float | None = None, **kwargs):
        timeout = self.call_timeout if timeout is None else timeout
        while True:
            w = await self._acquire()
            try:
                result = await w.invoke(name, args, kwargs, timeout=timeout)
                error = None
            except WorkerClosed as e:
                if not self._core.closed:  # it ended before the call reached it: try another
                    self._release(w, False)
                    continue
                error = e
            except asyncio.CancelledError:
                self._release(w, False, _Cancelled(), counted=True)  # the worker was killed
                raise
            except BaseException as e:  # noqa: BLE001
                error = e
            error, recycle = self._outcome(w, error)
            self._release(w, recycle, error, counted=True)
            if error is not None:
                raise error
            return result

    async def close(self, timeout: float = 5.0) -> None:
        """Stop taking calls; let calls in flight finish for up to `timeout` s; then end every worker."""
        if self._core.closed and self._task is None:
            return
        self._core.close()
        if self._wake is not None:
            self._wake.set()
        if self._core.busy > 0 and self._drained is not None:
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        idle = set(self._core.idle)
        workers, self._to_close = list(self._core.workers) + self._to_close, []
        await asyncio.gather(*(w.close(CLOSE_GRACE) if w in idle else w.terminate() for w in workers),
                             *self._closers, return_exceptions=True)

    # ---- internals --------------------------------------------------------------------------
    async def _open(self):
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        n = self._core.starts_due()
        results = await asyncio.gather(*(self._start_one() for _ in range(n)), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.close()
            raise failed[0]  # a plugin that can't load fails here, loudly
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name=f"sandbox-pool-{self.name}")

    async def _acquire(self):
        slot = Slot(None)
        w = self._core.acquire(slot)
        if w is not None:
            return w
        fut = asyncio.get_running_loop().create_future()
        slot.wake = lambda: fut.done() or fut.set_result(None)
        try:
            await fut
        except asyncio.CancelledError:
            self._core.abandon(slot)
            raise
        if slot.error is not None:
            raise slot.error
        return slot.worker

    def _release(self, w, recycle, error=None, counted=False):
        if counted:
            self._core.record_call(error)
        old = self._core.release(w, recycle=recycle)
        if old is not None:
            self._close_later(old)
        if self._core.busy == 0 and self._drained is not None:
            self._drained.set()

    def _close_later(self, w):
        t = asyncio.ensure_future(w.close(CLOSE_GRACE))
        self._closers.add(t)
        t.add_done_callback(self._closers.discard)
        if self._wake is not None:
            self._wake.set()

    def _on_exit(self, w, death):
        if self._core.died(w, death) and self._wake is not None:
            self._wake.set()

    async def _start_one(self):
        try:
            w = AsyncWorker(self.plugin, self.policy, name=self.name, start_timeout=self.start_timeout)
            try:
                await w._start()
            except asyncio.CancelledError:
                await w.terminate()
                raise
        except asyncio.CancelledError:
            self._core.starting -= 1
            raise
        except BaseException as e:
            self._core.start_failed(e)
            raise
        w.on("exit", lambda death, w=w: self._on_exit(w, death))
        if not self._core.added(w):
            await w.close(CLOSE_GRACE)
        elif not w.alive:
            self._on_exit(w, w.death)

    async def _supervise(self):
        while not self._core.closed:
            n = self._core.starts_due()
            if n:
                for r in await asyncio.gather(*(self._start_one() for _ in range(n)), return_exceptions=True):
                    if isinstance(r, SandboxError):
                        log.warning("pool %s: a replacement worker did not start: %s", self.name, r)
                    elif isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                        log.error("pool %s: a replacement worker did not start", self.name, exc_info=r)
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._core.wake_in())
            except asyncio.TimeoutError:
                pass


def _never_sent(w: Worker, e: BaseException) -> bool:
    """The sync Worker refused the call before writing it: WorkerClosed from its liveness check, or
    the KeyError of its check-then-lock race (the hub finalised it in between; see the report)."""
    return isinstance(e, WorkerClosed) or (isinstance(e, KeyError) and not w.alive)


class _Cancelled(SandboxError):
    kind = "cancelled"

