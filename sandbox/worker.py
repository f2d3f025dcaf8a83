"""The host's handle on one sandboxed worker: `Worker(path, policy=...)`.

    with Worker("plugins/resize/worker.py", policy="policies/resize.toml") as w:
        w.on("message", print)
        w.call("resize", data, width=64)          # every keyword goes to the plugin
        w.invoke("resize", (data,), {"width": 64}, timeout=5)   # the library's options beside

A driver of the lifecycle core (`_host/lifecycle.py`), which decides what everything means:
this file only owns descriptors, poll(), locks and threads. A call does its own I/O in the
calling thread (poll with a deadline: the host never blocks forever); between calls the hub
thread watches the worker. Whatever the child does ends in one of the errors of
`sandbox.errors`, and the worker is gone when it should be.

Callbacks never run on the hub thread, nor on a caller's: every one runs on the worker's own
callback thread (`_host/callbacks.py`), in the order of the events, "exit" last. Whoever sees an
event only hands it over, so a slow callback never delays the supervision of any worker. A call
(or post) returns once the callbacks of the events it saw have run, so that what a plugin posted
during a call has reached its callbacks when the call returns.
"""
from __future__ import annotations

import os
import select
import sys
import threading
import time

from . import events as _events
from ._host import channel, hub as _hub, lifecycle as lc
from ._host.callbacks import CallbackRunner
from ._host.handle import DEATH_WAIT, EXITED_GRACE, WorkerHandle, log, weak_method

_monotonic = time.monotonic
_write = os.write
_READY, _ENDED, _STARTING, _CLOSING = lc._READY, lc._ENDED, lc._STARTING, lc._CLOSING
_Reply = lc.Reply
_events_log = _events.log
DISPATCH_AT = lc.BUFFER_BUDGET // 4  # bytes of a call's messages held before they are handed over
HUB_READS = 16                        # reads of a worker's pipe per hub wake-up
CALLBACK_DRAIN = 5.0  # how long close()/terminate() let the callbacks already queued run
# what a pump waits for
_WANT_REPLY, _WANT_READY, _WANT_WRITTEN, _WANT_END = 1, 2, 3, 4


