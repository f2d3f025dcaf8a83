"""Words an operator can act on: for a raw seccomp notification (syscall name, six integers),
and for a death that the worker's own limits caused (`limit_death`).

    describe("ioctl", (1, 0x5413, 0x7ffd..., 0, 0, 0))
      -> Report(syscall="ioctl", args_text="1, TIOCGWINSZ, 0x7ffd...", grant='[[seccomp.rule]] ...')

Everything here is pure except `read_string`/`read_memory`, which read the stopped task's memory
for the path or address a syscall points at. What they return is for people to read: the task
can change its memory after we looked, so a decoded path is never used for a decision.
"""
from __future__ import annotations

import errno as _errno
import fcntl
import os
import signal as _signal
import struct
from dataclasses import dataclass
from typing import Callable

from ..errors import PluginCrashed, PluginMemoryError, SandboxError

PATH_MAX = 4096
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102  # _IOW('!', 2, __u64)
AT_FDCWD = -100
U64 = (1 << 64) - 1

# ---- tables (x86_64 values; the policy compiler only emits native-arch programs) -------------

IOCTLS = {
    0x5401: "TCGETS", 0x5402: "TCSETS", 0x5403: "TCSETSW", 0x5404: "TCSETSF", 0x5405: "TCGETA",
    0x5406: "TCSETA", 0x5407: "TCSETAW", 0x5408: "TCSETAF", 0x5409: "TCSBRK", 0x540A: "TCXONC",
    0x540B: "TCFLSH", 0x540C: "TIOCEXCL", 0x540D: "TIOCNXCL", 0x540E: "TIOCSCTTY",
    0x540F: "TIOCGPGRP", 0x5410: "TIOCSPGRP", 0x5411: "TIOCOUTQ", 0x5412: "TIOCSTI",
    0x5413: "TIOCGWINSZ", 0x5414: "TIOCSWINSZ", 0x5415: "TIOCMGET", 0x5416: "TIOCMBIS",
    0x5417: "TIOCMBIC", 0x5418: "TIOCMSET", 0x5419: "TIOCGSOFTCAR", 0x541A: "TIOCSSOFTCAR",
    0x541B: "FIONREAD", 0x541C: "TIOCLINUX", 0x541D: "TIOCCONS", 0x541E: "TIOCGSERIAL",
    0x541F: "TIOCSSERIAL", 0x5420: "TIOCPKT", 0x5421: "FIONBIO", 0x5422: "TIOCNOTTY",
    0x5423: "TIOCSETD", 0x5424: "TIOCGETD", 0x5425: "TCSBRKP", 0x5427: "TIOCSBRK",
    0x5428: "TIOCCBRK", 0x5429: "TIOCGSID", 0x802C542A: "TCGETS2", 0x402C542B: "TCSETS2",
    0x80045430: "TIOCGPTN", 0x40045431: "TIOCSPTLCK", 0x80045432: "TIOCGDEV", 0x5437: "TIOCVHANGUP",
    0x5441: "TIOCGPTPEER", 0x5450: "FIONCLEX", 0x5451: "FIOCLEX", 0x5452: "FIOASYNC",
    0x5459: "TIOCSERGETLSR", 0x5460: "FIOQSIZE", 0x8901: "FIOSETOWN", 0x8903: "FIOGETOWN",
    0x8910: "SIOCGIFNAME", 0x8912: "SIOCGIFCONF", 0x8913: "SIOCGIFFLAGS", 0x8915: "SIOCGIFADDR",
    0x8921: "SIOCGIFMTU", 0x8927: "SIOCGIFHWADDR", 0x8933: "SIOCGIFINDEX",
    0x80086601: "FS_IOC_GETFLAGS", 0x40086602: "FS_IOC_SETFLAGS", 0xC020660B: "FS_IOC_FIEMAP",
    0x40049409: "FICLONE", 0x80081272: "BLKGETSIZE64", 0x1: "FIBMAP", 0x2: "FIGETBSZ",
    0xC0502100: "SECCOMP_IOCTL_NOTIF_RECV", 0xC0182101: "SECCOMP_IOCTL_NOTIF_SEND",
}
# Requests no policy should grant: they reach other processes' terminals or the console.
IOCTL_NEVER = {
    "TIOCSTI": "injects keystrokes into the terminal's input",
    "TIOCLINUX": "console control (can inject input on a virtual console)",
    "TIOCCONS": "redirects the system console",
    "TIOCSCTTY": "takes a controlling terminal",
}

