"""A worker dropped without close() is killed and released wherever the collector drops it.

Python runs __del__ in whatever thread allocates, possibly one inside a section that holds the
hub's lock or the uid and gid registries' (root hosts), and at interpreter exit, when a daemon
thread stopped mid-section may hold one of them for ever. A __del__ that took one of those locks
hung the host for good (seen in CI: a host that never exited). Each scenario runs in a host of
its own, in a subprocess: a hang is a timeout here, with the host's stack in the failure.
"""
import json
import os
import subprocess
import sys

import pytest

from helpers import IS_ROOT, ROOT, TESTS

pytestmark = pytest.mark.unpriv

PLUGIN = """
def add(a, b):
    return a + b
"""

PRELUDE = r"""
import asyncio, faulthandler, gc, json, os, sys, threading, time
faulthandler.dump_traceback_later(30, exit=True)  # a hang says where it is
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
import procfs
import sandbox
from sandbox._host import gids, hub as _hub, uids
PLUGIN = {plugin!r}


def registry_locks():
    # the locks a worker's release takes: the hub's (sync driver), the uid and gid registries'
    locks = [uids._lock, gids._lock]
    hub = _hub.current()
    if hub is not None:
        locks.append(hub._lock)
    return locks
"""

IN_A_LOCKED_SECTION = PRELUDE + r"""
def dropped_inside_locks(box):
    w = box.pop()  # the only reference left
    pid, uid = w.pid, getattr(w, "_sp").uid
    locks = registry_locks()
    for lock in locks:
        lock.acquire()
    try:
        del w
        gc.collect()  # the collector runs __del__ right here, with every lock held by this thread
    finally:
        for lock in reversed(locks):
            lock.release()
    return pid, uid


def settled(pid, uid, baseline):
    ok = procfs.wait_until(lambda: procfs.ended(pid), 10)
    ok = ok and procfs.wait_until(lambda: uid not in uids._in_use, 10)
    ok = ok and procfs.wait_until(lambda: len(procfs.open_fds()) <= baseline, 10)
    return bool(ok)


def sync():
    with sandbox.Worker(PLUGIN) as warm:  # the hub and the zygote run: their fds are the baseline
        warm.call("add", 1, 1)
    baseline = len(procfs.open_fds())
    w = sandbox.Worker(PLUGIN)
    assert w.call("add", 1, 2) == 3
    box = [w]
    del w
    pid, uid = dropped_inside_locks(box)
    return {{"settled": settled(pid, uid, baseline), "root_uid": uid is not None}}


async def async_():
    async with sandbox.AsyncWorker(PLUGIN) as warm:
        await warm.call("add", 1, 1)
    baseline = len(procfs.open_fds())
    w = await sandbox.AsyncWorker.start(PLUGIN)
    assert await w.call("add", 1, 2) == 3
    box = [w]
    del w
    pid, uid = dropped_inside_locks(box)
    await asyncio.sleep(0)  # the loop runs the release handed to it
    return {{"settled": await asyncio.to_thread(settled, pid, uid, baseline), "root_uid": uid is not None}}


import warnings
warnings.simplefilter("ignore", ResourceWarning)
out = sync() if sys.argv[1] == "sync" else asyncio.run(async_())
with sandbox.Worker(PLUGIN) as after:  # the registries work as before
    out["after"] = after.call("add", 2, 2)
print(json.dumps(out))
"""

AT_EXIT = PRELUDE + r"""
def hold_for_ever(lock, held):
    lock.acquire()
    held.set()
    threading.Event().wait()  # a daemon thread stopped mid-section by the interpreter's exit


if sys.argv[1] == "sync":
    left_open = sandbox.Worker(PLUGIN)
    assert left_open.call("add", 1, 2) == 3
else:
    async def start():
        w = await sandbox.AsyncWorker.start(PLUGIN)
        assert await w.call("add", 1, 2) == 3
        return w
    loop = asyncio.new_event_loop()
    left_open = loop.run_until_complete(start())
pid = left_open.pid
for lock in registry_locks():
    held = threading.Event()
    threading.Thread(target=hold_for_ever, args=(lock, held), daemon=True).start()
    held.wait()
print(json.dumps({{"pid": pid}}), flush=True)
# the end of the script: `left_open` is collected while the interpreter finalises
"""


def _host(plugin_dir, make_plugin, script: str, driver: str):
    path, _ = make_plugin(PLUGIN)
    host = os.path.join(plugin_dir, f"host-{driver}.py")
    with open(host, "w") as f:
        f.write(script.format(root=ROOT, tests=TESTS, plugin=path))
    return subprocess.run([sys.executable, host, driver], capture_output=True, text=True, timeout=90)


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_a_worker_dropped_inside_a_locked_section_is_released_soon_after(driver, plugin_dir, make_plugin):
    out = _host(plugin_dir, make_plugin, IN_A_LOCKED_SECTION, driver)
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["settled"], seen  # killed, its uid free again, its descriptors closed
    assert seen["root_uid"] == IS_ROOT and seen["after"] == 4


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_the_host_exits_with_a_worker_left_open_and_a_registry_lock_held(driver, plugin_dir, make_plugin):
    """Whatever runs at exit (atexit hooks, __del__ during finalisation) is bounded: a thread
    stuck in a registry section does not keep the host from exiting."""
    out = _host(plugin_dir, make_plugin, AT_EXIT, driver)
    assert out.returncode == 0, out.stderr[-4000:]
    pid = json.loads(out.stdout.strip().splitlines()[-1])["pid"]
    import procfs
    assert procfs.wait_until(lambda: procfs.ended(pid), 10)  # it ended with its host
