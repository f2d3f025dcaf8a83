"""Inside the worker: read the plan, confine, load the plugin's folder as a package, then answer
frames until the host hangs up.

Everything here runs in the forked child. Imports are done in the zygote, before fork, so that
nothing is imported after the filter is on except what the plugin itself asks for.

Order in the child: the plan (the first frame on the worker's input, from the host: the zygote
never has it); the process title; worker.py read with no more rights than the worker will have
and without following a symlink; the confinement steps; then the plugin's first line.
"""
import _thread
import builtins
import ctypes
import errno
import gc
import importlib.machinery
import operator
import os
import stat
import sys
import traceback
import types
from typing import Any, Callable

import msgpack
import prctl

from .. import protocol
from ..protocol import codec, framing, plan as plan_wire, zygote as spawn_wire
from ..protocol.zygote import FROM_HOST, HANDOFF, TO_HOST
from . import steps as confine, syscalls as _sys

MAX_SOURCE = 8 * 1024 * 1024
MAX_TEXT = 64 * 1024  # error message and traceback, each
EXPORT_MARK = "__sandbox_export__"  # set by sandbox.plugin.export
_writer = None
_header = framing.HEADER.pack
_write = os.write
_MAGIC, _VERSION, _LARGE, _HEADER_SIZE = framing.MAGIC, framing.VERSION, framing.LARGE, framing.HEADER_SIZE

# ---- what the serve loop needs, held before the plugin can change it ---------------------------
# A plugin may replace builtins (say `builtins.len`) or sys.modules entries; the code that reads
# frames, encodes replies and reports errors must keep working. Modules are held here by
# reference (never looked up in sys.modules again), and the builtins the serve loop uses are
# checked whenever plugin code has run (at each reply, event and message): if the plugin changed
# one, the originals are put back while the library works and the plugin's are restored before
# its code runs again, so the plugin still sees its own changes.
_BUILTINS = builtins.__dict__
_ORIGINAL = dict(_BUILTINS)
_callable, _isinstance, _type, _str, _len, _sorted = callable, isinstance, type, str, len, sorted
_getattr, _frozenset, _list, _tuple = getattr, frozenset, list, tuple
_BaseException, _AttributeError = BaseException, AttributeError


def _names_used(*functions) -> tuple[str, ...]:
    """Builtins these functions (and the code nested in them) look up: the ones the serve loop
    runs on every frame. Error paths swap all builtins back instead (_OwnBuiltins)."""
    seen: set[str] = set()
    for fn in functions:
        stack, own_globals = [fn.__code__], fn.__globals__
        while stack:
            code = stack.pop()
            seen.update(n for n in code.co_names if n in _ORIGINAL and n not in own_globals)
            stack += [c for c in code.co_consts if _isinstance(c, types.CodeType)]
    return tuple(sorted(seen))


_WATCHED: tuple[str, ...] = ()
_current: Callable[[dict], Any] = operator.itemgetter("len")  # the watched builtins, once _WATCHED is known
_expected: tuple = ()


def _builtins_changed() -> bool:
    try:
        changed = _current(_BUILTINS) != _expected
    except Exception:  # noqa: BLE001 - a watched builtin was deleted
        changed = True
    _seen[0] = changed
    return changed


# What the last check found. Every reply is sent after the plugin's code for that call has
# run, and checks; no plugin code runs between a reply and the next read (an on_message
# handler checks again after it), so the serve loop reads this instead of checking twice.
_seen = [False]


class _OwnBuiltins:
    """While the library works: the builtins as they were before the plugin loaded (a no-op
    unless the plugin changed one). Comparing every builtin touches each one's refcount, a
    write to pages every worker would otherwise share: only error paths do (`every=True`);
    the others check the builtins the serve loop uses."""
    __slots__ = ("_theirs", "_every")

    def __init__(self, every: bool = False):
        self._every = every

    def __enter__(self):
        self._theirs = None
        if (_BUILTINS != _ORIGINAL) if self._every else _builtins_changed():
            self._theirs = dict(_BUILTINS)
            _BUILTINS.clear()
            _BUILTINS.update(_ORIGINAL)

    def __exit__(self, *exc):
        if self._theirs is not None:
            _BUILTINS.clear()
            _BUILTINS.update(self._theirs)
            self._theirs = None
        return False


