"""uid_range never overlaps the subordinate ids of /etc/subuid or /etc/subgid (pure: temp files)."""
import pytest

from sandbox import PolicyError
from sandbox._host import uids


@pytest.fixture
def subfiles(tmp_path):
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("# useradd's ranges\nalice:100000:65536\nbob:165536:65536\nbroken-line\nx:y:z\n")
    subgid.write_text("alice:100000:65536\ncarol:400000:10\n")
    return [str(subuid), str(subgid)]


@pytest.mark.parametrize("lo,hi", [(200000, 265535), (165535, 165536), (100000, 100000), (0, 4294967294),
                                   (400009, 500000)])
def test_overlapping_ranges_are_policy_errors(subfiles, lo, hi):
    with pytest.raises(PolicyError) as ei:
        uids.check_range(lo, hi, "/etc/sandbox/p.toml", files=subfiles)
    assert ei.value.key == "identity.uid_range" and ei.value.path == "/etc/sandbox/p.toml"
    assert "subordinate" in str(ei.value)


@pytest.mark.parametrize("lo,hi", [(300000, 365535), (231072, 399999), (400010, 500000), (1, 99999)])
def test_ranges_clear_of_every_entry_pass(subfiles, lo, hi):
    uids.check_range(lo, hi, files=subfiles)


def test_missing_files_mean_no_subordinate_ids(tmp_path):
    uids.check_range(100000, 165535, files=[str(tmp_path / "absent")])


def test_allocation_refuses_an_overlapping_range(subfiles, monkeypatch):
    monkeypatch.setattr(uids, "SUBORDINATE_FILES", tuple(subfiles))
    with pytest.raises(PolicyError, match="identity.uid_range"):
        uids.allocate(200000, 265535)
