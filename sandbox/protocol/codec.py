"""Plain-data payloads in msgpack, decoded under explicit budgets.

msgpack's defaults would let a 5-byte array header preallocate ~800 MB; every max_*_len is
therefore set from the frame size and an item budget, and the decoded tree is walked once to
enforce the nesting depth. Nothing here ever builds an object the peer chose: no pickle, no ext types.
"""
import gc
import threading
from collections.abc import Iterable
from typing import Any

import msgpack

from ..errors import NotPlainData, ProtocolViolation
from .framing import KEEP_MAX, LARGE  # a LARGE payload is handed out as a view, not copied out


# What either side decodes at most (Limits' defaults); the encoder refuses what would pass them,
# so a value the other side would take for a protocol breach is never sent.
MAX_DEPTH = 64
MAX_ITEMS = 1_000_000
MAX_OBJECTS = 1_000_000


class Limits:
    """Decoding budgets. (A plain class: dataclasses would pull inspect into the zygote.)

    `max_depth=None` skips the nesting walk: only for frames from the trusted side (the worker
    decoding its host's calls), where it would protect nothing."""

    __slots__ = ("max_bytes", "max_items", "max_depth", "max_objects")

    def __init__(self, max_bytes: int = 16 * 1024 * 1024, max_items: int = MAX_ITEMS,
                 max_depth: int | None = MAX_DEPTH, max_objects: int = MAX_OBJECTS):
        self.max_bytes = max_bytes
        self.max_items = max_items  # elements of any one array or map
        self.max_depth = max_depth
        # objects of one whole message (every container and element, counted while decoding):
        # 3 bytes of msgpack can become a 50-byte Python object, so bytes alone don't bound the cost
        self.max_objects = max_objects


DEFAULT_LIMITS = Limits()


def _refuse(obj):
    raise NotPlainData(f"{type(obj).__name__} is not plain data (None, bool, int, float, str, bytes, list, dict)")


_CONTAINERS = (list, tuple, dict)


_SMALL = LARGE // 2  # str/bytes below this can't make a payload LARGE, whatever the int sizes


def _new_packer():
    return msgpack.Packer(use_bin_type=True, default=_refuse, strict_types=False, autoreset=False)


