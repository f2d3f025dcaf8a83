"""The host's Worker against real forked, confined workers."""
import gc
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import sandbox
from sandbox import (LoadError, PluginCrashed, PluginError, PluginMemoryError, PluginTimeout,
                     PolicyViolation, WorkerClosed)
from helpers import DEFAULT_POLICY, ROOT
from procfs import children_of, open_fds, zombies_of

pytestmark = pytest.mark.unpriv

# read once: make_plugin copies it into a folder every worker uid may read
with open(os.path.join(ROOT, "tests", "plugins", "basic", "worker.py")) as _f:
    BASIC = _f.read()


@pytest.fixture
def basic(make_plugin):
    path, policy = make_plugin(BASIC, "[limits]\nmemory_mb = 512\ntimeout = 10\n")
    with sandbox.Worker(path, policy=policy) as w:
        yield w


def test_call_returns_values(basic):
    assert basic.call("add", 2, 3) == 5
    assert basic.call("echo", {"a": [1, b"\x00", None, 2.5, True]}) == {"a": [1, b"\x00", None, 2.5, True]}
    assert basic.call("kw", 4, scale=3) == 12
    assert basic.alive and basic.pid > 0


def test_plugin_exception_arrives_as_three_strings(basic):
    with pytest.raises(PluginError) as ei:
        basic.call("fail")
    e = ei.value
    assert (e.type, e.message) == ("KeyError", "'no such thing'")
    assert "in fail" in e.traceback and all(isinstance(x, str) for x in (e.type, e.message, e.traceback))
    assert basic.call("add", 1, 1) == 2  # the worker survives its plugin's exceptions


def test_private_and_missing_functions_are_not_callable(basic):
    for name in ("_private", "nope", "__import__"):
        with pytest.raises(PluginError, match="no public function"):
            basic.call(name)


def test_messages_both_ways(basic):
    got = []
    basic.on("message", got.append)
    assert basic.call("tell", 3) == "told"
    assert got == [{"i": 0}, {"i": 1}, {"i": 2}]
    basic.post({"hello": "plugin"})
    deadline = time.monotonic() + 5
    while len(got) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got[3] == {"echo": {"hello": "plugin"}}


def test_stdout_never_corrupts_the_protocol(basic):
    lines = []
    basic.on("log", lines.append)
    assert basic.call("noisy") == "still fine"
    assert basic.call("add", 1, 2) == 3
    deadline = time.monotonic() + 10
    while len(lines) < 1000 and time.monotonic() < deadline:  # the hub forwards them as they come
        time.sleep(0.01)
    # every line the listener got is one whole line of the plugin's, up to the log budget
    assert len(lines) >= 1000 and set(lines) == {"x" * 200}
    assert basic.logs and basic.logs[-1] == "x" * 200


def test_non_plain_return_is_a_clear_error(basic):
    with pytest.raises(PluginError, match="not plain data"):
        basic.call("not_plain")
    assert basic.call("add", 1, 2) == 3


def test_exit_code_and_signal_are_reported(make_plugin):
    path, policy = make_plugin(BASIC)
    with sandbox.Worker(path, policy=policy) as w:
        with pytest.raises(PluginCrashed) as ei:
            w.call("exit_with", 7)
        assert ei.value.exit_code == 7
    with sandbox.Worker(path, policy=policy) as w:
        with pytest.raises((PluginCrashed, PolicyViolation)) as ei:
            w.call("abort")
        if isinstance(ei.value, PluginCrashed):
            # pid 1 of its PID namespace ignores its own SIGABRT; abort() then faults (SIGSEGV)
            assert ei.value.signal in (signal.SIGABRT, signal.SIGSEGV)


