"""A gid per policy (root hosts): a policy's workers share its writable paths, and nothing else does.

Each worker keeps a uid of its own (uids.py: process limits, signals); its gid is its policy's,
with no supplementary groups. Its umask is 007, so what it makes in a writable path is group
read-write: the next worker of the same policy, under another uid, opens it through the group
bits, while a worker of another policy (another gid, empty "other" bits) cannot. The operator
makes each writable directory the policy's once (`chgrp GID DIR && chmod 2770 DIR`, printed by
`sandbox policy explain`); the library never changes an operator's directory.

The gid is `identity.gid` when the policy file sets one, else a hash of the policy file's
resolved path into `identity.gid_range`: the same after a host restart or a reboot, so files
written yesterday stay shared. A policy without a file (Policy.from_dict, no path) has nothing
stable to derive from: its workers keep a private gid equal to their uid.

A gid must not be a group of the system (its members, and any file of that group, would be
the worker's), nor one of the subordinate gids useradd hands out for containers (/etc/subgid),
nor inside the uid range (the old one-gid-per-worker scheme used those numbers).

Two different policies must never share a gid silently. While a host has a live worker of a
policy, the policy's gid is claimed machine-wide: a file `gid-N` in the uid claims directory holds the policy's
resolved path under a shared flock. Hosts serving the same policy share the claim; a policy
with another path finds the claim held and gets a PolicyError saying to set identity.gid. The
kernel drops the locks of a host that dies; a claim nobody holds is taken over by the next
claimer, and the last holder to let go removes the file.
"""
from __future__ import annotations

import atexit
import fcntl
import grp
import hashlib
import logging
import os
import stat
import threading
import time
import weakref

from ..errors import HostResourceError, PolicyError
from . import uids

SUBGID_FILE = "/etc/subgid"
RESERVED = frozenset({65534, 65535})  # nogroup, and (gid_t)-1 of 16-bit interfaces
MAX_RECORD = 8192
log = logging.getLogger("sandbox")

_lock = threading.Lock()
_held: dict[int, list] = {}  # gid -> [owner, fd or None, claim path, live workers in this process]
_workers: dict[int, int] = {}  # a live worker's uid -> its gid
_chosen: "weakref.WeakKeyDictionary[object, tuple]" = weakref.WeakKeyDictionary()


# ---- which gid ---------------------------------------------------------------------------------
def derive(path: str, lo: int, hi: int) -> int:
    """The gid a policy file at `path` (resolved) gets in [lo, hi]: a hash, the same every time."""
    digest = hashlib.sha256(os.fsencode(path)).digest()
    return lo + int.from_bytes(digest[:8], "big") % (hi - lo + 1)


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except (KeyError, OverflowError):
        return None


def _check_gid(gid: int, policy, key: str, how: str) -> None:
    where = policy.path
    name = _group_name(gid)
    if name is not None:
        raise PolicyError(f"{how} gid {gid} is the system group {name!r}: its members and files would be "
                          "the workers'; set identity.gid to a number no group has", where, key)
    if gid in RESERVED:
        raise PolicyError(f"{how} gid {gid} is reserved (nogroup / -1)", where, key)
    lo, hi = policy.uid_range
    if lo <= gid <= hi:
        raise PolicyError(f"{how} gid {gid} lies inside identity.uid_range [{lo}, {hi}]; pick one outside it",
                          where, key)
    for first, last in uids.subordinate_ranges(SUBGID_FILE):
        if first <= gid <= last:
            raise PolicyError(f"{how} gid {gid} is among the subordinate gids {first}-{last} of {SUBGID_FILE} "
                              "(another user's container ids)", where, key)


def _check_range(policy) -> None:
    lo, hi = policy.gid_range
    ulo, uhi = policy.uid_range
    key = "identity.gid_range"
    if lo <= uhi and ulo <= hi:
        raise PolicyError(f"gid_range [{lo}, {hi}] overlaps identity.uid_range [{ulo}, {uhi}]", policy.path, key)
    for first, last in uids.subordinate_ranges(SUBGID_FILE):
        if lo <= last and first <= hi:
            raise PolicyError(f"gid_range [{lo}, {hi}] overlaps the subordinate gids {first}-{last} listed in "
                              f"{SUBGID_FILE}; pick a range outside every entry", policy.path, key)


def policy_gid(policy) -> tuple[int | None, str]:
    """(the gid this policy's workers share on a root host, where it comes from). None: a policy
    without a file and without identity.gid, whose workers each keep a gid of their own.
    PolicyError (naming identity.gid or identity.gid_range) when the gid is unusable here."""
    explicit = getattr(policy, "gid", None)
    if explicit is not None:
        _check_gid(explicit, policy, "identity.gid", "identity.gid:")
        return explicit, "identity.gid"
    if policy.path is None:
        return None, "a policy without a file: each worker's gid is its uid (set identity.gid to share)"
    _check_range(policy)
    real = os.path.realpath(policy.path)
    gid = derive(real, *policy.gid_range)
    _check_gid(gid, policy, "identity.gid_range", f"the derived (from {real})")
    return gid, f"derived from {real} into identity.gid_range"


