"""A call made while a worker is dying on its own (its pipe has closed, the kill is under way,
its exit status not read yet) says why the worker ended, on both drivers: never the "is closed"
of a worker someone closed, with `death` still unknown. (CI saw this window once: the zygote
was killed, the worker's pipe closed, and a call arrived before the status.)

The window is a few microseconds wide in real life; here the driver is fed the EOF its reader
would see (the core's own input), while the worker itself is really killed and really reaped."""
import asyncio

import pytest

import sandbox
from sandbox import WorkerClosed

pytestmark = pytest.mark.unpriv

PLUGIN = """
def add(a, b):
    return a + b
"""


def test_a_sync_call_in_the_dying_window_names_the_death(make_plugin):
    path, policy = make_plugin(PLUGIN)
    w = sandbox.Worker(path, policy=policy)
    assert w.call("add", 1, 2) == 3
    with w._io:  # as the hub does when it reads EOF: the core says kill, the driver kills
        w._apply(w._core.eof())
    with pytest.raises(WorkerClosed) as ei:
        w.call("add", 1, 2)
    assert w.death is not None, str(ei.value)
    assert "is closed" not in str(ei.value) and str(w.death) in str(ei.value)
    w.close()


def test_an_async_call_in_the_dying_window_names_the_death(make_plugin):
    path, policy = make_plugin(PLUGIN)

    async def main():
        w = await sandbox.AsyncWorker.start(path, policy=policy)
        assert await w.call("add", 1, 2) == 3
        w._apply(w._core.eof())  # on the loop, as its reader would
        with pytest.raises(WorkerClosed) as ei:
            await w.call("add", 1, 2)
        death = w.death
        await w.close()
        return death, str(ei.value)

    death, said = asyncio.run(main())
    assert death is not None, said
    assert "is closed" not in said and str(death) in said
