"""Deaths named by their real cause, from evidence the plugin cannot forge (the kernel's rusage
of the reaped worker, the confinement step that sets the limits), and data that cannot cross
refused before it is sent, in both directions, on all four of Worker, AsyncWorker, Pool and
AsyncPool, with the worker still usable afterwards."""
import asyncio
import os
import signal
import time

import pytest

import sandbox
from helpers import LoopThread
from sandbox import (AsyncPool, AsyncWorker, ConfinementError, NotPlainData, PluginCrashed, PluginError,
                     PluginMemoryError, Pool, UsageError)

pytestmark = pytest.mark.unpriv

PLUGIN = """
    import os, signal, time

    def echo(x):
        return x

    def spin():
        while "forever":
            pass

    def burn(seconds):
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass
        return seconds

    def kill_self(sig):
        os.kill(os.getpid(), sig)
        return "alive"

    def nest(n):
        x = 0
        for _ in range(n):
            x = [x]
        return x

    def many(n):
        return [[] for _ in range(n)]

    def post_back(n):
        from sandbox.plugin import post
        try:
            post(nest(n))
        except TypeError as e:  # NotPlainData: refused in the plugin, nothing sent
            return f"{type(e).__name__}: {e}"
        return "posted"

    def pretend_and_die():
        try:
            raise MemoryError("pretend")
        finally:
            os._exit(70)

    def fill_and_die(chunk):
        held = []
        try:
            while True:
                held.append(b"x" * chunk)  # touched: resident, as the rusage counts it
        except MemoryError:
            os._exit(70)  # what the worker does when it cannot even report
"""


def _nest(n):
    x = 0
    for _ in range(n):
        x = [x]
    return x


