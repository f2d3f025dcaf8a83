"""grant_paths.open_grant: links on the way to a granted path are followed only where no
worker could have made them. Real folders, links and descriptors under a private temp dir."""
import os

import pytest

from helpers import IS_ROOT
from sandbox.child import grant_paths
from sandbox.child.grant_paths import UnsafeGrant, open_grant, real_path

pytestmark = pytest.mark.unpriv


@pytest.fixture
def tree(tmp_path):
    os.chmod(tmp_path, 0o755)
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    (target / "data.txt").write_text("x")
    safe = tmp_path / "safe"
    safe.mkdir(mode=0o755)
    return tmp_path, target, safe


def _where(fd):
    try:
        return real_path(fd)
    finally:
        os.close(fd)


def test_a_plain_path_opens_where_it_is(tree):
    base, target, _ = tree
    assert _where(open_grant(str(target / "data.txt"))) == str(target / "data.txt")


def test_a_link_in_a_folder_only_its_owner_writes_is_followed(tree):
    base, target, safe = tree
    os.symlink(str(target), safe / "abs")
    os.symlink("../target", safe / "rel")
    assert _where(open_grant(str(safe / "abs" / "data.txt"))) == str(target / "data.txt")
    assert _where(open_grant(str(safe / "rel"))) == str(target)


def test_a_link_in_a_folder_any_user_may_write_is_refused(tree):
    base, target, _ = tree
    shared = base / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # as /tmp: sticky, but anyone may add a link of their own
    os.symlink(str(target), shared / "ln")
    with pytest.raises(UnsafeGrant, match="any user may write") as e:
        open_grant(str(shared / "ln" / "data.txt"))
    assert str(shared / "ln") in str(e.value)
    os.chmod(shared, 0o755)  # the same link, its folder no longer writable by others: followed
    assert _where(open_grant(str(shared / "ln"))) == str(target)


@pytest.mark.skipif(not IS_ROOT, reason="root hosts: an unprivileged host's workers write only beneath write grants")
def test_a_link_in_a_folder_a_policy_gid_may_write_is_refused(tree):
    base, target, _ = tree
    shared = base / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2775)
    os.chown(shared, 0, 3_999_999)  # a policy's gid: no group account (its workers hold it)
    os.symlink(str(target), shared / "ln")
    with pytest.raises(UnsafeGrant, match="no group account"):
        open_grant(str(shared / "ln"))
    os.chown(shared, 0, 0)  # group-writable by an account group no worker holds: followed
    assert _where(open_grant(str(shared / "ln"))) == str(target)


def test_a_link_in_a_folder_of_the_hosts_own_group_is_followed_when_no_grant_covers_it(tree):
    """umask 002 makes a user's folders group-writable (a venv's lib64 link lies in one): on an
    unprivileged host its workers write only beneath write grants, so that alone says nothing."""
    if IS_ROOT:
        pytest.skip("unprivileged hosts: a root host's workers hold no account group")
    base, target, _ = tree
    mine = base / "mine"
    mine.mkdir()
    os.chmod(mine, 0o775)
    os.symlink(str(target), mine / "ln")
    assert _where(open_grant(str(mine / "ln"))) == str(target)
    with pytest.raises(UnsafeGrant, match="write grant"):
        open_grant(str(mine / "ln"), writable=[str(mine)])


def test_a_link_beneath_a_write_grant_is_refused(tree):
    base, target, _ = tree
    out = base / "out"
    (out / "deep").mkdir(parents=True)
    os.symlink(str(target), out / "deep" / "ln")
    with pytest.raises(UnsafeGrant, match="write grant"):
        open_grant(str(out / "deep" / "ln"), writable=[str(out)])
    # a plain file beneath a write grant is no link: granted as it is
    (out / "plain").write_text("y")
    assert _where(open_grant(str(out / "plain"), writable=[str(out)])) == str(out / "plain")


def test_the_write_grant_itself_swapped_for_a_link_is_refused(tree):
    base, target, _ = tree
    parent = base / "parent"
    parent.mkdir(mode=0o755)
    os.symlink(str(target), parent / "out")
    # `parent` is itself writable by workers (another grant): the link in it is theirs
    with pytest.raises(UnsafeGrant):
        open_grant(str(parent / "out"), writable=[str(parent / "out"), str(parent)])


@pytest.mark.skipif(not IS_ROOT, reason="only root may give a folder to a uid that is no account")
def test_a_link_in_a_folder_of_a_uid_that_is_no_account_is_refused(tree):
    base, target, _ = tree
    theirs = base / "theirs"
    theirs.mkdir(mode=0o755)
    os.symlink(str(target), theirs / "ln")
    os.chown(theirs, 3_999_999, 3_999_999)  # a worker's kind of uid: never an account
    with pytest.raises(UnsafeGrant, match="no account"):
        open_grant(str(theirs / "ln"))


def test_missing_paths_and_files_in_the_middle_are_nothing_to_grant(tree):
    base, target, _ = tree
    assert open_grant(str(base / "nothing" / "here")) is None
    assert open_grant(str(target / "data.txt" / "below")) is None


def test_a_loop_of_links_ends_in_eloop(tree):
    base, _, safe = tree
    os.symlink(str(safe / "b"), safe / "a")
    os.symlink(str(safe / "a"), safe / "b")
    with pytest.raises(OSError) as e:
        open_grant(str(safe / "a"))
    assert e.value.errno == 40 and not isinstance(e.value, UnsafeGrant)


def test_dotdot_climbs_the_real_folders(tree):
    base, target, safe = tree
    os.symlink(str(target), safe / "t")
    # safe/t/.. is the parent of target (the kernel's meaning), not safe
    assert _where(open_grant(str(safe / "t" / ".." / "target" / "data.txt"))) == str(target / "data.txt")


def test_the_record_of_worker_writable_folders_is_bounded():
    before = dict(grant_paths._known_writable)
    try:
        for i in range(grant_paths.MAX_KNOWN_WRITABLE + 10):
            known = grant_paths.note_writable([f"/srv/w{i}"])
        assert len(known) == grant_paths.MAX_KNOWN_WRITABLE and known[-1] == f"/srv/w{i}"
    finally:
        grant_paths._known_writable.clear()
        grant_paths._known_writable.update(before)
