"""A fresh process for every call: `FreshWorker` (threads) and `AsyncFreshWorker` (asyncio).

    with sandbox.fresh.FreshWorker("plugins/snippet/worker.py", policy="policies/snippet.toml") as fw:
        fw.call("run", user_a_code)   # runs in a worker no earlier call touched
        fw.call("run", user_b_code)   # and this one in another: nothing A left is visible

For hosts that must not let one call see what an earlier call left behind (one user's snippet,
then another user's): module globals, a patched `builtins`, `math.pi = 3`, a crashed interpreter.
Each call takes a worker that was started, confined and loaded beforehand, answers one call and is
then killed. While the call runs, a background starter (a thread, or a task) already starts and
confines the next one, so that a caller waits for a start only when calls come faster than starts.

Every worker is an ordinary `sandbox.Worker` / `sandbox.AsyncWorker` under the same policy (parsed
and compiled once): the same layers, a uid of its own, the same errors. A plugin that fails to
load raises the Worker's `LoadError` from the constructor, and from the call that would have used
a spare whose start failed later. Close it (`close()`, or a `with` block): its spares live until then.
"""
from __future__ import annotations

import asyncio
import collections
import os
import threading

from ._host.handle import load_policy
from .aio import AsyncWorker
from .errors import UsageError, WorkerClosed
from .worker import Worker

__all__ = ["FreshWorker", "AsyncFreshWorker"]