CLONE_FLAGS = [
    (0x100, "CLONE_VM"), (0x200, "CLONE_FS"), (0x400, "CLONE_FILES"), (0x800, "CLONE_SIGHAND"),
    (0x1000, "CLONE_PIDFD"), (0x2000, "CLONE_PTRACE"), (0x4000, "CLONE_VFORK"), (0x8000, "CLONE_PARENT"),
    (0x10000, "CLONE_THREAD"), (0x20000, "CLONE_NEWNS"), (0x40000, "CLONE_SYSVSEM"),
    (0x80000, "CLONE_SETTLS"), (0x100000, "CLONE_PARENT_SETTID"), (0x200000, "CLONE_CHILD_CLEARTID"),
    (0x400000, "CLONE_DETACHED"), (0x800000, "CLONE_UNTRACED"), (0x1000000, "CLONE_CHILD_SETTID"),
    (0x2000000, "CLONE_NEWCGROUP"), (0x4000000, "CLONE_NEWUTS"), (0x8000000, "CLONE_NEWIPC"),
    (0x10000000, "CLONE_NEWUSER"), (0x20000000, "CLONE_NEWPID"), (0x40000000, "CLONE_NEWNET"),
    (0x80000000, "CLONE_IO"),
]
CLONE_THREAD = 0x10000
CLONE_NEW_NAMESPACES = 0x20000 | 0x2000000 | 0x4000000 | 0x8000000 | 0x10000000 | 0x20000000 | 0x40000000
CSIGNAL = 0xFF

O_ACCMODE = 0x3
OPEN_FLAGS = [
    (0x40, "O_CREAT"), (0x80, "O_EXCL"), (0x100, "O_NOCTTY"), (0x200, "O_TRUNC"), (0x400, "O_APPEND"),
    (0x800, "O_NONBLOCK"), (0x1000, "O_DSYNC"), (0x2000, "O_ASYNC"), (0x4000, "O_DIRECT"),
    (0x8000, "O_LARGEFILE"), (0x10000, "O_DIRECTORY"), (0x20000, "O_NOFOLLOW"), (0x40000, "O_NOATIME"),
    (0x80000, "O_CLOEXEC"), (0x100000, "__O_SYNC"), (0x200000, "O_PATH"), (0x400000, "__O_TMPFILE"),
]
O_WRITE_MASK = 0x1 | 0x2 | 0x40 | 0x200 | 0x400 | 0x400000  # what makes an open a write
AT_FLAGS = [(0x100, "AT_SYMLINK_NOFOLLOW"), (0x200, "AT_REMOVEDIR"), (0x400, "AT_SYMLINK_FOLLOW"),
            (0x800, "AT_NO_AUTOMOUNT"), (0x1000, "AT_EMPTY_PATH"), (0x6000, "AT_STATX_DONT_SYNC")]
ACCESS_MODES = [(4, "R_OK"), (2, "W_OK"), (1, "X_OK")]

FAMILIES = {
    0: "AF_UNSPEC", 1: "AF_UNIX", 2: "AF_INET", 3: "AF_AX25", 4: "AF_IPX", 5: "AF_APPLETALK",
    9: "AF_X25", 10: "AF_INET6", 15: "AF_KEY", 16: "AF_NETLINK", 17: "AF_PACKET", 21: "AF_RDS",
    29: "AF_CAN", 30: "AF_TIPC", 31: "AF_BLUETOOTH", 38: "AF_ALG", 40: "AF_VSOCK", 41: "AF_KCM",
    42: "AF_QIPCRTR", 43: "AF_SMC", 44: "AF_XDP", 45: "AF_MCTP",
}
POLICY_FAMILY = {1: "unix", 2: "inet", 10: "inet6"}  # the only families a policy can name
SOCK_TYPES = {1: "SOCK_STREAM", 2: "SOCK_DGRAM", 3: "SOCK_RAW", 4: "SOCK_RDM", 5: "SOCK_SEQPACKET",
              6: "SOCK_DCCP", 10: "SOCK_PACKET"}
