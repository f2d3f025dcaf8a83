"""The same scenarios on both drivers of the lifecycle core: the sync Worker and the AsyncWorker.

The `driver` fixture gives a sync-looking handle for either (the AsyncWorker runs on an event
loop in a thread of its own), so that a scenario is written once and a drift between the two
drivers fails here.
"""
import asyncio
import errno
import gc
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
import weakref

import pytest

import sandbox
import sandbox.events
from sandbox import (AsyncWorker, LoadError, PluginCrashed, PluginError, PluginTimeout, PolicyViolation,
                     ProtocolViolation, UsageError, WorkerClosed)
from helpers import ROOT, LoopThread

pytestmark = pytest.mark.unpriv

PLUGIN = """
    import os, signal, socket, time
    from sandbox.plugin import post

    def add(a, b):
        return a + b

    def kw(name, timeout, *, other=None):
        return [name, timeout, other]

    def nap(seconds):
        time.sleep(seconds)
        return seconds

    def sigsys():
        signal.raise_signal(signal.SIGSYS)

    def sock():
        try:
            socket.socket().close()
        except OSError as e:
            return e.errno
        return 0

    def exit_with(code):
        os._exit(code)

    def garbage():
        os.write(4, b"no frame at all, not even close" * 4)
        time.sleep(5)

    def empty_maps(n, parts):
        return [[{} for _ in range(n)] for _ in range(parts)]

    def raw_empty_maps(n, parts):
        # past the worker's own encoder, as a hostile plugin would: straight onto its pipe
        import msgpack
        from sandbox.protocol import framing
        data = framing.encode_frame(framing.EVENT, 0, msgpack.packb([[{}] * n] * parts))
        while data:
            data = data[os.write(4, data):]
        time.sleep(30)

    def flood(count, size):
        blob = b"x" * size
        for _ in range(count):
            post(blob)
        return count

    def on_message(msg):
        time.sleep(30)  # never reads the next post

    def spin():
        while "forever":
            pass
"""


class SyncDriver:
    name = "sync"

    def worker(self, path, policy, **kw):
        return sandbox.Worker(path, policy=policy, **kw)

    def close(self):
        pass


class AsyncDriver(LoopThread):
    """AsyncWorker behind the sync API: each method runs on a loop of its own thread."""
    name = "async"

    def worker(self, path, policy, **kw):
        return AsyncHandle(self, self.run(AsyncWorker.start(path, policy=policy, **kw)))