def test_memory_limit_is_a_memory_error_only_with_evidence(make_plugin):
    path, policy = make_plugin(BASIC, "[limits]\nmemory_mb = 256\n")
    import sandbox.events
    seen = []
    unsubscribe = sandbox.events.subscribe(lambda ev: ev.name == "memory" and seen.append(ev))
    with sandbox.Worker(path, policy=policy) as w:
        with pytest.raises(PluginMemoryError):
            w.call("grow")  # its peak reached the limit: the kernel's figures say so
        unsubscribe()
        assert len(seen) == 1 and seen[0].fields["pid"] == w.pid
        assert w.call("add", 1, 1) == 2
        # the plugin's word alone is not evidence: a PluginError of type MemoryError
        with pytest.raises(PluginError) as ei:
            w.call("pretend")
        assert ei.value.type == "MemoryError" and not isinstance(ei.value, PluginMemoryError)
        # one request far past the limit fails without the worker ever reaching it
        with pytest.raises(PluginError) as ei:
            w.call("hog")
        assert ei.value.type == "MemoryError" and not isinstance(ei.value, PluginMemoryError)


def test_load_errors_are_clear(make_plugin, plugin_dir):
    path, policy = make_plugin("def broken(:\n    pass\n")
    with pytest.raises(LoadError, match="SyntaxError|invalid syntax"):
        sandbox.Worker(path, policy=policy)
    path, policy = make_plugin("raise RuntimeError('no config')\n")
    with pytest.raises(LoadError, match="no config"):
        sandbox.Worker(path, policy=policy)
    with pytest.raises(LoadError, match="not found"):
        sandbox.Worker(os.path.join(plugin_dir, "missing.py"), policy=DEFAULT_POLICY)


def test_plugin_folder_does_not_shadow_the_stdlib(make_plugin):
    path, policy = make_plugin("import json\n\ndef which():\n    return json.__file__\n", name="shadow")
    with open(os.path.join(os.path.dirname(path), "json.py"), "w") as f:
        f.write("raise SystemExit('shadowed!')\n")
    with sandbox.Worker(path, policy=policy) as w:
        assert "shadow" not in w.call("which")


def test_threads_share_a_worker_safely(basic):
    errors = []

    def hammer(k):
        try:
            for i in range(50):
                assert basic.call("add", k, i) == k + i
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_no_fd_or_zombie_left_after_200_cycles(make_plugin):
    path, policy = make_plugin(BASIC)
    warm = sandbox.Worker(path, policy=policy)  # the zygote and hub exist before we count
    warm.terminate()
    gc.collect()
    fds_before, kids_before = open_fds(), set(children_of(os.getpid()))
    for i in range(200):
        w = sandbox.Worker(path, policy=policy)
        assert w.call("add", i, 1) == i + 1
        if i % 3 == 0:
            w.terminate()
        elif i % 3 == 1:
            with pytest.raises(PluginTimeout):
                w.invoke("spin", timeout=0.05)
        else:
            w.close()
    gc.collect()
    time.sleep(0.2)
    assert open_fds() == fds_before
    # the zygote and its one spare child (a new one after each start, so compare counts)
    assert len(children_of(os.getpid())) == len(kids_before)
    assert not zombies_of(os.getpid())


SECRET_HOST = r"""
import os, socket, sys, json
sys.path.insert(0, {root!r})
SECRET = "hunter2-" + "a9f3c1e7-only-in-the-host"
os.environ["HOST_SECRET_TOKEN"] = SECRET
secret_file = open({secret_path!r}, "w+")
secret_file.write(SECRET)
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
import sandbox
with sandbox.Worker({plugin!r}, policy={policy!r}) as w:
    print(json.dumps(w.call("look", SECRET[:8])))
"""

LOOKER = """
    import gc, os

    def _strings():
        # str and bytes are not tracked by the collector, nor are dicts and tuples holding only
        # such atoms: start from every tracked object and walk what it refers to
        seen, stack = set(), list(gc.get_objects())
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, (str, bytes, bytearray)):
                yield obj
            else:  # tracked referents are in the stack already
                stack.extend(r for r in gc.get_referents(obj) if not gc.is_tracked(r))

    def look(prefix, marker="only-in-the-host"):
        found = []
        if isinstance(marker, list):
            marker = "-".join(marker)  # built here, so this plugin's own constants never match
        for s in _strings():
            text = s if isinstance(s, str) else bytes(s).decode("latin-1")
            if prefix in text and marker in text:
                found.append("gc:" + text[:60])
        for k, v in os.environ.items():
            if prefix in v or k == "HOST_SECRET_TOKEN":
                found.append("env:" + k)
        fds = []
        for fd in range(1024):
            try:
                os.fstat(fd)
                fds.append(fd)
            except OSError:
                pass
        return {"found": found, "fds": fds}
"""

