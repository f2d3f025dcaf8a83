"""The minimal mount view: a worker that may make unix sockets sees only what its policy grants.

Connecting to a pathname unix socket (connect, sendto) is checked by the socket file's
permissions alone: Landlock's path rules govern making a socket file, not reaching one, and a
read-only mount does not refuse connect either. So in the read-only view a worker granted the
`unix` family could reach every socket file its uid may write (the D-Bus system bus, /dev/log,
and on an unprivileged host the user's own ssh-agent and session bus). What cannot be found
cannot be reached: for such a worker the root is a fresh, read-only tmpfs holding only

- every path the policy grants (its Landlock read and write paths: the Python runtime, the
  plugin folder, `read_only`, `writable`), each bound at its own path, read-only (writable
  ones read-write again where the host's mount was);
- the socket files named in `network.connect` ("unix:/path"), each bound alone;
- the scratch tmpfs and a /proc of the worker's own PID namespace, as in the read-only view.

A pathname socket is then reachable only if it lies inside a granted path or is named. The
binds keep the host's inodes, so a Landlock ruleset built on the host's paths still matches.

The technique is bubblewrap's: sources opened first (as O_PATH descriptors, so the tmpfs can
cover anything), the tmpfs built, /proc mounted while the host's is still visible (an
unprivileged user namespace may mount a procfs only then), pivot_root(".", ".") into it and the
old root detached. Runs in the private, read-only mount namespace mounts.py entered after fork,
before Landlock and before the worker's own user namespace.
"""
import ctypes
import errno
import os
import stat

from . import grant_paths, mounts, syscalls as _sys

SYS_pivot_root = 155
MNT_DETACH = 2
ROOT_OPTIONS = b"size=1m,nr_inodes=4096,mode=0755"
BASES = ("/tmp", "/mnt", "/run", "/var/tmp")  # an existing folder to build the new root on


def _proc_fd(fd: int) -> bytes:
    return f"/proc/self/fd/{fd}".encode()


def _open_source(path: str, *, socket_only: bool, writable: tuple[str, ...]) -> int | None:
    """An O_PATH descriptor of what a grant names, following only links no worker could have
    made (grant_paths.py); a socket named by path must be the socket itself, never a link."""
    if not socket_only:
        return grant_paths.open_grant(path, writable)
    folder, name = os.path.split(path)
    parent = grant_paths.open_grant(folder, writable)
    if parent is None:
        return None
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None  # nothing there (or not ours to see): nothing to grant, as Landlock skips it
    finally:
        os.close(parent)
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


_OpenHow = grant_paths.OpenHow
SYS_openat2, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_IN_ROOT = (
    grant_paths.SYS_openat2, grant_paths.RESOLVE_NO_MAGICLINKS, grant_paths.RESOLVE_NO_SYMLINKS,
    grant_paths.RESOLVE_IN_ROOT)
AT_EMPTY_PATH = 0x1000


def _open_in_root(root_fd: int, path: str) -> int | None:
    """`path` opened as the worker will find it, root_fd its "/" (absolute links included);
    None when it is not there (or the kernel lacks openat2: then every grant is bound)."""
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    fd = _sys.libc.syscall(SYS_openat2, root_fd, path.encode(), ctypes.byref(how), ctypes.sizeof(how))
    return fd if fd >= 0 else None


def _step_into(dir_fd: int, name: str) -> int:
    """One folder below dir_fd, made if missing; never through a symlink (ENOTDIR/ELOOP then)."""
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        os.mkdir(name, 0o755, dir_fd=dir_fd)
        return os.open(name, flags, dir_fd=dir_fd)


# a target that cannot be made: a link on the way, or a read-only bind that lacks the entry
_NOT_MADE = (errno.ENOTDIR, errno.ELOOP, errno.EROFS, errno.EEXIST, errno.EACCES, errno.ENOENT)