SOCK_NONBLOCK, SOCK_CLOEXEC = 0x800, 0x80000

PROT_BITS = [(0x1, "PROT_READ"), (0x2, "PROT_WRITE"), (0x4, "PROT_EXEC"), (0x8, "PROT_SEM"),
             (0x01000000, "PROT_GROWSDOWN"), (0x02000000, "PROT_GROWSUP")]
MAP_TYPES = {1: "MAP_SHARED", 2: "MAP_PRIVATE", 3: "MAP_SHARED_VALIDATE"}
MAP_FLAGS = [(0x10, "MAP_FIXED"), (0x20, "MAP_ANONYMOUS"), (0x100, "MAP_GROWSDOWN"),
             (0x800, "MAP_DENYWRITE"), (0x1000, "MAP_EXECUTABLE"), (0x2000, "MAP_LOCKED"),
             (0x4000, "MAP_NORESERVE"), (0x8000, "MAP_POPULATE"), (0x10000, "MAP_NONBLOCK"),
             (0x20000, "MAP_STACK"), (0x40000, "MAP_HUGETLB"), (0x80000, "MAP_SYNC"),
             (0x100000, "MAP_FIXED_NOREPLACE")]
RLIMITS = {0: "RLIMIT_CPU", 1: "RLIMIT_FSIZE", 2: "RLIMIT_DATA", 3: "RLIMIT_STACK", 4: "RLIMIT_CORE",
           5: "RLIMIT_RSS", 6: "RLIMIT_NPROC", 7: "RLIMIT_NOFILE", 8: "RLIMIT_MEMLOCK", 9: "RLIMIT_AS",
           10: "RLIMIT_LOCKS", 11: "RLIMIT_SIGPENDING", 12: "RLIMIT_MSGQUEUE", 13: "RLIMIT_NICE",
           14: "RLIMIT_RTPRIO", 15: "RLIMIT_RTTIME"}
FCNTL_CMDS = {0: "F_DUPFD", 1: "F_GETFD", 2: "F_SETFD", 3: "F_GETFL", 4: "F_SETFL", 5: "F_GETLK",
              6: "F_SETLK", 7: "F_SETLKW", 1030: "F_DUPFD_CLOEXEC", 1031: "F_SETPIPE_SZ",
              1032: "F_GETPIPE_SZ", 1033: "F_ADD_SEALS", 1034: "F_GET_SEALS"}

