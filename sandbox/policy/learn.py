"""`sandbox policy learn`: run a plugin's calls once and write the smallest policy they need.

    sandbox policy learn plugins/report/worker.py --call render '{"rows": 3}' --out report.toml

The worker is started as usual (own uid, rlimits, namespaces, Landlock, no_new_privs, seccomp),
but under a *learning* filter: every syscall the policy being extended does not grant, and
every path-taking call whether granted or not, stops in the kernel and is shown to this host
(seccomp user notification). The host decodes it, records it, and lets it through
(SECCOMP_USER_NOTIF_FLAG_CONTINUE) -- except what no policy should grant, which fails with an
errno and is recorded as refused: dangerous syscalls, signals or limits aimed at processes that
are not the worker's, connections when the policy has no network, sockets of families no policy
can name, new namespaces, TIOCSTI-like ioctls. Reads get a broad view (the whole tree, still
bounded by the worker's uid); writes stay where the policy and a scratch dir allow, and every
write attempted elsewhere is recorded (and refused by Landlock).

One run records everything; the result extends the given policy with grants in the terms an
operator writes (groups, `limits.threads`, `filesystem.read_only`, one `[[seccomp.rule]]` per
ioctl request), each commented with the call that needed it. Dangerous syscalls are never
granted: they appear as commented-out lines saying so.

Learning is for vetting a plugin on trusted inputs, never for serving untrusted traffic: it
widens the read view and lets through what the final policy may refuse.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import errno as errno_mod
import fcntl
import inspect
import json
import os
import re
import struct
import sys
import sysconfig
from dataclasses import dataclass, field

from ..errors import PolicyViolation, SandboxError, UsageError
from .._host import decode
from .dangerous import DANGEROUS

SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
_NOTIF = struct.Struct("<QII iIQ 6Q")   # struct seccomp_notif: id, pid, flags, nr, arch, ip, args[6]
_RESP = struct.Struct("<QqiI")          # struct seccomp_notif_resp: id, val, error, flags

LEARN_TASKS = 64            # threads/processes a learning run may have at once (RLIMIT_NPROC)
MAX_NOTIFICATIONS = 2_000_000  # a plugin looping on syscalls: stop learning, kill it
MAX_DISTINCT = 20_000       # recorded entries kept (the rest only counted)
LEARN_TIMEOUT = 120.0       # seconds per call and for the start: every open is a round trip

# Calls notified even when the policy allows them: their paths (and threads) are what we learn.
WATCHED = frozenset({
    "open", "openat", "openat2", "creat", "execve", "execveat", "mkdir", "mkdirat", "unlink", "unlinkat",
    "rmdir", "rename", "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat", "truncate",
    "chdir", "stat", "lstat", "newfstatat", "statx", "access", "faccessat", "faccessat2", "readlink",
    "readlinkat", "clone", "fork", "vfork", "socket", "connect", "bind",
})
STAT_CALLS = frozenset({"stat", "lstat", "newfstatat", "statx", "access", "faccessat", "faccessat2",
                        "readlink", "readlinkat"})
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
# Why common system files get read, and what to do instead of granting them.
READ_HINTS = {
    "/etc/passwd": "glibc's getpwuid (os.path.expanduser or sysconfig without HOME): "
                   "environment.set HOME avoids it",
    "/etc/nsswitch.conf": "glibc's name-service lookup (getpwuid, getaddrinfo)",
    "/etc/group": "glibc's getgrgid",
}
PROC_SELF = re.compile(r"^/proc/(self|thread-self|\d+)(/|$)")
# Without network, these are granted only in the shape that was used: no destination address.
NO_ADDRESS_RULES = {"sendto": "arg4 == 0"}
# Harmless probes the kernel may refuse without harm to the caller: answered with an errno, not granted.
BENIGN_ERRNO = {"mbind": "EPERM"}  # OpenBLAS' NUMA placement; Docker's default answers it with EPERM
O_PATH = 0x200000
LEARN_FILE_MB = 64  # RLIMIT_FSIZE while learning when the policy allows no file to grow
MAX_GROUP_EXTRA = 3  # a group is proposed only if it adds at most this many unused syscalls


@dataclass(frozen=True)
class Notification:
    """One stopped syscall (the same shape as the host's `_on_syscall` hook receives)."""
    id: int
    pid: int
    nr: int
    name: str
    args: tuple[int, ...]


def receive(listener_fd: int) -> Notification | None:
    buf = bytearray(_NOTIF.size)
    try:
        fcntl.ioctl(listener_fd, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
    except OSError:
        return None  # ENOENT: the task died meanwhile; EINTR/EAGAIN: nothing there
    nid, pid, _flags, nr, _arch, _ip, *args = _NOTIF.unpack(buf)
    from .._host.notify import syscall_name
    return Notification(nid, pid, nr, syscall_name(nr), tuple(args))


def respond(listener_fd: int, notif_id: int, verdict) -> None:
    """Answer one notification: "continue" (run it as the task asked) or ("deny", errno)."""
    if verdict == "continue":
        resp = _RESP.pack(notif_id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)
    else:
        resp = _RESP.pack(notif_id, 0, -int(verdict[1]), 0)
    try:
        fcntl.ioctl(listener_fd, SECCOMP_IOCTL_NOTIF_SEND, resp)
    except OSError:
        pass  # ENOENT: the task was killed or its syscall interrupted meanwhile


# ---- the learning filter and policy ------------------------------------------------------------

def _seccomp_module():
    try:
        import seccomp
    except ImportError:
        import pyseccomp as seccomp
    return seccomp


def learning_bpf(base) -> bytes:
    """The base policy's filter with NOTIFY instead of KILL, plus WATCHED calls notified too."""
    import tempfile
    from .compile import parse_condition
    sc = _seccomp_module()
    sec = base.explain()["seccomp"]
    f = sc.SyscallFilter(sc.NOTIFY)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    allow = set(sec["allow"])
    for name in sorted(allow - WATCHED):
        f.add_rule(sc.ALLOW, name)
    for rule in sec["rules"]:
        if rule["syscall"] not in WATCHED and rule["syscall"] not in allow:
            f.add_rule(sc.ALLOW, rule["syscall"], *[parse_condition(c, base.path, "learn") for c in rule["when"]])
    # fstat() is newfstatat(fd, "", AT_EMPTY_PATH): no path, and every open is followed by one
    for name, arg in (("newfstatat", 3), ("statx", 2)):
        if name in allow or any(r["syscall"] == name for r in sec["rules"]):
            f.add_rule(sc.ALLOW, name, sc.Arg(arg, sc.MASKED_EQ, 0x1000, 0x1000))
    for name, err in sec["errno"].items():
        if name not in allow:
            f.add_rule(sc.ERRNO(getattr(errno_mod, err)), name)
    with tempfile.TemporaryFile() as tmp:
        f.export_bpf(tmp)
        tmp.seek(0)
        return tmp.read()


def learning_policy(base, program: bytes):
    """What the learning worker is started with: the base policy, plus a broad read view, a
    scratch dir, room for threads and processes (RLIMIT_NPROC still caps them), and the
    learning filter as its program."""
    from . import Policy, schema
    data = {"extends": base.path,
            "filesystem": {"read_only": ["/"], "scratch": True},
            "limits": {**{k: LEARN_TASKS for k in ("processes", "threads") if k in schema.SCHEMA["limits"]},
                       "file_size_mb": max(base.limits.file_size_bytes // schema.MIB, LEARN_FILE_MB)},
            "seccomp": {"default_action": "kill", "groups": ["@process"]}}  # @process: the zygote then
    policy = Policy.from_dict(data, path=None, base_dir=os.path.dirname(base.path))  # reaps leftovers
    policy.name = base.name
    policy.bpf = lambda *a, **k: program
    return policy


# ---- what one run saw ------------------------------------------------------------------------

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


def _clean(text: str, limit: int = 160) -> str:
    """Plugin-made text for a one-line comment: no newlines, no control characters, bounded."""
    text = json.dumps(text, ensure_ascii=False)[1:-1]
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class Seen:
    """One thing a grant is made for: the first call that needed it, how often it happened."""
    why: str
    call: str
    count: int = 1


@dataclass
class Recorder:
    base: object
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

    def __post_init__(self):
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


def _imports_of(files) -> set[str]:
    """Top-level names the plugin's own files import (parsed, never run)."""
    import ast
    names: set[str] = set()
    for path in files:
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read(8 * 1024 * 1024))
        except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".", 1)[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".", 1)[0])
    return names


_startup = None


def _startup_modules() -> set[str]:
    """What a bare `python -I -S` has imported before any plugin runs (never worth preloading)."""
    global _startup
    if _startup is None:
        import subprocess
        try:
            out = subprocess.run([sys.executable, "-I", "-S", "-c", "import sys; print(' '.join(sys.modules))"],
                                 capture_output=True, text=True, timeout=30, env={}).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        _startup = {m.split(".", 1)[0] for m in out.split()} | set(sys.builtin_module_names)
    return _startup


def _installed(name: str, plugin: str) -> bool:
    """A top-level module the host has installed, not one of the plugin's own (found, never imported)."""
    import importlib.machinery
    folder = os.path.dirname(plugin)
    try:
        spec = importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if p and
                                                               not _beneath(os.path.realpath(p), [folder])])
    except (ImportError, ValueError):
        return False
    return spec is not None


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


