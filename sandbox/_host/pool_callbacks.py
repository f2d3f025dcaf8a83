"""The thread on which a Pool's callbacks run, behind a bounded backlog (host side).

Workers' events are handed over by whichever thread saw them (the hub, a caller) without waiting;
callbacks then run here one at a time, in order, so that a slow callback delays only the ones
after it, never the supervision of workers. What does not fit the backlog is dropped, counted and
logged (at most every REPORT_EVERY seconds).
"""
from __future__ import annotations

import collections
import logging
import threading
import time

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


class CallbackThread:
    """The one thread on which a Pool's callbacks run, in order, behind a bounded backlog."""

    REPORT_EVERY = 5.0

    def __init__(self, name: str):
        self.name = name
        self._cv = threading.Condition(threading.Lock())
        self._queue: collections.deque = collections.deque()
        self.budget = CallbackBudget()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._reported = 0.0

    def put(self, callbacks: list, args: tuple, size: int, *, must: bool = False) -> None:
        with self._cv:
            if self._stopping:
                return
            if must:
                self.budget.events += 1
                self.budget.bytes += size
            elif not self.budget.admit(size):
                self._report_drops()
                return
            self._queue.append((callbacks, args, size))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"sandbox-pool-{self.name}-callbacks",
                                                daemon=True)
                self._thread.start()
            self._cv.notify()

    def stop(self, timeout: float) -> None:
        """Run what is already queued (for up to `timeout` s), then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _report_drops(self) -> None:
        now = time.monotonic()
        if now - self._reported >= self.REPORT_EVERY:
            self._reported = now
            log.warning("pool %s: %d callback events dropped: callbacks do not keep up (backlog of %d events)",
                        self.name, self.budget.take_unreported(), self.budget.max_events)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if not self._queue:
                    return
                callbacks, args, size = self._queue.popleft()
            for cb in callbacks:
                try:
                    cb(*args)
                except Exception:
                    log.exception("pool %s: callback %r failed", self.name, cb)
            with self._cv:
                self.budget.done(size)