# Argument kinds per syscall. "path" args are pointers to NUL-terminated strings in the task.
SIGNATURES: dict[str, tuple[str, ...]] = {
    "open": ("path", "oflags", "mode"), "openat": ("dirfd", "path", "oflags", "mode"),
    "creat": ("path", "mode"), "stat": ("path", "ptr"), "lstat": ("path", "ptr"),
    "newfstatat": ("dirfd", "path", "ptr", "atflags"), "statx": ("dirfd", "path", "atflags", "hex", "ptr"),
    "access": ("path", "amode"), "faccessat": ("dirfd", "path", "amode"),
    "faccessat2": ("dirfd", "path", "amode", "atflags"), "readlink": ("path", "ptr", "int"),
    "readlinkat": ("dirfd", "path", "ptr", "int"), "execve": ("path", "ptr", "ptr"),
    "execveat": ("dirfd", "path", "ptr", "ptr", "atflags"), "mkdir": ("path", "mode"),
    "mkdirat": ("dirfd", "path", "mode"), "rmdir": ("path",), "unlink": ("path",),
    "unlinkat": ("dirfd", "path", "atflags"), "rename": ("path", "path"),
    "renameat": ("dirfd", "path", "dirfd", "path"), "renameat2": ("dirfd", "path", "dirfd", "path", "hex"),
    "link": ("path", "path"), "linkat": ("dirfd", "path", "dirfd", "path", "atflags"),
    "symlink": ("path", "path"), "symlinkat": ("path", "dirfd", "path"), "chdir": ("path",),
    "chroot": ("path",), "truncate": ("path", "int"), "chmod": ("path", "mode"),
    "fchmodat": ("dirfd", "path", "mode"), "chown": ("path", "int", "int"), "lchown": ("path", "int", "int"),
    "fchownat": ("dirfd", "path", "int", "int", "atflags"), "utimensat": ("dirfd", "path", "ptr", "atflags"),
    "mknod": ("path", "mode", "hex"), "mknodat": ("dirfd", "path", "mode", "hex"),
    "statfs": ("path", "ptr"), "inotify_add_watch": ("fd", "path", "hex"),
    "getxattr": ("path", "path", "ptr", "int"), "lgetxattr": ("path", "path", "ptr", "int"),
    "listxattr": ("path", "ptr", "int"), "mount": ("path", "path", "path", "hex", "ptr"),
    "umount2": ("path", "hex"),
    "ioctl": ("fd", "ioctl", "hex"), "fcntl": ("fd", "fcntl", "hex"),
    "clone": ("clone", "ptr", "ptr", "ptr", "hex"), "fork": (), "vfork": (), "clone3": ("ptr", "int"),
    "unshare": ("clone",), "setns": ("fd", "clone"),
    "socket": ("family", "socktype", "int"), "socketpair": ("family", "socktype", "int", "ptr"),
    "connect": ("fd", "sockaddr", "int"), "bind": ("fd", "sockaddr", "int"),
    "sendto": ("fd", "ptr", "int", "hex", "sockaddr", "int"),
    "kill": ("pid", "signal"), "tkill": ("pid", "signal"), "tgkill": ("pid", "pid", "signal"),
    "rt_sigqueueinfo": ("pid", "signal", "ptr"), "rt_tgsigqueueinfo": ("pid", "pid", "signal", "ptr"),
    "pidfd_send_signal": ("fd", "signal", "ptr", "hex"),
    "mmap": ("ptr", "int", "prot", "mapflags", "fd", "hex"), "mprotect": ("ptr", "int", "prot"),
    "pkey_mprotect": ("ptr", "int", "prot", "int"),
    "prlimit64": ("pid", "resource", "ptr", "ptr"), "setrlimit": ("resource", "ptr"),
    "getrlimit": ("resource", "ptr"), "alarm": ("int",), "setitimer": ("int", "ptr", "ptr"),
    "mbind": ("ptr", "int", "int", "ptr", "int", "hex"), "pipe2": ("ptr", "oflags"),
    "epoll_create1": ("oflags",), "eventfd2": ("int", "oflags"),
}
PATH_SYSCALLS = frozenset(n for n, sig in SIGNATURES.items() if "path" in sig)

# Groups an operator never lists: the policy key that brings each along.
GRANTED_BY_KEY = {"@file-write": "filesystem.writable or filesystem.scratch", "@threads": "limits.threads"}
# Groups too wide to propose for one syscall (epoll for asyncio's own loop is not networking).
TOO_WIDE = {"@network-client": "network.allow", "@process": "limits.processes"}

# Causes known to be harmless, by what the call looks like.
NSCD_SOCKET_PATHS = ("/var/run/nscd/socket", "/run/nscd/socket")
NSCD_NOTE = "glibc's nscd lookup (getpwuid): harmless; set HOME / grant nothing"


@dataclass(frozen=True)
class Report:
    syscall: str
    args_text: str
    path: str | None
    grant: str
    benign_note: str | None = None

    def __str__(self) -> str:
        text = f"{self.syscall}({self.args_text})"
        if self.path is not None and self.path not in self.args_text:
            text += f" path={self.path!r}"
        return text

    def to_dict(self) -> dict:
        return {"syscall": self.syscall, "args": self.args_text, "path": self.path, "grant": self.grant,
                "benign": self.benign_note}


