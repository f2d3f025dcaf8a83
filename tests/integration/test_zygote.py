"""The zygote and its spare child: what every worker inherits, and the path without a spare."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import sandbox
from helpers import IS_ROOT, ROOT, TESTS
import procfs
from procfs import children_of

pytestmark = pytest.mark.unpriv

PLUGIN = """
    import os

    def add(a, b):
        return a + b

    def ids():
        return [os.getuid(), os.getgid(), os.getppid()]

    def open_socket():
        import socket
        socket.socket()
"""


def spares_of(zygote: int, workers) -> list[int]:
    return [p for p in children_of(zygote) if p not in workers]


def wait_gone(pid: int, limit: float = 10.0) -> None:
    assert procfs.wait_until(lambda: procfs.gone(pid), limit), f"pid {pid} is still there"


def test_zygote_shares_no_writable_memory_with_workers(make_plugin):
    """Every worker inherits the zygote's memory: a shared writable mapping there (say, the spawn
    request buffer) would let one worker rewrite the plan of the next."""
    path, policy = make_plugin(PLUGIN)
    with sandbox.Worker(path, policy=policy) as w:
        with open(f"/proc/{procfs.parent_of(w.pid)}/maps") as f:
            shared = [line for line in f if line.split()[1].startswith("rw") and line.split()[1][3] == "s"]
    assert shared == []


SPARE_PROBE = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
import sandbox
sys.path.insert(0, {tests!r})
import procfs
from procfs import children_of
with sandbox.Worker({plugin!r}, policy={policy!r}) as w:
    zygote = procfs.parent_of(w.pid)
    end = time.monotonic() + 10  # a spare forked a moment ago may not have closed them yet
    spares = [p for p in children_of(zygote) if p != w.pid]
    while not spares and time.monotonic() < end:  # nor even be there yet, on a busy machine
        time.sleep(0.01)
        spares = [p for p in children_of(zygote) if p != w.pid]
    while True:
        fds = {{fd: os.readlink(f"/proc/{{spares[0]}}/fd/{{fd}}") for fd in os.listdir(f"/proc/{{spares[0]}}/fd")}}
        extra = {{fd: t for fd, t in fds.items() if int(fd) > 2}}
        if len(extra) <= 1 or time.monotonic() > end:
            break
        time.sleep(0.01)
    print(json.dumps({{"spares": len(spares), "extra": extra, "zygote_fds": len(os.listdir(f"/proc/{{zygote}}/fd"))}}))
"""