def _spares(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise UsageError(f"spares must be an integer from 1 to 64, got {value!r}")
    return value


class _Base:
    def __init__(self, worker_py, policy, spares: int, name: str | None, start_timeout: float | None):
        self.plugin = os.path.abspath(os.fspath(worker_py))  # every start reads the same file
        self.policy = load_policy(policy)  # parsed and compiled once, shared by every worker
        self.spares = _spares(spares)
        self._name = name
        self._start_timeout = start_timeout
        self._busy: set = set()       # workers answering a call now
        self._closed = False
        self.calls = 0                # calls handed to a worker (each in a process of its own)

    def _closed_error(self) -> WorkerClosed:
        return WorkerClosed(f"fresh worker {self.plugin} is closed")


class FreshWorker(_Base):
    """Each call in a worker that no earlier call touched; safe from any number of threads.

    `spares` workers are kept started and waiting (one background thread each keeps one start in
    flight). A call takes one, so `spares` bounds how many calls run at once without waiting for
    a start."""

    def __init__(self, worker_py, policy=None, *, spares: int = 1, name: str | None = None,
                 start_timeout: float | None = None):
        super().__init__(worker_py, policy, spares, name, start_timeout)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._ready: collections.deque = collections.deque()  # started Workers, or a start's error
        self._retire: collections.deque = collections.deque()  # used workers, to kill and reap
        self._threads: list[threading.Thread] = []
        self._starting = 0  # starts in flight
        first = self._start_one()  # the Worker's own errors (bad path, load failure) surface here
        with self._lock:
            self._ready.append(first)
        for i in range(self.spares):
            t = threading.Thread(target=self._keep_ready, name=f"sandbox-fresh-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        self._reaper = threading.Thread(target=self._reap, name="sandbox-fresh-reaper", daemon=True)
        self._reaper.start()

    # ---- public API -------------------------------------------------------------------------
    def call(self, name: str, /, *args, **kwargs):
        """Call `name` in a fresh worker; every keyword goes to the plugin."""
        return self.invoke(name, args, kwargs)

    def invoke(self, name: str, args=(), kwargs=None, *, timeout: float | None = None):
        """The call with the library's options beside the plugin's arguments (`timeout` as Worker's)."""
        w = self._take()
        try:
            return w.invoke(name, args, kwargs, timeout=timeout)
        finally:
            with self._lock:
                self._busy.discard(w)
                self._retire.append(w)
                self._changed.notify_all()

    def close(self) -> None:
        """Kill every worker (waiting, answering a call, or starting) and wait until each is reaped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            doomed = [w for w in self._ready if isinstance(w, Worker)] + list(self._busy)
            self._ready.clear()
            self._changed.notify_all()
        for w in doomed:
            w.terminate()  # a call in flight on it ends with the Worker's error
        for t in self._threads:
            t.join()
        self._reaper.join()

    def __enter__(self) -> "FreshWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FreshWorker {self.plugin} calls={self.calls} ready={len(self._ready)}>"

    # ---- the caller's side ------------------------------------------------------------------
    def _take(self) -> Worker:
        skipped = False
        with self._lock:
            while True:
                while not self._ready:
                    if self._closed:
                        raise self._closed_error()
                    self._changed.wait()
                if self._closed:
                    raise self._closed_error()
                got = self._ready.popleft()
                self._changed.notify_all()  # a starter may start the next one now
                if isinstance(got, BaseException):
                    raise got
                if not got.alive and not skipped:
                    # A spare that died while it waited (killed from outside, a limit) never saw a
                    # call: its death is not this call's error. Once only, so that spares that always
                    # die still end in the worker's own error rather than in an endless wait.
                    skipped = True
                    self._retire.append(got)
                    continue
                self._busy.add(got)
                self.calls += 1
                return got

    # ---- background -------------------------------------------------------------------------
    def _start_one(self) -> Worker:
        return Worker(self.plugin, policy=self.policy, name=self._name, start_timeout=self._start_timeout)

    def _keep_ready(self) -> None:
        """One start in flight at a time, whenever fewer than `spares` are ready or starting."""
        while True:
            with self._lock:
                while not self._closed and len(self._ready) + self._starting >= self.spares:
                    self._changed.wait()
                if self._closed:
                    return
                self._starting += 1
            got: Worker | BaseException
            try:
                got = self._start_one()
            except BaseException as e:  # noqa: BLE001 - handed to the call that would have used it
                got = e
            with self._lock:
                self._starting -= 1
                if self._closed:
                    closed = True
                else:
                    closed = False
                    self._ready.append(got)
                    self._changed.notify_all()
            if closed and isinstance(got, Worker):
                got.terminate()

    def _reap(self) -> None:
        """Kill and reap every used worker; off the caller's path (terminate waits for the reap)."""
        while True:
            with self._lock:
                while not self._retire and not (self._closed and not self._busy):
                    self._changed.wait()
                if not self._retire:
                    return  # closed, and no call in flight can hand back another
                w = self._retire.popleft()
            w.terminate()


class AsyncFreshWorker(_Base):
    """Each call in a worker that no earlier call touched, on the running event loop.

    Create with `await AsyncFreshWorker.start(path, policy=...)` or
    `async with AsyncFreshWorker(path, policy=...) as fw`. `spares` background tasks each keep
    one worker started (or starting); a used worker is killed and reaped by a task of its own."""

    def __init__(self, worker_py, policy=None, *, spares: int = 1, name: str | None = None,
                 start_timeout: float | None = None):
        super().__init__(worker_py, policy, spares, name, start_timeout)
        self._queue: asyncio.Queue | None = None  # started AsyncWorkers, or a start's error
        self._slots: asyncio.Semaphore | None = None  # ready + starting <= spares
        self._tasks: set[asyncio.Task] = set()       # refills and reaps in flight

    @classmethod
    async def start(cls, worker_py, policy=None, **options) -> "AsyncFreshWorker":
        fw = cls(worker_py, policy, **options)
        await fw._begin()
        return fw

    # ---- public API -------------------------------------------------------------------------
    async def call(self, name: str, /, *args, **kwargs):
        """Call `name` in a fresh worker; every keyword goes to the plugin."""
        return await self.invoke(name, args, kwargs)

    async def invoke(self, name: str, args=(), kwargs=None, *, timeout: float | None = None):
        """The call with the library's options beside the plugin's arguments (`timeout` as AsyncWorker's)."""
        w = await self._take()
        try:
            return await w.invoke(name, args, kwargs, timeout=timeout)
        finally:
            self._busy.discard(w)
            self._spawn(w.terminate())  # off the caller's path: terminate waits for the reap

    async def close(self) -> None:
        """Kill every worker (waiting, answering a call, or starting) and wait until each is reaped."""
        if self._closed:
            return
        self._closed = True
        doomed = list(self._busy)
        while self._queue is not None and not self._queue.empty():
            got = self._queue.get_nowait()
            if isinstance(got, AsyncWorker):
                doomed.append(got)
        for w in doomed:
            self._spawn(w.terminate())  # a call in flight on it ends with the AsyncWorker's error
        if self._queue is not None and self._slots is not None:  # started: _begin sets both at once
            self._queue.put_nowait(None)  # wakes callers waiting for a spare: they raise WorkerClosed
            for _ in range(self.spares):
                self._slots.release()  # wakes the refill tasks: they see the close and return
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def __aenter__(self) -> "AsyncFreshWorker":
        if self._queue is None:
            await self._begin()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def __repr__(self) -> str:
        ready = self._queue.qsize() if self._queue is not None else 0
        return f"<AsyncFreshWorker {self.plugin} calls={self.calls} ready={ready}>"

    # ---- inside -----------------------------------------------------------------------------
    async def _begin(self) -> None:
        if self._queue is not None:
            raise UsageError("this AsyncFreshWorker was already started")
        queue: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(self.spares)
        self._queue, self._slots = queue, slots
        await slots.acquire()
        first = await self._start_one()  # the AsyncWorker's own errors surface here
        queue.put_nowait(first)
        for _ in range(self.spares):
            self._spawn(self._keep_ready(queue, slots))

    async def _start_one(self) -> AsyncWorker:
        return await AsyncWorker.start(self.plugin, self.policy, name=self._name, start_timeout=self._start_timeout)

    async def _take(self) -> AsyncWorker:
        skipped = False
        while True:
            if self._closed or self._queue is None or self._slots is None:  # closed, or never started
                raise self._closed_error()
            got = await self._queue.get()
            if got is None or self._closed:  # close() woke us; pass the wake-up on to the next waiter
                self._queue.put_nowait(None)
                if isinstance(got, AsyncWorker):
                    self._spawn(got.terminate())
                raise self._closed_error()
            self._slots.release()
            if isinstance(got, BaseException):
                raise got
            if not got.alive and not skipped:  # died while it waited: not this call's error (once)
                skipped = True
                self._spawn(got.terminate())
                continue
            self._busy.add(got)
            self.calls += 1
            return got

    async def _keep_ready(self, queue: asyncio.Queue, slots: asyncio.Semaphore) -> None:
        while True:
            await slots.acquire()
            if self._closed:
                return
            got: AsyncWorker | BaseException
            try:
                got = await self._start_one()
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - handed to the call that would have used it
                got = e
            if self._closed:
                if isinstance(got, AsyncWorker):
                    await got.terminate()
                return
            queue.put_nowait(got)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
