"""One worker's protocol state, without I/O: shared by the sync Worker and the AsyncWorker.

Bytes from the child go in; typed events come out. Every rule a hostile child could break
(frame caps, reply ids, frame order) is enforced here and ends in ProtocolViolation.
"""
import os
import signal

from .. import protocol
from ..errors import (LoadError, NotPlainData, PluginCrashed, PluginError, PluginTimeout, ProtocolViolation,
                      SandboxError)
from ..protocol import framing

HEADER_SIZE = framing.HEADER_SIZE
# What feed() returns, one (kind, value, payload size) per event.
READY, RESULT, FAILURE, MESSAGE, LOAD_FAILED = "ready", "result", "failure", "message", "load-failed"


def _strings(obj, keys=("type", "message", "traceback")) -> dict:
    if not isinstance(obj, dict):
        raise ProtocolViolation("error frame is not a map")
    out = {}
    for k in keys:
        v = obj.get(k, "")
        if not isinstance(v, str):
            raise ProtocolViolation(f"error frame field {k!r} is not a string")
        out[k] = v
    return out


class Session:
    def __init__(self, max_frame: int):
        self.decoder = framing.FrameDecoder(max_frame, framing.CHILD_TYPES, reuse=True)  # decoded at once
        self.limits = protocol.Limits(max_bytes=max_frame)
        self._encoder = protocol.Encoder()  # callers hold their own lock around encode_call
        self._encode_call = self._encoder.encode_call
        self.ready = False
        self.pending_id: int | None = None  # the one call in flight
        self._next_id = 0

    def encode_call(self, name: str, args, kwargs) -> bytes | tuple:
        if self.pending_id is not None:
            raise RuntimeError("a call is already in flight")
        try:
            payload = self._encode_call(name, args, kwargs)
        except NotPlainData as e:  # refused before anything is sent: the worker is fine
            raise NotPlainData(f"the arguments of {name!r} cannot cross to the worker: {e}") from None
        size = len(payload)
        if size > self.limits.max_bytes:  # the worker would take it for a breach of the protocol
            self._encoder.release()
            raise NotPlainData(f"the arguments of {name!r} are {size} bytes, over the policy's "
                               f"limits.max_message_bytes ({self.limits.max_bytes})")
        self.pending_id = call_id = self._next_id = self._next_id + 1  # only now: nothing refused
        if size < _LARGE:  # (what _frame does, in line: this is every call's path)
            return _header(_MAGIC, _VERSION, _CALL, size, call_id) + payload
        return _header(_MAGIC, _VERSION, _CALL, size, call_id), payload

    def call_done(self):
        self.pending_id = None

    def sent(self):
        """The frame from encode_call is written (or dropped): its buffer may be reused."""
        self._encoder.release()

    def encode_post(self, obj) -> bytes | tuple:
        try:
            payload = protocol.dumps(obj)
        except NotPlainData as e:
            raise NotPlainData(f"the message cannot cross to the worker: {e}") from None
        if len(payload) > self.limits.max_bytes:
            raise NotPlainData(f"the message is {len(payload)} bytes, over the policy's "
                               f"limits.max_message_bytes ({self.limits.max_bytes})")
        return _frame(framing.POST, 0, payload)

    def decode(self, payload):
        """A frame's payload, decoded under this session's budgets (thread-safe: pure)."""
        return protocol.loads(payload, self.limits)

    def decode_yielding(self, payload):
        """The same, letting other threads run while it decodes (for an executor thread)."""
        return protocol.loads(payload, self.limits, counted=True)

    def on_frame(self, frame, obj):
        """A whole frame and its decoded payload: (kind, value, payload size); ProtocolViolation
        for a frame this side may not send now."""
        payload = frame.payload
        t = frame.type
        if t == framing.RESULT or t == framing.ERROR:
            # must answer the one call in flight, by its id
            if self.pending_id is None:
                raise ProtocolViolation(f"unsolicited reply (call id {frame.call_id})")
            if frame.call_id != self.pending_id:
                raise ProtocolViolation(f"reply for call {frame.call_id} while call {self.pending_id} is in flight")
            self.pending_id = None
            if t == framing.RESULT:
                return (RESULT, obj, len(payload))
            return (FAILURE, plugin_error(_strings(obj)), len(payload))
        if t == framing.EVENT:
            return (MESSAGE, obj, len(payload))
        if t == framing.READY:
            if self.ready:
                raise ProtocolViolation("second READY frame")
            self.ready = True
            return (READY, obj, len(payload))
        # LOADERR (the decoder lets no other type through from a child)
        if self.ready:
            raise ProtocolViolation("load error after the plugin was ready")
        return (LOAD_FAILED, _strings(obj), len(payload))


def _frame(ftype, call_id, payload):
    """One buffer for a small frame; (header, payload) for a large one, which the writer hands
    to writev: copying a megabyte behind a 16-byte header costs a megabyte of fresh pages."""
    size = len(payload)
    header = _header(framing.MAGIC, framing.VERSION, ftype, size, call_id)
    return header + payload if size < framing.LARGE else (header, payload)


_header = framing.HEADER.pack
_MAGIC, _VERSION, _CALL, _LARGE = framing.MAGIC, framing.VERSION, framing.CALL, framing.LARGE


def plugin_error(d: dict) -> SandboxError:
    """What an ERROR frame says, taken as the plugin's word: a `MemoryError` stays a PluginError
    here; only the host's own evidence (lifecycle.memory_evidence) makes it a PluginMemoryError."""
    return PluginError(d["type"], d["message"], d["traceback"])


MAX_EXPORTS = 10_000


def exports_of(ready) -> tuple[str, ...]:
    """The names a READY frame says the plugin exports (the worker refuses calls to others)."""
    names = ready.get("exports") if isinstance(ready, dict) else None
    if not isinstance(names, list) or len(names) > MAX_EXPORTS:
        return ()
    return tuple(n for n in names if isinstance(n, str) and len(n) <= 1000)


def load_error(d: dict, plugin: str) -> LoadError:
    """A LOADERR frame is always a LoadError, whatever type it names: the plugin can write this
    pipe, so it never produces a ConfinementError (only the handoff socket can)."""
    return LoadError(d["type"], f"could not load {plugin}: {d['message']}", d["traceback"])


def classify_death(status: int | None, reason: SandboxError | None, plugin: str) -> SandboxError:
    """Turn what we know about a death into the one error that explains it."""
    if reason is not None:
        return reason
    if status is None:
        return PluginCrashed(f"plugin {plugin} died (status unknown)")
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        # A SIGSYS death alone is no evidence of a violation (a plugin can raise SIGSYS itself):
        # only the seccomp listener reports violations.
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return PluginCrashed(f"plugin {plugin} was killed by signal {name}", signal=sig)
    code = os.waitstatus_to_exitcode(status)
    return PluginCrashed(f"plugin {plugin} exited with code {code}", exit_code=code)


def settle_death(status, reason, closing: bool, plugin: str):
    """Once a worker is reaped: (death, reason). death is None after a close we asked for,
    else the one error that explains the end; reason keeps the first cause recorded."""
    if closing and reason is None:
        return None, None
    death = classify_death(status, reason, plugin)
    return death, reason if reason is not None else death


def timeout_error(plugin: str, timeout: float) -> PluginTimeout:
    return PluginTimeout(f"plugin {plugin} did not answer within {timeout:g} s; the worker was killed", timeout)
