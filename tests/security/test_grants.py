"""Attacks 38 and 42 of the README's security table: a grant gives exactly what it says.
Writes (and chmod, chown, utimes,
which Landlock does not cover) outside the writable paths meet a read-only mount (EROFS);
scratch is a tmpfs of the worker's own with a size and an inode quota (child/mounts.py)."""
import errno
import os
import stat

import pytest

import sandbox
from helpers import IS_ROOT

pytestmark = pytest.mark.unpriv

PLUGIN = """
    import os

    def uid():
        return os.getuid()

    def change(path):
        out = {}
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)  # fchmod and utimensat: the @file-write calls
        try:
            for name, act in (("chmod", lambda: os.fchmod(fd, 0o6777)), ("utime", lambda: os.utime(fd, (0, 0)))):
                try:
                    act()
                    out[name] = "done"
                except OSError as e:
                    out[name] = e.errno
        finally:
            os.close(fd)
        return out

    def make_dirs(n):
        for i in range(n):
            try:
                os.mkdir(f"d{i}")
            except OSError as e:
                return [i, e.errno]
        return [n, 0]

    def write_mb(name, mb):
        chunk = b"x" * (1 << 20)
        done = 0
        try:
            with open(name, "wb") as f:
                for _ in range(mb):
                    f.write(chunk)
                    f.flush()
                    done += 1
        except OSError as e:
            return [done, e.errno]
        return [done, 0]

    def cwd():
        return os.getcwd()

    def deep(levels):
        parent = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
        for i in range(levels):  # mkdirat/openat: no chdir in @file-write
            os.mkdir("d", dir_fd=parent)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=parent)
            os.close(parent)
            parent = child
        os.close(parent)
        return levels
"""
# @file-attributes granted on purpose: the read-only mount view is the layer these tests prove.
SCRATCH = '[filesystem]\nscratch = true\n[seccomp]\ngroups = ["@file-write", "@file-attributes"]\n'


def _own_the_plugin_file(w, path):
    """Make DAC allow the change: the file belongs to the worker's uid (root host: chown it to the
    worker's uid; unprivileged: it is the host's uid already)."""
    if IS_ROOT:
        uid = w.call("uid")
        os.chown(path, uid, uid)


def test_no_mode_owner_or_time_change_outside_writable_paths(make_plugin):
    """38: with scratch and @file-write, a plugin that owns a file of its read-only folder still
    can't make it setuid or re-date it: the folder is a read-only mount in its view."""
    path, policy = make_plugin(PLUGIN, SCRATCH)
    before = os.stat(path)
    with sandbox.Worker(path, policy=policy) as w:
        _own_the_plugin_file(w, path)
        got = w.call("change", path)
        assert got == {"chmod": errno.EROFS, "utime": errno.EROFS}
    after = os.stat(path)
    assert stat.S_IMODE(after.st_mode) == stat.S_IMODE(before.st_mode) and after.st_mtime == before.st_mtime


def test_mode_changes_inside_scratch_still_work(make_plugin):
    path, policy = make_plugin(PLUGIN, SCRATCH + "[limits]\nfile_size_mb = 1\n")
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("write_mb", "f", 1) == [1, 0]
        got = w.call("change", "f")
        assert got["chmod"] == "done" and got["utime"] == "done"


def test_scratch_has_an_inode_quota(make_plugin):
    """38: 5,000 directories in scratch: the tmpfs runs out of inodes (4,096 by default)."""
    path, policy = make_plugin(PLUGIN, SCRATCH)
    with sandbox.Worker(path, policy=policy) as w:
        made, err = w.call("make_dirs", 5000)
    assert err == errno.ENOSPC and 3000 < made < 4096


def test_scratch_has_a_size_quota(make_plugin):
    """38: a file over the scratch size (64 MiB by default) fails, though the file size limit
    would allow it."""
    path, policy = make_plugin(PLUGIN, SCRATCH + "[limits]\nfile_size_mb = 200\nmemory_mb = 512\n")
    with sandbox.Worker(path, policy=policy) as w:
        done, err = w.call("write_mb", "big", 80)
    assert err == errno.ENOSPC and 50 <= done <= 64