def _cap(text: str) -> str:
    return text if _len(text) <= MAX_TEXT else text[:MAX_TEXT] + f"... [{_len(text) - MAX_TEXT} characters cut]"


def _describe(exc: BaseException) -> dict:
    with _OwnBuiltins(every=True):
        try:
            message = _str(exc)
        except _BaseException:  # noqa: BLE001
            message = "<unprintable exception>"
        try:
            tb = "".join(traceback.format_exception(_type(exc), exc, exc.__traceback__))
        except _BaseException:  # noqa: BLE001 - a plugin broke traceback's own imports
            tb = ""
        return {"type": _type(exc).__name__, "message": _cap(message), "traceback": _cap(tb)}


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
        self.answered = False  # a reply (or error) to a call went out

    def send(self, ftype: int, call_id: int, obj) -> None:
        if _builtins_changed():
            with _OwnBuiltins():
                return self._send(ftype, call_id, obj)
        return self._send(ftype, call_id, obj)

    def _send(self, ftype: int, call_id: int, obj) -> None:
        with self._lock:
            try:
                payload = self._encode(obj)
            except protocol.NotPlainData as e:
                ftype, payload = self._refusal(ftype, "TypeError", f"value is not plain data: {e}")
            size = _len(payload)
            if size > self.max_frame:
                ftype, payload = self._refusal(
                    ftype, "ValueError", f"value of {size} bytes exceeds max_message_bytes ({self.max_frame})")
                size = _len(payload)
            header = _header(_MAGIC, _VERSION, ftype, size, call_id)
            if size < _LARGE:
                data = header + payload
                n = _write(self.fd, data)
                if n < size + _HEADER_SIZE:  # a pipe smaller than we asked for
                    self._write_all(memoryview(data)[n:])
            else:  # large: no copy into one buffer; the host drains the pipe as we go
                try:
                    self._write_all(memoryview(header), memoryview(payload))
                finally:
                    payload = None
                    self._encoder.release()

    def _refusal(self, ftype, etype, message):
        """A reply that can't be sent becomes an ERROR frame saying why; a post() that can't
        raises in the plugin (an ERROR frame would answer no call: the host would take it for
        a breach of the protocol)."""
        if ftype != framing.RESULT:
            raise (protocol.NotPlainData if etype == "TypeError" else ValueError)(message)
        return framing.ERROR, self._encode({"type": etype, "message": message, "traceback": ""})

    def _write_all(self, *views):
        for view in views:
            while view:
                view = view[_write(self.fd, view):]


# ---- the child's entry ----------------------------------------------------------------------
def child_main(fds: list[int], zygote_pid: int, ruleset: int | None = None) -> None:
    """Entry from the zygote's fork (or a spare): `fds` are the worker's own, in SpawnFds order
    (from_host, to_host, handoff, log); `ruleset`, the host's Landlock ruleset for the plan's
    paths, if it sent one. Never returns."""
    global _writer
    code = 70
    try:
        try:
            plan = plan_wire.decode(spawn_wire.read_plan_frame(fds[0]))
        except Exception as e:  # noqa: BLE001 - reported as the step it is, on the handoff socket
            raise confine.StepFailed("read_plan", e) from None
        _set_title(plan.title)
        source, problem = _read_source(plan)
        state = {"fds": fds, "ruleset": ruleset, "zygote_pid": zygote_pid}
        confine.apply(plan, state)
        _writer = Writer(TO_HOST, plan.max_frame)
        if problem is not None:  # reported now, confined, like any other load error
            _writer.send(framing.LOADERR, 0, problem)
            os._exit(71)
        gc.enable()
        module = _load(plan, source)
        if module is None:
            os._exit(71)
        exports = _exports(module)
        _writer.send(framing.READY, 0, {"pid": os.getpid(), "exports": _sorted(exports)})
        _serve(module, exports, plan.max_frame)
        code = 0
    except confine.StepFailed as e:
        if isinstance(e.error, confine.PreloadFailed):  # a load error naming the module, not a layer
            _report_early(framing.LOADERR, _describe(e.error))
            os._exit(code)
        _report_confinement(e, fds[2])
    except BaseException as e:  # noqa: BLE001 - the child must never fall back into zygote code
        _report_early(framing.LOADERR, _describe(e))
    os._exit(code)


