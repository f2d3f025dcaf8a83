"""Structured lifecycle events: every step of every worker, as data (host side).

    import sandbox.events
    unsubscribe = sandbox.events.subscribe(lambda ev: print(ev.name, ev.fields))

Each event is also a `logging` record on the "sandbox.events" logger with the fields in
`extra` (so a JSON log formatter sees plugin, policy, pid, uid, ...). Subscribers run on the
thread that emitted the event when that is a caller's (a call's own events: they have run when
the call returns); events the hub thread sees (an idle worker's death, a denial between calls)
are handed to the "sandbox-events" thread, in order, so that a slow subscriber never delays the
supervision of any worker. One that raises is logged and never breaks the worker that emitted.

The fields each event carries (every one has `plugin` and `policy`; any may add more):

| event | when | fields |
|---|---|---|
| started | a worker was forked | pid, uid |
| ready | it loaded worker.py and answers | pid, uid; duration (seconds since the start was asked) if known |
| call | a call ended, however it ended | pid, function, duration, outcome ("ok" or the error's `kind`) |
| ended | the worker is gone and reaped | pid, reason ("closed" or the error's `kind`) |
| violation | a forbidden syscall stopped it | pid, syscall |
| denied | a syscall the policy answers with an errno | pid, syscall |
| timeout, memory, crash, cancelled, load-error | why a call or a start failed | pid, detail |

`sandbox.metrics` counts from these alone, so an emitter keeps them: one `started` and one
`ended` per worker, one `call` per call.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("sandbox.events")
log.addHandler(logging.NullHandler())

# The names a subscriber may see.
NAMES = ("started", "ready", "call", "ended", "violation", "denied", "timeout", "memory", "crash",
         "cancelled", "load-error")


_monotonic = time.monotonic  # (inside Event, `time` is the field)


@dataclass(frozen=True)
class Event:
    name: str
    fields: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)
    monotonic: float = field(default_factory=_monotonic)  # for durations between events

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


_subscribers: list[Callable[[Event], None]] = []
_lock = threading.Lock()


def subscribe(callback: Callable[[Event], None]) -> Callable[[], None]:
    """Call `callback(event)` for every event from now on; returns a function that unsubscribes."""
    with _lock:
        _subscribers.append(callback)

    def unsubscribe() -> None:
        with _lock:
            if callback in _subscribers:
                _subscribers.remove(callback)
    return unsubscribe


def emit(name: str, level: int = logging.INFO, **fields: Any) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown event {name!r}")
    if log.isEnabledFor(level):
        shown = " ".join(f"{k}={v}" for k, v in fields.items())
        log.log(level, "%s %s", name, shown, extra={"sandbox_event": name, **{f"sandbox_{k}": v
                                                                              for k, v in fields.items()}})
    if not _subscribers:
        return
    event = Event(name, fields)
    subscribers = list(_subscribers)
    if getattr(_here, "defer", False):
        _deferred().put([_deliver], (event, subscribers), 512)
    else:
        _deliver(event, subscribers)


def _deliver(event: Event, subscribers: list[Callable[[Event], None]]) -> None:
    for cb in subscribers:
        try:
            cb(event)
        except Exception:  # a subscriber's bug never breaks a worker
            log.exception("event subscriber %r failed", cb)


_here = threading.local()  # `defer` is set on the hub's thread (defer_on_this_thread)
_runner = None


def defer_on_this_thread() -> None:
    """Events emitted on the calling thread from now on reach subscribers on the events thread
    (the hub calls this on its own thread: supervision never waits for a subscriber)."""
    _here.defer = True


def _deferred():
    global _runner
    if _runner is None:
        from ._host.callbacks import CallbackRunner  # (host-only machinery, imported on first use)
        with _lock:
            if _runner is None:
                _runner = CallbackRunner("sandbox.events subscribers", "sandbox-events")
    return _runner
