"""remove_tree: iterative, bounded, never follows a symlink, never raises (real directories)."""
import os
import resource

import pytest

from sandbox._host.cleanup import remove_tree

pytestmark = pytest.mark.unpriv


def _deep(root, levels):
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(levels):
        os.mkdir("d", dir_fd=fd)
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), "w") as f:
            f.write("x")
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)


def test_a_tree_1200_deep_is_removed_with_few_descriptors(tmp_path):
    root = tmp_path / "scratch"
    root.mkdir()
    _deep(str(root), 1200)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))  # a depth's worth of fds would not fit
    try:
        assert remove_tree(str(root)) is True
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not root.exists()


def test_wide_trees_and_symlinks(tmp_path):
    victim_dir = tmp_path / "host"
    victim_dir.mkdir()
    (victim_dir / "precious").write_text("keep")
    root = tmp_path / "scratch"
    root.mkdir()
    for i in range(300):
        (root / f"dir{i}").mkdir()
        (root / f"dir{i}" / "file").write_text("x")
        (root / f"file{i}").write_text("x")
    (root / "dir0" / "to-host").symlink_to(victim_dir)
    (root / "to-host-file").symlink_to(victim_dir / "precious")
    assert remove_tree(str(root)) is True
    assert not root.exists()
    assert (victim_dir / "precious").read_text() == "keep"


def test_never_raises_and_is_bounded(tmp_path):
    root = tmp_path / "scratch"
    root.mkdir()
    for i in range(50):
        (root / f"f{i}").write_text("x")
    assert remove_tree(str(root), max_entries=10) is False  # over budget: left, no exception
    assert remove_tree(str(tmp_path / "absent")) is True
    assert remove_tree("\0bad") is False
