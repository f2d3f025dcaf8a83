"""The paths a policy grants, opened without following a link a worker could have made.

Runs in the host (Landlock rulesets it builds and caches) and in the forked child before it
drops its privileges (its bind mounts, its own ruleset): both are privileged readers of paths
that workers may have shaped. A policy names paths; a worker gets what those names lead to
when it starts. So a symlink on the way is followed only where no worker could have put it:

- in a folder not world-writable, nor (root hosts) writable by a group that is no group account
  (a policy's gid: its workers' folders are group-writable, umask 007),
- owned by root, by the host's own user, or by an account of this machine (a worker's uid is
  never an account's: _host/uids.py), the link itself likewise,
- not at or beneath a folder a worker may write (`writable`: the policy's write grants).

Anything else is refused with `UnsafeGrant`, which names the link and why: the worker does
not start (fail closed). The operator grants the link's target instead.

`open_grant` walks the path one component at a time from "/" (O_PATH|O_NOFOLLOW), so what it
checks is what it opens: there is no window between a check and the open that a worker could
use to swap a link in.
"""
from __future__ import annotations

import ctypes
import os
import stat
from collections import deque
from collections.abc import Iterable

from . import syscalls as _sys

MAX_LINKS = 40  # as the kernel's own resolution (ELOOP past it)
_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeGrant(OSError):
    """A granted path leads through a symlink a worker could have made."""


# The host's record of every folder a worker of any policy it started may write (a worker of
# one policy may plant a link in a folder another policy only reads). The plan carries it to
# the child (Plan.worker_writable). Bounded: the oldest go first; a root host's group-writable
# worker folders are refused by their mode anyway.
MAX_KNOWN_WRITABLE = 256
_known_writable: dict[str, None] = {}


def note_writable(paths: Iterable[str]) -> tuple[str, ...]:
    """(host) Remember these write grants; every one known so far, these included."""
    for path in paths:
        _known_writable.pop(path, None)
        _known_writable[path] = None
    while len(_known_writable) > MAX_KNOWN_WRITABLE:
        _known_writable.pop(next(iter(_known_writable)))
    return tuple(_known_writable)


_accounts: dict[str, frozenset[int]] = {}


def _ids(table: str, own: set[int]) -> frozenset[int]:
    """The uids (/etc/passwd) or gids (/etc/group) of this machine's accounts, with `own`."""
    got = _accounts.get(table)
    if got is None:
        ids = set(own)
        try:
            with open(table, "rb") as f:
                for line in f:
                    fields = line.split(b":")
                    if len(fields) > 2 and fields[2].isdigit():
                        ids.add(int(fields[2]))
        except OSError:
            pass
        got = _accounts[table] = frozenset(ids)
    return got


def _account_uids() -> frozenset[int]:
    return _ids("/etc/passwd", {0, os.geteuid()})


def _account_gids() -> frozenset[int]:
    return _ids("/etc/group", {0, os.getegid()})


def _worker_gids_unknown() -> bool:
    """Whether a group-writable folder's group alone can make it a worker's: on a root host a
    worker holds only its policy's gid, which is no group account, so a folder writable by a
    group that is no account may be a worker's. An unprivileged host's workers keep the host's
    own groups, but write only where Landlock lets them, which is beneath a write grant (the
    `writable` check); there the group bits say nothing (umask 002 makes every folder g+w)."""
    return os.geteuid() == 0


def _beneath(path: str, roots: Iterable[str]) -> str | None:
    for root in roots:
        root = root.rstrip("/") or "/"
        if path == root or path.startswith(root.rstrip("/") + "/"):
            return root
    return None


def _why_untrusted(dir_fd: int, folder: str, link: os.stat_result, writable: Iterable[str]) -> str | None:
    d = os.fstat(dir_fd)
    if d.st_mode & stat.S_IWOTH:
        return "any user may write in that folder"
    if d.st_mode & stat.S_IWGRP and _worker_gids_unknown() and d.st_gid not in _account_gids():
        return f"group {d.st_gid} may write in that folder, and it is no group account (a policy's gid)"
    accounts = _account_uids()
    if d.st_uid not in accounts:
        return f"the folder belongs to uid {d.st_uid}, which is no account of this machine"
    if link.st_uid not in accounts:
        return f"the link belongs to uid {link.st_uid}, which is no account of this machine"
    root = _beneath(folder, writable)
    if root is not None:
        return f"workers may write there (write grant {root})"
    return None


def open_grant(path: str, writable: Iterable[str] = ()) -> int | None:
    """An O_PATH descriptor of what `path` (absolute) leads to, or None when nothing is there.
    Raises UnsafeGrant for a link a worker could have made, OSError(ELOOP) past MAX_LINKS."""
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path")
    writable = tuple(writable)
    parts = deque(path.split("/"))
    fd = os.open("/", _DIR)
    folder = "/"
    links = 0
    try:
        while parts:
            name = parts.popleft()
            if name in ("", "."):
                continue
            if name == "..":
                up = os.open("..", _DIR, dir_fd=fd)
                os.close(fd)
                fd, folder = up, os.path.dirname(folder) or "/"
                continue
            try:
                nxt = os.open(name, _NOFOLLOW, dir_fd=fd)
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                return None  # nothing there (or not ours to see): nothing to grant
            st = os.fstat(nxt)
            if stat.S_ISLNK(st.st_mode):
                os.close(nxt)
                here = os.path.join(folder, name)
                why = _why_untrusted(fd, folder, st, writable)
                if why is not None:
                    raise UnsafeGrant(f"{path}: not following the symlink {here} ({why}); "
                                      "grant what it points to instead")
                links += 1
                if links > MAX_LINKS:
                    raise OSError(40, f"{path}: too many levels of symbolic links")
                text = os.readlink(name, dir_fd=fd)
                if text.startswith("/"):
                    os.close(fd)
                    fd, folder = os.open("/", _DIR), "/"
                parts.extendleft(reversed(text.split("/")))
                continue
            if parts and any(p not in ("", ".") for p in parts) and not stat.S_ISDIR(st.st_mode):
                os.close(nxt)
                return None  # a file where a folder was expected
            os.close(fd)
            fd, folder = nxt, os.path.join(folder, name)
        result, fd = fd, -1
        return result
    finally:
        if fd >= 0:
            os.close(fd)


class OpenHow(ctypes.Structure):  # openat2(2)'s struct open_how
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


SYS_openat2, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_IN_ROOT = 437, 0x02, 0x04, 0x10
AT_FDCWD = -100


def open_no_links(path: str, dir_fd: int = AT_FDCWD) -> int:
    """An O_PATH descriptor of `path`, resolved through no symlink at all (ELOOP if one is there)."""
    how = OpenHow(os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    return _sys.check(_sys.libc.syscall(SYS_openat2, dir_fd, path.encode(), ctypes.byref(how), ctypes.sizeof(how)),
                      f"open {path} (following no link)")


def real_path(fd: int) -> str:
    """Where an O_PATH descriptor lies (its links resolved)."""
    return os.readlink(f"/proc/self/fd/{fd}")


__all__ = ["MAX_LINKS", "UnsafeGrant", "note_writable", "open_grant", "open_no_links", "real_path"]
