"""The host's handle on one sandboxed worker: `Worker(path, policy=...)`.

    with Worker("plugins/resize/worker.py", policy="policies/resize.toml") as w:
        w.on("message", print)
        w.call("resize", data, width=64)

A call does its own I/O in the calling thread (poll with a deadline: the host never blocks
forever); between calls the hub thread watches the worker. Either way, whatever the child
does ends in one of the errors of `sandbox.errors`, and the worker is gone when it should be.
"""
import os
import select
import signal
import threading
import time

from ._host import channel as S, hub as _hub
from ._host.handle import DEATH_WAIT, WorkerHandle, log
from ._host.resources import STATUS, Spawned
from .errors import ConfinementError, LoadError, ProtocolViolation, SandboxError, WorkerClosed

_REPLIES = (S.RESULT, S.FAILURE)
_monotonic = time.monotonic
_write = os.write


class Worker(WorkerHandle):
    def __init__(self, worker_py, policy=None, *, name: str | None = None, start_timeout: float | None = None):
        super().__init__(worker_py, policy, name, start_timeout)
        self._io = threading.Lock()      # whoever holds it reads the child's fds
        self._calls = threading.Lock()   # one call in flight
        self._final = threading.Lock()
        self._hub_missed = False
        self._hub_reads = False  # the hub reads the child's pipe between calls only for "message" listeners
        self._inbox = []
        self._poller = None
        self._handoff_fd = None
        self._start(self._start_timeout)

    # ---- public API -------------------------------------------------------------------------
    def on(self, event: str, callback) -> "Worker":
        if event not in self._callbacks:
            raise ValueError(f"unknown event {event!r} (message, exit, log)")
        self._callbacks[event].append(callback)
        if event == "message" and not self._hub_reads:
            # Someone listens now: let the hub read what the plugin posts between calls. Until
            # then the pipe simply holds it (the plugin blocks when it is full) till the next call.
            self._hub_reads = True
            if not self._finalized and "from" in self._fds:
                _hub.get().arm(self._fds["from"])
        return self

    def call(self, name: str, *args, timeout: float | None = None, **kwargs):
        timeout = self._timeout if timeout is None else timeout
        with self._calls:
            if self._finalized or self._reason is not None:
                self._check_alive()  # raises WorkerClosed, saying why
            deadline = _monotonic() + timeout
            try:
                with self._io:
                    if self._finalized or self._reason is not None:
                        self._check_alive()  # again: the hub may have seen it die while we waited
                    if self._hub_reads:
                        _hub.get().disarm(self._fds["from"])
                    try:
                        frame = self._session.encode_call(name, args, kwargs)
                        kind, value = self._exchange(frame, deadline, timeout)
                    finally:
                        self._session.call_done()
                        self._session.sent()
                        if self._hub_reads or self._hub_missed:
                            self._rearm()
            finally:
                if self._inbox:  # what it posted before the reply, or before it died, still counts
                    self._dispatch()
            if kind == S.RESULT:
                return value
            raise value

    def invoke(self, name: str, args=(), kwargs=None, *, timeout: float | None = None):
        """`call` with the library's own options beside, never among, the plugin's arguments:
        every keyword of `call` goes to the plugin; here `timeout` is the sandbox's deadline."""
        return self.call(name, *args, timeout=timeout, **(kwargs or {}))

    def post(self, obj) -> None:
        """Deliver obj to the plugin's on_message (plain data only)."""
        frame = S.Session.encode_post(obj)
        self._check_alive()
        with self._io:
            self._check_alive()
            if self._hub_reads:
                _hub.get().disarm(self._fds["from"])
            try:
                self._pump(frame, time.monotonic() + (self._timeout or 10.0), self._timeout, want=())
            finally:
                self._rearm()
        self._dispatch()

    def terminate(self) -> None:
        """Kill the worker now (SIGKILL) and wait, bounded, until it is reaped."""
        if self._finalized or self.pid is None:
            return
        self._closing = True
        self._kill(None)
        self._await_death()

    def close(self, grace: float = 1.0) -> None:
        """Ask the worker to exit (EOF on its input), then kill it if it hasn't within `grace`."""
        if self._finalized or self.pid is None:
            return
        self._closing = True
        fd = self._fds.pop("to", None)
        if fd is not None:
            os.close(fd)
        self._await_death(grace)
        if not self._finalized:
            self.terminate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "alive" if self.alive else "ended"
        return f"<Worker {self.name} pid={self.pid} {state}>"

    # ---- start ------------------------------------------------------------------------------
    def _start(self, start_timeout):
        self._sp = sp = Spawned(self.policy, self.plugin, self.name, start_timeout)
        self.pid, self._pidfd, self._fds = sp.pid, sp.pidfd, sp.fds
        hub = _hub.get()
        hub.watch(self._fds["log"], self._on_log, oneshot=False)
        with self._io:
            # The listener arrives before the plugin loads: watch for it from the start, so that a
            # forbidden syscall made while worker.py imports is reported as what it is.
            self._handoff_fd = sp.handoff.fileno()
            self._get_poller().register(self._handoff_fd, select.POLLIN)
            try:
                _, ready = self._pump(None, time.monotonic() + start_timeout, start_timeout,
                                      want=(S.READY,), starting=True)
                self.exports = S.exports_of(ready)
            finally:
                if self._handoff_fd is not None:
                    self._take_listener()
            if sp.plan.notify and self._listener is None:
                self._kill(ConfinementError("the worker did not hand over its seccomp listener", layer="seccomp"))
                self._await_status()
                raise self._ended()
            hub.watch(self._fds["from"], self._on_hub_event, armed=self._hub_reads)
            hub.watch(self._fds["status"], self._on_hub_event)
            if self._listener is not None:
                hub.watch(self._listener, self._on_hub_event)
        self._dispatch()

    # ---- the pump: the one place that reads the child ----------------------------------------
    def _pump(self, out, deadline: float, timeout, want, starting=False):
        """Write `out` (a frame, or None), then read until an event in `want` arrives (returned)
        or the worker ends."""
        poller = self._poller or self._get_poller()
        to_fd = self._fds.get("to")
        view = None  # what is left to write: a list of memoryviews
        if out:
            if to_fd is None:
                raise WorkerClosed(f"worker {self.name} is closing")
            view = self._write_now(to_fd, out)
            if view is not None:
                poller.register(to_fd, select.POLLOUT)
        try:
            return self._pump_loop(poller, view, to_fd, deadline, timeout, want, starting)
        finally:
            if view is not None:
                try:
                    poller.unregister(to_fd)
                except KeyError:
                    pass

    def _exchange(self, frame, deadline: float, timeout):
        """A call's I/O. The common case in a straight line: the frame goes out at once, one poll
        and one read bring exactly the reply. Anything else takes the pump."""
        to_fd = self._fds.get("to")
        if to_fd is None or self._poller is None:
            return self._pump(frame, deadline, timeout, want=_REPLIES)
        left = self._write_now(to_fd, frame)
        if left is not None:  # the pipe is full: the pump writes the rest as the child reads
            return self._pump(tuple(left), deadline, timeout, want=_REPLIES)
        remaining = deadline - _monotonic()
        if remaining > 0:
            events = self._poller.poll(remaining * 1000)
            if len(events) == 1 and events[0][0] == self._fds["from"]:
                result = self._read_frames(_REPLIES)
                if result is not None:
                    return result
        return self._pump(None, deadline, timeout, want=_REPLIES)  # events stay pending: level-triggered

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

    def _get_poller(self):
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self._fds["from"], select.POLLIN)
            self._poller.register(self._fds["status"], select.POLLIN)
        return self._poller

    def _take_listener(self):
        self._poller.unregister(self._handoff_fd)
        self._handoff_fd = None
        self._listener = self._sp.take_listener()
        if self._listener is not None:
            self._poller.register(self._listener, select.POLLIN)

    def _pump_loop(self, poller, view, to_fd, deadline, timeout, want, starting):
        fds = self._fds
        if view is None and not want:
            return (None, None)
        while True:
            remaining = deadline - _monotonic()
            if remaining <= 0:
                self._kill(S.timeout_error(self.name, timeout) if not starting else
                           LoadError("TimeoutError", f"plugin {self.name} did not start within {timeout:g} s"))
                raise self._reason
            events = poller.poll(remaining * 1000)
            for fd, ev in events:
                if fd == fds["from"]:
                    result = self._read_frames(want)
                    if result is not None:
                        return result
                elif fd == to_fd and view is not None:
                    view = self._write_some(to_fd, view)
                    if view is None:
                        try:
                            poller.unregister(to_fd)
                        except KeyError:
                            pass
                        if not want:
                            return (None, None)
                elif fd == self._listener:
                    if ev & select.POLLIN:
                        self._on_violation()
                    else:
                        poller.unregister(fd)  # every task under the filter is gone
                elif fd == self._handoff_fd:
                    self._take_listener()
                elif fd == fds["status"]:
                    self._read_frames(())  # what it wrote before dying still counts
                    self._on_status()
                    raise self._ended()

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

    def _read_frames(self, want):
        found = None
        while True:
            try:
                events = self._session.read_from(self._fds["from"])
            except BlockingIOError:
                return found
            except ProtocolViolation as e:
                self._kill(ProtocolViolation(f"plugin {self.name} broke the protocol: {e}"))
                self._await_status()
                raise self._ended() from None
            if events is None:
                # EOF: the child closed its pipe or died; wait for the status pipe to say which.
                self._await_status()
                raise self._ended()
            if len(events) == 1 and found is None and events[0][0] in want and self._session.decoder.at_boundary():
                return events[0]  # the usual read: exactly the awaited reply
            for kind, value in events:
                if kind == S.MESSAGE:
                    self._inbox.append(value)
                elif kind == S.LOAD_FAILED:
                    self._kill(S.load_error(value, self.plugin))
                    self._await_status()
                    raise self._ended()
                elif kind in want and found is None:
                    found = (kind, value)
                elif kind == S.READY:
                    continue
                else:
                    # a reply nobody waits for: Session already checked ids, so this is a late reply
                    self._kill(ProtocolViolation(f"plugin {self.name} sent an unexpected {kind} frame"))
                    self._await_status()
                    raise self._ended()
            if found is not None and self._session.decoder.at_boundary():
                return found

    # ---- death ------------------------------------------------------------------------------
    def _kill(self, reason: SandboxError | None):
        if self._reason is None and reason is not None:
            self._reason = reason
        try:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            pass

    def _await_status(self, limit: float = DEATH_WAIT):
        fd = self._fds.get("status")
        if fd is None:
            return
        p = select.poll()
        p.register(fd, select.POLLIN)
        if self._listener is not None:
            p.register(self._listener, select.POLLIN)
        end = time.monotonic() + limit
        while not self._finalized:
            left = end - time.monotonic()
            if left <= 0:
                self._kill(None)
                end = time.monotonic() + limit
                left = limit
            for f, ev in p.poll(left * 1000):
                if f == self._listener:
                    if ev & select.POLLIN:
                        self._on_violation()
                    else:
                        p.unregister(f)
                else:
                    self._on_status()
                    return

    def _on_status(self):
        try:
            data = os.read(self._fds["status"], STATUS.size)
        except (BlockingIOError, KeyError):
            return
        status = STATUS.unpack(data)[1] if len(data) == STATUS.size else None
        if self._reason is None and self._sp is not None:
            if self._handoff_fd is not None:
                self._take_listener()  # a confinement failure, reported there, names the step
            self._reason = self._sp.end_reason(status)
        self._finalize(status)

    def _await_death(self, limit: float = DEATH_WAIT):
        with self._io:
            self._await_status(limit)

    def _finalize(self, status):
        with self._final:
            if self._finalized:
                return
            self._finalized = True
        self.exit_status = status
        self.death, self._reason = S.settle_death(status, self._reason, self._closing, self.name)
        if self.death is not None and not isinstance(self.death, WorkerClosed):
            log.info("worker %s (pid %s) ended: %s", self.name, self.pid, self.death)
        self._release()
        for cb in list(self._callbacks["exit"]):
            try:
                cb(self.death)
            except Exception:
                log.exception("exit callback of worker %s failed", self.name)

    def _release(self):
        if "log" in self._fds:
            self._drain_log()
        hub = _hub.get()
        for fd in self._fds.values():
            hub.unwatch(fd)
        if self._sp is not None:
            self._sp.release()
        self._fds = {}
        self._pidfd = None

    def _ended(self) -> SandboxError:
        """The error for a caller whose worker just ended (closed on purpose, or died)."""
        return self.death or WorkerClosed(f"worker {self.name} was closed")

    # ---- between calls (hub thread) -----------------------------------------------------------
    def _on_hub_event(self, fd):
        if not self._io.acquire(blocking=False):
            self._hub_missed = True  # a caller owns the fds; it re-arms when done
            return
        try:
            if self._finalized:
                return
            if fd == self._listener:
                self._on_violation()
                self._await_status()
            elif fd == self._fds.get("status"):
                self._read_frames(())
                self._on_status()
            else:
                self._read_frames(())
        except SandboxError:
            pass  # recorded as self.death; exit callbacks already ran
        finally:
            self._io.release()
            self._rearm()
        self._dispatch()

    def _rearm(self):
        if self._finalized:
            return
        hub = _hub.get()
        if self._hub_reads:
            hub.arm(self._fds.get("from", -1))
        if self._hub_missed:
            self._hub_missed = False
            hub.arm(self._fds.get("status", -1))
            if self._listener is not None:
                hub.arm(self._listener)

    def _dispatch(self):
        while self._inbox:
            msg = self._inbox.pop(0)
            for cb in list(self._callbacks["message"]):
                try:
                    cb(msg)
                except Exception:
                    log.exception("message callback of worker %s failed", self.name)

    # ---- plugin output ----------------------------------------------------------------------
    def _on_log(self, fd):
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not data:
            _hub.get().unwatch(fd)
            return
        self._take_log(data)

