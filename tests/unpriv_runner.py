"""Run pytest as an unprivileged user (the library's unprivileged mode), started as root.

The interpreter may live where that user can't go (pyenv under /root, mode 0700), so first,
in a private mount namespace, lay the same 0755 view over such parents that the zygote uses
for its workers; then drop to the user for good and exec pytest.
"""
import os
import pwd
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sandbox.child import syscalls as _sys  # noqa: E402
from sandbox.zygote import namespaces as view  # noqa: E402


def main():
    user = os.environ.get("UNPRIV_USER", "nobody")
    pw = pwd.getpwnam(user)
    needed = [os.path.realpath(sys.executable), sys.prefix, sys.base_prefix, ROOT]
    blocked = view._blocked_parents(needed)
    if blocked:
        _sys.unshare(_sys.CLONE_NEWNS)
        _sys.mount(b"none", b"/", None, _sys.MS_REC | _sys.MS_PRIVATE)
        for parent, children in blocked.items():
            view._overlay_parent(parent, children)
    os.setgroups([])
    os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
    os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
    os.chdir(ROOT)
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "unpriv", *sys.argv[1:]]
    os.execve(sys.executable, args, env)


if __name__ == "__main__":
    main()
