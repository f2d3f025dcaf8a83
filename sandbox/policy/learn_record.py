"""What one learning run saw: every notification decoded, classified, and answered.

`Recorder.on_syscall(notification, listener_fd)` returns the verdict ("continue", or ("deny",
errno) for what no policy should grant) and keeps what the proposal needs. Every verdict is
decided on the syscall's registers only; what is read from the task's memory (paths, addresses)
is recorded for people to read, never used to decide.
"""
from __future__ import annotations

import errno as errno_mod
import os
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .._host import decode
from .._host.lifecycle import Notification
from .dangerous import DANGEROUS

if TYPE_CHECKING:
    from . import Policy

MAX_NOTIFICATIONS = 2_000_000  # a plugin looping on syscalls: stop learning, kill it
MAX_DISTINCT = 20_000       # recorded entries kept (the rest only counted)
OPEN_CALLS = frozenset({"open", "openat", "creat"})
WRITE_PATH_CALLS = frozenset({"mkdir", "mkdirat", "unlink", "unlinkat", "rmdir", "rename", "renameat",
                              "renameat2", "link", "linkat", "symlink", "symlinkat", "truncate"})
# Argument index of a pid each of these aims at; others than the worker's own are refused.
PID_TARGET = {"kill": 0, "tkill": 0, "tgkill": 1, "rt_sigqueueinfo": 0, "rt_tgsigqueueinfo": 0,
              "prlimit64": 0, "sched_setaffinity": 0, "sched_setparam": 0, "sched_setscheduler": 0,
              "sched_setattr": 0, "migrate_pages": 0, "move_pages": 0, "get_robust_list": 0,
              "setpriority": 1, "ioprio_set": 1, "process_madvise": None, "pidfd_send_signal": None}
PROCESS_CALLS = frozenset({"fork", "vfork", "execve", "execveat"})
NEVER = frozenset({"seccomp"})  # a plugin must never install filters of its own
O_PATH = 0x200000


