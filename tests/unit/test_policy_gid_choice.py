"""The policy's gid: which number, when it is refused, how two hosts claim it, what explain and
lint tell the operator (files in temporary folders; no workers)."""
import grp
import os
import textwrap

import pytest

from sandbox import HostResourceError, Policy, PolicyError
from sandbox._host import gids, uids
from sandbox.policy.explain import explain_text
from sandbox.policy.lint import lint
from helpers import IS_ROOT

pytestmark = pytest.mark.unpriv

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "sandbox", "policy", "default.toml")
LO, HI = 1879113728, 1895890943  # the default gid_range


@pytest.fixture
def write(tmp_path):
    def write(text: str, name: str = "p.toml", extends: str | None = SHIPPED) -> str:
        path = tmp_path / name
        path.write_text((f'extends = "{extends}"\n' if extends else "") + textwrap.dedent(text))
        return str(path)
    return write


@pytest.fixture
def no_subgid(monkeypatch, tmp_path):
    monkeypatch.setattr(gids, "SUBGID_FILE", str(tmp_path / "no-subgid"))


def _free_gid(start=1_900_000_000):
    gid = start
    while gids._group_name(gid) is not None:
        gid += 1
    return gid


def test_a_derived_gid_is_a_stable_hash_of_the_path_inside_the_range():
    a = gids.derive("/etc/sandbox/a.toml", LO, HI)
    assert a == gids.derive("/etc/sandbox/a.toml", LO, HI) and LO <= a <= HI
    assert a != gids.derive("/etc/sandbox/b.toml", LO, HI)
    assert gids.derive("/x", 5000, 5000) == 5000


def test_a_policy_file_derives_its_gid_from_its_resolved_path(write, tmp_path, no_subgid):
    path = write("")
    link = tmp_path / "link.toml"
    link.symlink_to(path)
    gid, how = gids.policy_gid(Policy.load(path))
    assert gid == gids.derive(os.path.realpath(path), LO, HI) and "derived" in how
    assert gids.policy_gid(Policy.load(str(link)))[0] == gid  # the same file: the same gid
    assert gids.policy_gid(Policy.load(write("", name="q.toml")))[0] != gid


def test_a_policy_without_a_file_keeps_a_gid_per_worker():
    gid, how = gids.policy_gid(Policy.from_dict({}))
    assert gid is None and "identity.gid" in how
    assert gids.worker_gid(Policy.from_dict({}), 1879050000) == 1879050000


@pytest.mark.parametrize("value", ["0", "-1", "4294967295", '"100"', "true", "1.5"])
def test_unusable_gid_values_name_the_key(write, value):
    with pytest.raises(PolicyError) as ei:
        Policy.load(write(f"[identity]\ngid = {value}\n"))
    assert ei.value.key == "identity.gid"


@pytest.mark.parametrize("value", ["[0, 10]", "[10, 5]", "[1]", '["a", "b"]'])
def test_unusable_gid_ranges_name_the_key(write, value):
    with pytest.raises(PolicyError) as ei:
        Policy.load(write(f"[identity]\ngid_range = {value}\n"))
    assert ei.value.key == "identity.gid_range"


def test_an_explicit_gid_belongs_to_its_file_and_is_not_inherited(write, no_subgid):
    gid = _free_gid()
    base = write(f"[identity]\ngid = {gid}\n", name="base.toml")
    child = write("", name="child.toml", extends=base)
    assert gids.policy_gid(Policy.load(base)) == (gid, "identity.gid")
    assert Policy.load(child).gid is None and gids.policy_gid(Policy.load(child))[0] != gid


def test_a_system_groups_gid_is_refused(write, no_subgid):
    taken = next(g for g in grp.getgrall() if g.gr_gid != 0)
    with pytest.raises(PolicyError) as ei:
        gids.policy_gid(Policy.load(write(f"[identity]\ngid = {taken.gr_gid}\n")))
    assert ei.value.key == "identity.gid" and repr(taken.gr_name) in str(ei.value)


def test_a_gid_inside_the_uid_range_is_refused(write, no_subgid):
    with pytest.raises(PolicyError, match="inside identity.uid_range") as ei:
        gids.policy_gid(Policy.load(write("[identity]\ngid = 1879048200\n")))
    assert ei.value.key == "identity.gid"
    with pytest.raises(PolicyError, match="overlaps identity.uid_range") as ei:
        gids.policy_gid(Policy.load(write("[identity]\ngid_range = [1879000000, 1879050000]\n")))
    assert ei.value.key == "identity.gid_range"


def test_subordinate_gids_are_refused(write, monkeypatch, tmp_path):
    subgid = tmp_path / "subgid"
    subgid.write_text(f"alice:{LO + 10}:65536\n")
    monkeypatch.setattr(gids, "SUBGID_FILE", str(subgid))
    with pytest.raises(PolicyError, match="subordinate gids") as ei:
        gids.policy_gid(Policy.load(write("")))
    assert ei.value.key == "identity.gid_range"
    with pytest.raises(PolicyError, match="subordinate gids") as ei:
        gids.policy_gid(Policy.load(write(f"[identity]\ngid = {LO + 20}\n")))
    assert ei.value.key == "identity.gid"


