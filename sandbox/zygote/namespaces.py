"""What the zygote does once, for all its workers: namespaces, and a view of the runtime.

Namespaces made here are shared by every worker of this zygote and cost nothing per worker:
an empty network namespace (no interface but a down loopback) means no network at all, and
private IPC and UTS namespaces hide the host's. A private mount namespace lets the zygote make
the Python runtime reachable for uids that can't traverse its parents (e.g. a pyenv under /root,
mode 0700) by laying a 0755 tmpfs over that parent holding only bind mounts of what is needed:
the rest of the parent (say, root's home) vanishes from the workers' sight.
"""
import os
import stat
from typing import Iterable

from ..child import syscalls as _sys

NS_FLAGS = {"net": _sys.CLONE_NEWNET, "ipc": _sys.CLONE_NEWIPC, "uts": _sys.CLONE_NEWUTS}


def prepare(args: list[str]) -> dict:
    wanted = [a for a in args if a in NS_FLAGS]
    expose = [a.split(":", 1)[1] for a in args if a.startswith("expose:")]
    done, errors = [], []
    if os.geteuid() != 0:
        expose = []  # unprivileged workers keep our uid: what we reach, they reach
    if os.geteuid() != 0 and wanted:
        try:
            _enter_user_namespace()
            done.append("user")
        except OSError as e:
            errors.append(f"user namespace: {e.strerror or e}")
    for name in wanted:
        try:
            _sys.unshare(NS_FLAGS[name])
            done.append(name)
        except OSError as e:
            errors.append(f"{name} namespace: {e.strerror or e}")
    blocked = _blocked_parents(expose)
    if blocked:
        try:
            _sys.unshare(_sys.CLONE_NEWNS)
            _sys.mount(b"none", b"/", None, _sys.MS_REC | _sys.MS_PRIVATE)
            for parent, children in blocked.items():
                _overlay_parent(parent, children)
            done.append("mount")
        except OSError as e:
            errors.append(f"mount namespace: {e.strerror or e}")
    return {"namespaces": done, "errors": errors}


def _enter_user_namespace():
    uid, gid = os.getuid(), os.getgid()
    _sys.unshare(_sys.CLONE_NEWUSER)
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _blocked_parents(paths: Iterable[str]) -> dict[str, set[str]]:
    """Map each directory that 'others' can't traverse to the children of it we must keep."""
    blocked: dict[str, set[str]] = {}
    for path in paths:
        path = os.path.abspath(path)
        parts = path.strip("/").split("/")
        for i in range(len(parts) - 1):
            parent = "/" + "/".join(parts[:i + 1]) if i >= 0 else "/"
            try:
                mode = os.stat(parent).st_mode
            except OSError:
                break
            if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
                blocked.setdefault(parent, set()).add(parts[i + 1])
                break
    return blocked


def _overlay_parent(parent, children):
    held = {c: os.open(os.path.join(parent, c), os.O_PATH | os.O_CLOEXEC) for c in children}
    try:
        _sys.mount(b"tmpfs", parent.encode(), b"tmpfs", 0, b"mode=0755,size=64k")
        for child, fd in held.items():
            target = os.path.join(parent, child)
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
            if is_dir:
                os.mkdir(target, 0o755)
            else:
                open(target, "w").close()
            _sys.mount(f"/proc/self/fd/{fd}".encode(), target.encode(), None, _sys.MS_BIND | _sys.MS_REC)
    finally:
        for fd in held.values():
            os.close(fd)