def _report_confinement(e: "confine.StepFailed", original_handoff: int) -> None:
    """On the handoff socket, which the plugin never gets: only this channel makes a
    ConfinementError in the host. Before the first step the socket still has its inherited
    number; after it, the fixed one."""
    frame = b"F" + msgpack.packb({"message": _cap(_str(e))[:16000], "layer": e.step})
    for fd in ((original_handoff,) if e.step in ("read_plan", "arrange_fds") else ()) + (HANDOFF, original_handoff):
        try:
            if os.write(fd, frame) == _len(frame):
                return
        except OSError:
            continue


def _report_early(ftype, obj):
    try:
        w = _writer or Writer(TO_HOST, 1 << 20)
        w.send(ftype, 0, obj)
    except Exception:
        pass


def _set_title(title: str) -> None:
    """`ps` and `top` name the plugin and its policy instead of the zygote's command line: the
    thread name (15 bytes) and, like setproctitle, the argument area the kernel shows as
    /proc/<pid>/cmdline, overwritten in place (it is this process's own copy of the stack)."""
    try:
        prctl.set_name(title[:15])
        start, end = _ARGS
        size = end - start
        if size < 2:
            return
        text = title.encode()[:size - 2] + b"\0"
        # the last byte not NUL: the kernel then reads up to our NUL, not the whole old area
        ctypes.memmove(start, text + b" " * (size - _len(text)), size)
    except Exception:  # noqa: BLE001 - a name is a convenience, never a reason not to start
        pass


def _argument_area() -> tuple[int, int]:
    """arg_start and arg_end (fields 48 and 49 of /proc/self/stat), read once in the zygote:
    every child it forks has the same addresses."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[45]), int(fields[46])
    except (OSError, ValueError, IndexError):
        return 0, 0


_ARGS = _argument_area()


# ---- reading worker.py: no symlink, a regular file, the worker's own rights --------------------
SYS_openat2 = 437
RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x02, 0x04, 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _open_beneath(dir_fd: int, name: str, flags: int) -> int:
    """Open one component below dir_fd, never through a symlink (openat2; O_NOFOLLOW where
    the kernel lacks it, which for a single component is the same guarantee)."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
    fd = _sys.libc.syscall(SYS_openat2, dir_fd, name.encode(), ctypes.byref(how), ctypes.sizeof(how))
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    if err != errno.ENOSYS:
        raise OSError(err, os.strerror(err))
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


class _WorkerRights:
    """Root mode: file opens checked as the worker's uid and gid with no groups (setfsuid drops
    the file capabilities too), so the privileged child reads nothing the worker couldn't."""

    def __init__(self, uid: int | None, gid: int | None):
        self.ids = (uid, gid) if uid is not None and os.geteuid() == 0 else None

    def __enter__(self):
        if self.ids is not None:
            uid, gid = self.ids
            if os.getgroups():
                os.setgroups([])  # the worker has none: they must not widen this read either
            _sys.libc.setfsgid(gid)
            _sys.libc.setfsuid(uid)
            if _sys.libc.setfsuid(uid) != uid or _sys.libc.setfsgid(gid) != gid:  # returns the current one
                raise OSError(errno.EPERM, "could not take the worker's file rights")

    def __exit__(self, *exc):
        if self.ids is not None:
            _sys.libc.setfsuid(0)
            _sys.libc.setfsgid(0)
        return False


def _read_source(plan) -> tuple[bytes | None, dict | None]:
    """(source, None), or (None, a load error naming only the plugin's own file). Read before
    confinement (seccomp may not allow openat2) but with the worker's rights: the plugin's
    folder is opened without following its last component, worker.py below it the same way."""
    path = plan.plugin
    try:
        with _WorkerRights(plan.uid, plan.gid):
            return read_plugin_file(path)
    except OSError as e:
        return None, _problem(type(e).__name__, _why_not(e, path))


