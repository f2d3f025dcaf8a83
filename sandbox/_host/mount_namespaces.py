"""A worker's mount namespace, let go off every caller's path.

When the last reference to a mount namespace goes, the kernel unmounts its copy of every mount
and then waits for an RCU grace period (synchronize_rcu_expedited, in namespace_unlock): about
a millisecond, spent inside the dying worker's do_exit, before its exit is reported. So
terminate() waited for it, and so did every fresh-per-call cycle.

The host takes a reference when the worker is ready (PIDFD_GET_MNT_NAMESPACE on its pidfd,
Linux 6.11): the worker then exits at once, is reaped and released as before, and a thread of
this module drops the references afterwards, one after the other. Nothing else changes: the
namespace is the worker's own, held only by this process, and gone a moment later. Where the
kernel lacks the ioctl, or refuses it, nothing is held and terminate() pays as before.
"""
from __future__ import annotations

import errno
import fcntl
import os
import queue
import threading

PIDFD_GET_MNT_NAMESPACE = 0xFF03  # _IO(PIDFS_IOCTL_MAGIC 0xFF, 3)
_UNSUPPORTED = (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES)

_supported = True
_pending: queue.SimpleQueue[int] = queue.SimpleQueue()  # put() takes no lock a caller could hold
_thread: threading.Thread | None = None
_start_lock = threading.Lock()


def hold(pidfd: int) -> int | None:
    """A descriptor that keeps the worker's mount namespace alive, or None."""
    global _supported
    if not _supported:
        return None
    try:
        return fcntl.ioctl(pidfd, PIDFD_GET_MNT_NAMESPACE)
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            _supported = False  # this kernel (or this host's rights) won't: stop asking
        return None  # ESRCH (it died meanwhile), EMFILE: nothing held this time


def release_later(fd: int) -> None:
    """Drop the reference on the closer thread (the worker is gone: nothing waits for this)."""
    _pending.put(fd)
    if _thread is None:
        _start()


def _start() -> None:
    global _thread
    with _start_lock:
        if _thread is not None:
            return
        thread = threading.Thread(target=_close_forever, name="sandbox-mntns-release", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: close here, paying the wait once
            _drain_here()
            return
        _thread = thread


def _close_forever() -> None:
    while True:
        fd = _pending.get()
        try:
            os.close(fd)
        except OSError:
            pass


def _drain_here() -> None:
    while True:
        try:
            fd = _pending.get_nowait()
        except queue.Empty:
            return
        try:
            os.close(fd)
        except OSError:
            pass


def _after_fork_in_child() -> None:
    # The closer thread is the parent's; the child starts its own when it first needs one.
    global _thread, _pending, _start_lock
    _thread, _pending, _start_lock = None, queue.SimpleQueue(), threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