class AsyncHandle:
    def __init__(self, driver, w):
        self._driver, self.w = driver, w

    def call(self, *args, **kwargs):
        return self._driver.run(self.w.call(*args, **kwargs))

    def invoke(self, *args, **kwargs):
        return self._driver.run(self.w.invoke(*args, **kwargs))

    def post(self, *args, **kwargs):
        return self._driver.run(self.w.post(*args, **kwargs))

    def close(self):
        return self._driver.run(self.w.close())

    def terminate(self):
        return self._driver.run(self.w.terminate())

    def on(self, event, callback):
        self.w.on(event, callback)
        return self

    def __getattr__(self, name):
        return getattr(self.w, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture(params=["sync", "async"])
def driver(request):
    d = SyncDriver() if request.param == "sync" else AsyncDriver()
    yield d
    d.close()


@pytest.fixture
def plugin(make_plugin):
    return make_plugin(PLUGIN, "[limits]\ntimeout = 10\nmemory_mb = 512\n")


def test_a_deadline_kills_the_worker(driver, plugin):
    with driver.worker(*plugin) as w:
        t = time.monotonic()
        with pytest.raises(PluginTimeout):
            w.invoke("spin", timeout=0.3)
        assert time.monotonic() - t < 5 and not w.alive
        with pytest.raises(WorkerClosed):
            w.call("add", 1, 2)
    assert isinstance(w.death, PluginTimeout)


def test_a_forbidden_syscall_is_named(driver, make_plugin):
    kill_mode = make_plugin(PLUGIN, '[seccomp]\ndefault_action = "kill"\n')
    with driver.worker(*kill_mode) as w:  # a policy without network: socket() is forbidden
        with pytest.raises(PolicyViolation) as ei:
            w.call("sock")
        assert ei.value.syscall == "socket" and not w.alive


def test_a_forbidden_syscall_is_denied_and_reported_under_the_default(driver, plugin):
    seen = []
    with driver.worker(*plugin) as w:  # the shipped default: deny mode
        w.on("denied", seen.append)
        assert w.call("sock") == errno.EPERM
        assert [n.name for n in w.last_denials] == ["socket"] and w.alive
        assert w.call("sock") == errno.EPERM
    assert [n.name for n in seen] == ["socket", "socket"]


def test_exit_codes_and_deaths_from_outside_are_reported(driver, plugin):
    with driver.worker(*plugin) as w:
        with pytest.raises(PluginCrashed) as ei:
            w.call("exit_with", 3)
        assert ei.value.exit_code == 3
    w = driver.worker(*plugin)
    ended = []
    w.on("exit", ended.append)
    os.kill(w.pid, signal.SIGKILL)  # while idle: noticed without a call
    deadline = time.monotonic() + 10
    while not ended and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(ended) == 1 and isinstance(ended[0], PluginCrashed) and ended[0].signal == signal.SIGKILL
    assert not w.alive
    w.close()


def test_a_protocol_breach_kills(driver, plugin):
    with driver.worker(*plugin) as w:
        with pytest.raises(ProtocolViolation):
            w.call("garbage")
        assert not w.alive


def test_every_keyword_goes_to_the_plugin(driver, plugin):
    with driver.worker(*plugin) as w:
        assert w.call("kw", name="n", timeout=5, other=1) == ["n", 5, 1]
        assert w.call("kw", "n", 0) == ["n", 0, None]
        assert w.invoke("kw", ("a",), {"timeout": "t"}, timeout=5) == ["a", "t", None]


@pytest.mark.parametrize("bad", [0, -1, math.nan, "1", True])
def test_timeouts_have_one_meaning(driver, plugin, bad):
    with driver.worker(*plugin) as w:
        with pytest.raises(UsageError):
            w.invoke("add", (1, 2), timeout=bad)
        assert w.alive and w.invoke("nap", (0.2,), timeout=math.inf) == 0.2  # inf: no deadline
        assert w.invoke("add", (1, 2), timeout=3e6) == 3  # past any poll's range: no deadline
        t = time.monotonic()
        with pytest.raises(PluginTimeout) as ei:
            w.invoke("spin", timeout=0.3)
        assert ei.value.timeout == 0.3 and time.monotonic() - t < 5
        with pytest.raises(WorkerClosed):
            w.call("add", 1, 2)
    with pytest.raises(UsageError):
        driver.worker(*plugin, start_timeout=bad)


def test_post_that_is_never_read_times_out(driver, plugin):
    with driver.worker(*plugin) as w:
        w.post("first")  # on_message now sleeps: nothing reads the pipe any more
        with pytest.raises(PluginTimeout):
            w.post(b"x" * (4 << 20), timeout=0.5)
        assert not w.alive


def test_terminate_twice_then_close_never_raise(driver, plugin):
    w = driver.worker(*plugin)
    w.terminate()
    w.terminate()
    w.close()
    assert not w.alive and w.death is None
    with pytest.raises(WorkerClosed):
        w.call("add", 1, 2)


def test_a_plain_sigsys_is_never_a_violation(driver, plugin):
    """Only the seccomp listener reports violations: a SIGSYS the plugin raises itself is a
    crash if it kills the worker (as the init of its PID namespace, it may well survive it)."""
    with driver.worker(*plugin) as w:
        try:
            w.call("sigsys")
        except PluginCrashed as e:
            assert e.signal == signal.SIGSYS


def test_a_forged_confinement_error_frame_is_a_load_error(driver, make_plugin):
    path, policy = make_plugin("""
        import os
        from sandbox.protocol import codec, framing
        os.write(4, framing.encode_frame(framing.LOADERR, 0, codec.dumps(
            {"type": "ConfinementError", "message": "forged", "traceback": "", "layer": "landlock"})))
        os._exit(70)
    """)
    with pytest.raises(LoadError) as ei:
        driver.worker(path, policy)
    assert type(ei.value) is LoadError and ei.value.type == "ConfinementError"


def test_a_reply_of_millions_of_tiny_objects_is_refused(driver, plugin):
    with driver.worker(*plugin) as w:
        # the worker's encoder refuses to send what the host would not decode
        with pytest.raises(PluginError, match="not plain data.*objects"):
            w.call("empty_maps", 900_000, 3)  # 2.7 million empty maps
        assert w.alive
        t = time.monotonic()
        with pytest.raises(ProtocolViolation, match="objects"):
            w.call("raw_empty_maps", 900_000, 3)  # the same in a 2.6 MiB frame written raw
        assert time.monotonic() - t < 30  # generous: the plugin builds them, the host stops early


def test_the_syscall_hook_denies_and_records(driver, plugin):
    seen, events = [], []
    unsubscribe = sandbox.events.subscribe(lambda ev: ev.name == "denied" and events.append(ev))
    try:
        def hook(n):
            return ("deny", errno.EACCES) if n.name == "socket" else "kill"
        with driver.worker(*plugin, _on_syscall=hook) as w:
            w.on("denied", seen.append)
            assert w.call("sock") == errno.EACCES  # answered, not killed
            assert [n.name for n in w.last_denials] == ["socket"]
            assert w.call("add", 1, 2) == 3 and w.last_denials == []
    finally:
        unsubscribe()
    assert [n.name for n in seen] == ["socket"]
    assert events and events[0].fields["syscall"] == "socket" and events[0].fields["plugin"]


def test_lifecycle_events_are_emitted(driver, plugin):
    got = []
    unsubscribe = sandbox.events.subscribe(got.append)
    try:
        with driver.worker(*plugin) as w:
            pid = w.pid
            w.call("add", 1, 2)
            with pytest.raises(PluginTimeout):
                w.invoke("spin", timeout=0.2)
            deadline = time.monotonic() + 10
            while not any(e.name == "ended" for e in got) and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        unsubscribe()
    mine = [e for e in got if e.fields.get("pid") == pid]
    names = [e.name for e in mine]
    for name in ("started", "ready", "call", "timeout", "ended"):
        assert name in names, names
    call = next(e for e in mine if e.name == "call")
    assert call.fields["outcome"] == "ok" and call.fields["duration"] >= 0
    assert next(e for e in mine if e.name == "ended").fields["reason"] == "timeout"


def test_a_dropped_worker_warns_and_is_cleaned_up(driver, plugin):
    w = driver.worker(*plugin)
    with pytest.raises(PluginError):
        # an error raised through the worker's own frames, which leaves it running (a timeout
        # would end it: then whether it ended before it was dropped is a race, not the test)
        w.call("add", 1)
    inner = getattr(w, "w", w)
    pid, ref = inner.pid, weakref.ref(inner)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.disable()
        try:
            del w, inner
            if driver.name == "async":
                gc.collect()  # asyncio's own future plumbing keeps the finished task in a cycle
        finally:
            gc.enable()
    assert ref() is None  # (sync: without the cyclic GC: no reference cycle held it)
    assert any(issubclass(c.category, ResourceWarning) for c in caught)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(pid)


def _alive(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


HOST = r"""
import asyncio, json, os, resource, signal, sys, time
sys.path.insert(0, {root!r})
import sandbox
from sandbox._host import zygote_client
driver, path, policy, scenario = sys.argv[1:5]
out = {{}}


def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) // 1024


async def run():
    if driver == "sync":
        make = lambda **kw: sandbox.Worker(path, policy=policy, **kw)
    else:
        make = lambda **kw: sandbox.AsyncWorker.start(path, policy=policy, **kw)

    async def sync(x):  # the same line for either driver
        return await x if asyncio.iscoroutine(x) else x
    w = await sync(make())
    if scenario == "flood":
        w.on("message", lambda m: None)
        before = rss_mib()
        out["posted"] = await sync(w.invoke("flood", (300, 8 << 20), timeout=120))  # 2.4 GB: slow on a busy host
        out["growth_mib"] = rss_mib() - before
        await sync(w.close())
        return
    # scenario "stopped": the zygote is stopped; terminate and the next start stay bounded
    zygote = zygote_client.get(False)._proc
    zygote.send_signal(signal.SIGSTOP)
    try:
        ticks = []
        async def ticker():
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.05)
        tick = asyncio.ensure_future(ticker())
        t = time.monotonic()
        await sync(w.terminate())
        out["terminate_s"] = time.monotonic() - t
        out["alive"] = w.alive
        t = time.monotonic()
        try:
            await sync(make(start_timeout=1.0))
            out["start"] = "started"
        except sandbox.SandboxError as e:
            out["start"] = e.kind
        out["start_s"] = time.monotonic() - t
        await asyncio.sleep(0.2)  # one more tick: a stall shows as the gap before it
        tick.cancel()
        gaps = [b - a for a, b in zip(ticks, ticks[1:])]
        out["loop_stall_s"] = max(gaps) if gaps else None
    finally:
        if zygote.poll() is None:  # the client may have killed (and reaped) it meanwhile
            zygote.send_signal(signal.SIGCONT)


asyncio.run(run())
print(json.dumps(out))
"""


def _host(driver_name, plugin, scenario, plugin_dir):
    script = os.path.join(plugin_dir, f"host_{scenario}.py")
    with open(script, "w") as f:
        f.write(HOST.format(root=ROOT))
    out = subprocess.run([sys.executable, script, driver_name, *plugin, scenario], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("driver_name", ["sync", "async"])
def test_a_post_flood_does_not_grow_the_host(driver_name, plugin, plugin_dir):
    got = _host(driver_name, plugin, "flood", plugin_dir)
    assert got["posted"] == 300  # 2.4 GB posted in one call
    assert got["growth_mib"] < 400, got  # bounded by the host's budget, not by what was posted


@pytest.mark.parametrize("driver_name", ["sync", "async"])
def test_a_stopped_zygote_bounds_terminate_and_start(driver_name, plugin, plugin_dir):
    got = _host(driver_name, plugin, "stopped", plugin_dir)
    # the pidfd says the worker exited: terminate() does not wait out DEATH_WAIT (5 s) for a status
    # the stopped zygote cannot send
    assert got["alive"] is False and got["terminate_s"] < 3, got
    # the same error from both drivers: the zygote is named, not a plugin that failed to load
    assert got["start"] == "zygote-died" and got["start_s"] < 8, got
    if driver_name == "async":
        assert got["loop_stall_s"] < 0.5, got  # the spawn ran in a thread, never on the loop


FORKER = r"""
import os, sys, time, json
sys.path.insert(0, {root!r})
import sandbox
path, policy = sys.argv[1:3]
from sandbox._host import zygote_client
w = sandbox.Worker(path, policy=policy)
assert w.call("add", 1, 1) == 2
parent_zygote = zygote_client.get(False).pid
r, wr = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    res = {{}}
    try:
        try:
            w.call("add", 1, 2)
            res["inherited"] = "answered"
        except sandbox.WorkerClosed:
            res["inherited"] = "closed"
        mine = sandbox.Worker(path, policy=policy)
        res["own"] = mine.call("add", 20, 22)
        ended = []
        mine.on("exit", ended.append)
        os.kill(mine.pid, 9)  # idle: only a hub thread of the child's own can notice
        deadline = time.monotonic() + 10
        while not ended and time.monotonic() < deadline:
            time.sleep(0.01)
        res["idle_death_noticed"] = bool(ended)
        # its workers come from a zygote of its own: the parent's answers the parent only
        res["own_zygote"] = zygote_client.get(False).pid not in (None, parent_zygote)
        for i in range(5):  # starts while the parent starts workers too: never on its zygote
            with sandbox.Worker(path, policy=policy) as other:
                assert other.call("add", i, 1) == i + 1
    except BaseException as e:
        res["error"] = repr(e)
    os.write(wr, json.dumps(res).encode())
    os._exit(0)
os.close(wr)
calls = 0
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    assert w.call("add", calls, 1) == calls + 1  # the parent keeps calling meanwhile
    with sandbox.Worker(path, policy=policy) as fresh:  # ... and starting workers
        assert fresh.call("add", 1, 1) == 2
    calls += 1
    done, _ = os.waitpid(pid, os.WNOHANG)
    if done:
        break
child = json.loads(os.read(r, 65536) or b"{{}}")
w.close()
print(json.dumps({{"child": child, "parent_calls": calls, "parent_alive_until_close": True}}))
"""


def test_fork_gives_the_child_its_own_library_state(plugin, plugin_dir):
    script = os.path.join(plugin_dir, "forker.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent(FORKER.format(root=ROOT)))
    out = subprocess.run([sys.executable, script, *plugin], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["child"] == {"inherited": "closed", "own": 42, "idle_death_noticed": True,
                            "own_zygote": True}, got
    assert got["parent_calls"] >= 1


def test_a_heavy_reply_is_decoded_off_the_event_loop(make_plugin):
    """A reply of a million tiny objects takes the host a while to decode: never on the loop."""
    path, policy = make_plugin(PLUGIN, "[limits]\ntimeout = 30\nmemory_mb = 1024\n")

    async def main():
        async with AsyncWorker(path, policy=policy) as w:
            gaps, last = [], [time.monotonic()]

            async def ticker():
                while True:
                    await asyncio.sleep(0.002)
                    now = time.monotonic()
                    gaps.append(now - last[0])
                    last[0] = now
            tick = asyncio.ensure_future(ticker())
            t = time.monotonic()
            got = await w.call("empty_maps", 330_000, 3)  # ~990,000 objects: within the budget
            took = time.monotonic() - t
            await asyncio.sleep(0.05)  # the ticker's next tick: a stall shows as the gap before it
            tick.cancel()
            return len(got), took, max(gaps)
    n, took, stall = asyncio.run(main())
    assert n == 3
    # what the same decode costs in line, here and now (so that a loaded machine moves both)
    import msgpack
    from sandbox import protocol
    payload = msgpack.packb([[{} for _ in range(330_000)] for _ in range(3)])
    t = time.monotonic()
    protocol.loads(payload, protocol.Limits())
    inline = time.monotonic() - t
    assert stall < 0.6 * inline, (stall, inline, took)