def _eval(cond: str, args) -> bool:
    m = re.match(r"^\s*arg([0-5])\s*&\s*(\S+)\s*==\s*(\S+)\s*$", cond)
    if m:
        return args[int(m[1])] & int(m[2], 0) == int(m[3], 0)
    m = re.match(r"^\s*arg([0-5])\s*(==|!=|<=|>=|<|>)\s*(\S+)\s*$", cond)
    if not m:
        return False
    a, b = args[int(m[1])], int(m[3], 0) & decode.U64
    return {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[m[2]]


def _beneath(path: str, roots) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


@dataclass
class Seen:
    """One thing a grant is made for: the first call that needed it, how often it happened."""
    why: str
    call: str
    count: int = 1


@dataclass
class Recorder:
    base: Policy
    plugin: str
    view_read: list[str]
    view_write: list[str]
    worker_pid: int | None = None
    scratch: str | None = None
    current: str = "load"
    total: int = 0
    syscalls: dict = field(default_factory=dict)     # name -> Seen (not granted by the base)
    ioctls: dict = field(default_factory=dict)       # request -> Seen
    refused: dict = field(default_factory=dict)      # text -> Seen (denied during learning)
    dangerous: dict = field(default_factory=dict)    # name -> Seen
    reads: dict = field(default_factory=dict)        # path -> Seen (opened outside the view)
    looked: dict = field(default_factory=dict)       # path -> Seen (stat'ed outside the view)
    writes_scratch: dict = field(default_factory=dict)
    writes_outside: dict = field(default_factory=dict)
    writes_inside: dict = field(default_factory=dict)  # into the policy's own writable paths
    writes_unknown: dict = field(default_factory=dict)  # a write whose path could not be read
    largest_file: int = 0                            # bytes, seen in the scratch dir between calls
    families: dict = field(default_factory=dict)     # "inet" -> Seen
    destinations: dict = field(default_factory=dict)  # "AF_INET:1.2.3.4:80" -> Seen
    benign: dict = field(default_factory=dict)       # note -> Seen
    threads: int = 0                                 # most extra threads at once
    thread_seen: Seen | None = None
    processes: int = 0
    process_seen: Seen | None = None
    modules: dict = field(default_factory=dict)      # top-level module -> Seen (files opened)
    own_files: set = field(default_factory=set)      # the plugin's own .py files that were loaded
    unreadable_paths: int = 0
    dropped: int = 0

    def __post_init__(self) -> None:
        sec = self.base.explain()["seccomp"]
        self._allow = set(sec["allow"])
        self._rules: dict[str, list[list[str]]] = {}
        for r in sec["rules"]:
            self._rules.setdefault(r["syscall"], []).append(r["when"])
        self._network = bool(self.base.network.allow)
        self._roots = _module_roots(self.plugin)

    # -- the verdict for one notification --------------------------------------------------------
    def granted(self, name: str, args) -> bool:
        if name in self._allow:
            return True
        return any(all(_eval(c, args) for c in when) for when in self._rules.get(name, ()))

    def on_syscall(self, n: Notification, listener_fd: int | None):
        self.total += 1
        if self.total > MAX_NOTIFICATIONS:
            return "kill"
        name, args = n.name, tuple(n.args) + (0,) * (6 - len(n.args))
        cache: dict = {}

        def read_path(addr):
            if addr not in cache:
                cache[addr] = decode.read_string(n.pid, addr, listener_fd, n.id) if listener_fd is not None else None
            return cache[addr]

        def read_memory(addr, size):
            return decode.read_memory(n.pid, addr, size, listener_fd, n.id) if listener_fd is not None else None

        report = decode.describe(name, args, pid=n.pid, read_path=read_path, read_memory=read_memory)
        granted = self.granted(name, args)
        if name in decode.PATH_SYSCALLS:
            self._paths(n, name, args, report, read_path, listener_fd)
        if report.benign_note:
            self._note(self.benign, report.benign_note, report)
        if granted:
            if name == "clone" and args[0] & decode.CLONE_THREAD:
                self._count_thread(n, report)
            elif name in ("connect", "bind") and report.path and report.benign_note is None:
                self._note(self.destinations, report.path, report)  # the policy's network: where to
            return "continue"
        return self._ungranted(n, name, args, report, read_memory)

    def _ungranted(self, n, name, args, report, read_memory):
        deny_perm = ("deny", errno_mod.EPERM)
        if name in DANGEROUS or name in NEVER:
            self._note(self.dangerous, name, report)
            return deny_perm
        if name == "clone":
            if args[0] & decode.CLONE_NEW_NAMESPACES:
                self._note(self.refused, f"clone with new namespaces ({decode.clone_flags(args[0])})", report)
                return deny_perm
            if args[0] & decode.CLONE_THREAD:
                self._count_thread(n, report)
                return "continue"
            self._count_process(report)
            return "continue"
        if name in PROCESS_CALLS:
            if name in ("fork", "vfork"):
                self._count_process(report)
            else:
                self._note(self.syscalls, name, report)
                self.process_seen = self.process_seen or Seen(str(report), self.current)
            return "continue"
        if name == "socket":
            fam = decode.POLICY_FAMILY.get(args[0] & 0xFFFFFFFF)
            if fam is None:
                self._note(self.refused, f"socket family {decode.socket_family(args[0])}", report)
                return ("deny", errno_mod.EAFNOSUPPORT)
            if report.benign_note is None:
                self._note(self.families, fam, report)
            return "continue"
        addressed = name in ("connect", "bind") or (name == "sendto" and args[4] != 0)
        if addressed or name in ("sendmsg", "sendmmsg"):
            # Decided on registers only: memory the task can change after we read it never decides.
            dest = report.path if name in ("connect", "bind") else None
            if name == "sendto":
                dest = decode.sockaddr_text(read_memory(args[4], min(args[5], 128)))
            if dest and report.benign_note is None:
                self._note(self.destinations, dest, report)
            if not self._network:
                # no network in the policy: nothing leaves, not even to the host's unix sockets;
                # sendmsg's destination lives in memory, so it is refused whatever it says
                if name in ("sendmsg", "sendmmsg"):
                    self._note(self.refused, f"{name} without network (its address is in memory)", report)
                unix = (dest or "").startswith("AF_UNIX")
                return ("deny", errno_mod.ECONNREFUSED if unix else errno_mod.ENETUNREACH)
            self._note(self.syscalls, name, report)
            return "continue"
        if name == "ioctl":
            req = args[1] & 0xFFFFFFFF
            label = decode.IOCTLS.get(req, "")
            if label in decode.IOCTL_NEVER or args[1] != req:
                self._note(self.refused, f"ioctl {decode.ioctl_name(args[1])}", report)
                return ("deny", errno_mod.ENOTTY)
            self._note(self.ioctls, req, report)
            return "continue"
        if name in PID_TARGET:
            idx = PID_TARGET[name]
            if idx is None or not self._own(n, args[idx]) or (name in ("setpriority", "ioprio_set") and args[0] != 1):
                self._note(self.refused, f"{name} aimed at another process", report)
                return deny_perm
        if name in OPEN_CALLS or name in WRITE_PATH_CALLS:
            return "continue"  # the path decides the grant (scratch or writable), Landlock the outcome
        self._note(self.syscalls, name, report)
        return "continue"

    # -- helpers ------------------------------------------------------------------------------
    def _note(self, table: dict, key, report) -> None:
        seen = table.get(key)
        if seen is not None:
            seen.count += 1
        elif sum(map(len, (self.syscalls, self.reads, self.looked, self.refused))) < MAX_DISTINCT:
            table[key] = Seen(str(report), self.current)
        else:
            self.dropped += 1

    def _own(self, n: Notification, target: int) -> bool:
        """Is `target` (a pid argument) the worker, or a thread or process of its own making?"""
        target = decode._signed(target, 32)
        if target == 0:
            return True
        pid = abs(target)  # negative: a process group; the worker made a session of its own
        for _ in range(32):
            if pid == self.worker_pid:
                return True
            status = _status(pid)
            if status is None:
                return False
            tgid, ppid = status
            if tgid == self.worker_pid:
                return True
            if ppid <= 1 or ppid == pid:
                return False
            pid = ppid
        return False

    def _count_thread(self, n: Notification, report) -> None:
        tgid = (_status(n.pid) or (n.pid, 0))[0]
        try:
            now = len(os.listdir(f"/proc/{tgid}/task"))  # the caller's group, before this thread
        except OSError:
            now = self.threads + 1
        if now >= self.threads:
            self.threads = now
        self.thread_seen = self.thread_seen or Seen(str(report), self.current)

    def _count_process(self, report) -> None:
        self.processes += 1
        self.process_seen = self.process_seen or Seen(str(report), self.current)

    def _paths(self, n, name, args, report, read_path, listener_fd) -> None:
        sig = decode.SIGNATURES[name]
        flags = args[2] if name == "openat" else args[1]
        write = (name in WRITE_PATH_CALLS or name == "creat" or
                 (name in OPEN_CALLS and decode.is_write_open(flags)))
        o_path = name in ("open", "openat") and bool(flags & O_PATH)  # no read right needed
        for i, kind in enumerate(sig):
            if kind != "path" or not args[i]:
                continue
            raw = read_path(args[i])
            if raw is None:
                self.unreadable_paths += 1
                if write:  # it could only have landed in the scratch dir or the policy's writable paths
                    self._note(self.writes_unknown, "unknown", report)
                continue
            if raw == "":
                continue  # AT_EMPTY_PATH: the fd itself
            dirfd = args[i - 1] if i > 0 and sig[i - 1] == "dirfd" else decode.AT_FDCWD & decode.U64
            path = _absolute(n.pid, raw, dirfd, listener_fd, n.id)
            if path is None:
                self.unreadable_paths += 1
                continue
            if name in ("symlink", "symlinkat") and i == 0:
                continue  # a symlink's target is text, not a path it opens
            self._record_path(name, path, write, report, o_path)

    def _record_path(self, name: str, path: str, write: bool, report, o_path: bool = False) -> None:
        scratch = [self.scratch] if self.scratch else []
        if name in OPEN_CALLS and not write:
            self._module(path)
        if _beneath(path, scratch):
            if write:
                self._note(self.writes_scratch, "scratch", report)
            return
        if write:
            if _beneath(path, self.view_write):
                self._note(self.writes_inside, "writable", report)
            else:
                self._note(self.writes_outside, path, report)
            return
        views = self.view_read + self.view_write
        if _beneath(path, views) or _beneath(os.path.realpath(path), views):
            return  # realpath only here: outside every place the worker can write (no planted links)
        opens = (name in OPEN_CALLS and not o_path) or name in ("execve", "execveat", "chdir")
        self._note(self.reads if opens else self.looked, path, report)

    def _module(self, path: str) -> None:
        if _beneath(path, [os.path.dirname(self.plugin)]):
            if len(self.own_files) < 200:  # the plugin's own modules: read for their imports, never preloaded
                source = _source_of(path)
                if source:
                    self.own_files.add(source)
            return
        top = _module_of(path, self._roots)
        if top and top not in self.modules:
            self.modules[top] = Seen(path, self.current)


def _status(pid: int, default=None):
    """(tgid, ppid) of a task, from /proc (None when it is gone)."""
    try:
        with open(f"/proc/{int(pid)}/status") as f:
            text = f.read(4096)
    except (OSError, ValueError):
        return default
    tgid = re.search(r"^Tgid:\s*(\d+)", text, re.M)
    ppid = re.search(r"^PPid:\s*(\d+)", text, re.M)
    return (int(tgid[1]), int(ppid[1])) if tgid and ppid else default


def _absolute(pid: int, raw: str, dirfd: int, listener_fd, notif_id: int) -> str | None:
    """An absolute, normalised path for what the task named (relative to its cwd or dirfd)."""
    if raw.startswith("/"):
        return os.path.normpath(raw)
    fd = decode._signed(dirfd, 32)
    link = f"/proc/{int(pid)}/cwd" if fd == decode.AT_FDCWD else f"/proc/{int(pid)}/fd/{fd}"
    try:
        where = os.readlink(link)
    except OSError:
        return None
    if listener_fd is not None and not decode.notification_valid(listener_fd, notif_id):
        return None
    if not where.startswith("/"):
        return None  # "pipe:[...]", "anon_inode:..." : not a directory
    return os.path.normpath(os.path.join(where, raw))


_EXT = re.compile(r"(\.cpython-[^.]*|\.abi3)?\.(py|pyc|so)$")


def _module_roots(plugin: str) -> list[str]:
    roots = set()
    paths = sysconfig.get_paths()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        if paths.get(key):
            roots.add(os.path.realpath(paths[key]))
    for p in sys.path:
        if p and os.path.isdir(p) and not _beneath(os.path.realpath(p), [os.path.dirname(plugin)]):
            roots.add(os.path.realpath(p))
    for r in list(roots):
        dyn = os.path.join(r, "lib-dynload")
        if os.path.isdir(dyn):
            roots.add(dyn)
    return sorted(roots, key=len, reverse=True)


def _module_of(path: str, roots) -> str | None:
    """The top-level module a file belongs to (stdlib or installed), or None."""
    if not _EXT.search(path):
        return None
    real = os.path.realpath(path)
    for root in roots:
        if _beneath(real, [root]):
            rel = os.path.relpath(real, root).split(os.sep)
            rel = [p for p in rel if p != "__pycache__"]
            top = _EXT.sub("", rel[0]) if len(rel) == 1 else rel[0]
            if top.isidentifier() and top not in ("sandbox", "site", "sitecustomize", "encodings"):
                return top
            return None
    return None


def _source_of(path: str) -> str | None:
    if path.endswith(".py"):
        return path
    if path.endswith(".pyc"):
        import importlib.util
        try:
            return importlib.util.source_from_cache(path)
        except ValueError:
            return None
    return None


def largest_file(folder: str | None, budget: int = 10_000) -> int:
    """Size of the largest file under `folder` (the worker's scratch dir), walked by descriptor
    with O_NOFOLLOW: a symlink the worker planted is never followed."""
    if not folder:
        return 0
    try:
        top = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return 0
    biggest, stack = 0, [top]
    while stack:
        fd = stack.pop()
        try:
            for entry in os.scandir(fd):
                budget -= 1
                if budget < 0:
                    break
                try:
                    st = os.stat(entry.name, dir_fd=fd, follow_symlinks=False)
                    if st.st_mode & 0o170000 == 0o040000 and len(stack) < 64:
                        stack.append(os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                             dir_fd=fd))
                    elif st.st_mode & 0o170000 == 0o100000:
                        biggest = max(biggest, st.st_size)
                except OSError:
                    pass
        except OSError:
            pass
        finally:
            os.close(fd)
    for fd in stack:
        os.close(fd)
    return biggest
