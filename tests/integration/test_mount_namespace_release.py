"""The host holds each worker's mount namespace from READY (so the kernel's unmounting happens
off the worker's exit, which terminate() waits for) and lets it go once the worker is gone:
no namespace, and no descriptor, outlives its worker for long."""
import asyncio
import os

import pytest

import procfs
import sandbox
from sandbox._host import mount_namespaces

pytestmark = pytest.mark.unpriv

PLUGIN = """
def add(a, b):
    return a + b
"""


def _ns_targets() -> set[str]:
    """What this process's descriptors of mount namespaces name ("mnt:[inode]")."""
    out = set()
    for fd in procfs.open_fds():
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("mnt:["):
            out.add(target)
    return out


def _held(held: int | None) -> str:
    if held is None:
        assert not mount_namespaces._supported, "nothing held on a kernel that has the ioctl"
        pytest.skip("this kernel (or this host's rights) gives no reference to a worker's mount namespace")
    target = os.readlink(f"/proc/self/fd/{held}")
    assert target.startswith("mnt:[") and target != os.readlink("/proc/self/ns/mnt")  # the worker's own
    return target


def _released(target: str) -> None:
    # (compared by the namespace's inode: other workers' references may come and go meanwhile)
    assert procfs.wait_until(lambda: target not in _ns_targets(), 10), (target, _ns_targets())


def test_the_mount_namespace_is_held_while_the_worker_runs_and_let_go_after(make_plugin):
    path, policy = make_plugin(PLUGIN)
    w = sandbox.Worker(path, policy=policy)
    assert w.call("add", 1, 2) == 3
    target = _held(w._sp.mnt_ns)
    w.terminate()
    _released(target)


def test_async_workers_hold_and_let_go_the_same_way(make_plugin):
    path, policy = make_plugin(PLUGIN)

    async def main():
        w = await sandbox.AsyncWorker.start(path, policy=policy)
        assert await w.call("add", 1, 2) == 3
        target = _held(w._sp.mnt_ns)
        await w.close()
        return target

    _released(asyncio.run(main()))
