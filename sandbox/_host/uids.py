"""Unique uids for live workers (root mode): RLIMIT_NPROC and kill permissions become per worker.

Unique on the machine, not just in this process: two hosts drawing from the same range would
otherwise, now and then, give two workers one uid, and with it each other's processes (signals,
the per-uid process limit, the uid-wide kill that ends a worker's leftovers). A uid is claimed
by holding an flock on a file named after it in a root-only directory; the kernel drops the
claim when the holder closes it or dies, so a crashed host leaks nothing.
"""
import fcntl
import logging
import os
import pwd
import random
import threading

CLAIMS = "/run/sandbox-uids"
log = logging.getLogger("sandbox")
_in_use: dict[int, int | None] = {}  # uid -> the fd holding its machine-wide claim
_lock = threading.Lock()
_accounts: tuple = (None, frozenset())  # (/etc/passwd mtime, uids of existing accounts)
_claims_ok: bool | None = None


def _existing_uids() -> frozenset:
    """Account uids, re-read only when /etc/passwd changes (a lookup per worker costs ~70 us)."""
    global _accounts
    try:
        mtime = os.stat("/etc/passwd").st_mtime_ns
    except OSError:
        mtime = None
    if _accounts[0] != mtime or mtime is None:
        _accounts = (mtime, frozenset(p.pw_uid for p in pwd.getpwall()))
    return _accounts[1]


def _claims_dir() -> bool:
    global _claims_ok
    if _claims_ok is None:
        try:
            os.makedirs(CLAIMS, mode=0o700, exist_ok=True)
            st = os.lstat(CLAIMS)
            # ours alone: a directory someone else controls could hand us claims that mean nothing
            _claims_ok = st.st_uid == 0 and (st.st_mode & 0o777) == 0o700 and not os.path.islink(CLAIMS)
        except OSError:
            _claims_ok = False
        if not _claims_ok:
            log.warning("sandbox: %s is unusable; worker uids are unique within this process only", CLAIMS)
    return _claims_ok


def _claim(uid: int):
    """The fd holding a machine-wide claim on uid, or None if another host holds it."""
    fd = os.open(f"{CLAIMS}/{uid}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def allocate(lo: int, hi: int) -> int:
    with _lock:
        accounts = _existing_uids()
        machine_wide = _claims_dir()
        for _ in range(10_000):
            uid = random.randint(lo, hi)
            if uid == 0 or uid in _in_use or uid in accounts:  # never an existing account's uid
                continue
            fd = _claim(uid) if machine_wide else None
            if machine_wide and fd is None:
                continue  # another host's worker has it
            _in_use[uid] = fd
            return uid
    raise RuntimeError(f"no free uid in [{lo}, {hi}]")


def release(uid: int | None) -> None:
    if uid is not None:
        with _lock:
            fd = _in_use.pop(uid, None)
        if fd is not None:
            os.close(fd)
