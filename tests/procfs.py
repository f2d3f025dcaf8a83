"""What the tests read from /proc, parsed in one place.

Every function answers for the process as it is now and treats a process that is gone (or
that this user may not look into) as absent, never as an error: tests poll these while the
processes they watch exit.
"""
from __future__ import annotations

import os
import time
from typing import Callable


def stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces and
    parentheses: the last ')' ends it). Index 0 is the state, 1 the parent pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].decode().split()
    except (OSError, IndexError):
        return None


def state(pid: int) -> str | None:
    """The state letter (R, S, D, T, Z, X, ...), or None once the process is gone."""
    fields = stat(pid)
    return fields[0] if fields else None


def parent_of(pid: int) -> int | None:
    fields = stat(pid)
    return int(fields[1]) if fields else None


def start_time(pid: int) -> str | None:
    """When the process started (clock ticks since boot): with the pid, names one process
    even after the pid is reused. None once it is gone."""
    fields = stat(pid)
    return fields[19] if fields else None


def cpu_ticks(pid: int | str) -> int:
    """utime + stime of a process or, as "self/task/<tid>", of one thread; in clock ticks."""
    fields = stat(pid)
    if fields is None:
        raise ProcessLookupError(pid)
    return int(fields[11]) + int(fields[12])


def ended(pid: int) -> bool:
    """Gone, or a zombie waiting for its parent to reap it."""
    return state(pid) in (None, "Z", "X")


def gone(pid: int) -> bool:
    """Reaped: not even a zombie is left."""
    return not os.path.exists(f"/proc/{pid}")


def _parents() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat(entry)
            if fields:
                out[int(entry)] = int(fields[1])
    return out


def children_of(pid: int) -> list[int]:
    """Every process (zombies included) whose parent chain reaches `pid`: its descendants."""
    parents = _parents()
    out = []
    for p in parents:
        q = p
        while q in parents and q not in (0, 1):
            q = parents[q]
            if q == pid:
                out.append(p)
                break
    return out


def direct_children(pid: int) -> list[int]:
    return [p for p, parent in _parents().items() if parent == pid]


def zombies_of(pid: int) -> list[int]:
    """Descendants of `pid` that died and were never reaped."""
    return [p for p in children_of(pid) if state(p) == "Z"]


def open_fds(pid: int | str = "self") -> set[int]:
    return {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}


def status(pid: int | str = "self") -> dict[str, str]:
    """/proc/<pid>/status as a dict of stripped strings ({} once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: v.strip() for k, _, v in (line.partition(":") for line in f) if _}
    except OSError:
        return {}


def task_statuses(pid: int | str = "self") -> list[dict[str, str]]:
    """status() of each thread of `pid`."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        st = status(f"{pid}/task/{tid}")
        if st:
            out.append(st)
    return out


def rss_kib(pid: int | str = "self") -> int:
    return int(status(pid).get("VmRSS", "0 kB").split()[0])


def peak_rss_kib(pid: int | str = "self") -> int:
    """VmHWM: the most resident memory the process ever had."""
    return int(status(pid)["VmHWM"].split()[0])


def cmdline(pid: int) -> bytes:
    """The raw NUL-separated command line, b"" once the process is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def wait_until(cond: Callable[[], object], timeout: float = 10.0, interval: float = 0.005) -> bool:
    """Poll `cond` until it is true or `timeout` seconds pass; the last answer decides."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return bool(cond())
        time.sleep(interval)
    return True
