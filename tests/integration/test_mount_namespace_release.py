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


def _ns_fds() -> dict[int, str]:
    out = {}
    for fd in procfs.open_fds():
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("mnt:["):
            out[fd] = target
    return out


def _held_and_released(w_ns: int | None, before: dict[int, str]) -> None:
    if w_ns is None:
        assert not mount_namespaces._supported, "nothing held on a kernel that has the ioctl"
        pytest.skip("this kernel (or this host's rights) gives no reference to a worker's mount namespace")
    assert procfs.wait_until(lambda: _ns_fds() == before, 10), (_ns_fds(), before)


def test_the_mount_namespace_is_held_while_the_worker_runs_and_let_go_after(make_plugin):
    path, policy = make_plugin(PLUGIN)
    before = _ns_fds()
    w = sandbox.Worker(path, policy=policy)
    assert w.call("add", 1, 2) == 3
    held = w._sp.mnt_ns
    if held is not None:
        assert os.readlink(f"/proc/self/fd/{held}").startswith("mnt:[")
        assert os.readlink(f"/proc/self/fd/{held}") != os.readlink("/proc/self/ns/mnt")  # the worker's own
    w.terminate()
    _held_and_released(held, before)


def test_async_workers_hold_and_let_go_the_same_way(make_plugin):
    path, policy = make_plugin(PLUGIN)
    before = _ns_fds()

    async def main():
        w = await sandbox.AsyncWorker.start(path, policy=policy)
        assert await w.call("add", 1, 2) == 3
        held = w._sp.mnt_ns
        await w.close()
        return held

    _held_and_released(asyncio.run(main()), before)