def _owner(policy) -> str:
    """What a claim records: the policy file, resolved; a file-less policy is one of a kind."""
    if policy.path is None:
        return f"<policy without a file, pid {os.getpid()}, id {id(policy):#x}>"
    return os.path.realpath(policy.path)


# ---- the machine-wide claim ----------------------------------------------------------------------
def _same_file(fd: int, path: str) -> bool:
    try:
        here = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def _try_flock(fd: int, op: int) -> bool:
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _recorded(fd: int) -> str:
    return os.pread(fd, MAX_RECORD, 0).decode("utf-8", "replace")


def _open_claim(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise HostResourceError(f"{path} is not a claim file of ours (a regular file we own)", resource="gids")
    return fd


def _collision(gid: int, other: str, policy, how: str) -> PolicyError:
    return PolicyError(f"gid {gid} ({how}) is in use by another policy, {other[:300]}; two policies never share "
                       "a gid: give this one a gid of its own with identity.gid = N (a number no group has)",
                       policy.path, "identity.gid")


def _claim_file(directory: str, gid: int, owner: str, policy, how: str) -> int:
    """The fd holding a shared flock on `gid-N`, which records `owner`."""
    path = f"{directory}/gid-{gid}"
    for _ in range(400):
        try:
            fd = _open_claim(path)
        except FileExistsError:
            continue  # another host made it just now: open theirs
        except OSError as e:
            raise HostResourceError(f"cannot claim gid {gid} in {directory}: {e.strerror}", resource="gids") from None
        try:
            if _try_flock(fd, fcntl.LOCK_EX):
                # nobody holds it: whatever it records is no live policy's
                if _same_file(fd, path):
                    data = owner.encode()
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, data, 0)
                    # the downgrade may let another claimer in between: read again below
                    if _try_flock(fd, fcntl.LOCK_SH) and _same_file(fd, path):
                        held = _recorded(fd)
                        if held == owner:
                            fd, kept = -1, fd
                            return kept
                        raise _collision(gid, held, policy, how)
            elif _try_flock(fd, fcntl.LOCK_SH) and _same_file(fd, path):
                held = _recorded(fd)
                if held == owner:
                    fd, kept = -1, fd
                    return kept
                if held:
                    raise _collision(gid, held, policy, how)
        except OSError as e:
            raise HostResourceError(f"cannot claim gid {gid} in {directory}: {e.strerror}", resource="gids") from None
        finally:
            if fd >= 0:
                os.close(fd)
        time.sleep(0.002)  # a claimer is writing its record (microseconds), or the file was just removed
    raise HostResourceError(f"cannot claim gid {gid}: {path} stays busy", resource="gids")


def _release_file(fd: int, path: str) -> None:
    # The last holder (an exclusive lock is free to take) removes the file, still locked: whoever
    # opened it meanwhile sees, once locked, that the name is gone and starts again.
    if _try_flock(fd, fcntl.LOCK_EX) and _same_file(fd, path):
        try:
            os.unlink(path)
        except OSError:
            pass
    os.close(fd)


def _drop(gid: int) -> None:
    entry = _held.get(gid)
    if entry is None:
        return
    entry[3] -= 1
    if entry[3] <= 0:
        del _held[gid]
        if entry[1] is not None:
            _release_file(entry[1], entry[2])


def _choice(policy) -> tuple[int | None, str, str]:
    """(gid, where it comes from, what a claim records), worked out once per Policy object."""
    try:
        return _chosen[policy]
    except KeyError:
        pass
    gid, how = policy_gid(policy)
    got = _chosen[policy] = (gid, how, _owner(policy))
    return got


def worker_gid(policy, uid: int | None) -> int | None:
    """The gid of a new worker with this uid (root hosts; None when unprivileged): its policy's,
    claimed until that uid is released (uids.release); its uid for a file-less policy."""
    if uid is None:
        return None
    gid, how, owner = _choice(policy)
    if gid is None:
        return uid
    with _lock:
        if uid in _workers:  # a plan built again for one uid: count it once
            _drop(_workers.pop(uid))
        _take(gid, owner, policy, how)
        _workers[uid] = gid
    return gid


def worker_released(uid: int) -> None:
    """The worker with this uid is gone (called by uids.release): its policy's claim with it,
    once no worker of that policy is left in this process."""
    with _lock:
        gid = _workers.pop(uid, None)
        if gid is not None:
            _drop(gid)


def _take(gid: int, owner: str, policy, how: str) -> None:
    entry = _held.get(gid)
    if entry is not None:
        if entry[0] != owner:
            raise _collision(gid, entry[0], policy, how)
        entry[3] += 1
        return
    directory = uids.CLAIMS
    fd = None
    if uids._claims_dir(directory):
        fd = _claim_file(directory, gid, owner, policy, how)
    else:
        log.warning("sandbox: policy gids are unique within this process only (%s is not usable)", directory)
    _held[gid] = [owner, fd, f"{directory}/gid-{gid}", 1]


@atexit.register
def _release_all() -> None:
    # Bounded: a thread stuck in a section must not keep the host from exiting. The claims
    # left then are only files whose lock the kernel frees with this process: reused later.
    if not _lock.acquire(timeout=1.0):
        return
    try:
        for gid in list(_held):
            _held[gid][3] = 1
            _drop(gid)
    finally:
        _lock.release()


__all__ = ["derive", "policy_gid", "worker_gid"]
