"""What a pool learns about its workers from the kernel, never from the worker (host side).

Whether a worker's process has ended (its pidfd), how much CPU it has used (/proc/<pid>/stat),
and, after a fork, which descriptors of this process are still a parent's worker pipes.
"""
from __future__ import annotations

import os
import select
import stat

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def exited(w, pollers: dict) -> bool:
    """The worker's process has ended (its pidfd is readable), or its handle already says so."""
    if not w.alive:
        return True
    p = pollers.get(w)
    if p is None:
        pidfd = getattr(w, "_pidfd", None)
        if pidfd is None:
            return False
        p = pollers[w] = select.poll()
        p.register(pidfd, select.POLLIN)
    try:
        return bool(p.poll(0))
    except OSError:
        return False


def cpu_seconds(pid: int | None) -> float | None:
    """Lifetime CPU time (user + system) of a process, from /proc/<pid>/stat; None if unknown."""
    if pid is None:
        return None
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 2048)
    except OSError:
        return None
    finally:
        os.close(fd)
    fields = data.rpartition(b")")[2].split()
    try:
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)
    except (IndexError, ValueError):
        return None


def pipe_ids(w) -> list[tuple[int, int, int]]:
    """(fd, device, inode) of the worker's pipes in this process, to recognise them after a fork."""
    out = []
    for fd in list(getattr(w, "_fds", {}).values()):
        try:
            st = os.fstat(fd)
        except (OSError, TypeError):
            continue
        if stat.S_ISFIFO(st.st_mode):
            out.append((fd, st.st_dev, st.st_ino))
    return out


def close_inherited(ids: list[tuple[int, int, int]]) -> None:
    """In a forked child: close its copies of a parent's worker pipes, so that the worker sees EOF
    when the parent closes it. Only descriptors that still are those very pipes are closed."""
    for fd, dev, ino in ids:
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if stat.S_ISFIFO(st.st_mode) and (st.st_dev, st.st_ino) == (dev, ino):
            os.close(fd)
