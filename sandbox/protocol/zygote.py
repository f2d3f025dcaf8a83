"""What host, zygote and worker agree on for one spawn: the descriptors, the spawn request and
its reply, the status record, and the plan frame (the first bytes on the worker's input).

The zygote learns only what it needs to fork and reap: the descriptors, the worker's uid and
whether it may start processes (to kill its leftovers), and the names of the modules the policy
preloads (host-installed code, never a secret: they pick the warm template the worker is forked
from, zygote/template.py). The plan goes from the host to the worker over the worker's own pipe,
so the zygote, its spare and its templates never hold one.
"""
import os
import struct
from typing import NamedTuple

import msgpack


class SpawnFds(NamedTuple):
    """The descriptors of one worker, in the order they travel host -> zygote (SCM_RIGHTS)."""
    from_host: int  # the worker's input (read end): the plan frame first, then calls
    to_host: int    # the worker's frames to the host (write end)
    handoff: int    # a socket: the seccomp listener, or the confinement step that failed
    log: int        # the worker's stdout and stderr
    status: int     # the zygote writes the reaped status here; never given to the worker


SPAWN_FD_COUNT = len(SpawnFds._fields)
WORKER_FD_COUNT = SPAWN_FD_COUNT - 1  # all but `status`, in the same order
# After them, optionally, a Landlock ruleset the host built for the worker's paths: the zygote
# relays it as a descriptor and never learns a path.
MAX_SPAWN_FDS = SPAWN_FD_COUNT + 1

# The fixed descriptor numbers inside a worker, once its first step has arranged them.
STDIN, STDOUT, STDERR, FROM_HOST, TO_HOST, HANDOFF = 0, 1, 2, 3, 4, 5

# The zygote's report when it reaps a worker: (pid, raw wait status, CPU time in microseconds
# (user + system), peak resident set in KiB), as the kernel's wait4() rusage gave them. The
# plugin can't write these: they are how the host tells a death by limits.cpu_seconds or
# limits.memory_mb from any other (the rusage counts the children the worker reaped as well).
STATUS = struct.Struct("<iiQQ")


class Reaped(NamedTuple):
    pid: int
    raw: int             # the wait status
    cpu_seconds: float   # user + system time the worker (and the children it reaped) used
    max_rss: int         # peak resident set in bytes


def encode_status(pid: int, raw: int, rusage) -> bytes:
    """The record for one reaped worker, from os.wait4()'s (pid, status, rusage)."""
    cpu_us = max(0, int((rusage.ru_utime + rusage.ru_stime) * 1_000_000))
    return STATUS.pack(pid, raw, cpu_us, max(0, int(rusage.ru_maxrss)))


def decode_status(data: bytes) -> Reaped | None:
    """The record, or None unless it is exactly one (the zygote died before writing it whole)."""
    if len(data) != STATUS.size:
        return None
    pid, raw, cpu_us, max_rss_kib = STATUS.unpack(data)
    return Reaped(pid, raw, cpu_us / 1_000_000, max_rss_kib * 1024)

# A preload set names at most MAX_PRELOAD modules of at most MAX_MODULE_NAME characters each; a
# policy with more is served without a template (its workers import after fork, as always).
MAX_PRELOAD = 64
MAX_MODULE_NAME = 128
MAX_REQUEST = 16384  # the largest preload set (64 x 128 bytes) and framing; anything bigger is refused unread
MAX_REPLY = 4096


class SpawnRequest(NamedTuple):
    uid: int | None  # root mode: the worker's own uid (the zygote kills its leftovers by it)
    may_fork: bool   # the worker may start processes: the zygote reaps and kills what it leaves
    preload: tuple[str, ...] = ()  # the warm template's key: () for none (see template_key)


def template_key(preload) -> tuple[str, ...]:
    """The preload set as a template key, or () (no template: the worker imports after fork)
    when it is empty or over the limits. Names are checked as the policy schema checks them."""
    key = tuple(preload)
    if len(key) > MAX_PRELOAD or not all(_is_module_name(n) for n in key):
        return ()
    return key


def _is_module_name(name) -> bool:
    """Dotted ASCII identifiers (without `re`, which the zygote does not otherwise import)."""
    return (type(name) is str and 0 < len(name) <= MAX_MODULE_NAME and name.isascii()
            and all(part.isidentifier() for part in name.split(".")))