def test_a_deep_scratch_tree_never_troubles_close(make_plugin):
    """42: 1,200 directories deep in scratch: close() raises nothing, the exit callbacks run,
    the host's scratch folder is gone (the tree lived in the worker's tmpfs)."""
    path, policy = make_plugin(PLUGIN, SCRATCH)
    w = sandbox.Worker(path, policy=policy)
    exits = []
    w.on("exit", exits.append)
    scratch = w.call("cwd")
    assert scratch != "/" and os.path.isdir(scratch)
    assert w.call("deep", 1200) == 1200
    w.close()
    assert len(exits) == 1
    assert not os.path.exists(scratch)


def _writable_policy(paths, extra=""):
    listed = ", ".join(f'"{p}"' for p in paths)
    return (f'[filesystem]\nwritable = [{listed}]\n[seccomp]\ngroups = ["@file-write", "@file-attributes"]\n'
            '[limits]\nfile_size_mb = 1\n' + extra)


def test_writable_paths_stay_writable(make_plugin, plugin_dir):
    """The view binds each writable path back read-write: a folder and a single file."""
    out = os.path.join(plugin_dir, "out")
    os.mkdir(out)
    single = os.path.join(plugin_dir, "single.txt")
    open(single, "w").close()
    for p in (out, single):
        os.chmod(p, 0o777 if p == out else 0o666)
    path, policy = make_plugin(PLUGIN, _writable_policy([out, single]))
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("write_mb", os.path.join(out, "result"), 1) == [1, 0]
        assert w.call("change", os.path.join(out, "result"))["chmod"] == "done"
        assert w.call("write_mb", single, 1) == [1, 0]
        assert w.call("write_mb", os.path.join(plugin_dir, "beside"), 1)[1] in (errno.EROFS, errno.EACCES)
    assert os.path.getsize(os.path.join(out, "result")) == 1 << 20  # on the host: not a private copy
    assert os.path.getsize(single) == 1 << 20


READ_ONLY_HOST = r"""
import json, os, sys, tempfile
sys.path.insert(0, {root!r})
from sandbox.child import syscalls as _sys
uid, gid = os.getuid(), os.getgid()
if uid != 0:
    _sys.unshare(_sys.CLONE_NEWUSER)
    for name, text in (("setgroups", "deny"), ("uid_map", f"{{uid}} {{uid}} 1"), ("gid_map", f"{{gid}} {{gid}} 1")):
        with open(f"/proc/self/{{name}}", "w") as f:
            f.write(text)
_sys.unshare(_sys.CLONE_NEWNS)
_sys.mount(b"none", b"/", None, _sys.MS_REC | _sys.MS_PRIVATE)
out = {out!r}
_sys.mount(out.encode(), out.encode(), None, _sys.MS_BIND)
_sys.mount(b"none", out.encode(), None, 32 | 4096 | 1)  # MS_REMOUNT | MS_BIND | MS_RDONLY
import sandbox
with sandbox.Worker({plugin!r}, policy={policy!r}) as w:
    print(json.dumps(w.call("write_mb", os.path.join(out, "result"), 1)))
"""


def test_a_grant_never_makes_a_read_only_host_mount_writable(make_plugin, plugin_dir, tmp_path):
    """The writable path lies on a mount that is read-only for the host too (a host of its own
    in a subprocess, with its own mount namespace): the worker's view keeps it read-only."""
    import json
    import subprocess
    import sys
    from helpers import ROOT
    out = os.path.join(plugin_dir, "out")
    os.mkdir(out)
    os.chmod(out, 0o777)
    path, policy = make_plugin(PLUGIN, _writable_policy([out]))
    script = tmp_path / "host.py"
    script.write_text(READ_ONLY_HOST.format(root=ROOT, out=out, plugin=path, policy=policy))
    os.chmod(tmp_path, 0o755)
    os.chmod(script, 0o644)
    got = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout.strip().splitlines()[-1]) == [0, errno.EROFS]
    assert not os.path.exists(os.path.join(out, "result"))
