"""Inside the worker: confine, load worker.py by path, then answer frames until the host hangs up.

Everything here runs in the forked child. Imports are done in the zygote, before fork, so that
nothing is imported after the filter is on except what the plugin itself asks for.
"""
import _thread
import gc
import os
import sys
import traceback
import types

from .. import protocol
from ..protocol import framing
from . import steps as confine, syscalls as _sys
from .steps import FROM_HOST, TO_HOST

MAX_SOURCE = 8 * 1024 * 1024
MAX_TEXT = 64 * 1024  # error message and traceback, each
_writer = None
_header = framing.HEADER.pack
_write = os.write


def _cap(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f"... [{len(text) - MAX_TEXT} characters cut]"


def _describe(exc: BaseException) -> dict:
    try:
        message = str(exc)
    except Exception:
        message = "<unprintable exception>"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"type": type(exc).__name__, "message": _cap(message), "traceback": _cap(tb)}


class Writer:
    """Blocking frame writer on the child->host pipe (the host always drains it).

    One frame at a time: a plugin's threads may post() while the main thread replies, and
    interleaved frames would be a protocol violation the plugin did not commit."""

    def __init__(self, fd: int, max_frame: int):
        self.fd = fd
        self.max_frame = max_frame
        self._encoder = protocol.Encoder()
        self._encode = self._encoder.encode
        self._lock = _thread.allocate_lock()  # _thread, not threading: the zygote stays lean

    def send(self, ftype: int, call_id: int, obj) -> None:
        with self._lock:
            try:
                payload = self._encode(obj)
            except protocol.NotPlainData as e:
                ftype, payload = self._refusal(ftype, "TypeError", f"value is not plain data: {e}")
            size = len(payload)
            if size > self.max_frame:
                ftype, payload = self._refusal(
                    ftype, "ValueError", f"value of {size} bytes exceeds max_message_bytes ({self.max_frame})")
                size = len(payload)
            header = _header(framing.MAGIC, framing.VERSION, ftype, size, call_id)
            if size < framing.LARGE:
                data = header + payload
                n = _write(self.fd, data)
                if n < len(data):  # a pipe smaller than we asked for
                    self._write_all(memoryview(data)[n:])
            else:  # large: no copy into one buffer; the host drains the pipe as we go
                try:
                    self._write_all(memoryview(header), memoryview(payload))
                finally:
                    payload = None
                    self._encoder.release()

    def _refusal(self, ftype, etype, message):
        """A reply or event that can't be sent becomes an ERROR frame saying why."""
        if ftype not in (framing.RESULT, framing.EVENT):
            raise ValueError(message)
        return framing.ERROR, self._encode({"type": etype, "message": message, "traceback": ""})

    def _write_all(self, *views):
        for view in views:
            while view:
                view = view[_write(self.fd, view):]


def child_main(plan: dict, fds: list, ruleset: int | None = None) -> None:
    """Entry from the zygote's fork; never returns."""
    global _writer
    code = 70
    try:
        state = {"fds": fds, "ruleset": ruleset}
        source = _read_source(plan["plugin"])
        confine.apply(plan, state)
        _writer = Writer(TO_HOST, plan["max_frame"])
        gc.enable()
        module = _load(plan, source)
        if module is None:
            os._exit(71)
        _sys.libc.malloc_trim(0)  # what loading freed goes back to the kernel: a smaller idle worker
        _writer.send(framing.READY, 0, {"pid": os.getpid()})
        _serve(module, plan["max_frame"])
        code = 0
    except confine.StepFailed as e:
        if isinstance(e.error, confine.PreloadFailed):  # a load error naming the module, not a layer
            _report_early(framing.LOADERR, _describe(e.error))
            os._exit(code)
        tb = "".join(traceback.format_exception(type(e.error), e.error, e.error.__traceback__))
        _report_early(framing.LOADERR, {"type": "ConfinementError", "message": str(e), "traceback": _cap(tb),
                                        "layer": e.step})
    except BaseException as e:  # noqa: BLE001 - the child must never fall back into zygote code
        _report_early(framing.LOADERR, _describe(e))
    os._exit(code)


def _read_source(path: str) -> bytes:
    # Read while still privileged: the plugin's folder need not be readable by the worker's uid.
    # Read here, not cached in the zygote: then no worker inherits another plugin's code.
    with open(path, "rb") as f:
        data = f.read(MAX_SOURCE + 1)
    if len(data) > MAX_SOURCE:
        raise ValueError(f"{path} is larger than {MAX_SOURCE} bytes")
    return data


def _report_early(ftype, obj):
    try:
        w = _writer or Writer(TO_HOST, 1 << 20)
        w.send(ftype, 0, obj)
    except Exception:
        pass


def _load(plan, source):
    """Run worker.py as a module named after the plugin, never via sys.path."""
    name = plan["module_name"]
    module = types.ModuleType(name)
    module.__file__ = plan["plugin"]
    sys.modules[name] = module
    try:
        code = compile(source, plan["plugin"], "exec")
        exec(code, module.__dict__)
    except BaseException as e:  # noqa: BLE001
        _writer.send(framing.LOADERR, 0, _describe(e))
        return None
    return module


def _serve(module, max_frame: int) -> None:
    decoder = framing.FrameDecoder(max_frame, allowed_types=framing.HOST_TYPES, reuse=True)  # decoded at once
    limits = protocol.Limits(max_bytes=max_frame, max_depth=None)  # the host is the trusted side
    # the loop every call goes through: names bound locally, not looked up per frame
    payload_view, read_size, feed, advance = decoder.payload_view, decoder.read_size, decoder.feed, decoder.advance
    loads, read, readv, CALL, POST = protocol.loads, os.read, os.readv, framing.CALL, framing.POST
    at_boundary, single_frame, HEADER_SIZE = decoder.at_boundary, framing.single_frame, framing.HEADER_SIZE
    functions = module.__dict__
    while True:
        view = payload_view()
        if view is not None:  # a large payload: read straight into its buffer
            n = readv(FROM_HOST, [view])
            del view
            if not n:
                return
            frames = advance(n)
        else:
            data = read(FROM_HOST, read_size())
            if not data:
                return
            one = single_frame(data, max_frame) if at_boundary() else None
            if one is not None and one[0] == CALL:  # the usual read: one whole call
                _answer_call(functions, one[1], loads(data[HEADER_SIZE:], limits))
                continue
            frames = feed(data)
        for ftype, call_id, payload in frames:
            obj = loads(payload, limits)
            if ftype == CALL:
                _answer_call(functions, call_id, obj)
            elif ftype == POST:
                _deliver(module, obj)


def _answer_call(functions, call_id, obj):
    try:
        name, args, kwargs = obj
        fn = functions.get(name) if type(name) is str and name[:1] != "_" else None
        if not callable(fn) or isinstance(fn, type):
            raise AttributeError(f"plugin has no public function {name!r}")
        result = fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - SystemExit and friends are reported, not obeyed
        _writer.send(framing.ERROR, call_id, _describe(e))
        return
    _writer.send(framing.RESULT, call_id, result)


def _deliver(module, obj):
    handler = module.__dict__.get("on_message")
    if not callable(handler):
        return
    try:
        handler(obj)
    except Exception:
        traceback.print_exc()


def post(obj) -> None:
    if _writer is None:
        raise RuntimeError("sandbox.plugin.post() works only inside a sandboxed worker")
    _writer.send(framing.EVENT, 0, obj)
