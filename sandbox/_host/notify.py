"""Host side of seccomp user notification: read which syscall a worker tried, and answer it.

The worker's filter answers syscalls it does not allow with SECCOMP_RET_USER_NOTIF; the listener
fd was handed to us before the plugin loaded, so only the host can see them. In the policy's
"kill" mode the host never answers (the worker is killed); in "deny" mode it fails the syscall
with an errno, and a private hook may let one continue.
"""
import errno
import fcntl
import select
import struct

from .lifecycle import Notification

SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100       # _IOWR('!', 0, struct seccomp_notif)
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101       # _IOWR('!', 1, struct seccomp_notif_resp)
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102   # _IOW('!', 2, __u64); kernels before 5.17 also took _IOR
_ID_VALID_OLD = 0x80082102
_NOTIF = struct.Struct("<QII iIQ 6Q")  # id, pid, flags, nr, arch, ip, args[6]
_RESP = struct.Struct("<QqiI")         # id, val, error, flags
_names: dict[int, str] = {}


def receive(listener_fd: int) -> Notification | None:
    """One pending notification, or None if none is pending (or its task died meanwhile)."""
    # NOTIF_RECV ignores O_NONBLOCK: with no notification pending and the worker alive it blocks
    # until the worker makes a forbidden syscall, i.e. possibly forever. A wake-up can be stale
    # (epoll reported a closed fd whose number a new worker's listener now has), so ask first.
    p = select.poll()
    p.register(listener_fd, select.POLLIN)
    if not any(ev & select.POLLIN for _, ev in p.poll(0)):
        return None
    buf = bytearray(_NOTIF.size)
    try:
        fcntl.ioctl(listener_fd, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
    except OSError:
        return None  # ENOENT: the task died meanwhile; EINTR/EAGAIN: nothing there
    nid, pid, _flags, nr, _arch, _ip, *args = _NOTIF.unpack(buf)
    return Notification(nid, pid, nr, syscall_name(nr), tuple(args))


def id_valid(listener_fd: int, notification_id: int) -> bool:
    """Whether the notification still stands for a task waiting in that syscall."""
    raw = struct.pack("<Q", notification_id)
    for request in (SECCOMP_IOCTL_NOTIF_ID_VALID, _ID_VALID_OLD):
        try:
            fcntl.ioctl(listener_fd, request, raw)
            return True
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOTTY):
                return False  # ENOENT: the task is gone or the syscall was interrupted
    return False


def answer(listener_fd: int, notification_id: int, error: int, flags: int = 0) -> bool:
    """Answer a notification: the syscall returns -1 with errno `-error`, or (flags CONTINUE)
    runs as if the filter had allowed it. False if the task is no longer waiting."""
    if not id_valid(listener_fd, notification_id):
        return False
    try:
        fcntl.ioctl(listener_fd, SECCOMP_IOCTL_NOTIF_SEND, _RESP.pack(notification_id, 0, error, flags))
    except OSError:
        return False  # ENOENT: it went away between the check and the answer
    return True


def syscall_name(nr: int) -> str:
    name = _names.get(nr)
    if name is None:
        try:
            try:
                import seccomp
            except ImportError:
                import pyseccomp as seccomp
            raw = seccomp.resolve_syscall(seccomp.Arch.NATIVE, nr)
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
        except Exception:
            name = f"syscall#{nr}"
        _names[nr] = name
    return name