# ---- the proposal ----------------------------------------------------------------------------

def _q(text: str) -> str:
    return json.dumps(text)  # a TOML basic string


def _toml_safe(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False  # undecodable bytes from the task: shown in a comment, never written as a key
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _why(seen: Seen) -> str:
    return _clean(f"{seen.why} in {seen.call}" + (f" ({seen.count}x)" if seen.count > 1 else ""))


def _choose(rec: Recorder) -> tuple[dict, dict]:
    """Syscalls not granted -> ({group: [names]}, {name: Seen}) to list in `allow`."""
    from ..policy.groups import GROUPS, expand
    already = set(rec._allow)
    if rec.threads:  # limits.threads (or processes) brings @threads with it
        already |= set(expand(["@threads"])[0])
    if rec.families:  # network.allow brings @network-client with it
        already |= set(expand(["@network-client"])[0])
    wanted = {n: s for n, s in rec.syscalls.items() if n not in PROCESS_CALLS
              and n not in already and n not in BENIGN_ERRNO}
    groups: dict[str, list[str]] = {}
    for name in sorted(wanted):
        best = None
        for g in GROUPS:
            if g in ("@sandbox-runtime", "@process", "@network-client", "@threads", "@file-write"):
                continue
            plain, rules = expand([g])
            members = set(plain) | {s for s, _ in rules}
            if name not in members:
                continue
            extra = members - already - set(wanted)
            if len(extra) <= MAX_GROUP_EXTRA and (best is None or len(members) < best[0]):
                best = (len(members), g)
        if best:
            groups.setdefault(best[1], []).append(name)
    in_group = {n for names in groups.values() for n in names}
    return groups, {n: s for n, s in wanted.items() if n not in in_group}


def _extends_value(base_path: str, out_path: str | None) -> str:
    from .loader import SHIPPED_DEFAULT
    if os.path.realpath(base_path) == os.path.realpath(SHIPPED_DEFAULT):
        folder = os.path.dirname(os.path.abspath(out_path)) if out_path else os.getcwd()
        if not os.path.exists(os.path.join(folder, "default.toml")):
            return "default"
    return os.path.abspath(base_path)


def _proposed_reads(rec: Recorder) -> tuple[list[tuple[str, Seen]], list[tuple[str, str]]]:
    grant, skipped = [], []
    for path, seen in sorted(rec.reads.items()):
        if not _toml_safe(path):
            skipped.append((path, "not valid UTF-8 text"))
        elif PROC_SELF.match(path):
            skipped.append((path, "the worker's own /proc entry: a path rule cannot name it"))
        elif not os.path.lexists(path):
            continue  # it was not there: a failed probe, nothing to grant
        else:
            grant.append((path, seen))
    return grant, skipped


def propose(rec: Recorder, *, out_path: str | None, outcomes: list[tuple[str, str | None]]) -> str:
    """The learned policy, as TOML text with a comment on every grant."""
    from . import schema
    L: list[str] = []
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    L.append(f"# Learned by `sandbox policy learn` from {_clean(rec.plugin, 300)} on {when}, in one run.")
    for label, err in outcomes:
        L.append(f"#   {_clean(label)}: " + ("ok" if err is None else "FAILED: " + _clean(err, 240)))
    L.append("# Review every grant: learning let each of these through once. Learning is for vetting a")
    L.append("# plugin on trusted inputs, not for serving untrusted traffic.")
    L.append(f"extends = {_q(_extends_value(rec.base.path, out_path))}")
    L.append(f"description = {_q('learned for ' + os.path.basename(os.path.dirname(rec.plugin)) + '/' + os.path.basename(rec.plugin))}")

    limits = []
    if "threads" in schema.SCHEMA["limits"]:
        if rec.threads:
            limits.append(f"threads = {rec.threads}  # most threads at once: {_why(rec.thread_seen)}")
        if rec.process_seen:
            limits.append(f"processes = {max(rec.processes, 1)}  # NEW PROCESSES: {_why(rec.process_seen)}")
    elif rec.threads or rec.process_seen:
        total = rec.threads + (max(rec.processes, 1) if rec.process_seen else 0)
        why = "; ".join(_why(s) for s in (rec.thread_seen, rec.process_seen) if s)
        kind = "NEW PROCESSES and threads" if rec.process_seen else "threads (this version's processes counts them)"
        limits.append(f"processes = {total}  # {kind}, most at once: {why}")
    reads, skipped = _proposed_reads(rec)
    fs = []
    writes = bool(rec.writes_scratch or rec.writes_inside or rec.writes_unknown)
    if writes and rec.base.limits.file_size_bytes == 0:
        mib = max(1, -(-rec.largest_file // schema.MIB))
        limits.append(f"file_size_mb = {mib}  # files may grow (largest seen: {rec.largest_file} bytes); "
                      "raise it if the plugin writes bigger files")
    if limits:
        L += ["", "[limits]"] + limits
    if rec.writes_scratch:
        fs.append(f"scratch = true  # a private, emptied-on-exit dir: {_why(rec.writes_scratch['scratch'])}")
    elif rec.writes_unknown and not rec.base.filesystem.writable:
        fs.append("scratch = true  # a write whose path could not be read (unprivileged host), and the scratch "
                  f"dir was the only writable place: {_why(rec.writes_unknown['unknown'])}")
    if reads:
        fs.append("read_only = [")
        for path, seen in reads:
            kind = " (a directory: Landlock grants all beneath it)" if os.path.isdir(path) else ""
            hint = f" [{READ_HINTS[path]}]" if path in READ_HINTS else ""
            fs.append(f"    {_q(path)},  #{kind}{hint} {_why(seen)}")
        fs.append("]")
    if fs:
        L += ["", "[filesystem]"] + fs
    for path, why in skipped:
        L.append(f"# not granted: read {_clean(path)}: {why}")
    for path, seen in sorted(rec.writes_outside.items()):
        L.append(f"# not granted: write outside the policy's writable paths, refused during learning: "
                 f"{_clean(path)} ({_why(seen)}); add its folder to filesystem.writable only if the plugin needs it")

    fams = sorted(rec.families)
    if fams:
        L += ["", "[network]", "allow = true  # NETWORK: " + "; ".join(_why(rec.families[f]) for f in fams),
              f"families = [{', '.join(_q(f) for f in fams)}]"]
    for dest, seen in sorted(rec.destinations.items()):
        L.append(f"# destination: {_clean(dest)} ({_why(seen)})")

    have = set(rec.base.preload)
    asked = _imports_of([rec.plugin] + sorted(rec.own_files))
    mods = sorted(m for m in rec.modules if m in asked and m not in have)
    guessed = not rec.modules and rec.unreadable_paths > 0
    if guessed:  # no path could be read: what the plugin's source imports, less what every worker has
        mods = sorted(m for m in asked - have - _startup_modules() if _installed(m, rec.plugin))
    if mods:
        L += ["", "[python]",
              f"preload = [{', '.join(_q(m) for m in mods)}]  # imported by the plugin (never its own modules"
              + ("; from its source: no path was readable" if guessed else "")
              + "); preloads are imported before the filter, in every worker"]

    groups, allow = _choose(rec)
    no_address = {n: c for n, c in NO_ADDRESS_RULES.items() if n in allow and not fams}
    allow = {n: v for n, v in allow.items() if n not in no_address}
    sec = []
    group_lines = {g: "; ".join(_why(rec.syscalls[n]) for n in names) for g, names in groups.items()}
    if rec.process_seen and "@process" not in rec.base.seccomp.groups:
        group_lines["@process"] = "NEW PROCESSES: " + _why(rec.process_seen)
    if group_lines:
        sec += ["groups = ["] + [f"    {_q(g)},  # {why}" for g, why in sorted(group_lines.items())] + ["]"]
    if allow:
        sec.append("allow = [")
        for name, seen in sorted(allow.items()):
            sec.append(f"    {_q(name)},  # {_why(seen)}")
        sec.append("]")
    errnos = {n: (e, f"{_why(rec.syscalls[n])}: harmless, answered with {e} instead of granted")
              for n, e in BENIGN_ERRNO.items() if n in rec.syscalls}
    if any("nscd" in note for note in rec.benign) and not fams:
        errnos["socket"] = ("EAFNOSUPPORT", _clean(decode.NSCD_NOTE) + ": answered with an errno, no network granted")
    if errnos:
        sec.append("errno = { " + ", ".join(f"{n} = {_q(e)}" for n, (e, _) in sorted(errnos.items())) + " }")
        sec += [f"#   {n}: {why}" for n, (_, why) in sorted(errnos.items())]
    for name, seen in sorted(rec.dangerous.items()):
        sec.append(f'# allow_dangerous = [{_q(name)}]  # DANGEROUS, not granted (denied with EPERM during '
                   f"learning): {_why(seen)}")
    if sec:
        L += ["", "[seccomp]"] + sec
    for name, cond in sorted(no_address.items()):
        L += ["", f"[[seccomp.rule]]  # {_why(rec.syscalls[name])}; only without a destination address",
              f"syscall = {_q(name)}", f"when = [{_q(cond)}]"]
    for req, seen in sorted(rec.ioctls.items()):
        L += ["", f"[[seccomp.rule]]  # ioctl {decode.ioctl_name(req)}: {_why(seen)}",
              'syscall = "ioctl"', f'when = ["arg1 == {req:#x}"]']

    notes = []
    for text, seen in sorted(rec.refused.items()):
        notes.append(f"# refused during learning, not granted: {_clean(text)} ({_why(seen)})")
    for note, seen in sorted(rec.benign.items()):
        notes.append(f"# known harmless: {_clean(note)} ({_why(seen)})")
    for path, seen in sorted(rec.looked.items())[:40]:
        notes.append(f"# looked at (stat/access, which Landlock does not limit; nothing to grant): {_clean(path)}")
    if len(rec.looked) > 40:
        notes.append(f"# ... and {len(rec.looked) - 40} more paths looked at")
    if rec.unreadable_paths:
        notes.append(f"# {rec.unreadable_paths} paths could not be read from the worker's memory (an unprivileged "
                     "host cannot read a non-dumpable worker): run learn as root for exact paths")
    if rec.dropped:
        notes.append(f"# {rec.dropped} further distinct observations were counted, not kept")
    if notes:
        L += [""] + notes
    return "\n".join(L) + "\n"


# ---- running it ------------------------------------------------------------------------------

def _view(base, plugin: str) -> tuple[list[str], list[str]]:
    """The read and write paths a worker of `base` sees (as the plan builder computes them)."""
    from .._host import plan as plans
    plan = plans.build(base, plugin, "learn", None, None)
    ll = plan["landlock"]
    return ([os.path.realpath(p) for p in ll["read"]] + list(ll["read"]),
            [os.path.realpath(p) for p in ll["write"]] + list(ll["write"]))


def _worker_class():
    from ..worker import Worker
    from .._host import hub as _hub

    hooked = "_on_syscall" in inspect.signature(Worker.__init__).parameters

    class LearningWorker(Worker):
        """A Worker whose forbidden syscalls go to a Recorder instead of ending the worker."""

        def __init__(self, worker_py, policy, recorder: Recorder, **kw):
            self._recorder = recorder
            if hooked:
                kw["_on_syscall"] = self._hook
            super().__init__(worker_py, policy, **kw)

        def _hook(self, n):
            rec = self._recorder
            rec.worker_pid = rec.worker_pid or self.pid
            if rec.scratch is None and self._sp is not None:
                rec.scratch = self._sp.scratch
            return rec.on_syscall(n, getattr(n, "listener", None) or self._listener)

        if not hooked:
            def _on_violation(self):
                n = receive(self._listener)
                if n is None:
                    return
                verdict = self._hook(n)
                if verdict == "kill":
                    self._kill(PolicyViolation(
                        f"plugin {self.name} made more than {MAX_NOTIFICATIONS} syscalls for learning",
                        syscall=n.name, args=n.args, plugin=self.name, policy=self.policy.path))
                    return
                respond(self._listener, n.id, verdict)

            def _on_hub_event(self, fd):
                if fd != self._listener:
                    return super()._on_hub_event(fd)
                if not self._io.acquire(blocking=False):
                    self._hub_missed = True  # the caller's poll sees it (level-triggered)
                    return
                try:
                    if not self._finalized:
                        self._on_violation()
                finally:
                    self._io.release()
                    if not self._finalized and self._listener is not None:
                        _hub.get().arm(self._listener)

    return LearningWorker, hooked


@dataclass
class LearnResult:
    text: str                                   # the proposed policy (TOML)
    outcomes: list[tuple[str, str | None]]      # (call, None or the error it ended in)
    recorder: Recorder
    hooked: bool                                # ran through Worker's _on_syscall hook

    @property
    def ok(self) -> bool:
        return all(err is None for _, err in self.outcomes)


def _label(name: str, args) -> str:
    text = f"{name}({', '.join(json.dumps(a) for a in args)})"
    return text if len(text) <= 80 else text[:77] + "..."


def learn(worker_py, calls=(), *, script: str | None = None, extends=None, out: str | None = None) -> LearnResult:
    """Run `calls` ([(function, [args...]), ...]) and then `script` once under learning; return
    (and with `out`, write) the proposed policy."""
    from . import Policy
    from .loader import SHIPPED_DEFAULT
    plugin = os.path.abspath(os.fspath(worker_py))
    if not os.path.isfile(plugin):
        raise UsageError(f"plugin file not found: {plugin}")
    base = Policy.load(extends if extends is not None else SHIPPED_DEFAULT)
    if base.path is None:
        raise UsageError("learn extends a policy file; an inline policy has no path to extend")
    view_read, view_write = _view(base, plugin)
    rec = Recorder(base, plugin, view_read, view_write)
    LearningWorker, hooked = _worker_class()
    policy = learning_policy(base, learning_bpf(base))
    outcomes: list[tuple[str, str | None]] = []
    worker = None
    try:
        worker = LearningWorker(plugin, policy, rec, start_timeout=LEARN_TIMEOUT)
        outcomes.append(("load", None))
        for name, args in calls:
            rec.current = "call " + _label(name, args)
            try:
                worker.invoke(name, tuple(args), timeout=LEARN_TIMEOUT)
                outcomes.append((rec.current, None))
            except SandboxError as e:
                outcomes.append((rec.current, f"{type(e).__name__}: {e}"))
                if not worker.alive:
                    break
            finally:
                rec.largest_file = max(rec.largest_file, largest_file(rec.scratch))
        if script is not None and worker.alive:
            rec.current = f"script {os.path.basename(script)}"
            try:
                with open(script) as f:
                    code = compile(f.read(), script, "exec")
                exec(code, {"__name__": "__learn__", "worker": worker})  # the operator's own code
                outcomes.append((rec.current, None))
            except (SandboxError, Exception) as e:  # noqa: BLE001 - reported in the proposal
                outcomes.append((rec.current, f"{type(e).__name__}: {e}"))
    except SandboxError as e:
        outcomes.append((rec.current, f"{type(e).__name__}: {e}"))
    finally:
        if worker is not None:
            worker.close()
    text = propose(rec, out_path=out, outcomes=outcomes)
    if out is not None:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, out)
    return LearnResult(text, outcomes, rec, hooked)


def _json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--call argument is not valid JSON: {text!r} ({e.msg})") from None


def main(argv=None) -> int:
    """`sandbox policy learn WORKER_PY --call FUNCTION [JSON_ARG ...] ... --out FILE`.
    Exit 0: written, every call succeeded; 1: written, some call failed (look at the comments)."""
    p = argparse.ArgumentParser(prog="sandbox policy learn",
                                description="run a plugin's calls once and write the policy they need")
    p.add_argument("worker_py", metavar="WORKER_PY")
    p.add_argument("--call", nargs="+", action="append", default=[], metavar=("FUNCTION", "JSON_ARG"),
                   help="a call to make (repeatable): the function's name, then its arguments as JSON")
    p.add_argument("--script", metavar="FILE", help="a Python file run with `worker` bound, after the calls")
    p.add_argument("--extends", metavar="POLICY", help="the policy to extend (default: the shipped default)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the learned policy")
    args = p.parse_args(argv)
    from ..cli import fail
    try:
        if not args.call and not args.script:
            raise UsageError("nothing to learn from: give at least one --call or a --script")
        calls = [(c[0], [_json_arg(a) for a in c[1:]]) for c in args.call]
        result = learn(args.worker_py, calls, script=args.script, extends=args.extends, out=args.out)
    except SandboxError as exc:
        return fail(exc)
    for label, err in result.outcomes:
        print(f"{label}: {'ok' if err is None else err}", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
