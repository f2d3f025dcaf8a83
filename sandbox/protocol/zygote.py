"""What host, zygote and worker agree on for one spawn: the descriptors, the spawn request and
its reply, the status record, and the plan frame (the first bytes on the worker's input).

The zygote learns only what it needs to fork and reap: the descriptors, the worker's uid and
whether it may start processes (to kill its leftovers). The plan goes from the host to the
worker over the worker's own pipe, so the zygote and its spare never hold one.
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

MAX_REQUEST = 4096  # a spawn request is a few bytes; anything bigger is refused unread
MAX_REPLY = 4096


class SpawnRequest(NamedTuple):
    uid: int | None  # root mode: the worker's own uid (the zygote kills its leftovers by it)
    may_fork: bool   # the worker may start processes: the zygote reaps and kills what it leaves


def encode_request(req: SpawnRequest) -> bytes:
    return msgpack.packb([req.uid, req.may_fork])


def decode_request(data) -> SpawnRequest:
    """Raises ValueError for anything but [uid or None, bool]."""
    obj = msgpack.unpackb(data, raw=False, max_array_len=2, max_map_len=0, max_str_len=0, max_bin_len=0)
    if type(obj) is not list or len(obj) != 2:
        raise ValueError("a spawn request is [uid, may_fork]")
    uid, may_fork = obj
    if not (uid is None or (type(uid) is int and 0 < uid < 2**32 - 1)) or type(may_fork) is not bool:
        raise ValueError("a spawn request is [uid (a positive int) or None, may_fork (a bool)]")
    return SpawnRequest(uid, may_fork)


def encode_reply(pid: int | None = None, error: str | None = None) -> bytes:
    return msgpack.packb({"pid": pid} if error is None else {"error": error})


def decode_reply(data: bytes) -> tuple[int | None, str | None]:
    """(pid, None) or (None, the zygote's reason)."""
    try:
        obj = msgpack.unpackb(data, raw=False, max_map_len=2, max_array_len=0, max_str_len=MAX_REPLY)
    except Exception:  # noqa: BLE001 - the zygote is ours; an unreadable reply is still just an error
        return None, f"an unreadable reply ({len(data)} bytes)"
    if type(obj) is dict and type(obj.get("pid")) is int and obj["pid"] > 0:
        return obj["pid"], None
    if type(obj) is dict and type(obj.get("error")) is str:
        return None, obj["error"]
    return None, f"an unexpected reply: {obj!r}"[:200]


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