class _Tree:
    """The new root under construction: folders made on demand beneath it, never through a
    symlink (a link inside an earlier bind would point into the host's tree), each folder's
    descriptor kept until a mount covers it."""

    def __init__(self, base: str):
        self.base = base
        self.dirs: dict[str, int] = {}
        self.placed: list[str] = []  # where binds and links were made: only beneath them is a host inode

    def folder(self, path: str) -> int:
        fd = self.dirs.get(path)
        if fd is None:
            if path == "/":
                fd = os.open(self.base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            else:
                parent, name = os.path.split(path)
                fd = _step_into(self.folder(parent), name)
            self.dirs[path] = fd
        return fd

    def target(self, path: str, is_dir: bool) -> int | None:
        """An O_PATH descriptor (the caller's) of `path` in the tree, made if missing; None: not made."""
        try:
            if is_dir:
                return os.dup(self.folder(path))
            parent, name = os.path.split(path)
            pfd = self.folder(parent)
            flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(name, flags, dir_fd=pfd)
            except FileNotFoundError:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o644, dir_fd=pfd))
                fd = os.open(name, flags, dir_fd=pfd)
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode) or stat.S_ISDIR(mode):
                os.close(fd)
                return None
            return fd
        except OSError as e:
            if e.errno in _NOT_MADE:
                return None
            raise

    def covered(self, path: str) -> None:
        """A mount now lies over `path`: the descriptors at and beneath it name what it hides."""
        prefix = path.rstrip("/") + "/"
        for key in [k for k in self.dirs if k == path or k.startswith(prefix)]:
            os.close(self.dirs.pop(key))

    def shows(self, path: str, source: int, kind: str) -> bool:
        """Does the tree already show `source` at `path`, read-only unless it is a socket, as the
        worker will resolve it (its links within the new root)? Then no bind is needed."""
        if not any(path == p or path.startswith(p.rstrip("/") + "/") for p in self.placed):
            return False  # only folders the tree made itself lie there: nothing of the host's
        fd = _open_in_root(self.folder("/"), path)
        if fd is None:
            return False
        try:
            mine, there = os.fstat(source), os.fstat(fd)
            if (mine.st_dev, mine.st_ino) != (there.st_dev, there.st_ino):
                return False
            return kind == "socket" or bool(os.fstatvfs(fd).f_flag & os.ST_RDONLY)
        finally:
            os.close(fd)

    def bind(self, path: str, source: int) -> str | None:
        """Bind `source` at `path` (at its real path when `path` cannot be made without a link);
        the path used, or None when neither can be made."""
        is_dir = stat.S_ISDIR(os.fstat(source).st_mode)
        target = self.target(path, is_dir)
        if target is None:
            path = os.readlink(_proc_fd(source).decode())  # where it lies, links resolved
            target = self.target(path, is_dir)
            if target is None:
                return None
        try:
            _sys.mount(_proc_fd(source), _proc_fd(target), None, _sys.MS_BIND | _sys.MS_REC)
        finally:
            os.close(target)
        self.covered(path)
        self.placed.append(path)
        return path

    def writable(self, path: str) -> None:
        """The bind just made at `path` read-write again, found without following any link (by
        path, a link swapped in meanwhile could name another mount)."""
        how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
        fd = _sys.check(_sys.libc.syscall(SYS_openat2, self.folder("/"), path.encode(), ctypes.byref(how),
                                          ctypes.sizeof(how)), f"open {path} in the minimal view")
        try:
            attr = mounts._MountAttr(0, mounts.MOUNT_ATTR_RDONLY, 0, 0)
            _sys.check(_sys.libc.syscall(mounts.SYS_mount_setattr, fd, b"", AT_EMPTY_PATH, ctypes.byref(attr),
                                         ctypes.sizeof(attr)), f"mount_setattr {path}")
        finally:
            os.close(fd)

    def link(self, path: str, text: str, source: int) -> bool:
        """The host's symlink at `path` made again in the tree (a link costs less than a bind),
        kept only if it leads to `source` there."""
        parent, name = os.path.split(path)
        try:
            pfd = self.folder(parent)
            os.symlink(text, name, dir_fd=pfd)
        except OSError as e:
            if e.errno in _NOT_MADE:
                return False
            raise
        self.placed.append(path)
        if self.shows(path, source, "ro"):
            return True
        self.placed.pop()
        os.unlink(name, dir_fd=pfd)
        return False

    def close(self) -> None:
        for fd in self.dirs.values():
            os.close(fd)
        self.dirs.clear()


def _base() -> str:
    for base in BASES:
        if os.path.isdir(base) and not os.path.islink(base):
            return base
    raise OSError("no folder to build the minimal view on (tried " + ", ".join(BASES) + ")")


def _mount_id(fd: int) -> int | None:
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    return None


def _is_proc(path: str) -> bool:
    return path == "/proc" or path.startswith("/proc/")


class _Grant:
    __slots__ = ("path", "kind", "fd", "link")

    def __init__(self, path: str, kind: str, fd: int):
        self.path, self.kind, self.fd = path, kind, fd
        self.link: str | None = None  # the text of the host's symlink at `path`, for a read grant
        if kind == "ro":
            try:
                self.link = os.readlink(path)
            except OSError:
                pass