class Encoder:
    """A reusable packer: building one per message costs more than packing a small one, and a
    large message is packed into the same kept buffer each time instead of fresh pages.

    A small payload comes back as bytes. A large one comes back as a view of the packer's
    buffer, valid until `release()` (or the next encode): write it, then release it.
    Not thread-safe: each Session and Writer owns one and uses it under its own lock, because
    a packer shared between threads could mix one message's bytes into another's."""

    __slots__ = ("_packer", "_view", "_quick")

    def __init__(self):
        self._packer = _new_packer()
        self._view = None
        # values known to be small go through a plain packer: one C call, no buffer juggling
        self._quick = msgpack.Packer(use_bin_type=True, default=_refuse, strict_types=False).pack

    def encode(self, obj):
        """Plain data to bytes; anything else raises NotPlainData (tuples travel as lists)."""
        t = type(obj)
        if (t is bytes or t is str) and len(obj) < _SMALL or t is int or t is float or obj is None or t is bool:
            try:  # (what _packed_quick does, in line: this is every reply's path)
                return self._quick(obj)
            except NotPlainData:
                raise
            except (TypeError, ValueError, OverflowError) as e:
                raise NotPlainData(str(e)) from None
        if isinstance(obj, _CONTAINERS):
            _check_keys(obj)
        return self._packed(obj)

    def encode_call(self, name: str, args: tuple, kwargs: dict):
        """[name, args, kwargs] without walking the parts Python already guarantees (a str name,
        str keyword names): only container arguments are walked. An argument may nest as deep
        as a reply may (its echo must be able to come back); the object count is the message's."""
        size = len(name)
        count = len(args) + len(kwargs)
        if len(args) > MAX_ITEMS or len(kwargs) > MAX_ITEMS:
            raise NotPlainData(f"a call of {count} arguments is over the {MAX_ITEMS}-item cap")
        left = 2 * MAX_OBJECTS - (6 + count)  # the frame's own three containers
        for a in args:
            t = type(a)
            if t is bytes or t is str:
                size += len(a)
            elif t is not int and t is not float and a is not None and t is not bool and isinstance(a, _CONTAINERS):
                left = _check_keys(a, left)
                size = LARGE
        if kwargs:
            for k, a in kwargs.items():
                if type(k) is not str:  # invoke(kwargs=...) takes any dict
                    raise NotPlainData(f"keyword argument name {k!r} is not a str")
                size += len(k)
                t = type(a)
                if t is bytes or t is str:
                    size += len(a)
                elif isinstance(a, _CONTAINERS):
                    left = _check_keys(a, left)
                    size = LARGE
        if size < _SMALL and count < 64:
            try:  # (what _packed_quick does, in line: this is every call's path)
                return self._quick([name, args, kwargs])
            except NotPlainData:
                raise
            except (TypeError, ValueError, OverflowError) as e:
                raise NotPlainData(str(e)) from None
        return self._packed([name, args, kwargs])

    def _packed_quick(self, obj) -> bytes:
        try:
            return self._quick(obj)  # autoreset: a failed pack leaves nothing behind
        except NotPlainData:
            raise
        except (TypeError, ValueError, OverflowError) as e:
            raise NotPlainData(str(e)) from None

    def _packed(self, obj):
        if self._view is not None:
            self.release()
        packer = self._packer
        try:
            packer.pack(obj)
        except BufferError:  # someone still holds a view of the last large payload: start afresh
            packer = self._packer = _new_packer()
            return self._packed(obj)
        except NotPlainData:
            packer.reset()
            raise
        except (TypeError, ValueError, OverflowError) as e:
            packer.reset()
            raise NotPlainData(str(e)) from None
        view = packer.getbuffer()
        if len(view) < LARGE:
            data = view.tobytes()
            view.release()
            packer.reset()
            return data
        self._view = view
        return view

    def release(self) -> None:
        """The last large payload was written: its buffer is free for the next one."""
        view, self._view = self._view, None
        if view is None:
            return
        size = len(view)
        try:
            view.release()
            self._packer.reset()
        except BufferError:
            # a slice of it is still alive (a traceback's frame can hold one): leave that buffer
            # to it and pack the next message elsewhere
            self._packer = _new_packer()
            return
        if size > KEEP_MAX:
            self._packer = _new_packer()  # don't keep a 16 MiB buffer for the next 16 bytes


def dumps(obj) -> bytes:
    """Encode plain data; anything else raises NotPlainData (tuples travel as lists)."""
    if isinstance(obj, _CONTAINERS):
        _check_keys(obj)
    try:
        return msgpack.packb(obj, use_bin_type=True, default=_refuse, strict_types=False)
    except NotPlainData:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise NotPlainData(str(e)) from None


def loads(data: bytes, limits: Limits = DEFAULT_LIMITS, counted: bool = False):
    """Decode one payload; any problem is a ProtocolViolation.

    `counted`: count objects through Python-level hooks even when the size alone bounds them;
    the decode then lets other threads run between containers (an event loop, while this runs
    in an executor), where msgpack's C decoder would hold the GIL from start to end."""
    size = len(data)
    if size > limits.max_bytes:
        raise ProtocolViolation(f"payload of {size} bytes exceeds the {limits.max_bytes}-byte cap")
    if counted or size > limits.max_objects:
        # Only a payload longer than the budget can hold more objects than it: count them as
        # each container completes, so a flood of tiny maps is refused part-way, not after.
        return _loads_counted(data, limits, counted)
    items = limits.max_items
    try:
        obj = _unpackb(
            data, raw=False, strict_map_key=True,  # lists, no timestamps: the defaults
            max_str_len=size, max_bin_len=size, max_ext_len=0, ext_hook=_no_ext,
            max_array_len=size if size < items else items, max_map_len=size // 2 if size // 2 < items else items,
        )
    except Exception as e:  # msgpack raises many types (ValueError, StackError, ExtraData, ...)
        raise ProtocolViolation(f"undecodable payload: {type(e).__name__}: {e}") from None
    if (type(obj) is list or type(obj) is dict) and limits.max_depth is not None:
        check_depth(obj, limits.max_depth)
    return obj


