"""What the sync Worker and the AsyncWorker share: everything but their kind of I/O.

The decisions live in `lifecycle.Lifecycle` (no I/O at all). This base owns what both drivers
do the same way around it: spawning (with host-resource errors named), carrying out the core's
outputs that need no loop or thread of their own (kill through the pidfd, answer a seccomp
notification, finalise), one read of a pipe, plugin output, structured events.

Each subclass brings its I/O: threads and poll() (worker.py), or the event loop (aio.py), and
implements the `_on_*` hooks named in `_apply`.
"""
from __future__ import annotations

import collections
import copy
import errno
import logging
import os
import re
import select
import signal
import sys
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from .. import events
from ..errors import HostResourceError, LoadError, PluginError, ProtocolViolation, SandboxError, WorkerClosed
from ..protocol import framing
from . import channel, lifecycle as lc, notify, options
from ..protocol.zygote import decode_status
from .resources import STATUS, Spawned

log = logging.getLogger("sandbox")
log.addHandler(logging.NullHandler())  # a library doesn't print on its own
LOG_LINE_MAX = 4096
LOG_BUDGET = 1 << 20  # bytes of plugin output forwarded per worker; the rest is counted, not kept
DEATH_WAIT = 5.0      # after a kill, how long the status may take before the handle ends anyway
DENIED_WORDS_KEPT = 256  # denials remembered for the words of the call's error (the budget kills past ~100)
EXITED_GRACE = 0.25   # ... once the worker's pidfd says it has exited (a stopped or dead zygote
                      # would otherwise hold terminate() for the whole DEATH_WAIT)
_readv, _read = os.readv, os.read
_READ_FLOOR = framing.LARGE  # what FrameDecoder.read_size() asks for between frames
_events_log = events.log
# (an OSError's errno may be None: no entry, like any errno not named here)
_HOST_ERRNOS: dict[int | None, str] = {errno.EMFILE: "file descriptors", errno.ENFILE: "file descriptors",
                errno.EAGAIN: "processes", errno.ENOMEM: "memory", errno.ENOSPC: "disk space",
                errno.EDQUOT: "disk space", errno.EROFS: "a writable disk"}
# which event (besides "ended") tells what kind of end it was
_END_EVENTS = {"timeout": "timeout", "memory": "memory", "crashed": "crash", "load-error": "load-error"}


def load_policy(policy):
    from ..policy import Policy
    if policy is None:
        return Policy.default()
    if isinstance(policy, (str, os.PathLike)):
        return Policy.load(os.fspath(policy))
    return policy


def plugin_name(path: str) -> str:
    base = os.path.basename(path)
    stem = os.path.splitext(base)[0]
    if stem == "worker":
        stem = os.path.basename(os.path.dirname(path)) or "worker"
    return "".join(c if c.isalnum() or c == "_" else "_" for c in stem) or "plugin"


def weak_method(method):
    """A callable for a hub or an event loop that does not keep its worker alive: a dropped
    worker is collected (and cleaned up by __del__) instead of living on in a registry."""
    ref, func = weakref.ref(method.__self__), method.__func__

    def call(*args):
        obj = ref()
        if obj is not None:
            return func(obj, *args)

    def call0():  # an event loop's reader: no arguments, called for every read
        obj = ref()
        if obj is not None:
            return func(obj)
    return call0 if func.__code__.co_argcount == 1 else call


def _vm_peak(pid: int | None, pidfd: int | None) -> int | None:
    """The worker's peak virtual size in bytes (kernel figures), read while it is alive."""
    if pid is None:
        return None  # no worker was forked: nothing to read
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read(8192)
    except OSError:
        return None
    # The pid names our worker only while it lives (the pidfd turns readable when it exits).
    if pidfd is None or select.select([pidfd], [], [], 0)[0]:
        return None
    for line in text.splitlines():
        if line.startswith(b"VmPeak:"):
            try:
                return int(line.split()[1]) * 1024
            except (IndexError, ValueError):
                return None
    return None


_live: "weakref.WeakSet[WorkerHandle]" = weakref.WeakSet()


def _disown_after_fork():
    owner = os.getppid()
    for handle in list(_live):
        handle._disown(owner)


os.register_at_fork(after_in_child=_disown_after_fork)


