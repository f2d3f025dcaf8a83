"""The lifecycle of one worker as the host sees it, without any I/O (in the style of h11).

The drivers (`sandbox.worker.Worker` with poll() and a hub thread, `sandbox.aio.AsyncWorker` with
the event loop) own the descriptors, the polling, the timers, the locks and the callback
threads. Everything they observe goes in here as an input; what it means comes back as a list
of outputs to carry out. So both drivers make the same decisions by construction.

States: STARTING -> READY <-> CALLING -> CLOSING -> ENDED (any state may go to CLOSING, and
CLOSING only to ENDED). Inputs and what they mean:

    input               STARTING             READY / CALLING             CLOSING        ENDED
    bytes (frames)      READY: TakeHandoff   MESSAGE: Deliver            as READY       ignored
                        or Ready             reply: Reply (CALLING)      (replies only
                        LOADERR: Kill        anything else: Kill(PV)      without a reason)
                        (with `offload`: a large map or array first gives Decode; decoded() goes on)
    EOF / read error    Kill (status says why, within a bounded wait)    Kill           ignored
    handoff             failure: Kill(ConfinementError); missing listener: Kill   -     ignored
    notification        kill mode: Kill(PolicyViolation); deny mode: Answer (or Kill past the budget)
    deadline passed     Kill(start timeout)  CALLING: Kill(PluginTimeout) + Reply  -    ignored
    status reaped       Ended (+ Reply of the death to a call in flight)  Ended          ignored
    status wait over    Ended with a reason saying the status never came              ignored
    close asked         CloseInput, CLOSING (the driver kills after its grace)  -       ignored
    kill asked          Kill, CLOSING                                        Kill        ignored
    begin_call          WorkerClosed         frame to write (READY only)   WorkerClosed  WorkerClosed
    encode_post         WorkerClosed         frame to write                WorkerClosed  WorkerClosed

"First reason wins": the first recorded cause of the end is the one every caller sees.
"""
from __future__ import annotations

import copy
import enum
import errno as _errno
from dataclasses import dataclass
from operator import itemgetter as _itemgetter
from typing import Callable

from . import channel, decode
from .channel import FAILURE, LOAD_FAILED, MESSAGE, READY, RESULT
from ..errors import (ConfinementError, LoadError, PluginCrashed, PluginError, PluginMemoryError,
                      PolicyViolation, ProtocolViolation, SandboxError, WorkerClosed)
from .. import protocol
from ..protocol import framing


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    CALLING = "calling"
    CLOSING = "closing"
    ENDED = "ended"


# the states as plain module constants: an Enum member lookup costs ~60 ns, and the hot path
# compares states several times per call
_STARTING, _READY, _CALLING, _CLOSING, _ENDED = (State.STARTING, State.READY, State.CALLING, State.CLOSING,
                                                 State.ENDED)


_tuple_new = tuple.__new__


# ---- outputs ------------------------------------------------------------------------------------
class Kill:
    """SIGKILL the worker through its pidfd, then wait (bounded) for its status."""
    __slots__ = ()


class TakeHandoff:
    """Read the handoff socket now and feed the result to `handoff()`."""
    __slots__ = ()


class CloseInput:
    """Close the host->worker pipe: the worker sees EOF and exits."""
    __slots__ = ()


class Ready:
    """The plugin loaded and the start is over."""
    __slots__ = ()


class Deliver:
    """A message the plugin posted (`size`: its bytes on the wire, for the buffer budget)."""
    __slots__ = ("message", "size")

    def __init__(self, message, size: int):
        self.message, self.size = message, size


class Reply(tuple):
    """The outcome of the call in flight: `error` is None and `value` the result, or the error.
    (A tuple: built in one C call on the hot path, fields read by C getters.)"""
    __slots__ = ()
    value = property(_itemgetter(0))
    error = property(_itemgetter(1))

    def __new__(cls, value, error: SandboxError | None):
        return _tuple_new(cls, (value, error))