# ---- pure decoders ---------------------------------------------------------------------------

def _signed(v: int, bits: int = 64) -> int:
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


def _bits(value: int, table, zero: str = "0") -> str:
    names, rest = [], value
    for bit, name in table:
        if value & bit == bit and bit:
            names.append(name)
            rest &= ~bit
    if rest:
        names.append(hex(rest))
    return "|".join(names) or zero


def ioctl_name(request: int) -> str:
    """The kernel takes the request as an unsigned int: high bits are ignored, but shown."""
    low = request & 0xFFFFFFFF
    name = IOCTLS.get(low)
    if name is None:
        return hex(request)
    return name if low == request else f"{name} (as {request:#x})"


def clone_flags(flags: int) -> str:
    flags &= 0xFFFFFFFF  # clone's flags are an int on x86_64
    text = _bits(flags & ~CSIGNAL, CLONE_FLAGS, zero="")
    sig = flags & CSIGNAL
    if sig:
        text = (text + "|" if text else "") + signal_name(sig)
    return text or "0"


def open_flags(flags: int) -> str:
    flags &= 0xFFFFFFFF
    mode = {0: "O_RDONLY", 1: "O_WRONLY", 2: "O_RDWR", 3: "O_ACCMODE"}[flags & O_ACCMODE]
    rest = _bits(flags & ~O_ACCMODE, OPEN_FLAGS, zero="")
    return mode + ("|" + rest if rest else "")


def is_write_open(flags: int) -> bool:
    return bool(flags & O_WRITE_MASK)


def socket_family(family: int) -> str:
    return FAMILIES.get(family & 0xFFFFFFFF, str(family))


def socket_type(kind: int) -> str:
    kind &= 0xFFFFFFFF
    base = SOCK_TYPES.get(kind & 0xF, str(kind & 0xF))
    extra = _bits(kind & ~0xF, [(SOCK_NONBLOCK, "SOCK_NONBLOCK"), (SOCK_CLOEXEC, "SOCK_CLOEXEC")], zero="")
    return base + ("|" + extra if extra else "")


def signal_name(sig: int) -> str:
    sig = _signed(sig, 32)
    if sig == 0:
        return "0"
    try:
        return _signal.Signals(sig).name
    except ValueError:
        if _signal.SIGRTMIN < sig <= _signal.SIGRTMAX:
            return f"SIGRTMIN+{sig - _signal.SIGRTMIN}"
        return str(sig)


def prot_bits(prot: int) -> str:
    return _bits(prot & 0xFFFFFFFF, PROT_BITS, zero="PROT_NONE")


def map_flags(flags: int) -> str:
    flags &= 0xFFFFFFFF
    kind = MAP_TYPES.get(flags & 0x3, "0")
    rest = _bits(flags & ~0x3, MAP_FLAGS, zero="")
    return kind + ("|" + rest if rest else "")


def dirfd_text(fd: int) -> str:
    fd = _signed(fd, 32)
    return "AT_FDCWD" if fd == AT_FDCWD else str(fd)


def sockaddr_text(raw: bytes | None) -> str | None:
    """A struct sockaddr as read from the task: 'AF_UNIX:/path', 'AF_INET:1.2.3.4:80', ..."""
    if not raw or len(raw) < 2:
        return None
    family = struct.unpack_from("<H", raw)[0]
    if family == 1:
        path = raw[2:]
        if path[:1] == b"\0":
            return "AF_UNIX:@" + path[1:].split(b"\0", 1)[0].decode("utf-8", "replace")
        return "AF_UNIX:" + path.split(b"\0", 1)[0].decode("utf-8", "replace")
    if family == 2 and len(raw) >= 8:
        port = struct.unpack_from(">H", raw, 2)[0]
        return f"AF_INET:{'.'.join(str(b) for b in raw[4:8])}:{port}"
    if family == 10 and len(raw) >= 24:
        import ipaddress
        port = struct.unpack_from(">H", raw, 2)[0]
        return f"AF_INET6:[{ipaddress.IPv6Address(bytes(raw[8:24]))}]:{port}"
    return socket_family(family)


