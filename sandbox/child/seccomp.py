"""Install a prepared seccomp program (raw BPF bytes) in the calling process.

The host compiles each policy once with libseccomp; the child only hands the bytes to the
kernel, which is what keeps a confined start under a millisecond (no libseccomp in the child).
"""
import ctypes
import os

SYS_seccomp = 317  # x86_64; the policy compiler only emits native-arch programs
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_FILTER_FLAG_TSYNC = 1 << 0
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_TSYNC_ESRCH = 1 << 4  # 5.7+; Landlock (5.13+) is required anyway
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_filter(bpf: bytes, *, listener: bool = False) -> int | None:
    """Load `bpf` (a `struct sock_filter[]`) as this thread group's filter.

    With `listener`, ask the kernel for a user-notification fd and return it: the caller must
    hand it to the supervisor and close it before any untrusted code runs.
    """
    if not bpf or len(bpf) % 8:
        raise ValueError("seccomp program must be a non-empty array of 8-byte instructions")
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.addressof(buf))
    flags = SECCOMP_FILTER_FLAG_TSYNC
    if listener:
        # Every thread gets the filter, also those a preload started (OpenBLAS does, at import):
        # without TSYNC they would run unfiltered. With a listener, TSYNC needs TSYNC_ESRCH.
        flags = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_TSYNC | SECCOMP_FILTER_FLAG_TSYNC_ESRCH
    ret = _libc.syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(prog))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp(SET_MODE_FILTER) failed: {os.strerror(err)}")
    return ret if listener else None


def action_available(action: int = 0x80000000) -> bool:
    """SECCOMP_GET_ACTION_AVAIL (default: KILL_PROCESS); a query that changes nothing."""
    value = ctypes.c_uint32(action)
    return _libc.syscall(SYS_seccomp, SECCOMP_GET_ACTION_AVAIL, 0, ctypes.byref(value)) == 0


def set_no_new_privs() -> None:
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "prctl(PR_SET_NO_NEW_PRIVS) failed")
