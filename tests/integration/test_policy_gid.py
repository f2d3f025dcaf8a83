"""Root hosts: a policy's workers share its writable paths through the policy's gid, and the
workers of any other policy do not (sandbox/_host/gids.py)."""
import errno
import grp
import os
import random
import stat
import subprocess
import sys

import pytest

import sandbox
from sandbox import PolicyError
from sandbox._host import gids
from helpers import IS_ROOT, ROOT

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="root mode only: unprivileged hosts run workers as themselves")

PLUGIN = """
    import os

    def ids():
        return [os.getuid(), os.getgid(), os.getgroups()]

    def append(path, text):
        try:
            with open(path, "a") as f:
                f.write(text)
        except OSError as e:
            return e.errno
        return "done"

    def read(path):
        try:
            with open(path) as f:
                return f.read()
        except OSError as e:
            return e.errno
"""


def _policy(folder, extra=""):
    return (f'[filesystem]\nwritable = ["{folder}"]\n[seccomp]\ngroups = ["@file-write"]\n'
            f"[limits]\nfile_size_mb = 1\n{extra}")


def test_a_policys_workers_share_its_writable_folder_and_no_other_policy_does(make_plugin, plugin_dir):
    folder = os.path.join(plugin_dir, "shared")
    path, mine = make_plugin(PLUGIN, _policy(folder), name="mine")
    os.mkdir(folder)
    policy = sandbox.Policy.load(mine)
    gid, _ = gids.policy_gid(policy)
    os.chown(folder, 0, gid)  # then chmod: chown clears the setgid bit
    # others may pass through (not list, not create): what then refuses another policy's worker
    # is the mode the file was made with (umask 007), not only the folder
    os.chmod(folder, 0o2771)
    # another policy granted the same folder; uids from a range of its own, so that it can never
    # draw the uid that owns the file (uids are reused across policies once released)
    _, theirs = make_plugin(PLUGIN, _policy(folder, "[identity]\nuid_range = [1900000000, 1900000999]\n"),
                            name="theirs")
    target = os.path.join(folder, "notes")
    with sandbox.Worker(path, policy=policy) as a:
        uid_a, gid_a, groups_a = a.call("ids")
        assert gid_a == gid and groups_a == []
        assert a.call("append", target, "A") == "done"
        st = os.stat(target)
        assert st.st_uid == uid_a and st.st_gid == gid and stat.S_IMODE(st.st_mode) == 0o660
        with sandbox.Worker(path, policy=mine) as b:  # the same policy file, loaded again
            uid_b, gid_b, _ = b.call("ids")
            assert uid_b != uid_a and gid_b == gid
            assert b.call("append", target, "B") == "done"
            assert b.call("read", target) == "AB"
        with sandbox.Worker(path, policy=theirs) as other:
            uid_o, gid_o, _ = other.call("ids")
            assert gid_o != gid and uid_o != uid_a
            assert other.call("read", target) == errno.EACCES
            assert other.call("append", target, "X") == errno.EACCES
            assert other.call("append", os.path.join(folder, "new"), "X") == errno.EACCES
    with open(target) as f:
        assert f.read() == "AB"


def test_two_policies_get_different_gids_and_one_policy_the_same_each_time(make_plugin):
    path, one = make_plugin(PLUGIN, "", name="one")
    _, two = make_plugin(PLUGIN, "", name="two")
    seen = {}
    for policy_path in (one, two, one):
        with sandbox.Worker(path, policy=policy_path) as w:
            uid, gid, _ = w.call("ids")
        assert gid != uid
        assert gid == gids.derive(os.path.realpath(policy_path), *sandbox.Policy.load(policy_path).gid_range)
        seen.setdefault(policy_path, set()).add(gid)
    assert len(seen[one]) == 1 and seen[one] != seen[two]


def test_an_explicit_gid_that_a_system_group_has_is_refused(make_plugin):
    taken = next(g for g in grp.getgrall() if g.gr_gid not in (0, 65534))
    path, policy = make_plugin(PLUGIN, f"[identity]\ngid = {taken.gr_gid}\n")
    with pytest.raises(PolicyError) as ei:
        sandbox.Worker(path, policy=policy)
    assert ei.value.key == "identity.gid" and taken.gr_name in str(ei.value)


def _lone_gid_range():
    gid = random.randint(1880000000, 1890000000)  # inside the default gid_range, clear of any policy's uids
    return gid, f"[identity]\ngid_range = [{gid}, {gid}]\n"


def test_two_policies_that_derive_one_gid_never_share_it(make_plugin):
    gid, one_gid_only = _lone_gid_range()
    path, first = make_plugin(PLUGIN, one_gid_only, name="first")
    _, second = make_plugin(PLUGIN, one_gid_only, name="second")
    with sandbox.Worker(path, policy=first) as w:
        assert w.call("ids")[1] == gid
        with pytest.raises(PolicyError) as ei:
            sandbox.Worker(path, policy=second)
        assert ei.value.key == "identity.gid" and first in str(ei.value) and "identity.gid = N" in str(ei.value)


OTHER_HOST = r"""
import sys
sys.path.insert(0, {root!r})
import sandbox
w = sandbox.Worker({plugin!r}, policy={policy!r})
print(w.call("ids")[1], flush=True)
sys.stdin.readline()  # hold the policy (and its gid) until told
w.close()
"""


def test_another_host_holding_the_gid_for_another_policy_is_refused_until_it_exits(make_plugin):
    gid, one_gid_only = _lone_gid_range()
    path, first = make_plugin(PLUGIN, one_gid_only, name="first")
    _, second = make_plugin(PLUGIN, one_gid_only, name="second")
    other = subprocess.Popen([sys.executable, "-c", OTHER_HOST.format(root=ROOT, plugin=path, policy=first)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == str(gid)
        with pytest.raises(PolicyError, match="in use by another policy") as ei:
            sandbox.Worker(path, policy=second)
        assert first in str(ei.value)
        # the same policy as the other host: the claim is shared
        with sandbox.Worker(path, policy=first) as w:
            assert w.call("ids")[1] == gid
    finally:
        other.stdin.close()
        other.wait(30)
    with sandbox.Worker(path, policy=second) as w:  # its host is gone, and its claim with it
        assert w.call("ids")[1] == gid
