"""Unique uids for live workers (root mode): RLIMIT_NPROC and kill permissions become per worker."""
import os
import pwd
import random
import threading

_in_use: set[int] = set()
_lock = threading.Lock()
_accounts: tuple = (None, frozenset())  # (/etc/passwd mtime, uids of existing accounts)


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


def allocate(lo: int, hi: int) -> int:
    with _lock:
        accounts = _existing_uids()
        for _ in range(10_000):
            uid = random.randint(lo, hi)
            if uid == 0 or uid in _in_use or uid in accounts:  # never an existing account's uid
                continue
            _in_use.add(uid)
            return uid
    raise RuntimeError(f"no free uid in [{lo}, {hi}]")


def release(uid: int | None) -> None:
    if uid is not None:
        with _lock:
            _in_use.discard(uid)