def read_plugin_file(path: str) -> tuple[bytes | None, dict | None]:
    """The file's bytes, opened as described above; OSError when it can't be opened."""
    folder, name = os.path.split(path)
    parent, folder_name = os.path.split(folder)
    fds: list[int] = []
    try:
        # Up to the plugin's folder, the path is the operator's; the folder and what is in it
        # are the plugin's, and a link there could point anywhere.
        fds.append(os.open(parent or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        if folder_name:
            fds.append(_open_beneath(fds[-1], folder_name, os.O_PATH | os.O_DIRECTORY))
        fds.append(_open_beneath(fds[-1], name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY))
        st = os.fstat(fds[-1])
        if not stat.S_ISREG(st.st_mode):
            return None, _problem("OSError", f"{path} is not a regular file")
        if st.st_size > MAX_SOURCE:
            return None, _problem("OSError", f"{path} is larger than {MAX_SOURCE} bytes")
        data = os.read(fds[-1], MAX_SOURCE + 1)
        while _len(data) <= MAX_SOURCE:
            more = os.read(fds[-1], MAX_SOURCE + 1 - _len(data))
            if not more:
                break
            data += more
    finally:
        for fd in fds:
            os.close(fd)
    if _len(data) > MAX_SOURCE:
        return None, _problem("OSError", f"{path} is larger than {MAX_SOURCE} bytes")
    return data, None


def _why_not(e: OSError, path: str) -> str:
    if e.errno in (errno.ELOOP, errno.EXDEV) or (e.errno == errno.ENOTDIR and os.path.islink(os.path.dirname(path))):
        return f"{path}: refused to follow a symbolic link (the plugin's folder and worker.py must be real)"
    if e.errno == errno.EACCES:
        return f"{path}: the worker's uid may not read it (plugin files must be readable by the worker)"
    return f"{path}: {e.strerror or e}"


def _problem(etype: str, message: str) -> dict:
    return {"type": etype, "message": message, "traceback": ""}


# ---- loading: the plugin's folder as a package of its own ----------------------------------------
def _load(plan, source):
    """worker.py runs as a package named privately after the plugin, whose __path__ is its own
    folder: `from . import helper` finds helper.py there, while the folder never goes on
    sys.path, so a json.py beside worker.py shadows nothing."""
    name = f"_sandbox_plugin_{plan.module_name}"
    folder = os.path.dirname(plan.plugin)
    spec = importlib.machinery.ModuleSpec(name, None, origin=plan.plugin, is_package=True)
    spec.submodule_search_locations = [folder]
    spec.has_location = True
    module = types.ModuleType(name)
    module.__spec__ = spec
    module.__file__ = plan.plugin
    module.__path__ = [folder]
    module.__package__ = name
    sys.modules[name] = module
    try:
        code = compile(source, plan.plugin, "exec")
        exec(code, module.__dict__)
    except BaseException as e:  # noqa: BLE001
        _writer.send(framing.LOADERR, 0, _describe(e))
        return None
    return module


def export(fn):
    """Decorator for plugins: mark a function callable from the host (see _exports)."""
    try:
        setattr(fn, EXPORT_MARK, True)
    except (AttributeError, TypeError):
        raise TypeError("sandbox.plugin.export marks functions only") from None
    return fn


def _exports(module) -> frozenset:
    """What the host may call: `__all__` if the plugin defines it; else the functions it marked
    with @export, if it marked any; else every public function. Decided once, at load."""
    namespace = module.__dict__
    public = [(k, v) for k, v in namespace.items()
              if _type(k) is _str and k[:1] != "_" and _callable(v) and not _isinstance(v, _type)]
    declared = namespace.get("__all__")
    if declared is not None:
        if not _isinstance(declared, (_list, _tuple)):
            return _frozenset()
        return _frozenset(k for k in declared if _type(k) is _str and _callable(namespace.get(k))
                          and not _isinstance(namespace.get(k), _type))
    marked = [k for k, v in public if _getattr(v, EXPORT_MARK, False) is True]
    if marked:
        return _frozenset(marked)
    # what `from sandbox.plugin import ...` brings in is not the plugin's
    return _frozenset(k for k, v in public if k != "on_message" and v is not post and v is not export)


# ---- the serve loop ---------------------------------------------------------------------------
def _serve(module, exports: frozenset, max_frame: int) -> None:
    decoder = framing.FrameDecoder(max_frame, allowed_types=framing.HOST_TYPES, reuse=True)  # decoded at once
    limits = protocol.Limits(max_bytes=max_frame, max_depth=None)  # the host is the trusted side
    # the loop every call goes through: names bound locally, not looked up per frame
    payload_view, read_size, feed, advance = decoder.payload_view, decoder.read_size, decoder.feed, decoder.advance
    loads, read, readv, CALL, FLOOR = _loads, _read, _readv, framing.CALL, framing.LARGE
    unpack_header, HEADER_SIZE = framing.HEADER.unpack_from, framing.HEADER_SIZE
    MAGIC, VERSION = framing.MAGIC, framing.VERSION
    seen, own, answer = _seen, _OwnBuiltins, _answer_call
    functions = module.__dict__
    _builtins_changed()  # loading ran plugin code
    # What loading freed goes back to the kernel (a smaller idle worker), once the first call is
    # answered: malloc_trim walks the whole heap (~0.15 ms), which no start should wait for.
    untrimmed, writer = True, _writer
    assert writer is not None  # child_main made it before loading the plugin
    while True:
        if untrimmed and writer.answered:
            untrimmed = False
            _sys.libc.malloc_trim(0)
        if seen[0]:  # the plugin replaced a builtin this code uses: read with the originals
            with own():
                frames = _read_decoded(decoder, limits)
            if frames is None:
                return
            for ftype, call_id, obj in frames:
                _dispatch(module, functions, exports, ftype, call_id, obj)
            continue
        if decoder._head is None and not decoder._hbuf:  # between frames: the usual read
            data = read(FROM_HOST, FLOOR)  # (what read_size() asks for there)
            if not data:
                return
            size = _len(data)
            if size > HEADER_SIZE:  # exactly one whole call? (framing.single_frame's checks, in line)
                magic, version, ftype, length, call_id = unpack_header(data, 0)
                if ftype == CALL and size == HEADER_SIZE + length and magic == MAGIC and version == VERSION \
                        and length <= max_frame:
                    answer(functions, exports, call_id, loads(data[HEADER_SIZE:], limits))
                    continue
            frames = feed(data)
        else:
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
                frames = feed(data)
        for ftype, call_id, payload in frames:
            obj = loads(payload, limits)
            _dispatch(module, functions, exports, ftype, call_id, obj)


def _read_decoded(decoder, limits) -> list | None:
    """One read's frames, decoded (None at EOF): the plain path, for when speed is not the point."""
    view = decoder.payload_view()
    if view is not None:
        n = _readv(FROM_HOST, [view])
        del view
        if not n:
            return None
        frames = decoder.advance(n)
    else:
        data = _read(FROM_HOST, decoder.read_size())
        if not data:
            return None
        frames = decoder.feed(data)
    return [(ftype, call_id, _loads(payload, limits)) for ftype, call_id, payload in frames]


def _dispatch(module, functions, exports, ftype, call_id, obj):
    if ftype == framing.CALL:
        _answer_call(functions, exports, call_id, obj)
    elif ftype == framing.POST:
        _deliver(module, obj)


def _answer_call(functions, exports, call_id, obj):
    try:
        name, args, kwargs = obj
        fn = functions.get(name) if name in exports else None
        if fn is None or not _callable(fn):
            raise _AttributeError(f"plugin has no public function {name!r} (it exports: "
                                  f"{', '.join(_sorted(exports)) or 'nothing'})")
        result = fn(*args, **kwargs)
    except _BaseException as e:  # noqa: BLE001 - SystemExit and friends are reported, not obeyed
        _writer.send(framing.ERROR, call_id, _describe(e))
        _writer.answered = True
        return
    _writer.send(framing.RESULT, call_id, result)
    _writer.answered = True


def _deliver(module, obj):
    handler = module.__dict__.get("on_message")
    if not _callable(handler):
        return
    try:
        handler(obj)
    except Exception:
        with _OwnBuiltins(every=True):
            traceback.print_exc()
    _builtins_changed()


def post(obj) -> None:
    if _writer is None:
        raise RuntimeError("sandbox.plugin.post() works only inside a sandboxed worker")
    _writer.send(framing.EVENT, 0, obj)


_loads, _read, _readv = codec.loads, os.read, os.readv
_WATCHED = _names_used(
    _serve, _dispatch, _answer_call, Writer.send, Writer._send, Writer._write_all, post,
    codec.loads, codec.check_depth, codec._check_keys, codec.Encoder.encode, codec.Encoder.encode_call,
    codec.Encoder._packed_quick, codec.Encoder._packed, codec.Encoder.release, framing.single_frame,
    *(f for f in vars(framing.FrameDecoder).values() if _isinstance(f, types.FunctionType)))
_current = operator.itemgetter(*_WATCHED)
_expected = _current(_BUILTINS)