def _arg_text(kind: str, value: int, text_for_path: str | None) -> str:
    if kind == "path":
        return repr(text_for_path) if text_for_path is not None else hex(value)
    if kind in ("fd", "int"):
        return str(_signed(value, 32)) if kind == "fd" else str(_signed(value))
    if kind == "pid":
        return str(_signed(value, 32))
    if kind == "dirfd":
        return dirfd_text(value)
    if kind == "oflags":
        return open_flags(value)
    if kind == "mode":
        return oct(value & 0o7777)
    if kind == "atflags":
        return _bits(value & 0xFFFFFFFF, AT_FLAGS)
    if kind == "amode":
        return _bits(value & 0x7, ACCESS_MODES, zero="F_OK")
    if kind == "ioctl":
        return ioctl_name(value)
    if kind == "clone":
        return clone_flags(value)
    if kind == "family":
        return socket_family(value)
    if kind == "socktype":
        return socket_type(value)
    if kind == "signal":
        return signal_name(value)
    if kind == "prot":
        return prot_bits(value)
    if kind == "mapflags":
        return map_flags(value)
    if kind == "resource":
        return RLIMITS.get(value, str(value))
    if kind == "fcntl":
        return FCNTL_CMDS.get(value, str(value))
    if kind in ("ptr", "hex"):
        return hex(value) if value else "0"  # pointers and flag words: as policies write them
    return hex(value) if value > 0xFFFF else str(value)  # unknown layouts


# ---- what would grant it ---------------------------------------------------------------------

def holding_group(name: str) -> str | None:
    """The smallest named group whose own list holds `name` (plainly, or by a conditional rule)."""
    from ..policy.groups import GROUPS, expand
    best = None
    for group in GROUPS:
        if group in ("@sandbox-runtime",):
            continue
        plain, rules = expand([group])
        if name in plain or any(s == name for s, _ in rules):
            size = len(set(plain)) + len(rules)
            if best is None or size < best[0]:
                best = (size, group)
    return best[1] if best else None


def grant_for(name: str, args: tuple[int, ...]) -> str:
    """The policy key an operator would write to make this call succeed (or why none exists)."""
    from ..policy.dangerous import DANGEROUS
    a = tuple(args) + (0,) * (6 - len(args))
    if name == "clone":
        flags = a[0] & 0xFFFFFFFF
        if flags & CLONE_NEW_NAMESPACES:
            return "nothing: new namespaces are never granted to a plugin"
        if flags & CLONE_THREAD:
            return "limits.threads"
        return "limits.processes"
    if name in ("fork", "vfork"):
        return "limits.processes"
    if name in DANGEROUS:
        return "dangerous: needs allow_dangerous"
    if name == "socket":
        fam = POLICY_FAMILY.get(a[0] & 0xFFFFFFFF)
        if fam is None:
            return f"nothing: policies grant only the unix, inet and inet6 families, not {socket_family(a[0])}"
        return f'network.allow + network.families = ["{fam}"]'
    if name in ("open", "openat", "creat"):
        flags = a[2] if name == "openat" else a[1]
        if name == "creat" or is_write_open(flags):
            return "filesystem.writable or filesystem.scratch"
        return "filesystem.read_only"
    if name == "ioctl":
        req = a[1] & 0xFFFFFFFF
        never = IOCTL_NEVER.get(IOCTLS.get(req, ""))
        if never:
            return f"nothing: {IOCTLS[req]} {never}"
        if a[1] != req:
            return "nothing: request has bits above 32 set"
        return f'[[seccomp.rule]] syscall = "ioctl", when = ["arg1 == {req:#x}"]'
    group = holding_group(name)
    if group in GRANTED_BY_KEY:
        return GRANTED_BY_KEY[group]
    if group in TOO_WIDE:
        return f'seccomp.allow = ["{name}"] ({TOO_WIDE[group]} brings it too, with much more)'
    if group is not None:
        return f'seccomp.groups = ["{group}"]'
    return f'seccomp.allow = ["{name}"]'