class Worker(WorkerHandle):
    def __init__(self, worker_py, policy=None, *, name: str | None = None, start_timeout: float | None = None,
                 _on_syscall=None):
        super().__init__(worker_py, policy, name, start_timeout, _on_syscall)
        self._io = threading.Lock()      # whoever holds it reads the child's fds and feeds the core
        self._calls = threading.Lock()   # one call in flight
        self._pidfd_lock = threading.Lock()
        self._hub_missed = False
        self._hub_reads = False  # the hub reads the child's pipe between calls only for "message" listeners
        self._inbox: list = []
        self._inbox_bytes = 0
        self._poller: select.poll | None = None
        self._handoff_fd: int | None = None
        self._kill_at: float | None = None  # monotonic time at which the bounded wait for the status ends
        self._hub: _hub.Hub | None = None
        # users' callbacks run on this (created by the first on()); the library's own listeners
        # (a pool's, `_listen`) run in line where the event is seen, and only hand over
        self._runner: CallbackRunner | None = None
        self._hooks: dict[str, list] = {event: [] for event in self._callbacks}
        self._start(self._start_timeout)

    # ---- public API -------------------------------------------------------------------------
    def on(self, event: str, callback) -> "Worker":
        """Register a callback for "message", "exit", "log" or "denied". Every callback runs on
        the worker's callback thread (`sandbox-worker-NAME-callbacks`), one at a time, in order."""
        if event in self._callbacks and self._runner is None:  # (before the callback is seen)
            self._runner = CallbackRunner(f"worker {self.name}", f"sandbox-worker-{self.name}-callbacks")
        self._on_event_callback(event, callback)
        self._listening(event)
        return self

    def _listen(self, event: str, callback) -> None:
        if event not in self._hooks:
            raise ValueError(f"unknown event {event!r} (message, exit, log, denied)")
        self._hooks[event].append(callback)
        self._listening(event)

    def _listening(self, event: str) -> None:
        if event == "message" and not self._hub_reads:
            # Someone listens now: let the hub read what the plugin posts between calls. Until
            # then the pipe simply holds it (the plugin blocks when it is full) till the next call.
            self._hub_reads = True
            if not self._finalized and "from" in self._fds:
                hub = self._hub
                assert hub is not None  # set by _start before any fd is watched; None only once ended
                hub.arm(self._fds["from"])

    @property
    def callbacks_dropped(self) -> int:
        """Events (messages, log lines, denials) dropped for the callbacks: they did not keep up."""
        runner = self._runner
        return runner.dropped if runner is not None else 0

    def call(self, name: str, /, *args, **kwargs):
        """Call the plugin's function `name`; every argument and keyword goes to the plugin."""
        return self._call(name, args, kwargs, self._timeout)

    def invoke(self, name: str, args=(), kwargs=None, *, timeout: float | None = None):
        """`call` with the library's own options beside, never among, the plugin's arguments:
        `timeout` in seconds (None: the policy's; math.inf: none)."""
        return self._call(name, tuple(args), dict(kwargs or {}), self._call_timeout(timeout))

    def post(self, obj, *, timeout: float | None = None) -> None:
        """Deliver obj to the plugin's on_message (plain data only); returns once it is written.
        A worker that does not read it within `timeout` is killed (PluginTimeout)."""
        timeout = self._call_timeout(timeout)
        core = self._core
        assert core is not None  # the constructor started the worker (or raised)
        with self._io:
            frame = core.encode_post(obj)
            if self._hub_reads:
                hub = self._hub
                assert hub is not None  # None only once ended, and then encode_post raised
                hub.disarm(self._fds["from"])
            try:
                left = self._write_now(self._fds["to"], frame)
                if left is not None:
                    if timeout is None:  # no deadline, so nothing to do when it passes
                        self._pump(left, None, _WANT_WRITTEN, None)
                    else:
                        limit = timeout
                        self._pump(left, _monotonic() + limit, _WANT_WRITTEN,
                                   lambda: core.kill(channel.timeout_error(self.name, limit)))
            finally:
                msgs = self._take_inbox()
        self._after_io()  # after letting go of the fds (see _on_hub_event)
        self._dispatch(msgs)
        if self._runner is not None:
            self._runner.barrier()
        if core.reason is not None:
            raise core.ended_error()

    def terminate(self) -> None:
        """Kill the worker now (SIGKILL) and wait, bounded, until it is reaped."""
        core = self._core
        if core is None or core.state is _ENDED:
            self._stop_callbacks()
            return
        core.closing = True   # a plain flag: the caller of a call in flight sees "closed", not "killed"
        self._send_kill()     # without the lock: a call in flight ends at once
        with self._io:
            self._apply(core.kill())
            self._pump(None, None, _WANT_END, None)
            msgs = self._take_inbox()
        self._dispatch(msgs)
        self._stop_callbacks()

    def close(self, grace: float = 1.0) -> None:
        """Ask the worker to exit (EOF on its input), then kill it if it hasn't within `grace`."""
        core = self._core
        if core is None or core.state is _ENDED:
            self._stop_callbacks()
            return
        if not self._io.acquire(timeout=grace):
            self.terminate()  # a call is in flight and outlasts the grace: it can't end cleanly
            return
        try:
            if core.state is not _ENDED:
                self._apply(core.close())
                self._pump(None, _monotonic() + grace, _WANT_END, core.kill)
            msgs = self._take_inbox()
        finally:
            self._io.release()
        self._dispatch(msgs)
        self._stop_callbacks()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self._warn_unclosed()
        runner = self.__dict__.get("_runner")
        if runner is not None and not sys.is_finalizing():
            runner.seal()  # (dropped unclosed: no "exit" will end its thread; its lock is its own)

    def __repr__(self):
        state = "alive" if self.alive else "ended"
        return f"<Worker {self.name} pid={self.pid} {state}>"

    # ---- calls ------------------------------------------------------------------------------
    def _call(self, name, args, kwargs, timeout):
        core = self._core
        if core.state is _CLOSING and not core.closing:
            self._wait_for_verdict()
        # (a callback calling its own worker says so: a caller waiting for its callbacks stops waiting)
        with self._calls if self._runner is None else self._runner.guard(self._calls):
            with self._io:
                frame = core.begin_call(name, args, kwargs)  # WorkerClosed unless READY
                started = _monotonic()
                if self._hub_reads:
                    self._hub.disarm(self._fds["from"])
                try:
                    reply = self._exchange(frame, started, timeout)
                finally:
                    core.call_over(sent=True)
                    msgs = self._take_inbox() if self._inbox else None
            if self._hub_reads or self._hub_missed:
                self._after_io()  # after letting go of the fds (see _on_hub_event)
            if msgs:  # what it posted before the reply, or before it died, still counts
                self._dispatch(msgs)
        runner = self._runner
        if runner is not None:  # (outside self._calls: a callback may make a call of its own)
            runner.barrier()
        if reply is not None and reply.error is None and not (_events._subscribers or _events_log.isEnabledFor(20)):
            return reply.value  # the usual outcome, without the event nobody listens to
        return self._outcome(name, started, reply)

    def _wait_for_verdict(self):
        """The worker is dying on its own (its pipe closed, a kill under way): wait for its exit
        status (bounded: DEATH_WAIT, shortened once the pidfd says it exited), so that a call made
        meanwhile says why it ended, not that it was closed."""
        with self._io:
            core = self._core
            if core.state is not _ENDED:
                if self._kill_at is None:
                    self._kill_at = _monotonic() + DEATH_WAIT
                self._pump(None, None, _WANT_END, None)
            msgs = self._take_inbox()
        self._dispatch(msgs)

    def _exchange(self, frame, started: float, timeout):
        """A call's I/O. The common case in a straight line: the frame goes out at once, one poll
        and one read bring exactly the reply. Anything else takes the pump."""
        deadline = None if timeout is None else started + timeout
        left = self._write_now(self._fds["to"], frame)
        if left is None:
            wait = -1 if deadline is None else (deadline - _monotonic()) * 1000
            if wait:
                poller = self._poller
                assert poller is not None  # None only once ended, and then begin_call raised
                events = poller.poll(wait if wait > 0 else 0)
                from_fd = self._fds["from"]
                if len(events) == 1 and events[0][0] == from_fd:
                    outs = self._read_child(from_fd)
                    if outs:
                        if len(outs) == 1 and type(outs[0]) is _Reply:
                            return outs[0]  # the usual read: exactly the awaited reply
                        reply = self._apply(outs)
                        if reply is not None:
                            return reply
        core = self._core
        assert core is not None  # begin_call succeeded on it
        return self._pump(left, deadline, _WANT_REPLY, lambda: core.deadline_passed(timeout))

    # ---- the pump: the one loop that reads the child ----------------------------------------
    def _pump(self, left, deadline, want, on_deadline):
        """Poll and feed the core until `want` happens or the worker ends; `left`: what is still
        to write (memoryviews). `on_deadline()`: the core's input when `deadline` passes."""
        core = self._core
        poller = self._poller
        fds = self._fds
        to_fd = fds.get("to")
        if left is not None:
            poller.register(to_fd, select.POLLOUT)
        try:
            while True:
                if core.state is _ENDED:
                    return None
                if (want == _WANT_READY and core.state is not _STARTING) or \
                        (want == _WANT_WRITTEN and (left is None or core.reason is not None)):
                    return None
                now = _monotonic()
                wait = None if deadline is None else deadline - now
                if self._kill_at is not None and (wait is None or self._kill_at - now < wait):
                    wait = self._kill_at - now
                events = poller.poll(None if wait is None else max(wait, 0) * 1000)
                if not events and wait is not None and wait <= 0:
                    if self._kill_at is not None and _monotonic() >= self._kill_at:
                        outs = self._status_never_came()
                    else:
                        deadline, outs = None, (on_deadline() if on_deadline is not None else lc.NOTHING)
                    reply = self._apply(outs)
                    if reply is not None and want == _WANT_REPLY:
                        return reply
                    continue
                for fd, ev in events:
                    reply = None
                    if fd == fds["from"]:
                        outs = self._read_child(fd)
                        if self._eof:
                            _unregister(poller, fd)  # EOF stays readable: the status pipe says the rest
                        if outs:
                            reply = self._apply(outs)
                    elif fd == to_fd and left is not None:
                        left = self._write_some(to_fd, left)
                        if left is None:
                            poller.unregister(to_fd)
                    elif fd == self._listener:
                        if ev & select.POLLIN:
                            reply = self._apply(self._on_listener())
                        else:
                            poller.unregister(fd)  # every task under the filter is gone
                    elif fd == self._handoff_fd:
                        reply = self._apply(self._take_handoff())
                    elif fd == self._pidfd:
                        _unregister(poller, fd)  # exited: the zygote's status should follow at once
                        self._exited_seen = True
                        soon = _monotonic() + EXITED_GRACE
                        self._kill_at = soon if self._kill_at is None else min(self._kill_at, soon)
                    elif fd == fds["status"]:
                        reply = self._drain_child()  # what it wrote before dying still counts
                        if core.state is not _ENDED:
                            reply = self._apply(self._read_status(fd)) or reply
                    if reply is not None and want == _WANT_REPLY:
                        return reply
                    if core.state is _ENDED:
                        break  # its fds are closed now: nothing more from this poll
                if self._inbox_bytes > DISPATCH_AT:
                    self._dispatch_midway()
        finally:
            if left is not None and core.state is not _ENDED:
                _unregister(poller, to_fd)

    def _drain_child(self, reads: int = -1):
        """Read what the pipe holds (at most `reads` times: a flood can't keep the hub here)."""
        reply = None
        fd = self._fds.get("from")
        core = self._core
        assert core is not None  # called while the worker's pipes are watched: it was started
        while reads and fd is not None and not self._eof and core.state is not _ENDED:
            reads -= 1
            outs = self._read_child(fd)
            if outs is None:
                break
            reply = self._apply(outs) or reply
        return reply

    def _write_now(self, fd, out):
        """Write what fits of a frame now (a small one in one write; a large one, header and
        payload, by writev): None when it is all out (or the child is gone: its death arrives on
        the status pipe), else the memoryviews still to write."""
        if type(out) is tuple:
            return self._write_some(fd, [memoryview(part) for part in out])
        try:
            n = _write(fd, out)
        except BlockingIOError:
            n = 0
        except OSError:
            return None
        return None if n >= len(out) else self._write_some(fd, [memoryview(out)[n:]])

    @staticmethod
    def _write_some(fd, parts):
        """Write the memoryviews in `parts` until the pipe is full: what is left, or None when all
        is written (or the child is gone: its death arrives on the status pipe)."""
        try:
            while parts:
                n = os.writev(fd, parts)
                while n:
                    if n >= len(parts[0]):
                        n -= len(parts.pop(0))
                    else:
                        parts[0] = parts[0][n:]
                        n = 0
        except BlockingIOError:
            return parts
        except OSError:
            return None
        return None

    # ---- start ------------------------------------------------------------------------------
    def _start(self, start_timeout):
        t0 = _monotonic()
        sp = self._spawn()
        self._hub = hub = _hub.get()
        hub.watch(self._fds["log"], weak_method(self._on_log), oneshot=False)
        core = self._core
        with self._io:
            self._poller = poller = select.poll()
            poller.register(self._fds["from"], select.POLLIN)
            poller.register(self._fds["status"], select.POLLIN)
            # The listener arrives before the plugin loads: watch for it from the start, so that a
            # forbidden syscall made while worker.py imports is reported as what it is.
            self._handoff_fd = sp.handoff.fileno()
            poller.register(self._handoff_fd, select.POLLIN)
            deadline = None if start_timeout is None else t0 + start_timeout
            self._pump(None, deadline, _WANT_READY, lambda: core.deadline_passed(start_timeout))
            if core.state is not _READY:
                self._pump(None, None, _WANT_END, None)  # killed already: bounded
                raise core.ended_error()
            on_event = weak_method(self._on_hub_event)
            hub.watch(self._fds["from"], on_event, armed=self._hub_reads)
            hub.watch(self._fds["status"], on_event)
            if self._listener is not None:
                hub.watch(self._listener, on_event)
            msgs = self._take_inbox()
        self._dispatch(msgs)

    # ---- hooks the core's outputs call (handle.WorkerHandle._apply) -------------------------------
    def _on_deliver(self, out):
        if not self._callbacks["message"] and not self._hooks["message"]:
            self._core.delivered(out.size)  # nobody listens: nothing to keep
            return
        self._inbox.append(out)
        self._inbox_bytes += out.size

    def _on_killed(self):
        self._kill_at = _monotonic() + DEATH_WAIT
        if self._poller is not None and self._pidfd is not None:
            try:  # its exit, seen through the pidfd, shortens the wait for a status that may not come
                self._poller.register(self._pidfd, select.POLLIN)
            except (OSError, ValueError):
                pass

    def _on_close_input(self):
        fd = self._fds.pop("to", None)
        if fd is not None:
            os.close(fd)

    def _unwatch_handoff(self, fd):
        if self._handoff_fd is not None:
            if self._poller is not None:
                _unregister(self._poller, fd)
            self._handoff_fd = None

    def _watch_listener(self, fd):
        if self._poller is not None:
            self._poller.register(fd, select.POLLIN)

    def _release_elsewhere(self):
        hub, sp, fds = self._hub, self._sp, list(self._fds.values())
        self._sp, self._fds, self._poller, self._handoff_fd = None, {}, None, None

        def release():  # no reference to the worker: it is being collected
            if hub is not None:
                for fd in fds:
                    hub.unwatch(fd)  # before the descriptors close: never a reused number
            if sp is not None:
                sp.release()
        if hub is not None:
            hub.call_soon(release)
        else:
            release()  # never started a hub: nothing of it is watched

    def _unwatch_all(self):
        hub = self._hub
        if hub is not None:
            for fd in self._fds.values():
                hub.unwatch(fd)
        self._poller = None
        self._handoff_fd = None

    def _disown(self, owner: int):
        super()._disown(owner)
        # a lock some parent thread held at the fork would stay held in the child forever
        self._io, self._calls, self._pidfd_lock = threading.Lock(), threading.Lock(), threading.Lock()
        self._hub = None
        self._poller = None
        self._runner = None  # the parent's callback thread is not the child's

    def _send_kill(self):
        with self._pidfd_lock:  # never a pidfd number that finalisation closed meanwhile
            super()._send_kill()

    def _finish(self, death):
        with self._pidfd_lock:
            self._pidfd = None
        super()._finish(death)

    # ---- between calls (hub thread) -----------------------------------------------------------
    def _on_hub_event(self, fd):
        if not self._io.acquire(blocking=False):
            # A caller owns the fds. Callers re-arm only after letting go of them (_after_io), so
            # flag the miss first and try again: either the caller still holds the lock and sees
            # the flag after releasing it, or it has let go and this thread takes the event
            # itself. A re-arm under the lock would consume the flag before the wake-up it made
            # was missed: an EPOLLONESHOT wake-up lost, and a message posted between calls held
            # back until the next call.
            self._hub_missed = True
            if not self._io.acquire(blocking=False):
                return
        try:
            if self._core.state is _ENDED:
                return
            if fd == self._listener:
                self._apply(self._on_listener())
            elif fd == self._fds.get("status"):
                self._drain_child()
                if self._core.state is not _ENDED:
                    self._apply(self._read_status(fd))
            else:
                self._drain_child(HUB_READS)
            msgs = self._take_inbox()
        finally:
            self._io.release()
            self._rearm(listener=True)
        self._dispatch(msgs, caller=False)

    def _after_io(self):
        """After letting go of the fds: re-arm what the hub could not handle meanwhile."""
        if not self._finalized:
            self._rearm()

    def _rearm(self, listener: bool = False):
        if self._finalized:
            return
        hub = self._hub
        assert hub is not None  # set by _start; None only after a fork, where the worker is ended
        if self._hub_reads and not self._eof:
            hub.arm(self._fds.get("from", -1))
        if self._hub_missed or listener:
            self._hub_missed = False
            hub.arm(self._fds.get("status", -1))
            if self._listener is not None:
                hub.arm(self._listener)

    def _take_inbox(self) -> list:
        """Under self._io: the messages read so far, handed over (and off the core's budget)."""
        msgs, self._inbox = self._inbox, []
        if msgs:
            core = self._core
            assert core is not None  # messages came from its core
            core.delivered(self._inbox_bytes)
            self._inbox_bytes = 0
        return msgs

    def _dispatch_midway(self):
        """A call's messages pile up past DISPATCH_AT: hand them over now, with the fds let go
        for the while (a callback may post), instead of holding them all until the reply."""
        msgs = self._take_inbox()
        self._io.release()
        try:
            self._dispatch(msgs)
        finally:
            self._io.acquire()

    def _dispatch(self, msgs, caller: bool = True):
        """Hand messages over: to the library's listeners in line, to users' callbacks through the
        callback thread. A caller (`caller`) waits for room in its backlog: back-pressure on its
        own call, as when it ran them itself. The hub never waits: past the backlog it drops."""
        hooks, callbacks = self._hooks["message"], self._callbacks["message"]
        for out in msgs:
            for hook in list(hooks):
                try:
                    hook(out.message)
                except Exception:
                    log.exception("message listener of worker %s failed", self.name)
            if callbacks:
                runner = self._runner
                assert runner is not None  # on() made it before registering the callback
                runner.put(list(callbacks), (out.message,), out.size, wait=caller)

    def _run_callbacks(self, event: str, arg) -> None:
        """A "denied", "exit" or "log" event: the library's listeners in line, users' callbacks
        handed to the callback thread ("exit" never dropped, and the last it takes)."""
        for hook in list(self._hooks[event]):
            try:
                hook(arg)
            except Exception:
                log.exception("%s listener of worker %s failed", event, self.name)
        runner = self._runner
        if runner is None:
            return
        callbacks = self._callbacks[event]
        if event == "exit":  # the last event: never dropped, and nothing after it is taken
            if callbacks:
                runner.put(list(callbacks), (arg,), 0, must=True, last=True)
            else:
                runner.seal()
        elif callbacks:
            runner.put(list(callbacks), (arg,), len(arg) if event == "log" else 256)

    def _stop_callbacks(self) -> None:
        """The worker has ended: run what is queued (bounded) and end the callback thread."""
        runner = self._runner
        if runner is not None:
            runner.stop(CALLBACK_DRAIN)

    # ---- plugin output ----------------------------------------------------------------------
    def _on_log(self, fd):
        if not self._read_log(fd):
            self._hub.unwatch(fd)


def _unregister(poller, fd):
    try:
        poller.unregister(fd)
    except KeyError:
        pass