def _wait_for(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


# ---- a sync face for each of the four APIs ------------------------------------------------------
class _Face:
    """call/invoke/post/close of any of the four, run to completion."""

    def __init__(self, kind, path, policy):
        self.kind, self._loop = kind, None
        if kind == "Worker":
            self.obj = sandbox.Worker(path, policy=policy)
        elif kind == "Pool":
            self.obj = Pool(path, policy=policy, size=1)
        else:
            self._loop = LoopThread()
            start = AsyncWorker.start if kind == "AsyncWorker" else AsyncPool.start
            kw = {} if kind == "AsyncWorker" else {"size": 1}
            self.obj = self._loop.run(start(path, policy=policy, **kw))

    def call(self, name, *args, **kwargs):
        if self._loop is not None:
            return self._loop.run(self.obj.call(name, *args, **kwargs))
        return self.obj.call(name, *args, **kwargs)

    def post(self, obj):
        if self._loop is not None:
            return self._loop.run(self.obj.post(obj))
        return self.obj.post(obj)

    def close(self):
        try:
            if self._loop is not None:
                self._loop.run(self.obj.close())
            else:
                self.obj.close()
        finally:
            if self._loop is not None:
                self._loop.close()


@pytest.fixture(params=["Worker", "AsyncWorker", "Pool", "AsyncPool"])
def api(request, make_plugin):
    path, policy = make_plugin(PLUGIN, "[limits]\ntimeout = 30\nmemory_mb = 512\n")
    face = _Face(request.param, path, policy)
    yield face
    face.close()


# ---- data that cannot cross: refused before anything is sent ------------------------------------
@pytest.mark.parametrize("value, words", [
    (_nest(65), "nested deeper than 64"),
    ({"k": _nest(64)}, "nested deeper than 64"),
    ([[0] * 10] * 200_000, "more than 1000000 objects"),
    ([0] * 1_000_001, "1000000-item cap"),
    ({1, 2}, "not plain data"),
    (2 ** 70, "not plain data"),
    ("\udc80", "surrogates"),
])
def test_an_argument_that_cannot_cross_is_refused_on_the_host(api, value, words):
    """Before the fix a 65-deep argument was sent, echoed, and the host killed the worker for
    the echo (a ProtocolViolation); sets and big ints raised a bare TypeError and left the
    session believing a call was in flight."""
    with pytest.raises(NotPlainData, match=words) as ei:
        api.call("echo", value)
    assert isinstance(ei.value, UsageError) and isinstance(ei.value, TypeError)
    assert api.call("echo", 7) == 7  # nothing was sent: the same worker answers
    assert "'echo'" in str(ei.value)
    assert api.call("echo", _nest(64)) == _nest(64)  # the deepest value that crosses, both ways


def test_a_message_that_cannot_cross_is_refused_on_the_host(api):
    if api.kind.endswith("Pool"):
        pytest.skip("a pool has no post()")
    with pytest.raises(NotPlainData, match="nested deeper than 64"):
        api.post(_nest(65))
    assert api.call("echo", 8) == 8


@pytest.mark.parametrize("fn, arg, words", [("nest", 65, "nested deeper than 64"),
                                            ("many", 1_000_001, "1000000-item cap")])
def test_a_reply_that_cannot_cross_is_refused_by_the_worker(api, fn, arg, words):
    """The worker refuses to send it (a PluginError saying why) instead of the host killing the
    worker for a breach of the protocol it never committed."""
    with pytest.raises(PluginError, match=f"not plain data.*{words}"):
        api.call(fn, arg)
    assert api.call("echo", 9) == 9


def test_a_post_from_the_plugin_that_cannot_cross_raises_in_the_plugin(api):
    """Before: the worker sent an ERROR frame for the refused post, which answered no call, and
    the host killed the worker for a breach of the protocol."""
    assert api.call("post_back", 65).startswith("NotPlainData: value is not plain data: value nested deeper")
    assert api.call("echo", 10) == 10


def test_an_argument_over_max_message_bytes_is_refused_on_the_host(make_plugin):
    path, policy = make_plugin(PLUGIN, "[limits]\nmax_message_bytes = 65536\n")
    with sandbox.Worker(path, policy=policy) as w:
        with pytest.raises(NotPlainData, match="limits.max_message_bytes"):
            w.call("echo", b"x" * 100_000)
        with pytest.raises(NotPlainData, match="limits.max_message_bytes"):
            w.post(b"x" * 100_000)
        assert w.call("echo", b"y" * 60_000) == b"y" * 60_000 and w.alive


# ---- deaths by the worker's own limits ------------------------------------------------------------
def test_a_worker_that_used_up_its_cpu_is_named_by_limits_cpu_seconds(make_plugin):
    path, policy = make_plugin(PLUGIN, "[limits]\ncpu_seconds = 1\ntimeout = 60\n")
    with sandbox.Worker(path, policy=policy) as w:
        with pytest.raises(PluginCrashed, match=r"used up its 1 s of CPU \(limits.cpu_seconds\)") as ei:
            w.call("spin")
        assert ei.value.signal in (signal.SIGKILL, signal.SIGXCPU)
    assert "limits.cpu_seconds" in str(w.death)


def test_async_worker_names_the_cpu_limit_too(make_plugin):
    path, policy = make_plugin(PLUGIN, "[limits]\ncpu_seconds = 1\ntimeout = 60\n")

    async def run():
        async with await AsyncWorker.start(path, policy=policy) as w:
            with pytest.raises(PluginCrashed, match="limits.cpu_seconds"):
                await w.call("spin")
    asyncio.run(run())


def test_a_kill_from_outside_before_the_cpu_limit_is_a_plain_crash(make_plugin):
    path, policy = make_plugin(PLUGIN, "[limits]\ncpu_seconds = 30\n")
    w = sandbox.Worker(path, policy=policy)
    try:
        assert w.call("burn", 0.3) == 0.3
        ended = []
        w.on("exit", ended.append)
        os.kill(w.pid, signal.SIGKILL)  # the test's own worker, by its pid
        assert _wait_for(lambda: ended)
        assert isinstance(ended[0], PluginCrashed) and ended[0].signal == signal.SIGKILL
        assert "cpu" not in str(ended[0]).lower()
    finally:
        w.close()


def test_the_plugin_cannot_signal_itself_into_a_cpu_death(make_plugin):
    """The worker is pid 1 of its own PID namespace: its own SIGKILL and SIGXCPU are ignored,
    so no plugin can die the way RLIMIT_CPU kills, even with kill() allowed."""
    path, policy = make_plugin(PLUGIN, '[seccomp]\nallow = ["kill"]\n')
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("kill_self", signal.SIGKILL) == "alive"
        assert w.call("kill_self", signal.SIGXCPU) == "alive"
        assert w.alive


def test_a_memory_limit_too_low_to_start_is_named(make_plugin):
    """Before: the worker started with its address space already past its limit; anything it
    then allocated failed (a bare MemoryError, an import that 'failed to map segment', a
    silent 'exited with code 70')."""
    path, policy = make_plugin(PLUGIN, "[limits]\nmemory_mb = 16\n")
    with pytest.raises(ConfinementError,
                       match=r"limits.memory_mb = 16 is below what the worker needs to start \(~\d+ MiB") as ei:
        sandbox.Worker(path, policy=policy)
    assert ei.value.layer == "set_rlimits"


def test_a_death_after_filling_the_memory_limit_is_a_memory_error(make_plugin):
    path, policy = make_plugin(PLUGIN, "[limits]\nmemory_mb = 128\n")
    with sandbox.Worker(path, policy=policy) as w:
        with pytest.raises(PluginMemoryError, match=r"limits.memory_mb = 128.*exited with code 70"):
            w.call("fill_and_die", 1 << 20)


def test_a_pretended_memory_error_and_death_is_a_crash(make_plugin):
    path, policy = make_plugin(PLUGIN, "[limits]\nmemory_mb = 128\n")
    with sandbox.Worker(path, policy=policy) as w:
        with pytest.raises(PluginCrashed) as ei:
            w.call("pretend_and_die")
        assert ei.value.exit_code == 70 and not isinstance(ei.value, PluginMemoryError)
        assert "memory" not in str(ei.value)



def test_libseccomp_loads_on_a_host_out_of_processes():
    """ctypes.util.find_library runs ldconfig: with no process to spare it found nothing, and
    the host's first policy compile raised "RuntimeError: Unable to find libseccomp"."""
    if os.geteuid() == 0:
        pytest.skip("RLIMIT_NPROC binds only an unprivileged user (the unprivileged run covers it)")
    import resource
    import subprocess
    import sys

    def no_more_processes():
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    code = ("import ctypes.util, os\n"
            "assert ctypes.util.find_library('seccomp') is None, 'ldconfig still ran'\n"
            "import sandbox.policy.compile as c\n"
            "print(c.seccomp.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], preexec_fn=no_more_processes, capture_output=True,
                         text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "seccomp" in out.stdout