def encode_request(req: SpawnRequest) -> bytes:
    if req.preload:
        return msgpack.packb([req.uid, req.may_fork, list(template_key(req.preload))])
    return msgpack.packb([req.uid, req.may_fork])


def decode_request(data) -> SpawnRequest:
    """Raises ValueError for anything but [uid or None, bool] or [uid or None, bool, [module, ...]]."""
    obj = msgpack.unpackb(data, raw=False, max_array_len=MAX_PRELOAD, max_map_len=0, max_str_len=MAX_MODULE_NAME,
                          max_bin_len=0)
    if type(obj) is not list or len(obj) not in (2, 3):
        raise ValueError("a spawn request is [uid, may_fork] or [uid, may_fork, preload]")
    uid, may_fork = obj[:2]
    if not (uid is None or (type(uid) is int and 0 < uid < 2**32 - 1)) or type(may_fork) is not bool:
        raise ValueError("a spawn request is [uid (a positive int) or None, may_fork (a bool), ...]")
    preload: tuple[str, ...] = ()
    if len(obj) == 3:
        if type(obj[2]) is not list or not obj[2] or template_key(obj[2]) != tuple(obj[2]):
            raise ValueError(f"a spawn request's preload is a non-empty list of at most {MAX_PRELOAD} module names")
        preload = tuple(obj[2])
    return SpawnRequest(uid, may_fork, preload)


# How the zygote forked a worker, in the reply's "template": from the warm template of its
# preload set, or itself ("cold": no preload, or the template is not ready yet), or itself
# because that preload set's template refused ("refused: <why>", e.g. a module left a thread).
WARM, COLD, REFUSED = "warm", "cold", "refused: "


class SpawnReply(NamedTuple):
    pid: int | None
    error: str | None
    template: str  # WARM, COLD or REFUSED + why; COLD when the zygote did not say


def encode_reply(pid: int | None = None, error: str | None = None, template: str = COLD) -> bytes:
    if error is not None:
        return msgpack.packb({"error": error})
    return msgpack.packb({"pid": pid} if template == COLD else {"pid": pid, "template": template[:1000]})


def decode_spawn_reply(data: bytes) -> SpawnReply:
    """SpawnReply(pid, None, how) or SpawnReply(None, the zygote's reason, COLD)."""
    try:
        obj = msgpack.unpackb(data, raw=False, max_map_len=3, max_array_len=0, max_str_len=MAX_REPLY)
    except Exception:  # noqa: BLE001 - the zygote is ours; an unreadable reply is still just an error
        return SpawnReply(None, f"an unreadable reply ({len(data)} bytes)", COLD)
    if type(obj) is dict and type(obj.get("pid")) is int and obj["pid"] > 0:
        how = obj.get("template", COLD)
        return SpawnReply(obj["pid"], None, how if type(how) is str else COLD)
    if type(obj) is dict and type(obj.get("error")) is str:
        return SpawnReply(None, obj["error"], COLD)
    return SpawnReply(None, f"an unexpected reply: {obj!r}"[:200], COLD)


def decode_reply(data: bytes) -> tuple[int | None, str | None]:
    """(pid, None) or (None, the zygote's reason)."""
    return decode_spawn_reply(data)[:2]


# ---- the plan frame: host -> worker, on the worker's input pipe, before any call ----------------
PLAN_MAGIC = b"SBPL"
PLAN_HEADER = struct.Struct("<4sI")  # magic, payload length
MAX_PLAN = 1 << 20  # a pipe's capacity: the host writes the whole frame at once


def plan_frame(payload: bytes) -> bytes:
    return PLAN_HEADER.pack(PLAN_MAGIC, len(payload)) + payload


def read_plan_frame(fd: int) -> bytes:
    """In the worker, before confinement: exactly one plan frame from a blocking fd, and not a
    byte more (what follows is the host's first call). Raises ValueError or EOFError."""
    magic, size = PLAN_HEADER.unpack(_read_exactly(fd, PLAN_HEADER.size))
    if magic != PLAN_MAGIC:
        raise ValueError("the first frame on the worker's input is not a plan")
    if size > MAX_PLAN:
        raise ValueError(f"a plan of {size} bytes is over {MAX_PLAN}")
    return _read_exactly(fd, size)


def _read_exactly(fd: int, n: int) -> bytes:
    parts, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            raise EOFError("the host closed the worker's input before sending its plan")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)
