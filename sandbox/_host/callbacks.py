"""Where the host's callbacks run: a thread of their own, behind a bounded backlog (host side).

Every callback of a `Worker` ("message", "log", "exit", "denied") and of a `Pool` runs on a
CallbackRunner's thread, one at a time, in the order the events were seen. Whoever sees an event
(the hub thread that watches idle workers, or a caller doing its own I/O) only hands it over, so
a slow callback delays the callbacks after it and nothing else: never the supervision of workers.

Why one runner per owner (per Worker with callbacks, per Pool), not a shared executor:
- order per worker comes for free (one consumer per queue, FIFO), with no scheduling of queues
  over threads;
- one worker's slow callback never delays another worker's callbacks (a shared bounded executor
  would, as soon as slow callbacks hold all its threads);
- the thread lives no longer than its owner: it starts with the first event, and ends once the
  owner is done (a Worker's "exit" is the last event; close()/terminate() drain what is queued,
  bounded, and join it), so repeated start/terminate cycles leave no thread behind.
The price is one thread per Worker that has callbacks (small beside the worker's process).

The backlog is bounded in events and bytes (`CallbackBudget`). Handing over never blocks the
hub: past the caps an event is dropped, counted and logged (at most every REPORT_EVERY s). Two
exceptions: "exit" is never dropped (one per worker), and a caller that hands over the events of
its own call (`wait=True`) waits for room instead (back-pressure on its own callbacks: the plugin
blocks in post() meanwhile, as it did when the caller ran them itself), unless a callback is
itself waiting for that caller's lock (`guard`): then no room would ever come, and it drops.
`barrier()` lets a caller return only once the callbacks of what it handed over have run.

After os.fork() the child never uses the parent's thread or locks: every runner is reset there
(fresh lock, empty queue, no thread).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from .pool_core import CallbackBudget

log = logging.getLogger("sandbox")


def approx_size(obj, budget: int = 1000) -> int:
    """Bytes a posted value holds, roughly (strings and bytes; a bounded walk)."""
    total, stack = 0, [obj]
    while stack and budget > 0:
        budget -= 1
        x = stack.pop()
        if isinstance(x, (str, bytes, bytearray)):
            total += len(x)
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        total += 16
    return total + 64 * len(stack)  # what the walk did not reach counts at a flat rate


class CallbackRunner:
    """One thread that runs callbacks in order, behind a bounded backlog. `label` names the owner
    in log lines ("worker resize", "pool resize"); `thread_name` is the thread's name."""

    REPORT_EVERY = 5.0

    def __init__(self, label: str, thread_name: str):
        self.label = label
        self.thread_name = thread_name
        self._reset()
        _runners.add(self)

    def _reset(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._queue: collections.deque = collections.deque()
        self.budget = CallbackBudget()
        self._thread: threading.Thread | None = None
        self._sealed = False   # nothing more is taken: the owner is done
        self._queued = 0       # events taken so far (a sequence number)
        self._done = 0         # events whose callbacks have run (FIFO: all up to this one)
        self._owed = threading.local()  # per producing thread: the last event it handed over
        self._reentered = 0    # callbacks (on this thread) waiting for a lock of the owner's
        self._reported = 0.0

    @property
    def dropped(self) -> int:
        return self.budget.dropped

    def put(self, callbacks: list[Callable[..., Any]], args: tuple, size: int, *, must: bool = False,
            wait: bool = False, last: bool = False) -> None:
        """Hand over one event: `callbacks(*args)`, later, on the runner's thread. `must`: never
        dropped; `wait`: wait for room instead of dropping (not on the runner's own thread: it drops);
        `last`: the owner's last event (a Worker's "exit"): nothing after it is taken."""
        with self._cv:
            if self._sealed:
                return
            if must:
                self.budget.events += 1
                self.budget.bytes += size
            elif wait and threading.current_thread() is not self._thread:  # (its own would wait for itself)
                budget = self.budget
                while self._full(size) and not self._reentered:
                    self._cv.wait()
                    if self._sealed:
                        return
                if self._full(size):  # a callback waits for the owner, who waits for it: no room will come
                    budget.dropped += 1
                    budget.unreported += 1
                    self._report_drops()
                    return
                budget.events += 1
                budget.bytes += size
            elif not self.budget.admit(size):
                self._report_drops()
                return
            if self._thread is None and not self._start_thread():
                self.budget.done(size)
                return
            self._queue.append((callbacks, args, size))
            self._queued += 1
            self._owed.seq = self._queued
            if last:
                self._sealed = True
            self._cv.notify_all()

    def _full(self, size: int) -> bool:
        """(lock held) No room for `size` more bytes (an empty backlog always has room)."""
        budget = self.budget
        return budget.events > 0 and (budget.events >= budget.max_events or budget.bytes + size > budget.max_bytes)

    def guard(self, lock):
        """`lock` for a `with`; taken from the runner's own thread (a callback calling its owner),
        the wait for it is announced first: an owner that holds `lock` while it waits for room
        in this backlog then stops waiting (the callback it waits for waits for it)."""
        if threading.current_thread() is not self._thread:
            return lock
        return self._reentering(lock)

    @contextlib.contextmanager
    def _reentering(self, lock):
        with self._cv:
            self._reentered += 1
            self._cv.notify_all()
        try:
            with lock:
                yield
        finally:
            with self._cv:
                self._reentered -= 1

    def barrier(self) -> None:
        """Wait until the callbacks of every event this thread handed over have run (a no-op on
        the runner's own thread, or when there is nothing to wait for)."""
        owed = getattr(self._owed, "seq", 0)
        if owed <= self._done:
            return
        with self._cv:
            if threading.current_thread() is self._thread:
                return
            while self._done < owed and self._thread is not None:
                self._cv.wait()

    def seal(self) -> None:
        """Take nothing more; the thread ends once it has run what is queued."""
        with self._cv:
            self._sealed = True
            self._cv.notify_all()

    def stop(self, timeout: float) -> None:
        """Take nothing more; run what is already queued (for up to `timeout` s), end the thread."""
        self.seal()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _start_thread(self) -> bool:
        """(lock held) The thread, started with the first event."""
        thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        try:
            thread.start()
        except RuntimeError as e:  # the host is out of threads: the event is lost, not the caller's call
            self.budget.dropped += 1
            log.error("%s: a callback event was dropped: no thread to run it (%s)", self.label, e)
            return False
        self._thread = thread
        return True

    def _report_drops(self) -> None:
        now = time.monotonic()
        if now - self._reported >= self.REPORT_EVERY:
            self._reported = now
            log.warning("%s: %d callback events dropped: callbacks do not keep up (backlog of %d events)",
                        self.label, self.budget.take_unreported(), self.budget.max_events)

    def _run(self) -> None:
        cv, queue = self._cv, self._queue
        try:
            while True:
                with cv:
                    while not queue and not self._sealed:
                        cv.wait()
                    if not queue:
                        return  # sealed and drained: the owner is done
                    callbacks, args, size = queue.popleft()
                for cb in callbacks:
                    try:
                        cb(*args)
                    except BaseException:  # noqa: BLE001 - a callback's failure ends nothing of ours
                        log.exception("%s: callback %r failed", self.label, cb)
                with cv:
                    self.budget.done(size)
                    self._done += 1
                    cv.notify_all()
        finally:
            with cv:
                if self._thread is threading.current_thread():
                    self._thread = None  # (a barrier waits no longer for a thread that is gone)
                cv.notify_all()


_runners: "weakref.WeakSet[CallbackRunner]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The parent's callback threads do not exist here, and a lock one of them held at the fork
    # would stay held forever; the events queued are the parent's. Every runner starts afresh.
    for runner in list(_runners):
        sealed = runner._sealed
        runner._reset()
        runner._sealed = sealed


os.register_at_fork(after_in_child=_after_fork_in_child)