def benign_note(name: str, args: tuple[int, ...], sockaddr: str | None = None) -> str | None:
    a = tuple(args) + (0,) * (6 - len(args))
    if name == "connect" and sockaddr and sockaddr.split(":", 1)[-1] in NSCD_SOCKET_PATHS:
        return NSCD_NOTE
    # glibc's nscd client opens exactly this socket, first thing in getpwuid() and friends.
    if (name == "socket" and a[0] == 1 and a[1] & 0xF == 1 and a[1] & SOCK_CLOEXEC and a[1] & SOCK_NONBLOCK
            and a[2] == 0):
        return NSCD_NOTE
    if name == "ioctl" and a[1] & 0xFFFFFFFF == 0x5413:
        return "terminal size query (shutil.get_terminal_size, readline): harmless; the worker has no terminal"
    if name == "mbind":
        return "NUMA memory placement (OpenBLAS): harmless; answering EPERM is what Docker does"
    if name == "prlimit64" and a[0] == 0 and a[2] != 0:
        return "changes its own limit; the hard limits are set by the sandbox, so it can only lower them"
    return None


def describe(name: str, args: tuple[int, ...], *, pid: int | None = None,
             read_path: Callable[[int], str | None] | None = None,
             read_memory: Callable[[int, int], bytes | None] | None = None) -> Report:
    """Decode one syscall. `read_path(addr)` reads a NUL-terminated string from the task,
    `read_memory(addr, n)` raw bytes (for socket addresses); either may be None."""
    args = tuple(int(x) & U64 for x in args)
    sig = SIGNATURES.get(name)
    path = sockaddr = None
    if sig is None:
        shown = ", ".join(_arg_text("raw", v, None) for v in args)
    else:
        parts = []
        for i, value in enumerate(args):
            kind = sig[i] if i < len(sig) else None
            if kind is None:
                break
            text = None
            if kind == "path" and read_path is not None and value:
                text = read_path(value)
                if path is None:
                    path = text
            if kind == "sockaddr" and read_memory is not None and value:
                length = min(args[i + 1], 128) if i + 1 < len(args) else 128
                sockaddr = sockaddr_text(read_memory(value, length))
                parts.append(sockaddr or hex(value))
                continue
            parts.append(_arg_text(kind, value, text))
        shown = ", ".join(parts)
    grant = grant_for(name, args)
    if name in ("open", "openat", "creat") and path is not None and path.startswith(("/proc/", "/dev/")):
        grant += " (a /proc or /dev path: prefer not granting it)"
    return Report(syscall=name, args_text=shown, path=path or (sockaddr if name in ("connect", "bind") else None),
                  grant=grant, benign_note=benign_note(name, args, sockaddr))


# ---- reading the stopped task (host side, never for a decision) -------------------------------

def notification_valid(listener_fd: int, notif_id: int) -> bool:
    """SECCOMP_IOCTL_NOTIF_ID_VALID: is the task still stopped in the syscall we were told of?
    After a read from /proc/<pid>/mem it proves the pid was not reused in between."""
    try:
        fcntl.ioctl(listener_fd, SECCOMP_IOCTL_NOTIF_ID_VALID, struct.pack("<Q", notif_id))
    except OSError:
        return False
    return True