class Answer:
    """Answer the notification (SECCOMP_IOCTL_NOTIF_SEND): fail the syscall with -`error`, or let
    it run (`flags` = SECCOMP_USER_NOTIF_FLAG_CONTINUE)."""
    __slots__ = ("notification", "error", "flags")

    def __init__(self, notification: "Notification", error: int, flags: int):
        self.notification, self.error, self.flags = notification, error, flags


class Decode:
    """Decode `frame`'s payload with `decode` off the driver's loop, then feed `decoded()`;
    read nothing more from the worker's pipe meanwhile (later frames wait, in order)."""
    __slots__ = ("frame", "decode")

    def __init__(self, frame, decode):
        self.frame, self.decode = frame, decode


class Ended:
    """The worker is gone: release everything. `death` is None after a close that was asked for."""
    __slots__ = ("death",)

    def __init__(self, death: SandboxError | None):
        self.death = death


KILL, TAKE_HANDOFF, CLOSE_INPUT, READY_OUT = Kill(), TakeHandoff(), CloseInput(), Ready()
NOTHING: list = []  # shared, never appended to: inputs that mean nothing return it
HEADER = framing.HEADER_SIZE
_RESULT, _MAGIC, _VERSION = framing.RESULT, framing.MAGIC, framing.VERSION
_unpack_header = framing.HEADER.unpack_from
_loads = protocol.loads
# msgpack's first byte of a map or an array (fix, 16 and 32 bits)
_CONTAINER_BYTES = frozenset(range(0x80, 0xA0)) | {0xDC, 0xDD, 0xDE, 0xDF}
OFFLOAD_AT = 32 * 1024  # a container payload this large is decoded off an event loop
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
DENIAL_BUDGET = 100        # denied syscalls per call (deny mode) before the worker is killed
BUFFER_BUDGET = 64 << 20   # bytes of undelivered messages a worker may have in the host at once


@dataclass(frozen=True)
class Notification:
    """One seccomp notification: a syscall the filter did not allow, as the kernel reported it."""
    id: int
    pid: int
    nr: int
    name: str
    args: tuple


