"""Unique uids for live workers (root mode): RLIMIT_NPROC and kill permissions become per worker.

Unique on the machine, not just in this process: two hosts drawing from the same range would
otherwise, now and then, give two workers one uid, and with it each other's processes (signals,
the per-uid process limit). A uid is claimed by holding an flock on a file named after it in a
directory only we control; the kernel drops the claim when the holder closes it or dies, so a
crashed host leaks no claim.

Claim files do not pile up: a release removes its file while still holding the lock, and a
claimer checks, once it holds a lock, that the file it locked is still the one at that name
(else it locked a file just released and removed, and tries again). A directory that is full
or read-only still serves: unlocked claim files already there are reused. Only when no claim
can be made at all does a start fail, with a HostResourceError naming the directory.

A uid range must not overlap an account (/etc/passwd) nor the subordinate ids that useradd
hands out (/etc/subuid, /etc/subgid): a worker with a container user's uid could signal that
user's processes and share their process limit.
"""
import errno
import fcntl
import logging
import os
import pwd
import random
import threading

from ..errors import HostResourceError, PolicyError

CLAIMS = "/run/sandbox-uids"
SUBORDINATE_FILES = ("/etc/subuid", "/etc/subgid")
log = logging.getLogger("sandbox")
_in_use: dict[int, tuple[int, str] | None] = {}  # uid -> (fd holding its machine-wide claim, its path)
_lock = threading.Lock()
_accounts: tuple = (None, frozenset())  # (/etc/passwd mtime, uids of existing accounts)
_subordinate: dict[str, tuple] = {}  # path -> (mtime, [(first, last), ...])
_claims_ok: dict[str, bool] = {}  # directory -> usable
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMLINK}


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


def subordinate_ranges(path: str) -> list[tuple[int, int]]:
    """(first, last) of every `name:start:count` line of a subuid/subgid file; [] if absent."""
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        return []
    cached = _subordinate.get(path)
    if cached and cached[0] == mtime:
        return cached[1]
    ranges = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.strip().split(":")
            if len(parts) != 3 or line.lstrip().startswith("#"):
                continue
            try:
                start, count = int(parts[1]), int(parts[2])
            except ValueError:
                continue
            if count > 0:
                ranges.append((start, start + count - 1))
    _subordinate[path] = (mtime, ranges)
    return ranges


def check_range(lo: int, hi: int, policy_path: str | None = None, files=None) -> None:
    """PolicyError (identity.uid_range) if [lo, hi] overlaps a subordinate id range."""
    for path in files if files is not None else SUBORDINATE_FILES:
        for first, last in subordinate_ranges(path):
            if lo <= last and first <= hi:
                raise PolicyError(f"uid_range [{lo}, {hi}] overlaps the subordinate ids {first}-{last} "
                                  f"listed in {path} (another user's container ids); pick a range outside "
                                  "every /etc/subuid and /etc/subgid entry", path=policy_path, key="identity.uid_range")


def _claims_dir(directory: str) -> bool:
    ok = _claims_ok.get(directory)
    if ok is None:
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError:
            pass  # read-only parent, say: it may exist already, and then it still serves
        try:
            st = os.lstat(directory)
            # ours alone: a directory someone else controls could hand us claims that mean nothing
            ok = (st.st_uid == os.geteuid() and (st.st_mode & 0o777) == 0o700
                  and not os.path.islink(directory) and os.path.isdir(directory))
        except OSError:
            ok = False
        if not ok:
            log.warning("sandbox: %s is missing or not ours alone (owner, mode 0700); worker uids are "
                        "unique within this process only", directory)
        _claims_ok[directory] = ok
    return ok


HELD, MINE, STALE = "held", "mine", "stale"


def _lock_and_verify(fd: int, path: str) -> str:
    """Try an exclusive flock on fd: HELD (another holder has it), MINE (locked, and still the
    file at `path`) or STALE (locked a file that was released and removed meanwhile)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return HELD
    try:
        here = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return STALE
    mine = os.fstat(fd)
    return MINE if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino) else STALE


def _claim(directory: str, uid: int):
    """The fd holding a machine-wide claim on uid; None if another host holds it. Raises
    OSError (ENOSPC, EROFS, ...) when no claim file can be made for it."""
    path = f"{directory}/{uid}"
    for _ in range(8):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                continue  # another host made it just now: open theirs
        got = _lock_and_verify(fd, path)
        if got == MINE:
            return fd
        os.close(fd)
        if got == HELD:
            return None
    return None  # released and re-made under us again and again: count it as taken


def _reuse_existing(directory: str, lo: int, hi: int, accounts) -> tuple[int, int] | None:
    """A (uid, fd) from a claim file already in the directory, for when none can be created."""
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    random.shuffle(names)
    for name in names:
        if not name.isdigit():
            continue
        uid = int(name)
        if not lo <= uid <= hi or uid == 0 or uid in _in_use or uid in accounts:
            continue
        try:
            fd = _claim(directory, uid)
        except OSError:
            continue
        if fd is not None:
            return uid, fd
    return None


def allocate(lo: int, hi: int, policy_path: str | None = None) -> int:
    with _lock:
        check_range(lo, hi, policy_path)
        accounts = _existing_uids()
        directory = CLAIMS
        machine_wide = _claims_dir(directory)
        cannot_create = None
        for _ in range(10_000):
            uid = random.randint(lo, hi)
            if uid == 0 or uid in _in_use or uid in accounts:  # never an existing account's uid
                continue
            fd = None
            if machine_wide:
                try:
                    fd = _claim(directory, uid)
                except OSError as e:
                    if e.errno not in _FULL:
                        raise HostResourceError(f"cannot claim a worker uid in {directory}: {e.strerror}",
                                                resource="uids") from None
                    cannot_create = e
                    break
                if fd is None:
                    continue  # another host's worker has it
            _in_use[uid] = (fd, f"{directory}/{uid}") if fd is not None else None
            return uid
        if cannot_create is not None:
            got = _reuse_existing(directory, lo, hi, accounts)
            if got is not None:
                uid, fd = got
                log.warning("sandbox: %s accepts no new claim files (%s); reusing an existing one",
                            directory, cannot_create.strerror)
                _in_use[uid] = (fd, f"{directory}/{uid}")
                return uid
            raise HostResourceError(f"no worker uid can be claimed: {directory} accepts no new claim file "
                                    f"({cannot_create.strerror}) and holds no free one; free space there or "
                                    "make it writable", resource="uids")
    raise HostResourceError(f"no free uid in [{lo}, {hi}] (identity.uid_range): every uid is in use by a "
                            "live worker or an account", resource="uids")


def release(uid: int | None) -> None:
    if uid is None:
        return
    from . import gids
    gids.worker_released(uid)  # the worker's share in its policy's gid claim
    with _lock:
        claim = _in_use.pop(uid, None)
        if claim is None:
            return
        fd, path = claim
        try:
            # still locked: whoever opened it meanwhile finds it gone once they hold the lock
            os.unlink(path)
        except OSError:
            pass  # a read-only directory: the file stays, for reuse
        os.close(fd)
