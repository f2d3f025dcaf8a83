"""Named syscall groups, in the spirit of systemd's: what each holds, and why.

A group lists plain syscall names ("allow"), conditional rules ("rules": syscall, [conditions])
and answers ("answers": syscall, [conditions] or None, errno): calls that fail with an errno
instead of stopping the worker, because real code probes them and copes with the error. An
answer with None conditions covers whatever the group's own conditional rules leave out.
Groups may include other groups with "@name".

Every allowed name is also allowed by Docker's default profile (moby profiles/seccomp/default.json,
no added capabilities): the default is a strict subset of it, and far smaller. Each group's
"compare" says where it sits against Docker and against systemd's @system-service set, which
is a much wider grant (it holds @process, @network-io, @file-system and more).
"""
from typing import Any

# openat/open flags that create, truncate or write: a read-only open must have none of them.
O_WRITE_MASK = 0x1 | 0x2 | 0x40 | 0x200 | 0x400 | 0x400000  # WRONLY RDWR CREAT TRUNC APPEND __O_TMPFILE
CLONE_THREAD = 0x00010000
# clone's namespace flags: NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET. (NEWTIME is
# 0x80, which clone(2) reads as part of the exit signal; only clone3/unshare take it, and both are
# dangerous.) The kernel reads the low 32 bits of clone's flags only, so a mask on them is exact.
CLONE_NEW_MASK = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
TCGETS, FIONBIO, FIOCLEX, FIONCLEX, TIOCGWINSZ = 0x5401, 0x5421, 0x5451, 0x5450, 0x5413
AF_UNIX = 1
NSCD_SOCKET_TYPE = 0x80801  # SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, as glibc's nscd client asks

THREAD_RULE = f"arg0 & {CLONE_THREAD | CLONE_NEW_MASK:#x} == {CLONE_THREAD:#x}"
PROCESS_RULE = f"arg0 & {CLONE_THREAD | CLONE_NEW_MASK:#x} == 0"