def test_spare_holds_no_descriptor_of_the_zygote(make_plugin, plugin_dir):
    """The spare waits for a plan holding only stdio and its own socket: not the host's control
    socket, not other workers' status pipes, not another worker's ruleset. (A host of its
    own, in a subprocess: this process's zygote may have other tests' workers as children.)"""
    path, policy = make_plugin(PLUGIN)
    host = os.path.join(plugin_dir, "spare_probe.py")
    with open(host, "w") as f:
        f.write(SPARE_PROBE.format(root=ROOT, tests=TESTS,
                                   plugin=path, policy=policy))
    out = subprocess.run([sys.executable, host], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["spares"] == 1
    extra = seen["extra"]
    assert len(extra) == 1 and next(iter(extra.values())).startswith("socket:"), extra
    assert seen["zygote_fds"] > 4  # the zygote does hold more, so the check above means something


def test_a_fresh_fork_serves_when_the_spare_is_gone(make_plugin):
    """Kill the spare: the next worker is forked on demand and confined exactly the same way."""
    path, policy = make_plugin(PLUGIN)
    with sandbox.Worker(path, policy=policy) as first:
        zygote = procfs.parent_of(first.pid)
        ids_first = first.call("ids")
        for spare in spares_of(zygote, {first.pid}):  # and warm templates, and their spares
            try:
                os.kill(spare, signal.SIGKILL)
            except ProcessLookupError:
                pass  # a template's spare ends by itself once its template is gone
            wait_gone(spare)  # reaped by the zygote
        assert spares_of(zygote, {first.pid}) == []
        with sandbox.Worker(path, policy=policy) as second:
            assert second.call("add", 2, 3) == 5
            uid, gid, ppid = second.call("ids")
            assert ppid == 0 and procfs.parent_of(second.pid) == zygote  # 0: the parent is outside its PID namespace
            if IS_ROOT:
                assert uid != 0 and gid != 0 and uid != ids_first[0]
            else:
                assert uid == os.getuid()
            with pytest.raises(sandbox.PluginError) as ei:  # the default's deny mode: EPERM, reported
                second.call("open_socket")
            assert ei.value.type == "PermissionError" and [n.name for n in second.last_denials] == ["socket"]
        # and the zygote made a new spare after serving that request
        assert len(spares_of(zygote, {first.pid})) == 1


SPAWNER = """
    import os, time
    from sandbox.plugin import post

    def spawn_and_hang(escape):
        pid = os.fork()
        if pid == 0:
            if escape == "session":
                os.setsid()  # leaves the worker's session and process group
            time.sleep(120)
            os._exit(0)
        post(pid)
        while True:
            pass
"""


SPAWNER_POLICY = """
    [limits]
    processes = 4
    timeout = 1.0

    [seccomp]
    groups = ["@process"]
"""


@pytest.mark.parametrize("escape", ["none", "session"])
def test_a_killed_worker_takes_what_it_started_with_it(make_plugin, escape):
    """Timeout kills the whole worker, anything it started included: also a child that left the
    worker's session (root mode: the uid sweep; unprivileged: the zygote adopts and kills orphans)."""
    path, policy = make_plugin(SPAWNER, SPAWNER_POLICY)
    got, raised = [], []
    with sandbox.Worker(path, policy=policy) as w:
        # the pid the worker posts is its PID namespace's: the host finds the child by parentage
        def call():
            try:
                w.call("spawn_and_hang", escape)
            except sandbox.PluginTimeout as e:
                raised.append(e)
        caller = threading.Thread(target=call)
        caller.start()
        end = time.monotonic() + 10
        while not got and time.monotonic() < end and caller.is_alive():
            got = children_of(w.pid)
            time.sleep(0.01)
        caller.join()
    assert len(raised) == 1
    assert len(got) == 1 and got[0] > 0
    child = got[0]
    assert procfs.wait_until(lambda: procfs.ended(child), 10), f"process {child} started by the worker outlived it"


# ---- the zygote survives any request; a stuck or dead zygote is a clear, bounded error -------------
def test_a_policy_path_with_a_nul_byte_is_a_policy_error_in_the_host(make_plugin):
    """Found in the host, before anything is forked: the zygote and a sibling are untouched."""
    path, policy = make_plugin(PLUGIN)
    bad_path, bad_policy = make_plugin(PLUGIN, '[filesystem]\nread_only = ["/tmp/a\\u0000b"]\n')
    with sandbox.Worker(path, policy=policy) as sibling:
        zygote = procfs.parent_of(sibling.pid)
        with pytest.raises(sandbox.PolicyError) as ei:
            sandbox.Worker(bad_path, policy=bad_policy)
        assert ei.value.key == "filesystem.read_only"
        assert sibling.call("add", 1, 2) == 3
        with sandbox.Worker(path, policy=policy) as next_one:
            assert procfs.parent_of(next_one.pid) == zygote  # the same zygote still serves
            assert next_one.call("add", 2, 2) == 4


@pytest.mark.parametrize("request_bytes,nfds", [
    (b"\xc1garbage", 5),           # not msgpack
    (b"\x92\x00\xc3", 5),          # uid 0
    (b"\x92\xa3abc\xc3", 5),       # uid not an int
    (b"\x92\xc0\xc3", 2),          # too few descriptors
    (b"\x93\xc0\xc3\xc3", 5),      # one field too many
])
def test_the_zygote_answers_a_malformed_request_and_lives(make_plugin, request_bytes, nfds):
    """Whatever a request holds, the zygote answers with an error and carries on: its other
    workers keep running and it serves the next request."""
    import socket
    from sandbox._host import zygote_client
    from sandbox.protocol.zygote import decode_reply
    path, policy = make_plugin(PLUGIN)
    with sandbox.Worker(path, policy=policy) as sibling:
        z = zygote_client.get(False)
        zygote = procfs.parent_of(sibling.pid)
        assert z.pid == zygote
        pipes = [os.pipe() for _ in range(nfds)]
        fds = [r for r, _ in pipes]
        try:
            with z._lock:
                z._ctl.settimeout(10)
                socket.send_fds(z._ctl, [request_bytes], fds)
                msg, got, _, _ = socket.recv_fds(z._ctl, 4096, 1)
        finally:
            for r, w in pipes:
                os.close(r)
                os.close(w)
        assert got == []
        pid, error = decode_reply(msg)
        assert pid is None and error
        assert sibling.call("add", 1, 2) == 3
        with sandbox.Worker(path, policy=policy) as next_one:
            assert procfs.parent_of(next_one.pid) == zygote
            assert next_one.call("add", 2, 2) == 4


STOPPED_ZYGOTE = r"""
import faulthandler, json, os, signal, sys, time
faulthandler.dump_traceback_later(40, exit=True)  # a hang says where it is
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
import procfs
import sandbox
from sandbox import ZygoteDied
w = sandbox.Worker({plugin!r}, policy={policy!r})
zygote = procfs.parent_of(w.pid)
os.kill(zygote, signal.SIGSTOP)
start = time.monotonic()
try:
    sandbox.Worker({plugin!r}, policy={policy!r}, start_timeout=1.0)
    outcome = "started"
except ZygoteDied as e:
    outcome = str(e)
took = time.monotonic() - start
sibling = w.call("add", 1, 2)  # the stopped zygote's worker still answers
with sandbox.Worker({plugin!r}, policy={policy!r}) as fresh:  # on a new zygote
    new_zygote = procfs.parent_of(fresh.pid)
    fresh_answer = fresh.call("add", 2, 2)
os.kill(zygote, signal.SIGCONT)
print(json.dumps({{"outcome": outcome, "took": took, "sibling": sibling, "fresh": fresh_answer,
                  "new_zygote": new_zygote != zygote}}))
"""


def test_a_stopped_zygote_bounds_the_start_by_start_timeout(make_plugin, plugin_dir):
    """SIGSTOP the zygote (a host of its own, in a subprocess): Worker(start_timeout=1) fails
    with ZygoteDied in about a second, the stopped zygote's worker still answers, and the next
    worker starts on a new zygote."""
    path, policy = make_plugin(PLUGIN)
    host = os.path.join(plugin_dir, "stopped.py")
    with open(host, "w") as f:
        f.write(STOPPED_ZYGOTE.format(root=ROOT, tests=TESTS, plugin=path, policy=policy))
    out = subprocess.run([sys.executable, host], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert "did not answer within 1 s" in seen["outcome"], seen
    assert seen["took"] < 4.0, seen  # 1 s, plus generous slack for a loaded machine
    assert seen["sibling"] == 3 and seen["fresh"] == 4 and seen["new_zygote"]


KILLED_ZYGOTE = r"""
import json, os, signal, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
import procfs
import sandbox
w = sandbox.Worker({plugin!r}, policy={policy!r})
zygote = procfs.parent_of(w.pid)
os.kill(zygote, signal.SIGKILL)
procfs.wait_until(lambda: procfs.ended(w.pid), 10)  # the worker dies with its zygote (PDEATHSIG)
try:
    w.call("add", 1, 2)
    said = None
except sandbox.SandboxError as e:
    said = [type(w.death).__name__, str(w.death), str(e)]  # the call may find it ended already
with sandbox.Worker({plugin!r}, policy={policy!r}) as fresh:
    answer = fresh.call("add", 2, 2)
print(json.dumps({{"said": said, "fresh": answer}}))
"""


def test_a_dead_zygote_is_named_as_the_cause(make_plugin, plugin_dir):
    """The zygote dies (SIGKILL): its worker dies with it, and the caller is told that the
    zygote died and how, not that the plugin crashed; the next worker gets a new zygote."""
    path, policy = make_plugin(PLUGIN)
    host = os.path.join(plugin_dir, "killed.py")
    with open(host, "w") as f:
        f.write(KILLED_ZYGOTE.format(root=ROOT, tests=TESTS, plugin=path, policy=policy))
    out = subprocess.run([sys.executable, host], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    kind, message, told = seen["said"]
    assert kind == "ZygoteDied", seen
    assert message in told
    assert "zygote" in message and "SIGKILL" in message, seen
    assert seen["fresh"] == 4
