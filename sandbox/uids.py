"""Unique uids for live workers (root mode): RLIMIT_NPROC and kill permissions become per worker."""
import pwd
import random
import threading

_in_use: set[int] = set()
_lock = threading.Lock()


def allocate(lo: int, hi: int) -> int:
    with _lock:
        for _ in range(10_000):
            uid = random.randint(lo, hi)
            if uid == 0 or uid in _in_use:
                continue
            try:
                pwd.getpwuid(uid)
                continue  # an existing account's uid: never reuse it
            except KeyError:
                pass
            _in_use.add(uid)
            return uid
    raise RuntimeError(f"no free uid in [{lo}, {hi}]")


def release(uid: int | None) -> None:
    if uid is not None:
        with _lock:
            _in_use.discard(uid)