# name -> {"why", "compare", "allow", "rules", "answers"}: strings and lists of them, as above
GROUPS: dict[str, dict[str, Any]] = {
    "@sandbox-runtime": {
        "why": "the worker's own serve loop after the filter is on: read frames, write frames, hand "
               "the seccomp listener to the host on fd 5 (closed before the plugin loads), exit",
        "compare": "all in Docker's profile and in @system-service (@basic-io)",
        "allow": ["read", "readv", "write", "close", "exit", "exit_group", "rt_sigreturn"],
        "rules": [("sendmsg", ["arg0 == 5"])],
    },
    "@memory": {
        "why": "the allocator: pymalloc arenas, large buffers, freeing them. NUMA placement (OpenBLAS "
               "calls mbind) is answered EPERM: the kernel keeps placing memory as it would anyway",
        "compare": "Docker allows these and answers mbind/get_mempolicy/set_mempolicy EPERM without "
                   "CAP_SYS_NICE, as here; systemd's @system-service holds them in @default/@basic-io",
        "allow": ["brk", "mmap", "munmap", "mremap", "mprotect", "madvise"],
        "answers": [("mbind", None, "EPERM"), ("set_mempolicy", None, "EPERM"),
                    ("get_mempolicy", None, "EPERM")],
    },
    "@basic-io": {
        "why": "I/O on descriptors the worker already has; no new descriptors come from these",
        "compare": "all in Docker's profile; systemd @basic-io",
        "allow": ["read", "write", "readv", "writev", "pread64", "pwrite64", "lseek", "close", "dup",
                  "dup3", "fcntl", "poll", "ppoll"],
    },
    "@pipes": {
        "why": "anonymous pipes and AF_UNIX socket pairs inside the worker (asyncio's self-pipe, "
               "subprocess-free producer/consumer code): both ends stay in the worker, nothing is "
               "reachable through them, and socket() itself stays forbidden",
        "compare": "Docker allows pipe/pipe2/socketpair (any family) and sendto/recvfrom; systemd puts "
                   "pipes in @ipc and socketpair in @network-io, both in @system-service",
        "allow": ["pipe", "pipe2", "sendto", "recvfrom", "shutdown", "getsockname", "getpeername",
                  "getsockopt"],
        "rules": [("socketpair", [f"arg0 == {AF_UNIX}"])],
    },
    "@user-database": {
        "why": "glibc's getpwuid/getgrgid first ask the nscd daemon over an AF_UNIX socket; that exact "
               "socket (stream, non-blocking, close-on-exec) gets EACCES, so glibc falls back to the "
               "files, which the worker cannot read: pwd.getpwuid raises KeyError instead of the worker "
               "being killed. getpass, expanduser and sysconfig never get there: the worker's HOME, USER "
               "and LOGNAME are set. No socket is ever created",
        "compare": "Docker allows socket() of any family; systemd @network-io. Here only an error",
        "answers": [("socket", [f"arg0 == {AF_UNIX}", f"arg1 == {NSCD_SOCKET_TYPE:#x}", "arg2 == 0"], "EACCES")],
    },
    "@io-event": {
        "why": "waiting on many descriptors at once (asyncio's event loop, selectors): epoll, eventfd, "
               "select; they only watch descriptors the worker already has",
        "compare": "all in Docker's profile; exactly systemd's @io-event (minus the legacy names)",
        "allow": ["epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
                  "epoll_pwait2", "eventfd", "eventfd2", "select", "pselect6"],
    },
    "@file-read": {
        "why": "import modules and read data files; Landlock decides which paths, this only forbids "
               "opening for writing (the flags are checked: no O_WRONLY/O_RDWR/O_CREAT/O_TRUNC/O_APPEND). "
               "An open for writing or a mkdir fails with EROFS, as on a read-only file system, so "
               "code that probes for a writable directory (tempfile, caches) carries on",
        "compare": "Docker allows openat with any flags and mkdir; systemd @file-system. Here a write "
                   "only ever gets an error",
        "allow": ["newfstatat", "fstat", "statx", "lstat", "stat", "access", "faccessat", "faccessat2",
                  "getdents64", "readlink", "readlinkat", "getcwd", "fadvise64"],
        "rules": [("openat", [f"arg2 & {O_WRITE_MASK:#x} == 0"])],
        "answers": [("openat", None, "EROFS"), ("mkdir", None, "EROFS"), ("mkdirat", None, "EROFS")],
    },
    "@file-write": {
        "why": "create, remove and rename files; Landlock still limits it to the policy's writable "
               "paths and scratch dir. Changing mode, owner or times is @file-attributes, granted apart",
        "compare": "all in Docker's profile; part of systemd's @file-system",
        "allow": ["openat", "mkdirat", "unlinkat", "renameat", "renameat2", "ftruncate", "fsync",
                  "fdatasync", "symlinkat", "linkat",
                  "mkdir", "rmdir", "unlink", "rename", "symlink", "link"],  # glibc still calls these on x86_64
    },
    "@file-attributes": {
        "why": "change a file's mode, owner or times (chmod, chown, utime, shutil.copystat). Landlock "
               "does not cover these, so they are granted only when a policy lists the group; the "
               "worker's read-only view of everything outside its writable paths still refuses them",
        "compare": "all in Docker's profile; systemd's @file-system and @chown",
        "allow": ["fchmod", "fchmodat", "chmod", "fchown", "fchownat", "chown", "lchown", "utimensat",
                  "utime", "utimes", "futimesat"],
    },
    "@time": {
        "why": "clocks and sleeping (most clock reads never reach the kernel, thanks to the vDSO)",
        "compare": "all in Docker's profile; systemd @default",
        "allow": ["clock_gettime", "clock_getres", "gettimeofday", "time", "nanosleep", "clock_nanosleep"],
    },
    "@timers": {
        "why": "signal.alarm()/setitimer(): a timer that signals the worker itself (SIGALRM), the usual "
               "way to put a deadline on one's own code",
        "compare": "all in Docker's profile; systemd @timer",
        "allow": ["alarm", "setitimer", "getitimer"],
    },
    "@signals-self": {
        "why": "signal handlers, masks, and raise()/abort() of itself; signals to other processes are "
               "stopped by the unique uid and Landlock's signal scoping, kill() is not allowed at all",
        "compare": "all in Docker's profile; systemd @signal (which also has kill)",
        "allow": ["rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "tgkill", "tkill"],
    },
    "@process-info": {
        "why": "who am I: ids, limits, machine facts. prlimit64 only on itself (pid 0): with no "
               "capabilities the kernel refuses to raise a hard limit, and every limit the sandbox sets "
               "has soft = hard, so a plugin can read its limits or lower them, never raise one",
        "compare": "all in Docker's profile (which allows prlimit64 on any pid); systemd @default/@resources",
        "allow": ["getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid",
                  "getresgid", "getgroups", "uname", "sysinfo", "sched_getaffinity", "sched_yield",
                  "getrlimit", "getrusage", "getsid", "getpgid", "getpgrp"],
        "rules": [("prlimit64", ["arg0 == 0"])],
    },
    "@terminal-query": {
        "why": "isatty() on open files (TCGETS) and a few harmless fd ioctls; TIOCSTI and the rest are refused "
               "(exact compare on the full 64-bit request, so high bits can't sneak one in). The window "
               "size (TIOCGWINSZ, asked by shutil.get_terminal_size and readline) gets ENOTTY: a worker "
               "has no terminal, and the callers fall back to COLUMNS/LINES or 80x24",
        "compare": "Docker allows every ioctl; systemd @default/@basic-io allow ioctl too",
        "rules": [("ioctl", [f"arg1 == {TCGETS:#x}"]), ("ioctl", [f"arg1 == {FIONBIO:#x}"]),
                  ("ioctl", [f"arg1 == {FIOCLEX:#x}"]), ("ioctl", [f"arg1 == {FIONCLEX:#x}"])],
        "answers": [("ioctl", [f"arg1 == {TIOCGWINSZ:#x}"], "ENOTTY")],
    },
    "@python-runtime": {
        "why": "what CPython's standard library needs to compute, import modules, raise, allocate, run "
               "an asyncio loop and set its own alarms: the default policy's baseline",
        "compare": "a strict subset of Docker's default profile; far smaller than systemd's @system-service",
        "allow": ["@memory", "@basic-io", "@pipes", "@io-event", "@file-read", "@time", "@timers",
                  "@signals-self", "@process-info", "@terminal-query", "@user-database", "futex",
                  "getrandom"],
    },
    "@threads": {
        "why": "threads (e.g. numpy's BLAS pool, concurrent.futures): clone only with CLONE_THREAD set and "
               "no namespace flag, so never a new process; granted by limits.threads",
        "compare": "Docker allows clone without namespace flags (and clone3); systemd @process",
        "allow": ["set_robust_list", "get_robust_list", "rseq", "futex", "membarrier", "set_tid_address",
                  "sched_yield", "sched_getaffinity"],
        "rules": [("clone", [THREAD_RULE])],
    },
    "@network-client": {
        "why": "outgoing connections; socket() is further limited to the policy's network.families",
        "compare": "all in Docker's profile; systemd @network-io",
        "allow": ["connect", "sendto", "recvfrom", "sendmsg", "recvmsg", "getsockname", "getpeername",
                  "getsockopt", "setsockopt", "shutdown", "epoll_create1", "epoll_ctl", "epoll_wait",
                  "epoll_pwait", "select", "pselect6"],
    },
    "@fork": {
        "why": "new processes by fork (multiprocessing's fork start method, os.fork): clone without "
               "CLONE_THREAD and without namespace flags, fork, vfork, wait; granted by limits.processes. "
               "Namespace flags need clone in allow_dangerous",
        "compare": "Docker allows these (clone without namespace flags); systemd @process",
        "allow": ["fork", "vfork", "wait4", "waitid", "setsid", "setpgid", "set_robust_list", "rseq",
                  "set_tid_address"],
        "rules": [("clone", [PROCESS_RULE])],
    },
    "@process": {
        "why": "@fork plus execve and kill: programs and signals to one's own children. exec is of "
               "little use under no_new_privs and Landlock; listed only when a policy names the group",
        "compare": "Docker allows these; systemd @process",
        "allow": ["@fork", "execve", "execveat", "kill"],
    },
}

# Families for socket(domain, ...) when a policy grants network.
FAMILIES = {"unix": 1, "inet": 2, "inet6": 10}


def expand_all(names):
    """Resolve group names into (plain syscall names, conditional rules, answers), recursively."""
    plain, rules, answers, seen = [], [], [], set()

    def visit(name):
        if name in seen:
            return
        seen.add(name)
        group = GROUPS[name]
        for item in group.get("allow", ()):
            if item.startswith("@"):
                visit(item)
            else:
                plain.append(item)
        rules.extend(group.get("rules", ()))
        answers.extend(group.get("answers", ()))

    for n in names:
        visit(n)
    return plain, rules, answers


def expand(names):
    """Resolve group names into (plain syscall names, conditional rules): what they allow."""
    plain, rules, _ = expand_all(names)
    return plain, rules


def contents(name: str) -> dict:
    """What a group grants, flattened, for `sandbox policy groups` and explain."""
    plain, rules, answers = expand_all([name])
    return {"why": GROUPS[name]["why"], "compare": GROUPS[name].get("compare", ""),
            "includes": [g for g in GROUPS[name].get("allow", ()) if g.startswith("@")],
            "allow": sorted(set(plain)),
            "rules": [{"syscall": s, "when": list(w)} for s, w in rules],
            "answers": [{"syscall": s, "when": list(w) if w else None, "errno": e} for s, w, e in answers]}
