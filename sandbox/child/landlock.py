"""Landlock through ctypes: a deny-by-default filesystem view, TCP rules and scoping.

Chosen over the `landlock` PyPI package because the child must stay lean (no extra imports
after fork) and we need ABI 4 (network) and ABI 6 (signal and abstract-socket scoping), which we
detect and use when present.
"""
import ctypes
import os
import stat

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


def handled_fs(abi: int) -> int:
    return FS_BY_ABI.get(abi, FS_BY_ABI[5])


def build_ruleset(read_paths, write_paths, *, abi: int, deny_tcp: bool, scope_abstract_unix: bool,
                  scope_signals: bool = True) -> int:
    """A ruleset fd holding the path rules. Built once per distinct plan by the zygote and
    reused by every worker (restricting oneself with it does not change it)."""
    fs = handled_fs(abi)
    attr = _RulesetAttr(fs, 0, 0)
    size = 8
    if abi >= 4:
        size = 16
        attr.net = (NET_BIND_TCP | NET_CONNECT_TCP) if deny_tcp else 0
    if abi >= 6:
        size = 24
        attr.scoped = (SCOPE_SIGNAL if scope_signals else 0) | (SCOPE_ABSTRACT_UNIX_SOCKET if scope_abstract_unix else 0)
    ruleset = check(libc.syscall(SYS_create_ruleset, ctypes.byref(attr), size, 0), "landlock_create_ruleset")
    try:
        for paths, rights in ((read_paths, READ_RIGHTS), (write_paths, fs)):
            for path in paths:
                _add_path(ruleset, path, rights & fs)
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


def _add_path(ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # nothing there: nothing to grant
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FILE_RIGHTS
        rule = _PathBeneath(rights, fd)
        check(libc.syscall(SYS_add_rule, ruleset, RULE_PATH_BENEATH, ctypes.byref(rule), 0),
              f"landlock_add_rule {path}")
    finally:
        os.close(fd)
