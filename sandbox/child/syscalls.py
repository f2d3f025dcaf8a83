"""The few raw kernel calls Python's os module lacks, in one place (x86_64 numbers)."""
import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

SYS_close_range = 436
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_REC, MS_PRIVATE, MS_BIND = 0x4000, 1 << 18, 4096


def check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def close_range(first: int, last: int = 0xFFFFFFFF) -> None:
    check(libc.syscall(SYS_close_range, first, last, 0), "close_range")


def unshare(flags: int) -> None:
    check(libc.unshare(flags), "unshare")


def mount(source: bytes, target: bytes, fstype: bytes | None, flags: int, data: bytes | None = None) -> None:
    check(libc.mount(source, target, fstype, flags, data), f"mount {target!r}")
