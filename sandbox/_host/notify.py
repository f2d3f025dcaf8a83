"""Host side of seccomp user notification: read which syscall a worker tried.

The worker's filter answers forbidden syscalls with SECCOMP_RET_USER_NOTIF; the listener fd was
handed to us before the plugin loaded, so only the host can see (and never approves) them.
"""
import fcntl
import select
import struct

SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
_NOTIF = struct.Struct("<QII iIQ 6Q")  # id, pid, flags, nr, arch, ip, args[6]
_names: dict[int, str] = {}


def receive(listener_fd: int):
    """Return (pid, syscall_nr, args) of one pending notification, or None if none is pending."""
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
    _id, pid, _flags, nr, _arch, _ip, *args = _NOTIF.unpack(buf)
    return pid, nr, tuple(args)


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