class WorkerHandle:
    _OFFLOAD: int | None = None  # payload size from which the driver decodes off its thread
    _clock = staticmethod(time.monotonic)  # the driver's clock (the loop's, for AsyncWorker)
    # What __del__ reads, set here too: a constructor that fails early (a bad policy) leaves an
    # object whose __del__ must still find them.
    _core: "lc.Lifecycle | None" = None
    _exited_seen = False  # the pidfd said the worker exited: its status is waited for briefly only
    _sp: Spawned | None = None

    def __init__(self, worker_py, policy, name: str | None, start_timeout: float | None,
                 on_syscall=None):
        self.plugin = os.path.abspath(os.fspath(worker_py))
        self.name = name or plugin_name(self.plugin)
        self.policy = load_policy(policy)
        self.pid: int | None = None
        self.logs: collections.deque[str] = collections.deque(maxlen=200)
        self.log_dropped = 0
        self._log_bytes = 0
        self._log_partial = b""
        self._callbacks: dict[str, list[Callable[..., Any]]] = {"message": [], "exit": [], "log": [], "denied": []}
        self._listener: int | None = None
        self._denial_report: tuple[int, Any] | None = None  # (notification id, decoded report)
        # recent denials as words (oldest dropped), for the error of the call they happened in
        self._denied_words: collections.deque[tuple[int, str, str | None]] = collections.deque(
            maxlen=DENIED_WORDS_KEPT)
        self._sp = None
        self._pidfd: int | None = None
        self._fds: dict[str, int] = {}
        self._core = None
        self.exports: tuple[str, ...] = ()  # what the plugin lets the host call, from its READY
        self._eof = False  # the worker's pipe reached its end: stop watching it
        self._on_syscall = on_syscall
        self._timeout = options.timeout(None, self.policy.limits.timeout)
        self._start_timeout = options.timeout(start_timeout, max(10.0, self._timeout or 0), "start_timeout")
        if not os.path.isfile(self.plugin):
            raise LoadError("FileNotFoundError", f"plugin file not found: {self.plugin}")
        _live.add(self)

    # ---- state as the public API shows it ----------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Started, not ended, and no reason to end recorded yet."""
        core = self._core
        return core is not None and self.pid is not None and core.state is not lc._ENDED \
            and core.reason is None

    @property
    def death(self) -> SandboxError | None:
        """Why it ended (None while alive or after a close that was asked for)."""
        return self._core.death if self._core is not None else None

    @property
    def exit_status(self) -> int | None:
        """The raw wait status, once reaped."""
        return self._core.exit_status if self._core is not None else None

    @property
    def last_denials(self) -> list:
        """The syscalls denied (policy deny mode) during the last call, as Notifications."""
        return list(self._core.denials) if self._core is not None else []

    @property
    def _finalized(self) -> bool:
        return self._core is not None and self._core.state is lc._ENDED

    def _call_timeout(self, timeout) -> float | None:
        return options.timeout(timeout, self._timeout)

    # ---- start ---------------------------------------------------------------------------------------
    def _spawn(self) -> Spawned:
        """Fork the worker through the zygote; the host's own shortage is a HostResourceError."""
        try:
            sp = Spawned(self.policy, self.plugin, self.name, self._start_timeout)  # bounded by it
        except OSError as e:
            what = _HOST_ERRNOS.get(e.errno)
            if what is None:
                raise HostResourceError(f"the host could not start worker {self.name}: {e}") from None
            raise HostResourceError(f"the host is out of {what} (starting worker {self.name}: {e})",
                                    resource=what) from None
        except RuntimeError as e:  # e.g. no free uid in the policy's range
            raise HostResourceError(f"the host could not start worker {self.name}: {e}", resource="uids") from None
        self._sp = sp
        self.pid, self._pidfd, self._fds = sp.pid, sp.pidfd, sp.fds
        sec = self.policy.seccomp
        mode = getattr(sec, "default_action", "kill")
        deny_errno = getattr(sec, "deny_errno", errno.EPERM)
        from ..policy.dangerous import DANGEROUS
        limit = self.policy.limits.memory_bytes
        pid, pidfd = sp.pid, sp.pidfd
        self._core = lc.Lifecycle(
            self.name, self.plugin, max_frame=self.policy.limits.max_message_bytes,
            policy=self.policy.path or self.policy.name, expects_listener=bool(sp.plan.notify),
            seccomp_mode=mode, deny_errno=deny_errno if isinstance(deny_errno, int) else errno.EPERM,
            dangerous=DANGEROUS, on_syscall=self._on_syscall, memory_limit=limit,
            cpu_limit=self.policy.limits.cpu_seconds,
            denial_budget=getattr(sec, "max_denials_per_call", lc.DENIAL_BUDGET),
            memory_peak=lambda: _vm_peak(pid, pidfd), offload=self._OFFLOAD)
        # the read path's own bindings (one call less per read than through the core)
        self._decoder = decoder = self._core.session.decoder
        self._payload_view, self._read_size = decoder.payload_view, decoder.read_size
        self._emit("started")
        return sp

    # ---- carrying out the core's outputs --------------------------------------------------------------
    def _apply(self, outs):
        """Carry out the outputs of one core input; returns the Reply among them, if any."""
        reply = None
        for out in outs:
            t = type(out)
            if t is lc.Reply:
                reply = out
                self._on_reply(out)
            elif t is lc.Deliver:
                self._on_deliver(out)
            elif t is lc.Kill:
                self._send_kill()
                self._on_killed()
            elif t is lc.TakeHandoff:
                r = self._take_handoff()
                reply = self._apply(r) or reply
            elif t is lc.Ready:
                if self._sp is not None:
                    self._sp.hold_mount_namespace()
                self.exports = channel.exports_of(self._core.ready_info)
                self._emit("ready")
                self._on_ready()
            elif t is lc.CloseInput:
                self._on_close_input()
            elif t is lc.Answer:
                self._answer(out)
            elif t is lc.Decode:
                reply = self._on_decode(out) or reply
            elif t is lc.Ended:
                self._finish(out.death)
        return reply

    def _on_decode(self, out: lc.Decode):
        """Decode in line (the sync driver: no event loop to keep free)."""
        try:
            obj, error = out.decode(out.frame.payload), None
        except ProtocolViolation as e:
            obj, error = None, e
        core = self._core
        assert core is not None  # a Decode output comes from the core of a started worker
        return self._apply(core.decoded(out.frame, obj, error))

    def _send_kill(self):
        """SIGKILL through the pidfd: never the wrong process, and never raises."""
        pidfd = self._pidfd
        if pidfd is None:
            return
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            pass  # already gone

    def _take_handoff(self) -> list:
        sp = self._sp
        if sp is None or sp.handoff is None:
            got = sp.take_handoff() if sp is not None else None
        else:
            self._unwatch_handoff(sp.handoff.fileno())
            got = sp.take_handoff()
        listener = got.listener if got is not None else None
        if listener is not None and self._listener is None:
            self._listener = listener
            self._watch_listener(listener)
        core = self._core
        assert core is not None  # the handoff is watched only once the worker (and its core) exist
        return core.handoff(listener is not None, got.failure if got is not None else None)

    def _on_listener(self) -> list:
        """The listener is readable: one notification in, its meaning out."""
        listener, core = self._listener, self._core
        assert listener is not None and core is not None  # watched only while both are set
        n = notify.receive(listener)
        if n is None:
            return lc.NOTHING
        report = _describe(n, listener)
        outs = core.notification(n, report)
        if outs and type(outs[0]) is lc.Answer:
            self._denial_report = (n.id, report)  # words for the "denied" event and log line
        if core.reason is not None and outs and type(outs[0]) is lc.Kill:
            self._emit("violation", syscall=n.name, args=list(n.args))
            log.warning("%s", core.reason)
        return outs

    def _answer(self, out: lc.Answer):
        n = out.notification
        if self._listener is not None:
            notify.answer(self._listener, n.id, out.error, out.flags)
        if out.error:
            got, self._denial_report = self._denial_report, None
            report = got[1] if got is not None and got[0] == n.id else None
            shown = str(report) if report is not None else n.name
            grant = report.grant if report is not None else None
            # a denial is never silent: the event (metrics count it), the log, the callbacks
            self._emit("denied", syscall=n.name, args=list(n.args), errno=-out.error, detail=shown, grant=grant)
            self._denied_words.append((n.id, shown, grant))
            log.warning("plugin %s: denied %s with %s [policy %s]%s", self.name, shown,
                        errno.errorcode.get(-out.error, -out.error), self.policy.path or self.policy.name,
                        f"; to grant it: {grant}" if grant else "")
            self._run_callbacks("denied", n)

    def _read_status(self, fd) -> list:
        try:
            data = _read(fd, STATUS.size)
        except BlockingIOError:
            return lc.NOTHING
        except OSError:
            data = b""
        reaped = decode_status(data)
        core = self._core
        assert core is not None  # the status pipe is watched only once the worker (and its core) exist
        if reaped is None:  # no record: the zygote, which writes it, died (and the worker with it)
            return core.status(None, self._sp.zygote_death() if self._sp is not None else None)
        return core.status(reaped.raw, usage=reaped)

    def _status_never_came(self) -> list:
        """The bounded wait after a kill is over: end with what is known of the zygote."""
        core = self._core
        if core is None:
            return lc.NOTHING
        waited = EXITED_GRACE if self._exited_seen else DEATH_WAIT
        return core.status_wait_over(waited, self._sp.zygote_death() if self._sp is not None else None)

    def _read_child(self, fd):
        """One read of the worker's pipe into the core: its outputs, or None when nothing is there.
        A read error is EOF, like a closed pipe: the status pipe then says how it ended."""
        core = self._core
        if core.decoding:
            return None  # a payload is being decoded: the frames after it wait in the pipe
        try:
            if self._decoder._head is None:  # between frames (the usual read): what read_size() says there
                data = _read(fd, _READ_FLOOR)
                if not data:
                    self._eof = True
                return core.receive(data)
            view = self._payload_view()
            if view is not None:
                try:
                    n = _readv(fd, [view])
                finally:
                    view.release()
                if not n:
                    self._eof = True
                return core.received_into_view(n)
            data = _read(fd, self._read_size())
            if not data:
                self._eof = True
            return core.receive(data)
        except BlockingIOError:
            return None
        except OSError:
            self._eof = True
            return core.eof()

    def _finish(self, death: SandboxError | None):
        """The core says the worker ended: release everything, tell everyone (once)."""
        if death is not None and not isinstance(death, WorkerClosed):
            log.info("worker %s (pid %s) ended: %s", self.name, self.pid, death)
        if "log" in self._fds:
            self._drain_log()
        try:
            self._unwatch_all()
        finally:
            if self._sp is not None:
                try:
                    self._sp.release()
                except Exception:  # noqa: BLE001 - clean-up never raises past the finalisation
                    log.exception("releasing worker %s failed", self.name)
            self._fds = {}
            self._pidfd = None
            self._listener = None
        kind = getattr(death, "kind", None)
        if kind in _END_EVENTS:
            self._emit(_END_EVENTS[kind], error=str(death))
        self._emit("ended", reason=kind or "closed", error=str(death) if death is not None else None)
        self._on_ended(death)
        self._run_callbacks("exit", death)

    def _emit(self, name: str, **fields):
        sp = self._sp
        events.emit(name, plugin=self.name, policy=self.policy.path or self.policy.name, pid=self.pid,
                    uid=sp.uid if sp is not None else None, **fields)

    def _outcome(self, fn: str, started: float, reply):
        """A call's Reply (None: the worker ended without one) as its value, or raised."""
        if reply is None:
            core = self._core
            assert core is not None  # a call was made, so the worker (and its core) exist
            error = core.ended_error()
        else:
            error = reply.error
        if events._subscribers or _events_log.isEnabledFor(logging.INFO):
            self._emit("call", function=fn, duration=self._clock() - started,
                       outcome="ok" if error is None else error.kind)
        if error is None:
            return reply.value
        if isinstance(error, WorkerClosed):
            error.never_sent = False  # it ended after the call was written (a pool must not resend)
        if error.kind == "memory":  # the worker lives on: no "ended" event will say it
            self._emit("memory", function=fn, error=str(error))
        if reply is not None:
            # The caller's frame still holds `reply` and so its error: raising that very object
            # would tie it to a traceback through that frame (error -> traceback -> frame ->
            # reply -> error), a cycle that keeps a dropped worker alive until the cyclic GC
            # runs. A copy is raised instead.
            error = copy.copy(error)
            if self._denied_words:
                error = self._with_denials(error)
        try:
            raise error
        finally:
            del error  # (nor may this frame keep the error it raises)

    def _with_denials(self, error: SandboxError) -> SandboxError:
        """A plugin exception raised in a call that had syscalls denied: it most likely is the
        denial's errno surfacing, so the error says which syscall, what would grant it, and where
        in the plugin it surfaced (the traceback's last line in the plugin's own folder: the
        plugin's words, shown, never used for a decision)."""
        core = self._core
        words = list(self._denied_words)
        self._denied_words.clear()
        ids = {n.id for n in core.denials} if core is not None else set()
        mine = [(shown, grant) for nid, shown, grant in words if nid in ids]
        if not mine or not isinstance(error, PluginError) or isinstance(error, LoadError):
            return error
        shown, grant = mine[-1]
        where = plugin_line(error.traceback or "", os.path.dirname(self.plugin))
        more = f" (and {len(mine) - 1} more)" if len(mine) > 1 else ""
        error.denied = (f"{shown}{more}" + (f"; to grant it: {grant}" if grant else "")
                        + (f"; the exception was raised at {where}" if where else ""))
        error.args = (f"{error.args[0] if error.args else ''} [a syscall was denied in this call: {error.denied}]",)
        return error

    def _disown(self, owner: int):
        """After fork, in the child: the parent's worker is the parent's. Forget its descriptors
        and resources without closing, killing or removing anything; every call is WorkerClosed."""
        self._pidfd = None
        self._sp = None
        self._fds = {}
        self._listener = None
        if self._core is not None:
            self._core.disown(owner)

    def _warn_unclosed(self):
        """From __del__: a worker dropped without close() is killed, with a warning, and the rest
        of its release is handed on (`_release_elsewhere`). The collector runs __del__ in whatever
        thread allocates, possibly inside a section holding the hub's lock or the uid registry's,
        and at interpreter exit, when a daemon thread stopped mid-section holds one for ever: so
        nothing here takes a lock that is not this worker's own."""
        core = self._core
        if core is None or core.state is lc._ENDED:
            return
        # (no source=self: a recorded warning would keep the worker alive)
        warnings.warn(f"worker {self.name} (pid {self.pid}) was never closed; killing it", ResourceWarning,
                      stacklevel=1)
        self._send_kill()
        if sys.is_finalizing():
            return  # the process is ending: the kernel frees its descriptors and claim locks
        self._release_elsewhere()

    def _release_elsewhere(self) -> None:
        """(__del__) Unwatch and release this dropped worker where that is safe: the driver's
        own thread of control (the hub, the event loop), never the collector's."""
        raise NotImplementedError

    # ---- hooks of the drivers ----------------------------------------------------------------------
    def _on_reply(self, out):
        pass

    def _on_deliver(self, out):
        raise NotImplementedError

    def _on_killed(self):
        raise NotImplementedError

    def _on_ready(self):
        pass

    def _on_close_input(self):
        raise NotImplementedError

    def _on_ended(self, death):
        pass

    def _unwatch_handoff(self, fd):
        raise NotImplementedError

    def _watch_listener(self, fd):
        raise NotImplementedError

    def _unwatch_all(self):
        raise NotImplementedError

    def _on_event_callback(self, event: str, callback):
        if event not in self._callbacks:
            raise ValueError(f"unknown event {event!r} (message, exit, log, denied)")
        self._callbacks[event].append(callback)

    def _listen(self, event: str, callback):
        """The library's own listener (a pool's): run where the event is seen; it must only
        record and hand over. Here the same as a callback (the event loop's driver runs every
        callback in line); the thread driver keeps them apart from users' callbacks."""
        self._on_event_callback(event, callback)

    def _run_callbacks(self, event: str, arg) -> None:
        """The callbacks of one "denied", "exit" or "log" event; here in line (the event loop's
        driver). The thread driver hands them to a thread of their own instead."""
        for cb in list(self._callbacks[event]):
            try:
                cb(arg)
            except Exception:
                log.exception("%s callback of worker %s failed", event, self.name)

    # ---- plugin output ----------------------------------------------------------------------
    def _read_log(self, fd) -> bool:
        """One read of the log pipe; False at its end (stop watching it)."""
        try:
            data = _read(fd, 65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            return False
        self._take_log(data)
        return True

    def _drain_log(self):
        fd = self._fds.get("log")
        try:
            while fd is not None:
                data = os.read(fd, 65536)
                if not data:
                    break
                self._take_log(data)
        except OSError:
            pass

    def _take_log(self, data: bytes):
        """Split into lines, cap each and the total, keep the last ones, tell the listeners."""
        if self._log_bytes >= LOG_BUDGET:
            self.log_dropped += len(data)
            return
        self._log_bytes += len(data)
        lines = (self._log_partial + data).split(b"\n")
        self._log_partial = lines.pop()[:LOG_LINE_MAX]
        for raw in lines:
            line = raw[:LOG_LINE_MAX].decode("utf-8", "replace")
            self.logs.append(line)
            log.debug("[%s] %s", self.name, line)
            self._run_callbacks("log", line)


_FRAME = re.compile(r'  File "([^"\n]{1,4096})", line (\d{1,9})')


def plugin_line(traceback: str, folder: str) -> str | None:
    """'worker.py:12': the last frame of a plugin traceback that lies in the plugin's folder."""
    last = None
    for m in _FRAME.finditer(traceback[-65536:]):
        path = m.group(1)
        if path.startswith(folder.rstrip("/") + "/"):
            last = f"{path[len(folder.rstrip('/')) + 1:]}:{m.group(2)}"
    return last


def _describe(n, listener: int):
    """The decoded view of a notification (names, flags, the path), or None if decoding fails:
    words for the report only, so a decoding bug never changes what happens to the worker."""
    from . import decode
    try:
        read_path, read_memory = decode.readers(n.pid, listener, n.id)
        return decode.describe(n.name, n.args, pid=n.pid, read_path=read_path, read_memory=read_memory)
    except Exception:  # noqa: BLE001 - see above
        log.debug("could not decode %s", n.name, exc_info=True)
        return None