def read_memory(pid: int, addr: int, size: int, listener_fd: int, notif_id: int) -> bytes | None:
    """Up to `size` bytes (capped at PATH_MAX) at `addr` in task `pid`, or None."""
    size = max(0, min(size, PATH_MAX))
    try:
        fd = os.open(f"/proc/{int(pid)}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # gone, or not ours to read (an unprivileged host can't read a non-dumpable task)
    try:
        data = os.pread(fd, size, addr)
    except OSError as e:
        if e.errno not in (_errno.EIO, _errno.EFAULT, _errno.ESRCH, _errno.EPERM, _errno.EACCES):
            raise
        data = None
    except (OverflowError, ValueError):
        data = None
    finally:
        os.close(fd)
    if data is None or not notification_valid(listener_fd, notif_id):
        return None
    return data


def read_string(pid: int, addr: int, listener_fd: int, notif_id: int) -> str | None:
    """The NUL-terminated string at `addr` (at most PATH_MAX bytes), or None (unreadable, too
    long, or the notification is no longer valid). Undecodable bytes are escaped, not dropped."""
    data = read_memory(pid, addr, PATH_MAX, listener_fd, notif_id)
    if data is None:
        return None
    end = data.find(b"\0")
    if end < 0:
        return None  # longer than PATH_MAX: the kernel would refuse it too (ENAMETOOLONG)
    return data[:end].decode("utf-8", "surrogateescape")


def readers(pid: int, listener_fd: int, notif_id: int):
    """(read_path, read_memory) bound to one notification, for `describe`."""
    return (lambda addr: read_string(pid, addr, listener_fd, notif_id),
            lambda addr, n: read_memory(pid, addr, n, listener_fd, notif_id))


# ---- deaths the worker's limits caused (host side, from the zygote's wait4 rusage) ------------

# RLIMIT_CPU (soft = hard = limits.cpu_seconds) is checked against CPU time counted in scheduler
# ticks (a tick charges the whole tick to whoever runs at it), the rusage reports the precise run
# time: on a busy machine the rusage of a worker the limit killed reads up to a third below the
# limit (0.73 s for a 1 s limit, measured under load). Half the limit is the evidence asked for.
CPU_SHARE = 0.5
MEMORY_MARGIN = 64 << 20
# Signals the kernel sends at RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL at the hard one.
_CPU_SIGNALS = (_signal.SIGKILL, _signal.SIGXCPU)


def memory_near(limit: int) -> int:
    """A peak at or above this is evidence that the memory limit was reached: within one large
    allocation of it (64 MiB, or an eighth of the limit), never below half of it."""
    return max(limit // 2, limit - max(limit // 8, MEMORY_MARGIN))


def limit_death(raw: int | None, cpu_seconds: float | None, max_rss: int | None, *, plugin: str,
                cpu_limit: int | None, memory_limit: int | None) -> SandboxError | None:
    """The error for a death its limits caused, or None when the evidence doesn't say so.

    Evidence the plugin cannot forge: the kernel's rusage of the worker as the zygote reaped it,
    and how it died. A plugin can't send itself RLIMIT_CPU's signal (as pid 1 of its PID
    namespace it is immune to its own SIGKILL and SIGXCPU), and the host's own kills record
    their reason first: a SIGKILL or SIGXCPU death with the CPU time near the limit is the
    limit's. A peak resident set near limits.memory_mb is memory the worker really held
    (resident <= mapped <= RLIMIT_AS): a death after it is the memory limit's (malloc failing,
    the stack unable to grow: SIGSEGV, an exit in the middle)."""
    if raw is None:
        return None
    if os.WIFEXITED(raw) and os.WEXITSTATUS(raw) == 0:
        return None  # a clean exit is no death to explain
    signaled = os.WIFSIGNALED(raw)
    if (signaled and os.WTERMSIG(raw) in _CPU_SIGNALS and cpu_limit and cpu_seconds is not None
            and cpu_seconds >= cpu_limit * CPU_SHARE):
        sig = os.WTERMSIG(raw)
        return PluginCrashed(f"plugin {plugin} used up its {cpu_limit:g} s of CPU (limits.cpu_seconds); "
                             f"the kernel killed it with {signal_name(sig)}",
                             signal=sig)
    if memory_limit and max_rss is not None and max_rss >= memory_near(memory_limit):
        how = f"killed by signal {signal_name(os.WTERMSIG(raw))}" if signaled else \
            f"exited with code {os.waitstatus_to_exitcode(raw)}"
        return PluginMemoryError(f"plugin {plugin} reached its memory limit (limits.memory_mb = "
                                 f"{memory_limit >> 20}: {max_rss >> 20} MiB resident at its peak) and {how}")
    return None
