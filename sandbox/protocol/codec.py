"""Plain-data payloads in msgpack, decoded under explicit budgets.

msgpack's defaults would let a 5-byte array header preallocate ~800 MB; every max_*_len is
therefore set from the frame size and an item budget, and the decoded tree is walked once to
enforce the nesting depth. Nothing here ever builds an object the peer chose: no pickle, no ext types.
"""
import msgpack

from ..errors import ProtocolViolation


class Limits:
    """Decoding budgets. (A plain class: dataclasses would pull inspect into the zygote.)"""

    __slots__ = ("max_bytes", "max_items", "max_depth")

    def __init__(self, max_bytes: int = 16 * 1024 * 1024, max_items: int = 1_000_000, max_depth: int = 64):
        self.max_bytes = max_bytes
        self.max_items = max_items  # elements of any one array or map
        self.max_depth = max_depth


DEFAULT_LIMITS = Limits()
PLAIN_TYPES = (type(None), bool, int, float, str, bytes, list, dict)


class NotPlainData(TypeError):
    pass


def _refuse(obj):
    raise NotPlainData(f"{type(obj).__name__} is not plain data (None, bool, int, float, str, bytes, list, dict)")


def dumps(obj) -> bytes:
    """Encode plain data; anything else raises NotPlainData (tuples travel as lists)."""
    if isinstance(obj, (list, tuple, dict)):
        _check_keys(obj)
    try:
        return msgpack.packb(obj, use_bin_type=True, default=_refuse, strict_types=False)
    except NotPlainData:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise NotPlainData(str(e)) from None


def loads(data: bytes, limits: Limits = DEFAULT_LIMITS):
    """Decode one payload; any problem is a ProtocolViolation."""
    if len(data) > limits.max_bytes:
        raise ProtocolViolation(f"payload of {len(data)} bytes exceeds the {limits.max_bytes}-byte cap")
    size = len(data)
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, timestamp=0,
            max_str_len=size, max_bin_len=size,
            max_array_len=min(size, limits.max_items), max_map_len=min(size // 2, limits.max_items),
            max_ext_len=0, ext_hook=_no_ext,
        )
    except ProtocolViolation:
        raise
    except Exception as e:  # msgpack raises many types (ValueError, StackError, ExtraData, ...)
        raise ProtocolViolation(f"undecodable payload: {type(e).__name__}: {e}") from None
    check_depth(obj, limits.max_depth)
    return obj


def _check_keys(obj, budget: int = 10_000_000) -> None:
    stack = [obj]
    pop, push = stack.pop, stack.append
    while stack:
        budget -= 1
        if budget < 0:
            raise NotPlainData("value too large or cyclic")
        node = pop()
        if type(node) is dict:
            for k in node:
                if type(k) is not str:
                    raise NotPlainData(f"map key {k!r} is not a str")
            node = node.values()
        for x in node:
            if isinstance(x, (list, tuple, dict)):
                push(x)


def _no_ext(code, data):
    raise ProtocolViolation(f"msgpack extension type {code} is not allowed")


def check_depth(obj, max_depth: int) -> None:
    """Iterative walk (no recursion a hostile tree could exhaust): depth, and str map keys."""
    if type(obj) is not list and type(obj) is not dict:
        return
    stack = [(obj, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        node, depth = pop()
        if depth > max_depth:
            raise ProtocolViolation(f"payload nested deeper than {max_depth} levels")
        if type(node) is dict:
            for k in node:
                if type(k) is not str:
                    raise ProtocolViolation("map keys must be strings")
            node = node.values()
        for x in node:
            if type(x) is list or type(x) is dict:
                push((x, depth + 1))