# ---- claims ---------------------------------------------------------------------------------------
@pytest.fixture
def claims(tmp_path, monkeypatch):
    d = tmp_path / "claims"
    d.mkdir(mode=0o700)
    monkeypatch.setattr(uids, "CLAIMS", str(d))
    return d


class _P:
    path = "/etc/sandbox/x.toml"


def test_one_policy_shares_a_claim_and_another_is_refused(claims):
    a = gids._claim_file(str(claims), 5000, "/etc/sandbox/a.toml", _P(), "derived")
    b = gids._claim_file(str(claims), 5000, "/etc/sandbox/a.toml", _P(), "derived")  # another host, same policy
    assert (claims / "gid-5000").read_text() == "/etc/sandbox/a.toml"
    with pytest.raises(PolicyError, match="in use by another policy, /etc/sandbox/a.toml") as ei:
        gids._claim_file(str(claims), 5000, "/etc/sandbox/b.toml", _P(), "derived")
    assert ei.value.key == "identity.gid" and ei.value.path == _P.path
    gids._release_file(a, str(claims / "gid-5000"))
    assert (claims / "gid-5000").exists()  # b still holds it
    gids._release_file(b, str(claims / "gid-5000"))
    assert os.listdir(claims) == []  # the last holder removes it


def test_a_claim_nobody_holds_is_taken_over(claims):
    (claims / "gid-5001").write_text("/etc/sandbox/gone.toml")  # a host that died
    fd = gids._claim_file(str(claims), 5001, "/etc/sandbox/new.toml", _P(), "derived")
    assert (claims / "gid-5001").read_text() == "/etc/sandbox/new.toml"
    gids._release_file(fd, str(claims / "gid-5001"))


def test_a_claim_path_that_is_a_symlink_is_not_followed(claims, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("")
    (claims / "gid-5002").symlink_to(target)
    with pytest.raises(HostResourceError, match="gid 5002"):
        gids._claim_file(str(claims), 5002, "/etc/sandbox/a.toml", _P(), "derived")
    assert target.read_text() == ""


def test_a_claim_lasts_while_a_worker_of_the_policy_lives(claims, write, no_subgid):
    gid = _free_gid(1_900_100_000)
    one = Policy.load(write(f"[identity]\ngid_range = [{gid}, {gid}]\n", name="one.toml"))
    two = Policy.load(write(f"[identity]\ngid_range = [{gid}, {gid}]\n", name="two.toml"))
    assert gids.worker_gid(one, 299_801) == gid and gids.worker_gid(one, 299_802) == gid
    with pytest.raises(PolicyError, match="in use by another policy"):
        gids.worker_gid(two, 299_803)
    uids.release(299_801)  # a worker ends: the other still holds the claim
    with pytest.raises(PolicyError, match="in use by another policy"):
        gids.worker_gid(two, 299_803)
    uids.release(299_802)
    assert os.listdir(claims) == []
    assert gids.worker_gid(two, 299_803) == gid
    assert (claims / f"gid-{gid}").read_text() == os.path.realpath(two.path)
    uids.release(299_803)
    assert os.listdir(claims) == []


# ---- what the operator is told --------------------------------------------------------------------
def test_explain_shows_the_gid_and_the_commands_for_each_writable_folder(write, tmp_path, no_subgid):
    out = tmp_path / "out dir"
    out.mkdir()
    path = write(f'[filesystem]\nwritable = ["{out}"]\n')
    gid = gids.policy_gid(Policy.load(path))[0]
    text = explain_text(Policy.load(path))
    assert f"gid {gid}, shared by this policy's workers" in text
    assert f"chgrp {gid} '{out}' && chmod 2770 '{out}'" in text


def test_explain_says_why_a_gid_is_unusable(write, no_subgid):
    taken = next(g for g in grp.getgrall() if g.gr_gid != 0)
    text = explain_text(Policy.load(write(f"[identity]\ngid = {taken.gr_gid}\n")))
    assert "gid: unusable here" in text and repr(taken.gr_name) in text


def test_lint_warns_when_a_writable_folder_is_not_the_policys_group(write, tmp_path, no_subgid):
    out = tmp_path / "out"
    out.mkdir(mode=0o755)
    path = write(f'[filesystem]\nwritable = ["{out}"]\n')
    gid = gids.policy_gid(Policy.load(path))[0]
    found = [f for f in lint(path) if f.key == "filesystem.writable"]
    assert len(found) == 1 and found[0].level == "warning"
    assert f"not writable by the policy's gid {gid}" in found[0].message
    assert f"chgrp {gid} {out} && chmod 2770 {out}" in found[0].message
    os.chmod(out, 0o777)
    assert any("writable by every user" in f.message for f in lint(path))
    if IS_ROOT:  # only root may give a folder to a group it is not in
        os.chown(out, 0, gid)
        os.chmod(out, 0o2770)
        assert [f for f in lint(path) if f.key == "filesystem.writable"] == []


def test_lint_reports_an_unusable_gid_as_an_error(write, no_subgid):
    found = lint(write("[identity]\ngid = 1879048200\n"))
    assert [(f.level, f.key) for f in found] == [("error", "identity.gid")]
