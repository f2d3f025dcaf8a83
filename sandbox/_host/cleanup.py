"""`remove_tree(path)`: remove a directory a hostile plugin may have filled, and never fail.

A worker's scratch folder is a tmpfs in the worker's own mount namespace, so the host's folder
is normally empty when the worker ends. Should a tree ever be left there (a writable path, an
older kernel path), removing it must be bounded and iterative: shutil.rmtree recurses once per
level (RecursionError at ~1,000 levels, which its ignore_errors does not cover), and any
removal must never follow a symlink the plugin made.

Everything works on directory descriptors opened with O_NOFOLLOW relative to their parent
(openat), so a symlink or a rename race can only make us remove less, never something outside
the tree. The depth lives in a list, not in the call stack, at most two descriptors are open
at a time (a 100,000-deep tree needs no more than a shallow one), and the total work is capped.
"""
import logging
import os
import stat

log = logging.getLogger("sandbox")
MAX_ENTRIES = 1_000_000  # a bound on the work, whatever the plugin built
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: str, max_entries: int = MAX_ENTRIES) -> bool:
    """Remove `path` and everything below it; True if it is gone. Raises nothing."""
    try:
        return _remove(path, max_entries)
    except Exception as e:  # noqa: BLE001 - clean-up must not turn into the caller's failure
        log.warning("sandbox: could not remove %s: %s", path, e)
        return False


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _remove(path: str, budget: int) -> bool:
    """Depth-first, holding two descriptors at most: each level is remembered by its name and
    identity (device, inode), and the way back up is "..", checked against that identity."""
    parent_dir, name = os.path.split(os.path.abspath(path))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return True
    top = os.open(parent_dir, _DIR_FLAGS & ~os.O_NOFOLLOW)
    levels: list[tuple[tuple[int, int], str]] = []  # (identity of the parent, name in it), outermost first
    fd = None
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=top)
        levels.append((_identity(top), name))
        while True:
            child = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    budget -= 1
                    if budget < 0:
                        log.warning("sandbox: %s holds more than %d entries; left in place", path, MAX_ENTRIES)
                        return False
                    if entry.is_dir(follow_symlinks=False):
                        child = entry.name
                        break
                    try:
                        os.unlink(entry.name, dir_fd=fd)
                    except FileNotFoundError:
                        pass
            if child is not None:
                try:
                    sub = os.open(child, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    continue
                levels.append((_identity(fd), child))
                os.close(fd)
                fd = sub
                continue
            # this level is empty: go up and remove it
            parent_id, dname = levels.pop()
            up = top if not levels else os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = None
            if _identity(up) != parent_id:
                if up != top:
                    os.close(up)
                log.warning("sandbox: %s changed while being removed; left in place", path)
                return False
            try:
                os.rmdir(dname, dir_fd=up)
            except FileNotFoundError:
                pass
            if up == top:
                break
            fd = up
    finally:
        if fd is not None:
            os.close(fd)
        os.close(top)
    return not os.path.lexists(path)
