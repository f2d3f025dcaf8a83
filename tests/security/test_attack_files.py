"""Attacks 29-32 of the README's security table: the host's files and policy.
Each test names the layer meant to stop the attack."""
import os
import tempfile

import pytest

from sandbox import PluginError
from helpers import ROOT
from security.attack_lab import intact

pytestmark = pytest.mark.unpriv


def test_policy_files_are_out_of_reach(lab):
    """29: policies are read by the host before fork; Landlock keeps the policies folder out of
    sight, and even with @file-write granted nothing outside the worker's own grants is writable."""
    repo_policy = os.path.join(ROOT, "policies", "textstats.toml")
    before = open(repo_policy).read()
    with intact(lab, '[seccomp]\ngroups = ["@file-write"]\n') as w:
        got = w.call("read", repo_policy)
        assert isinstance(got, str) and got.startswith("refused")
        ret, err = w.call("sys", 257, -100, 0, 0o1001)  # openat(AT_FDCWD, NULL, O_WRONLY|O_TRUNC): no path
        assert ret == -1
        with pytest.raises(PluginError) as ei:
            w.call("write_file", repo_policy)
        assert ei.value.type in ("PermissionError", "OSError")  # EACCES (Landlock) or EROFS (read-only view)
    assert open(repo_policy).read() == before


def test_symlinked_scratch_is_not_followed_by_the_host(lab):
    """31: scratch removal works on fds and never follows a symlink the worker made."""
    victim = tempfile.NamedTemporaryFile(prefix="host-file-", delete=False)
    victim.write(b"precious")
    victim.close()
    try:
        with intact(lab, scratch=True) as w:
            scratch = w.call("make_symlink", victim.name)
        assert not os.path.exists(scratch)
        assert open(victim.name, "rb").read() == b"precious"
    finally:
        os.unlink(victim.name)