OTHER_PLUGIN = """
    API_KEY = "sk-live-4f1d9-belongs-to-plugin-a"

    def ping():
        return len(API_KEY)
"""


def test_looker_does_find_a_string_it_holds(make_plugin):
    """The scan below can fail: a string a plugin holds in a container is found."""
    path, policy = make_plugin(LOOKER + "\n    HELD = {'k': 'abc-' + str(12345) + '-held-here'}\n")
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("look", "abc-", ["held", "here"])["found"]


def test_plugin_finds_no_trace_of_other_plugins(make_plugin):
    """The zygote never reads a plugin's file; each worker reads its own, so none inherits another's."""
    other, policy = make_plugin(OTHER_PLUGIN)
    looker, _ = make_plugin(LOOKER)
    with sandbox.Worker(other, policy=policy) as a:
        assert a.call("ping") == 33
        with sandbox.Worker(looker, policy=policy) as b:
            assert b.call("look", "sk-live", ["belongs", "to", "plugin", "a"])["found"] == []


def test_plugin_finds_no_trace_of_host_secrets(make_plugin, plugin_dir):
    path, policy = make_plugin(LOOKER)
    host = os.path.join(plugin_dir, "host.py")
    with open(host, "w") as f:
        f.write(SECRET_HOST.format(root=ROOT, secret_path=os.path.join(plugin_dir, "secret.txt"),
                                   plugin=path, policy=policy))
    out = subprocess.run([sys.executable, host], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import json
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["found"] == []
    assert seen["fds"] == [0, 1, 2, 3, 4]  # stdin=/dev/null, log pipe twice, the two protocol pipes


HOST_THAT_DIES = r"""
import sys, time
sys.path.insert(0, {root!r})
import sandbox
ws = [sandbox.Worker({plugin!r}, policy={policy!r}) for _ in range(3)]
print(" ".join(str(w.pid) for w in ws), flush=True)
time.sleep(60)
"""


def test_host_death_takes_zygote_and_workers_with_it(make_plugin, plugin_dir):
    path, policy = make_plugin(BASIC)
    host = os.path.join(plugin_dir, "host.py")
    with open(host, "w") as f:
        f.write(HOST_THAT_DIES.format(root=ROOT, plugin=path, policy=policy))
    proc = subprocess.Popen([sys.executable, host], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 3
    family = children_of(proc.pid)
    assert set(pids) <= set(family)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in family):
        time.sleep(0.05)
    alive = [p for p in family if os.path.exists(f"/proc/{p}")]
    assert alive == []


def test_forbidden_syscall_while_loading_is_named(make_plugin):
    path, policy = make_plugin("import socket\nsocket.socket()\n")
    t = time.monotonic()
    with pytest.raises(PolicyViolation) as ei:
        sandbox.Worker(path, policy=policy)
    assert ei.value.syscall == "socket"
    assert time.monotonic() - t < 5  # named at once, not after the start timeout


def test_terminate_from_another_thread_during_a_call(basic):
    threading.Timer(0.3, basic.terminate).start()
    with pytest.raises(WorkerClosed):
        basic.invoke("spin", timeout=10)


THREADED_POSTER = """
    import threading
    from sandbox.plugin import post

    def storm(n, size):
        def run(k):
            for i in range(n):
                post({"k": k, "i": i, "pad": b"x" * (size if i % 2 else 10)})
        threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return 4 * n
"""


def test_threads_of_a_plugin_post_whole_frames(make_plugin):
    """post() from several plugin threads at once: frames are written one at a time, never
    interleaved (interleaving would be a protocol violation the plugin did not commit)."""
    path, policy = make_plugin(THREADED_POSTER, "[limits]\nthreads = 8\nmemory_mb = 512\n")
    got = []
    with sandbox.Worker(path, policy=policy) as w:
        w.on("message", got.append)
        assert w.invoke("storm", (200, 200_000), timeout=60) == 800
    assert len(got) == 800
    assert sorted((m["k"], m["i"]) for m in got) == [(k, i) for k in range(4) for i in range(200)]
    assert all(len(m["pad"]) == (200_000 if m["i"] % 2 else 10) for m in got)
