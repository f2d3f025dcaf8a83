"""Landlock through ctypes: a deny-by-default filesystem view, TCP rules and scoping.

What each part can and cannot say, because the policy keys promise no more than this:
- TCP (ABI 4): rules name a port, never an address. A worker granted port 8080 may connect to
  port 8080 on any address it can route to; bind is handled with no rule, so it is denied.
  There are no UDP rules at all: a worker in the host's network namespace sends datagrams
  anywhere its socket family allows.
- Abstract unix sockets (ABI 6): only a scope exists (none outside the worker's own Landlock
  domain), no rule naming a socket, so they are scoped always. Pathname unix sockets are files:
  the path rules decide them.

Chosen over the `landlock` PyPI package because the child must stay lean (no extra imports
after fork) and we need ABI 4 (network) and ABI 6 (signal and abstract-socket scoping), which we
detect and use when present.
"""
import ctypes
import os
import stat

from . import grant_paths
from .syscalls import check, libc

SYS_create_ruleset, SYS_add_rule, SYS_restrict_self = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
READ_RIGHTS = EXECUTE | READ_FILE | READ_DIR


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPort(ctypes.Structure):
    _fields_ = [("allowed", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def abi_version(at_most: int | None = None) -> int:
    """0 when Landlock is unavailable (old kernel, disabled at boot). `at_most` caps the answer:
    a test (or a cautious operator) can make this kernel behave like an older one, never newer."""
    ret = libc.syscall(SYS_create_ruleset, None, 0, CREATE_RULESET_VERSION)
    abi = ret if ret > 0 else 0
    if isinstance(at_most, int) and not isinstance(at_most, bool) and at_most >= 0:
        abi = min(abi, at_most)
    return abi


class MissingLayer(OSError):
    """This kernel lacks a Landlock feature the plan needs: the worker refuses to start, and the
    host's ConfinementError names `layer` (e.g. "landlock-net")."""

    def __init__(self, layer: str, message: str):
        super().__init__(message)
        self.layer = layer


NET_ABI, SCOPE_ABI = 4, 6


def require(abi: int, *, port_rules: bool, unix_sockets: bool) -> None:
    """Refuse, naming the layer, what this ABI cannot enforce: port rules need ABI 4; a worker
    that may make unix sockets in the host's network namespace needs the abstract-socket scope
    (ABI 6), or it could reach every abstract socket on the host."""
    if port_rules and abi < NET_ABI:
        raise MissingLayer("landlock-net", f"network.connect needs Landlock TCP rules (ABI {NET_ABI}); "
                           f"this kernel has ABI {abi}: refusing to start with any TCP port open")
    if unix_sockets and abi < SCOPE_ABI:
        raise MissingLayer("landlock-scope", f'families = ["unix"] needs the Landlock abstract-socket scope '
                           f"(ABI {SCOPE_ABI}); this kernel has ABI {abi}: the worker could reach every "
                           "abstract unix socket of the host's network namespace")


def handled_fs(abi: int) -> int:
    return FS_BY_ABI.get(abi, FS_BY_ABI[5])


def build_ruleset(read_paths, write_paths, *, abi: int, tcp: str, connect_ports=(),
                  scope_signals: bool = True, worker_writable=()) -> int:
    """A ruleset fd holding the path and port rules. Built once per distinct plan by the host and
    reused by every worker (restricting oneself with it does not change it).

    `tcp`: "none" (bind and connect denied), "ports" (connect to `connect_ports` only, bind
    denied) or "any" (TCP not handled: today's `network.allow` without `connect`). Abstract unix
    sockets are always scoped where the kernel can (ABI 6); `require` refuses where it must.
    `worker_writable`: folders some worker may write besides these (no link there is followed)."""
    if tcp not in ("none", "ports", "any"):
        raise ValueError(f"tcp must be none, ports or any, not {tcp!r}")
    if tcp == "ports":
        require(abi, port_rules=True, unix_sockets=False)
    fs = handled_fs(abi)
    attr = _RulesetAttr(fs, 0, 0)
    size = 8
    if abi >= NET_ABI:
        size = 16
        attr.net = (NET_BIND_TCP | NET_CONNECT_TCP) if tcp != "any" else 0
    if abi >= SCOPE_ABI:
        size = 24
        attr.scoped = (SCOPE_SIGNAL if scope_signals else 0) | SCOPE_ABSTRACT_UNIX_SOCKET
    ruleset = check(libc.syscall(SYS_create_ruleset, ctypes.byref(attr), size, 0), "landlock_create_ruleset")
    try:
        for paths, rights in ((read_paths, READ_RIGHTS), (write_paths, fs)):
            for path in paths:
                _add_path(ruleset, path, rights & fs, (*write_paths, *worker_writable))
        if tcp == "ports":
            for port in connect_ports:
                _add_port(ruleset, port, NET_CONNECT_TCP)
    except BaseException:
        os.close(ruleset)
        raise
    return ruleset


def restrict_self(ruleset: int) -> None:
    check(libc.syscall(SYS_restrict_self, ruleset, 0), "landlock_restrict_self")


def restrict(read_paths, write_paths, **kw) -> None:
    ruleset = build_ruleset(read_paths, write_paths, **kw)
    try:
        restrict_self(ruleset)
    finally:
        os.close(ruleset)


def _add_path(ruleset: int, path: str, rights: int, writable) -> None:
    # never through a link a worker could have made (grant_paths.py): the rule is for an inode
    fd = grant_paths.open_grant(path, writable)
    if fd is None:
        return  # nothing there: nothing to grant
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FILE_RIGHTS
        rule = _PathBeneath(rights, fd)
        check(libc.syscall(SYS_add_rule, ruleset, RULE_PATH_BENEATH, ctypes.byref(rule), 0),
              f"landlock_add_rule {path}")
    finally:
        os.close(fd)


def _add_port(ruleset: int, port: int, rights: int) -> None:
    if type(port) is not int or not 0 < port < 65536:
        raise ValueError(f"{port!r} is not a TCP port")
    rule = _NetPort(rights, port)
    check(libc.syscall(SYS_add_rule, ruleset, RULE_NET_PORT, ctypes.byref(rule), 0),
          f"landlock_add_rule tcp port {port}")
