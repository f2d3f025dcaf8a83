"""Named syscall groups, in the spirit of systemd's: what each holds, and why.

A group lists plain syscall names and conditional rules (syscall, [conditions]); groups may
include other groups with "@name". Every name here is also allowed by Docker's default profile:
our default is a strict subset of it, and far smaller.
"""

# openat/open flags that create, truncate or write: a read-only open must have none of them.
O_WRITE_MASK = 0x1 | 0x2 | 0x40 | 0x200 | 0x400 | 0x400000  # WRONLY RDWR CREAT TRUNC APPEND __O_TMPFILE
CLONE_THREAD = 0x00010000
TCGETS, FIONBIO, FIOCLEX, FIONCLEX = 0x5401, 0x5421, 0x5451, 0x5450

GROUPS = {
    "@sandbox-runtime": {
        "why": "the worker's own serve loop after the filter is on: read frames, write frames, hand "
               "the seccomp listener to the host on fd 5 (closed before the plugin loads), exit",
        "allow": ["read", "readv", "write", "close", "exit", "exit_group", "rt_sigreturn"],
        "rules": [("sendmsg", ["arg0 == 5"])],
    },
    "@memory": {
        "why": "the allocator: pymalloc arenas, large buffers, freeing them",
        "allow": ["brk", "mmap", "munmap", "mremap", "mprotect", "madvise"],
    },
    "@basic-io": {
        "why": "I/O on descriptors the worker already has; no new descriptors come from these",
        "allow": ["read", "write", "readv", "writev", "pread64", "pwrite64", "lseek", "close", "dup",
                  "dup3", "fcntl", "poll", "ppoll"],
    },
    "@file-read": {
        "why": "import modules and read data files; Landlock decides which paths, this only forbids "
               "opening for writing (the flags are checked: no O_WRONLY/O_RDWR/O_CREAT/O_TRUNC/O_APPEND)",
        "allow": ["newfstatat", "fstat", "statx", "lstat", "stat", "access", "faccessat", "faccessat2",
                  "getdents64", "readlink", "readlinkat", "getcwd", "fadvise64"],
        "rules": [("openat", [f"arg2 & {O_WRITE_MASK:#x} == 0"])],
    },
    "@file-write": {
        "why": "create and change files; Landlock still limits it to the policy's writable paths and scratch dir",
        "allow": ["openat", "mkdirat", "unlinkat", "renameat", "renameat2", "ftruncate", "fsync",
                  "fdatasync", "fchmod", "utimensat", "symlinkat", "linkat",
                  "mkdir", "rmdir", "unlink", "rename", "symlink", "link"],  # glibc still calls these on x86_64
    },
    "@time": {
        "why": "clocks and sleeping (most clock reads never reach the kernel, thanks to the vDSO)",
        "allow": ["clock_gettime", "clock_getres", "gettimeofday", "time", "nanosleep", "clock_nanosleep"],
    },
    "@signals-self": {
        "why": "signal handlers, masks, and raise()/abort() of itself; signals to other processes are "
               "stopped by the unique uid and Landlock's signal scoping, kill() is not allowed at all",
        "allow": ["rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "tgkill", "tkill"],
    },
    "@process-info": {
        "why": "who am I: ids, limits (read only), machine facts",
        "allow": ["getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid",
                  "getresgid", "getgroups", "uname", "sysinfo", "sched_getaffinity", "sched_yield",
                  "getrlimit", "getrusage", "getsid", "getpgid", "getpgrp"],
        "rules": [("prlimit64", ["arg2 == 0"])],  # reading a limit: no new_limit pointer
    },
    "@terminal-query": {
        "why": "isatty() on open files (TCGETS) and a few harmless fd ioctls; TIOCSTI and the rest are refused "
               "(exact compare on the full 64-bit request, so high bits can't sneak one in)",
        "rules": [("ioctl", [f"arg1 == {TCGETS:#x}"]), ("ioctl", [f"arg1 == {FIONBIO:#x}"]),
                  ("ioctl", [f"arg1 == {FIOCLEX:#x}"]), ("ioctl", [f"arg1 == {FIONCLEX:#x}"])],
    },
    "@python-runtime": {
        "why": "what CPython needs to compute with the standard library, import modules, raise and "
               "allocate: the default policy's baseline",
        "allow": ["@memory", "@basic-io", "@file-read", "@time", "@signals-self", "@process-info",
                  "@terminal-query", "futex", "getrandom"],
    },
    "@threads": {
        "why": "threads (e.g. numpy's BLAS pool): clone only with CLONE_THREAD set, so never a new process",
        "allow": ["set_robust_list", "get_robust_list", "rseq", "futex", "membarrier", "set_tid_address",
                  "sched_yield", "sched_getaffinity"],
        "rules": [("clone", [f"arg0 & {CLONE_THREAD:#x} == {CLONE_THREAD:#x}"])],
    },
    "@network-client": {
        "why": "outgoing connections; socket() is further limited to the policy's network.families",
        "allow": ["connect", "sendto", "recvfrom", "sendmsg", "recvmsg", "getsockname", "getpeername",
                  "getsockopt", "setsockopt", "shutdown", "epoll_create1", "epoll_ctl", "epoll_wait",
                  "epoll_pwait", "select", "pselect6"],
    },
    "@process": {
        "why": "new processes and programs: never in the default, and exec is pointless under no_new_privs "
               "and Landlock; listed for completeness",
        "allow": ["fork", "vfork", "clone", "execve", "execveat", "wait4", "waitid", "kill", "setsid",
                  "setpgid"],
    },
}

# Families for socket(domain, ...) when a policy grants network.
FAMILIES = {"unix": 1, "inet": 2, "inet6": 10}


def expand(names, where: str = "groups"):
    """Resolve group names into (plain syscall names, conditional rules), recursively."""
    plain, rules, seen = [], [], set()

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

    for n in names:
        visit(n)
    return plain, rules
