"""AsyncWorker against real forked, confined workers, on a plain asyncio loop."""
import asyncio
import os
import threading
import time

import pytest

from sandbox import AsyncWorker, LoadError, PluginError, PluginTimeout, WorkerClosed
from helpers import ROOT
from procfs import open_fds, zombies_of

pytestmark = pytest.mark.unpriv

with open(os.path.join(ROOT, "tests", "plugins", "basic", "worker.py")) as _f:
    PLUGIN = _f.read()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture
def plugin(make_plugin):
    return make_plugin(PLUGIN, "[limits]\ntimeout = 10\n")


def test_calls_results_and_plugin_errors(plugin):
    path, policy = plugin

    async def main():
        async with AsyncWorker(path, policy=policy) as w:
            assert w.alive and w.pid > 0
            assert await w.call("echo", {"a": [1, b"\x00", None, 2.5]}) == {"a": [1, b"\x00", None, 2.5]}
            assert await w.call("kw", 5, scale=10) == 50
            with pytest.raises(PluginError) as e:
                await w.call("fail")
            assert e.value.type == "KeyError" and "no such thing" in e.value.message
            with pytest.raises(PluginError, match="no public function"):
                await w.call("_private")
            # many tasks on one worker: serialised, each gets its own answer
            got = await asyncio.gather(*(w.call("echo", i) for i in range(100)))
            assert got == list(range(100))
        assert not w.alive and w.death is None  # closed cleanly
        with pytest.raises(WorkerClosed):
            await w.call("echo", 1)

    run(main())


def test_start_classmethod_and_load_error(make_plugin):
    bad, policy = make_plugin("def broken(:\n    pass\n")

    async def main():
        with pytest.raises(LoadError, match="SyntaxError|invalid syntax"):
            await AsyncWorker.start(bad, policy=policy)

    run(main())


def test_messages_by_callback_and_iterator(plugin):
    path, policy = plugin

    async def main():
        w = await AsyncWorker.start(path, policy=policy)
        seen, async_seen, logs = [], [], []

        async def async_cb(msg):
            async_seen.append(msg)

        w.on("message", seen.append).on("message", async_cb).on("log", logs.append)
        it = w.messages()
        assert await w.call("tell", 3) == "told"
        await w.post("hi")
        got = []
        async for msg in it:
            got.append(msg)
            if len(got) == 4:
                break
        assert got == [{"i": 0}, {"i": 1}, {"i": 2}, {"echo": "hi"}]
        assert seen == got
        await asyncio.sleep(0)
        assert async_seen == got
        assert await w.call("hello") == 1
        ended = []
        w.on("exit", ended.append)
        rest = w.messages()
        await w.close()
        assert [m async for m in rest] == []  # the iterator ends with the worker
        assert ended == [None]
        assert "hello from the plugin" in w.logs

    run(main())


def test_cancel_kills_so_a_late_reply_never_answers_the_next_call(plugin):
    path, policy = plugin

    async def main():
        w = await AsyncWorker.start(path, policy=policy)
        task = asyncio.ensure_future(w.call("nap", 0.5))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not w.alive
        with pytest.raises(WorkerClosed):
            await w.call("echo", 1)
        await w.close()
        assert isinstance(w.death, WorkerClosed)

        # wait_for() cancels the same way
        w = await AsyncWorker.start(path, policy=policy)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(w.call("spin"), 0.2)
        await w.close()
        assert not w.alive

    run(main())


def test_no_thread_fd_or_zombie_left(plugin):
    path, policy = plugin

    async def main():
        async with AsyncWorker(path, policy=policy) as w:  # warms the zygote
            await w.call("echo", 0)
        before_fds, before_threads = open_fds(), threading.active_count()
        for i in range(30):
            async with AsyncWorker(path, policy=policy) as w:
                assert await w.call("echo", i) == i
                if i % 3 == 0:
                    assert threading.active_count() == before_threads  # no thread per worker
            if i % 5 == 0:
                w = await AsyncWorker.start(path, policy=policy)
                with pytest.raises(PluginTimeout):
                    await w.invoke("spin", timeout=0.05)
                await w.close()
        return before_fds

    before_fds = run(main())
    assert open_fds() <= before_fds | set()  # asyncio.run's own loop fds are closed with it
    assert zombies_of(os.getpid()) == []


def test_call_deadlines_follow_each_call(plugin):
    """One timer serves calls in a row: a timer left by an earlier, shorter call must not kill a
    later, longer one, and a shorter call after a longer one still gets its own deadline."""
    path, policy = plugin

    async def main():
        async with AsyncWorker(path, policy=policy) as w:
            await w.invoke("nap", (0.0,), timeout=0.3)                  # leaves a timer at t+0.3
            await w.invoke("nap", (0.8,), timeout=5)                   # outlives that timer
            assert await w.invoke("echo", (1,), timeout=30) == 1       # leaves a timer far away
            t = time.monotonic()
            with pytest.raises(PluginTimeout):
                await w.invoke("nap", (30,), timeout=0.3)             # earlier than the far timer
            assert time.monotonic() - t < 5
            assert not w.alive

    run(main())