def _grants(read: list[str], writable: list[str], sockets: list[str], scratch: str | None,
            worker_writable: tuple[str, ...]) -> list[_Grant]:
    kinds: dict[str, str] = {}  # path -> "ro" / "rw" / "socket"; a write grant wins over a read one
    for kind, paths in (("ro", read), ("rw", writable), ("socket", sockets)):
        for path in paths:
            path = os.path.normpath(path)
            if path != scratch and not _is_proc(path) and kinds.get(path) != "rw":
                kinds[path] = kind
    out: list[_Grant] = []
    try:
        for path in sorted(kinds, key=lambda p: p.split("/")):  # a folder before what lies in it
            fd = _open_source(path, socket_only=kinds[path] == "socket", writable=worker_writable)
            if fd is not None:
                out.append(_Grant(path, kinds[path], fd))
    except BaseException:
        for g in out:
            os.close(g.fd)
        raise
    return out


def build(read: list[str], writable: list[str], sockets: list[str], scratch: str | None, *,
          scratch_bytes: int, scratch_inodes: int, owner: tuple[int, int],
          worker_writable: tuple[str, ...] = ()) -> None:
    """Replace this mount namespace's root with the minimal view (the module docstring)."""
    if mounts.prepared is None:
        mounts.enter_private_namespace()
    if mounts.prepared != "ok":
        raise OSError(mounts.prepared)
    grants = _grants(read, writable, sockets, scratch, (*writable, *worker_writable))  # before the tmpfs covers all
    base = _base()
    tree = _Tree(base)
    try:
        _sys.mount(b"tmpfs", base.encode(), b"tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, ROOT_OPTIONS)
        # links last: the folder a link leads to is bound by then
        for g in [g for g in grants if g.link is None] + [g for g in grants if g.link is not None]:
            if g.kind != "rw" and tree.shows(g.path, g.fd, g.kind):
                continue  # already there, read-only, through the bind of a folder around it
            if g.link is not None and tree.link(g.path, g.link, g.fd):
                continue
            where = tree.bind(g.path, g.fd)
            if where is not None and g.kind == "rw" and _mount_id(g.fd) in mounts._was_writable:
                # only the top mount: a read-only mount beneath a writable path stays read-only
                tree.writable(where)
        if scratch:
            target = tree.target(scratch, True)
            if target is None:
                raise OSError(f"the scratch folder {scratch} cannot be made in the minimal view")
            uid, gid = owner
            options = f"size={int(scratch_bytes)},nr_inodes={int(scratch_inodes)},mode=0700,uid={uid},gid={gid}"
            try:
                _sys.mount(b"tmpfs", _proc_fd(target), b"tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV,
                           options.encode())
            finally:
                os.close(target)
        proc = tree.target("/proc", True)
        if proc is None:
            raise OSError("no /proc folder can be made in the minimal view")
        try:
            _sys.mount(b"proc", _proc_fd(proc), b"proc", mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC)
        except OSError as e:
            raise OSError(e.errno, f"no /proc of the worker's own PID namespace: {e.strerror}") from None
        finally:
            os.close(proc)
    finally:
        tree.close()
        for g in grants:
            os.close(g.fd)
    mounts._setattr(base, set_=mounts.MOUNT_ATTR_RDONLY, recursive=False)  # the tmpfs root itself
    _pivot(base)


def _pivot(base: str) -> None:
    """Make `base` the root and detach the old one (pivot_root(".", "."), as runc and bubblewrap
    do: the old root is stacked on the new one, then unmounted from beneath our feet)."""
    os.chdir(base)
    old = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        _sys.check(_sys.libc.syscall(SYS_pivot_root, b".", b"."), "pivot_root")
        os.fchdir(old)
        _sys.check(_sys.libc.umount2(b".", MNT_DETACH), "detach the old root")
    finally:
        os.close(old)
    os.chdir("/")


def warm_up(paths: list[str]) -> None:
    """Walk the host-side half of `build` on read-only calls (a spare does it while idle, so a
    unix-family worker pays no first-touch page faults for this code)."""
    grants = _grants(paths, [], [], None, ())
    try:
        root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for g in grants[:1]:
                fd = _open_in_root(root, g.path)
                if fd is not None:
                    os.fstatvfs(fd), os.fstat(fd), os.fstat(g.fd)
                    os.close(fd)
        finally:
            os.close(root)
    finally:
        for g in grants:
            os.close(g.fd)