class Lifecycle:
    """One worker's state and rules. Not thread-safe: the driver calls it under its own lock."""

    def __init__(self, name: str, plugin: str, *, max_frame: int, policy: str | None = None,
                 expects_listener: bool = True, seccomp_mode: str = "kill", deny_errno: int = _errno.EPERM,
                 dangerous: frozenset = frozenset(), on_syscall: Callable | None = None,
                 memory_limit: int | None = None, memory_peak: Callable[[], int | None] | None = None,
                 buffer_budget: int = BUFFER_BUDGET, denial_budget: int = DENIAL_BUDGET,
                 offload: int | None = None, cpu_limit: int | None = None):
        self.name, self.plugin, self.policy = name, plugin, policy
        self.state = _STARTING
        self.session = channel.Session(max_frame)
        self.reason: SandboxError | None = None  # the first cause of the end, once known
        self.death: SandboxError | None = None
        self.exit_status: int | None = None
        self.closing = False                      # the end was asked for (close/terminate)
        self.killed = False
        self.handoff_taken = False
        self.listener = False
        self.awaiting = False                     # a caller waits for a Reply
        self.ready_info = None                    # what the READY frame said (exports)
        self.buffered = 0                         # bytes of Deliver outputs not yet acknowledged
        self.denials: list[Notification] = []     # of the call in flight (or the last one)
        self._expects_listener = expects_listener
        self._ready_seen = False
        self._untrusted = False
        self._offload = offload                   # payload size from which Decode is asked for
        self.decoding = False                     # a Decode is out: read nothing meanwhile
        self._held: list = []                     # frames after the one being decoded
        self._deferred: list = []                 # inputs held back until the handoff is read
        self._mode, self._deny_errno, self._dangerous = seccomp_mode, deny_errno, dangerous
        self._on_syscall = on_syscall
        self._memory_limit, self._memory_peak = memory_limit, memory_peak
        self._cpu_limit = cpu_limit
        self._peak_seen = 0
        self._buffer_budget, self._denial_budget = buffer_budget, denial_budget
        # hot-path bindings
        self._decoder = self.session.decoder
        self._max = self.session.limits.max_bytes
        self._limits = self.session.limits

    # ---- what the drivers ask -------------------------------------------------------------------
    @property
    def ended(self) -> bool:
        return self.state is _ENDED

    @property
    def usable(self) -> bool:
        """READY with no reason to end recorded: a call may start."""
        return self.state is _READY and self.reason is None

    def closed_error(self) -> WorkerClosed:
        if self.death is not None and not self.closing:
            return WorkerClosed(f"worker {self.name} has ended: {self.death}")
        if self.reason is not None and not self.closing:
            return WorkerClosed(f"worker {self.name} is ending: {self.reason}")
        return WorkerClosed(f"worker {self.name} is closed")

    def ended_error(self) -> SandboxError:
        """The error for a caller whose worker just ended (closed on purpose, or died): a copy,
        so that raising it never ties a traceback (and the frames that hold the worker) to the
        error the core keeps, which would make a reference cycle."""
        kept = self.death or self.reason
        return copy.copy(kept) if kept is not None else WorkerClosed(f"worker {self.name} was closed")

    def read_size(self) -> int:
        return self._decoder.read_size()

    def payload_view(self):
        return self._decoder.payload_view()

    # ---- calls and posts --------------------------------------------------------------------------
    def begin_call(self, name: str, args, kwargs):
        """The frame of a new call; WorkerClosed unless READY."""
        if self.state is not _READY or self.reason is not None:
            raise self.closed_error()
        frame = self.session.encode_call(name, args, kwargs)
        self.state = _CALLING
        self.awaiting = True
        if self.denials:
            self.denials = []
        return frame

    def call_sent(self) -> None:
        """The call's frame is written (or dropped): its buffer may be reused."""
        self.session.sent()

    def call_over(self, sent: bool = False) -> None:
        """The caller stopped waiting (reply, error, or cancel): nothing is in flight any more
        (`sent`: and the frame is out, as call_sent says)."""
        session = self.session
        if sent and session._encoder._view is not None:  # (only a large frame holds a buffer)
            session.sent()
        session.pending_id = None
        self.awaiting = False
        if self.state is _CALLING:
            self.state = _READY

    def encode_post(self, obj):
        frame = self.session.encode_post(obj)  # encoding errors come first: the worker is fine
        if self.state not in (_READY, _CALLING) or self.reason is not None:
            raise self.closed_error()
        return frame

    def delivered(self, size: int) -> None:
        """The driver handed a Deliver's message over (to callbacks, or out of its queues)."""
        self.buffered -= size

    # ---- inputs ------------------------------------------------------------------------------------
    def receive(self, data) -> list:
        """Bytes read from the worker's pipe; b"" is EOF."""
        if not data:
            return self.eof()
        if self.state is _ENDED or self._untrusted:
            return NOTHING
        decoder = self._decoder
        size = len(data)
        if size > HEADER and decoder._head is None and not decoder._hbuf and self.state is _CALLING:
            # the usual read: exactly the awaited reply, decoded in one step (the checks of
            # framing.single_frame, in line)
            magic, version, ftype, length, call_id = _unpack_header(data, 0)
            if size == HEADER + length and ftype == _RESULT and call_id == self.session.pending_id and \
                    magic == _MAGIC and version == _VERSION and length <= self._max and \
                    (self._offload is None or size < self._offload + HEADER or
                     not self._heavy(memoryview(data)[HEADER:])):
                try:
                    obj = _loads(data[HEADER:], self._limits)
                except ProtocolViolation as e:
                    return self._protocol_violation(e)
                self.session.pending_id = None
                self.awaiting = False
                return [_tuple_new(Reply, (obj, None))]
        try:
            frames = decoder.feed(data)
        except ProtocolViolation as e:
            return self._protocol_violation(e)
        return self._on_frames(frames)

    def received_into_view(self, n: int) -> list:
        """`n` bytes were read straight into payload_view(); 0 is EOF."""
        if not n:
            return self.eof()
        if self.state is _ENDED or self._untrusted:
            return NOTHING
        try:
            frames = self._decoder.advance(n)
        except ProtocolViolation as e:
            return self._protocol_violation(e)
        return self._on_frames(frames)

    def decoded(self, frame, obj, error: ProtocolViolation | None) -> list:
        """The payload of a Decode output, decoded off the driver's thread (or what was wrong)."""
        self.decoding = False
        held, self._held = self._held, []
        if self.state is _ENDED or self._untrusted:
            return NOTHING
        if error is not None:
            return self._protocol_violation(error)
        out = self._on_frame(frame, obj)
        return out + self._on_frames(held) if held else out

    def eof(self) -> list:
        """The worker's pipe closed (or reading it failed): it is dying; its status says why."""
        if self.state is _ENDED:
            return NOTHING
        if self._needs_handoff():
            return self._defer(self.eof)
        return self._kill(None)

    def handoff(self, listener: bool, failure: ConfinementError | None) -> list:
        """What the handoff socket held: a listener (or none), or a confinement step's failure."""
        if self.handoff_taken or self.state is _ENDED:
            return NOTHING
        self.handoff_taken, self.listener = True, listener
        out: list = []
        if failure is not None:
            out += self._kill(failure)
        deferred, self._deferred = self._deferred, []
        if self._ready_seen and not deferred:
            out += self._finish_start()
        for step in deferred:
            out += step()
        return out

    def notification(self, n: Notification, report=None) -> list:
        """The seccomp listener reported a syscall the filter did not allow. `report` is the
        driver's decoded view of it (sandbox._host.decode.Report: argument names, the path
        read from the stopped task, the policy key that would grant it), for words only: the
        verdict never depends on it, since the task could change that memory."""
        if self.state is _ENDED:
            return NOTHING
        verdict = self._verdict(n)
        if verdict == "continue":
            return [Answer(n, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)]
        if isinstance(verdict, tuple):
            self.denials.append(n)
            if len(self.denials) > self._denial_budget:
                return self._kill(PolicyViolation(
                    f"plugin {self.name} made more than {self._denial_budget} denied syscalls in one call "
                    f"(last: {n.name}) [policy {self.policy}]",
                    syscall=n.name, args=n.args, plugin=self.name, policy=self.policy))
            return [Answer(n, -verdict[1], 0)]
        if report is not None:
            shown, grant = str(report), report.grant
            hint = f"; to grant it: {grant}" if grant else ""
            if report.benign_note:
                hint += f" ({report.benign_note})"
        else:
            shown = f"{n.name}({', '.join(hex(a) if a > 0xFFFF else str(a) for a in n.args)})"
            grant, hint = None, ""
        return self._kill(PolicyViolation(
            f"plugin {self.name} made a forbidden syscall: {shown} [policy {self.policy}]{hint}",
            syscall=n.name, args=n.args, plugin=self.name, policy=self.policy, grant=grant))

    def deadline_passed(self, timeout: float | None) -> list:
        """The driver's deadline for the start or the call in flight passed (a deadline exists
        only for a finite timeout, so `timeout` is a number here)."""
        assert timeout is not None, "a deadline passed without a timeout"
        if self.state is _STARTING:
            return self._kill(LoadError("TimeoutError", f"plugin {self.name} did not start within {timeout:g} s"))
        if self.awaiting:
            self.session.call_done()  # the reply to the killed call is never delivered
            self.awaiting = False
            out = self._kill(channel.timeout_error(self.name, timeout))
            return out + [Reply(None, copy.copy(self.reason))]
        return NOTHING

    def status(self, raw: int | None, unknown: SandboxError | None = None, usage=None) -> list:
        """The zygote reaped the worker: its raw wait status (None if no record came; `unknown`
        then says what is known instead, e.g. that the zygote died). `usage`: the kernel's
        figures from the reap (cpu_seconds, max_rss), which tell a death by a limit."""
        if self.state is _ENDED:
            return NOTHING
        if raw is not None and usage is not None:
            unknown = decode.limit_death(raw, usage.cpu_seconds, usage.max_rss, plugin=self.name,
                                         cpu_limit=self._cpu_limit, memory_limit=self._memory_limit)
        elif raw is not None:
            unknown = None
        if self._needs_handoff():  # a confinement failure reported there names the real cause
            return self._defer(lambda: self._end(raw, unknown))
        return self._end(raw, unknown)

    def status_wait_over(self, waited: float, known: SandboxError | None = None) -> list:
        """The worker was killed `waited` seconds ago and its status never came: end anyway
        (`known`: what is known of its zygote)."""
        if self.state is _ENDED:
            return NOTHING
        return self._end(None, known or PluginCrashed(
            f"plugin {self.name} was killed; its zygote did not report its exit within {waited:g} s"))

    def close(self) -> list:
        """Ask the worker to exit on its own (EOF on its input); the driver kills after a grace."""
        if self.state is _ENDED:
            return NOTHING
        self.closing = True
        self.state = _CLOSING
        return [CLOSE_INPUT]

    def kill(self, reason: SandboxError | None = None) -> list:
        """terminate() (reason None: an end that was asked for) or a cancelled call (reason given)."""
        if self.state is _ENDED:
            return NOTHING
        if reason is None:
            self.closing = True
        return self._kill(reason)

    def disown(self, owner: int) -> None:
        """In a forked child: this worker belongs to process `owner`; the child may not touch it."""
        self.state = _ENDED
        self.death = self.reason = WorkerClosed(
            f"worker {self.name} belongs to process {owner}; a forked child makes workers of its own")

    def memory_evidence(self) -> bool:
        """Whether the kernel's figures say the worker reached its memory limit (read while alive)."""
        if self._memory_limit is None or self._memory_peak is None:
            return False
        peak = self._memory_peak()
        if peak is None:
            return False
        # A failed allocation leaves no trace of its size: only a peak near the limit is evidence,
        # and only once per climb (the peak is the worker's lifetime figure: a plugin that once
        # came near the limit can't make each later MemoryError of its own count as the limit's).
        rose, self._peak_seen = peak > self._peak_seen, max(peak, self._peak_seen)
        return rose and peak >= decode.memory_near(self._memory_limit)

    # ---- internals ---------------------------------------------------------------------------------
    def _needs_handoff(self) -> bool:
        return self.state is _STARTING and not self.handoff_taken

    def _defer(self, step) -> list:
        # A confinement failure reported on the handoff socket must win over what the pipe says
        # about the same end (a load error, EOF): read the handoff first.
        self._deferred.append(step)
        return [TAKE_HANDOFF] if len(self._deferred) == 1 else NOTHING

    def _finish_start(self) -> list:
        if self.reason is not None or self.state is not _STARTING:
            return NOTHING
        if self._expects_listener and not self.listener:
            return self._kill(ConfinementError("the worker did not hand over its seccomp listener",
                                               layer="seccomp"))
        self.state = _READY
        return [READY_OUT]

    def _heavy(self, payload) -> bool:
        # Only containers can cost more to decode than to copy: a large bin or str is a memcpy.
        offload = self._offload
        return offload is not None and len(payload) >= offload and payload[0] in _CONTAINER_BYTES

    def _on_frames(self, frames) -> list:
        out: list = []
        decode, offload = self.session.decode, self._offload
        for i, frame in enumerate(frames):
            if offload is not None and self._heavy(frame.payload):
                # the driver decodes it off its loop; the frames after it wait for it, in order
                self.decoding, self._held = True, frames[i + 1:]
                out.append(Decode(frame, self.session.decode_yielding))
                return out
            try:
                out += self._on_event(*self.session.on_frame(frame, decode(frame.payload)))
            except ProtocolViolation as e:
                # A read that breaks the protocol is not believed in part: a reply it carried
                # before the breach answers nothing (the call gets the violation).
                kept = [o for o in out if type(o) is not Reply]
                if len(kept) != len(out):
                    self.awaiting = True
                return kept + self._protocol_violation(e)
            if self._untrusted:
                break
        return out

    def _on_frame(self, frame, obj) -> list:
        try:
            kind, value, size = self.session.on_frame(frame, obj)
        except ProtocolViolation as e:
            return self._protocol_violation(e)
        return self._on_event(kind, value, size)

    def _on_event(self, kind, value, size) -> list:
        out: list = []
        if kind is MESSAGE:
            self.buffered += size
            if self.buffered > self._buffer_budget:
                return self._protocol_violation(ProtocolViolation(
                    f"it posted more than {self._buffer_budget} bytes the host had not delivered yet"))
            out.append(Deliver(value, size))
        elif kind is RESULT or kind is FAILURE:
            if self.reason is not None:
                return out  # killed for a reason already: that reason is the call's outcome
            self.awaiting = False
            out.append(Reply(value, None) if kind is RESULT else Reply(None, self._failure(value)))
        elif kind is READY:
            if self.state is _STARTING:
                self._ready_seen = True
                self.ready_info = value
                out += self._defer(self._finish_start) if not self.handoff_taken else self._finish_start()
        elif kind is LOAD_FAILED:
            err = channel.load_error(value, self.plugin)
            if self._needs_handoff():
                out += self._defer(lambda err=err: self._kill(err))
            else:
                out += self._kill(err)
        return out

    def _failure(self, err: SandboxError) -> SandboxError:
        if isinstance(err, PluginError) and err.type == "MemoryError" and self.memory_evidence():
            e = PluginMemoryError(f"plugin {self.name} reached its memory limit ({self._memory_limit} bytes)")
            e.traceback = err.traceback
            return e
        return err

    def _protocol_violation(self, e: ProtocolViolation) -> list:
        self._untrusted = True  # nothing after a breach is read: the stream can't be trusted
        return self._kill(ProtocolViolation(f"plugin {self.name} broke the protocol: {e}"))

    def _kill(self, reason: SandboxError | None) -> list:
        if self.reason is None and reason is not None:
            self.reason = reason  # first reason wins
        if self.state is not _CLOSING:
            self.state = _CLOSING
        if self.killed:
            return NOTHING
        self.killed = True
        return [KILL]

    def _end(self, raw: int | None, fallback: SandboxError | None) -> list:
        self.exit_status = raw
        if self.reason is None and fallback is not None and not self.closing:
            self.reason = fallback
        self.death, self.reason = channel.settle_death(raw, self.reason, self.closing, self.name)
        pending, self.awaiting = self.awaiting, False
        self.session.call_done()
        self.state = _ENDED
        out: list = [Reply(None, self.ended_error())] if pending else []
        out.append(Ended(self.death))
        return out

    def _verdict(self, n: Notification):
        if self._on_syscall is not None:
            v = self._on_syscall(n)
            if v == "continue" or v == "kill":
                return v
            if isinstance(v, tuple) and len(v) == 2 and v[0] == "deny" and isinstance(v[1], int):
                return v
            return "kill"  # anything else from the hook: fail closed
        if self._mode == "deny" and n.name not in self._dangerous:
            return ("deny", self._deny_errno)
        return "kill"