def _loads_counted(data, limits: Limits, pause_gc: bool):
    size, items = len(data), limits.max_items
    if pause_gc:
        _gc_pause()
    try:
        obj = _unpackb(
            data, raw=False, strict_map_key=True, max_str_len=size, max_bin_len=size, max_ext_len=0,
            ext_hook=_no_ext, max_array_len=size if size < items else items,
            max_map_len=size // 2 if size // 2 < items else items, **_budget_hooks(limits.max_objects),
        )
        if (type(obj) is list or type(obj) is dict) and limits.max_depth is not None:
            check_depth(obj, limits.max_depth)
    except ProtocolViolation:
        raise
    except Exception as e:  # msgpack raises many types (ValueError, StackError, ExtraData, ...)
        raise ProtocolViolation(f"undecodable payload: {type(e).__name__}: {e}") from None
    finally:
        if pause_gc:
            _gc_resume()
    return obj


# A decode that builds a million objects would trigger full collections that traverse them all,
# each holding the GIL (and so any event loop) for tens of ms: the cyclic GC waits meanwhile
# (what it would find is acyclic by construction). Counted, so overlapping decodes nest.
_gc_lock = threading.Lock()
_gc_paused = [0, False]


def _gc_pause() -> None:
    with _gc_lock:
        if _gc_paused[0] == 0:
            _gc_paused[1] = gc.isenabled()
            gc.disable()
        _gc_paused[0] += 1


def _gc_resume() -> None:
    with _gc_lock:
        _gc_paused[0] -= 1
        if _gc_paused[0] == 0 and _gc_paused[1]:
            gc.enable()


_unpackb = msgpack.unpackb


def _budget_hooks(budget: int) -> dict:
    """list_hook/object_hook that stop the decode past `budget` objects. Each completed container
    adds 1 + its length: every object is counted once as an element and a container once more
    as itself, so the count lies between the objects built and twice that. Refusing past twice
    the budget therefore never refuses a message within it, and a flood of empty containers
    is stopped part-way (each counts as it completes)."""
    left = [2 * budget]

    def count(node):
        left[0] -= 1 + len(node)
        if left[0] < 0:
            raise ProtocolViolation(f"payload holds more than {budget} objects")
        return node
    return {"list_hook": count, "object_hook": count}


def _check_keys(obj, left: int = 2 * MAX_OBJECTS) -> int:
    """Refuse, before anything is sent, what the other side's decoder would take for a breach of
    the protocol: a map key that is not a str, nesting past MAX_DEPTH, a container of more than
    MAX_ITEMS, more than MAX_OBJECTS objects (counted as `loads` counts them: each container as
    1 + its length, against twice the budget). A cycle is refused as too deep. `left`: what is
    left of that count (the parts of one message are checked in turn); returns the rest.
    Level by level and without recursion, in one function: the worker watches the builtins
    this function uses."""
    level = [obj]
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise NotPlainData(f"value nested deeper than {MAX_DEPTH} levels (the most either side decodes)")
        deeper: list = []
        for node in level:
            n = len(node)
            if n > MAX_ITEMS:
                raise NotPlainData(f"a {type(node).__name__} of {n} items is over the {MAX_ITEMS}-item cap")
            left -= 1 + n
            if left < 0:
                raise NotPlainData(f"value holds more than {MAX_OBJECTS} objects (the most either side decodes)")
            if isinstance(node, dict):
                for k in node:
                    if type(k) is not str:
                        raise NotPlainData(f"map key {k!r} is not a str")
                node = node.values()
            for x in node:
                if isinstance(x, _CONTAINERS):
                    deeper.append(x)
        level = deeper
    return left


def _no_ext(code, data):
    raise ProtocolViolation(f"msgpack extension type {code} is not allowed")


def check_depth(obj, max_depth: int) -> None:
    """Iterative walk (no recursion a hostile tree could exhaust): depth, and str map keys.
    Level by level, so a level of a million leaves costs one pass, not a million stack pushes."""
    if type(obj) is not list and type(obj) is not dict:
        return
    level, depth = [obj], 1
    while level:
        if depth > max_depth:
            raise ProtocolViolation(f"payload nested deeper than {max_depth} levels")
        deeper: list = []
        push = deeper.append
        for node in level:
            children: Iterable[Any] = node
            if type(node) is dict:
                for k in node:
                    if type(k) is not str:
                        raise ProtocolViolation("map keys must be strings")
                children = node.values()
            for x in children:
                if type(x) is list or type(x) is dict:
                    push(x)
        level, depth = deeper, depth + 1
