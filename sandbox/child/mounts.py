"""The worker's own mount namespace: a read-only view of everything, writable only where granted.

Landlock decides which paths a worker may write, but not everything that changes a file is a
Landlock right: chmod, chown and utimes are not (a plugin with a grant to write one folder
could re-mode and re-date files anywhere it can read). A read-only mount refuses all of them,
and every other write, with EROFS, whatever the file's owner. So each worker gets:

- its mount namespace, every mount private (nothing it does here propagates to the host);
- every mount read-only (mount_setattr, recursively);
- each writable path of the policy bound back over itself, read-write again only if it was
  read-write before (a grant never makes a read-only host mount writable);
- a /proc of the worker's own PID namespace over the host's: Landlock does not cover stat(),
  so with the host's /proc a worker could still tell which pids exist (stat /proc/N); in its
  own there is only its own tree. It stays read-write (the steps that follow write the
  worker's uid_map there; procfs refuses chmod/utimes by itself);
- the scratch folder as a private tmpfs with a size and an inode quota: what the worker
  writes there lives in its own memory-backed filesystem, gone with its last process, so the
  host never walks (or removes) a tree a hostile plugin built.

Runs while the worker may still mount: before Landlock (which forbids mount changes), and
before a worker makes a user namespace of its own (the mount namespace belongs to the
zygote's user namespace, where the worker still holds the capability to mount; from its own
user namespace it can change none of these mounts).
"""
import ctypes
import os

from . import grant_paths, syscalls as _sys

SYS_mount_setattr = 442
AT_FDCWD, AT_RECURSIVE, AT_EMPTY_PATH = -100, 0x8000, 0x1000
MOUNT_ATTR_RDONLY = 0x00000001
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
DEFAULT_SCRATCH_BYTES = 64 << 20
DEFAULT_SCRATCH_INODES = 4096


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _setattr(path: str, *, set_: int = 0, clr: int = 0, propagation: int = 0, recursive: bool) -> None:
    attr = _MountAttr(set_, clr, propagation, 0)
    flags = AT_RECURSIVE if recursive else 0
    _sys.check(_sys.libc.syscall(SYS_mount_setattr, AT_FDCWD, path.encode(), flags, ctypes.byref(attr),
                                 ctypes.sizeof(attr)), f"mount_setattr {path}")


prepared: str | None = None  # "ok" once this process has its private, read-only view, else why not
_was_writable: frozenset = frozenset()  # ids of the mounts that were read-write before we made them read-only


def _writable_mount_ids() -> frozenset:
    """Mount ids (field 1 of mountinfo) of this namespace's mounts that are read-write."""
    ids = set()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ", 6)
            if len(fields) > 5 and fields[5].split(b",")[0] == b"rw":
                ids.add(int(fields[0]))
    return frozenset(ids)


def _fd_mount_id(fd: int) -> int | None:
    """The id of the mount an open descriptor lies on."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    return None


def _setattr_fd(fd: int, *, clr: int) -> None:
    attr = _MountAttr(0, clr, 0, 0)
    _sys.check(_sys.libc.syscall(SYS_mount_setattr, fd, b"", AT_EMPTY_PATH, ctypes.byref(attr),
                                 ctypes.sizeof(attr)), f"mount_setattr {grant_paths.real_path(fd)}")


def enter_private_namespace() -> None:
    """The part that needs no plan, done right after the fork (a spare pays it while idle):
    a mount namespace of our own, every mount private (nothing we mount may ever propagate
    back to the host's namespace) and read-only, remembering which were read-write before.
    Never raises: a failure is recorded for the step to report."""
    global prepared, _was_writable
    try:
        _sys.unshare(_sys.CLONE_NEWNS)
        _setattr("/", propagation=_sys.MS_PRIVATE, recursive=True)
        _was_writable = _writable_mount_ids()
        _setattr("/", set_=MOUNT_ATTR_RDONLY, recursive=True)
        prepared = "ok"
    except OSError as e:
        prepared = f"no read-only mount namespace of its own: {e.strerror or e}"


def read_only_view(writable: list[str], scratch: str | None, *, scratch_bytes: int, scratch_inodes: int,
                   owner: tuple[int, int], worker_writable: tuple[str, ...] = ()) -> None:
    """Finish the view described in the module docstring, in the private read-only mount
    namespace entered after the fork (entered here if that did not happen)."""
    if prepared is None:
        enter_private_namespace()
    if prepared != "ok":
        raise OSError(prepared)
    keep_rw: list[int] = []
    try:
        for path in dict.fromkeys(writable):
            if path == scratch or path == "/proc" or path.startswith("/proc/"):
                continue  # /proc is the worker's own, below
            # by descriptor, never through a link a worker could have made (grant_paths.py)
            fd = grant_paths.open_grant(path, (*writable, *worker_writable))
            if fd is None:
                continue  # nothing there: nothing to grant (Landlock skips it too)
            if _fd_mount_id(fd) in _was_writable:
                keep_rw.append(fd)
            else:
                os.close(fd)
        for fd in keep_rw:
            where = f"/proc/self/fd/{fd}".encode()
            _sys.mount(where, where, None, _sys.MS_BIND | _sys.MS_REC)
            # The new mount lies over what fd names: reached by its real path, through no link.
            # Only the top mount: a read-only mount beneath a writable path stays read-only.
            top = grant_paths.open_no_links(grant_paths.real_path(fd))
            try:
                _setattr_fd(top, clr=MOUNT_ATTR_RDONLY)
            finally:
                os.close(top)
    finally:
        for fd in keep_rw:
            os.close(fd)
    try:
        _sys.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError as e:
        raise OSError(e.errno, f"no /proc of the worker's own PID namespace: {e.strerror}") from None
    if scratch:
        uid, gid = owner
        options = f"size={int(scratch_bytes)},nr_inodes={int(scratch_inodes)},mode=0700,uid={uid},gid={gid}"
        _sys.mount(b"tmpfs", scratch.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode())
