"""Attacks 37 and 17 of the README's security table: a worker addresses no process outside its own tree, and nothing it
starts outlives it. The layer: a PID namespace per worker (zygote/pidns.py)."""
import os
import signal
import subprocess
import sys
import time

import pytest

import sandbox
from helpers import IS_ROOT, ROOT
import procfs
from procfs import children_of
from security.attack_lab import intact

pytestmark = pytest.mark.unpriv

SYS_getsid, SYS_getpgid, SYS_tgkill = 124, 121, 234
ESRCH = 3


@pytest.mark.parametrize("nr", [SYS_getsid, SYS_getpgid])
def test_no_host_pid_can_be_probed(lab, sleeper, nr):
    """37: getsid/getpgid of the host, a neighbour or init find nothing (ESRCH); the worker
    sees only itself, as pid 1."""
    with intact(lab) as w:
        for pid in (os.getpid(), sleeper.pid, os.getppid()):
            assert w.call("sys", nr, pid) == [-1, ESRCH]
        assert w.call("sys", SYS_getsid, 0)[0] == 1  # itself: pid 1 of its namespace, its own session
        assert w.call("sys", 39)[0] == 1


def test_host_pids_do_not_exist_in_its_proc(lab, sleeper):
    """37: Landlock does not cover stat(), so with the host's /proc a worker could still map
    every pid by stat("/proc/N"); its /proc is its PID namespace's: only itself is there."""
    with intact(lab) as w:
        for pid in (os.getpid(), sleeper.pid, os.getppid()):
            assert w.call("stat_errno", f"/proc/{pid}") == 2  # ENOENT
        assert w.call("stat_errno", "/proc/1") == 0  # itself
        assert w.call("read", "/proc/self/status")[:5] == b"Name:"


def test_its_proc_lists_only_its_own_tree(make_plugin):
    path, policy = make_plugin("import os\n\ndef pids():\n    return sorted(int(n) for n in os.listdir('/proc') "
                               "if n.isdigit())\n", '[filesystem]\nread_only = ["/proc"]\n')
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("pids") == [1]


def test_tgkill_finds_no_host_process(lab, sleeper):
    with intact(lab) as w:
        assert w.call("tgkill", sleeper.pid, signal.SIGKILL) == [-1, ESRCH]
    assert sleeper.poll() is None


def _same_uid_sleeper(uid: int) -> subprocess.Popen:
    """A process the worker's uid may signal as far as uids go: the host's own uid when
    unprivileged, the worker's uid when root."""
    if IS_ROOT:
        return subprocess.Popen(["sleep", "60"], user=uid, group=uid)
    return subprocess.Popen(["sleep", "60"])


TGKILL = """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def tgkill(pid, sig):
        ret = libc.syscall(234, pid, pid, sig)
        return [ret, ctypes.get_errno()]

    def getuid():
        return libc.getuid()
"""


def test_old_landlock_abi_still_cannot_signal_a_same_uid_process(make_plugin, monkeypatch):
    """37: Landlock below ABI 6 has no signal scoping, and the uid is no barrier for a process
    of the worker's own uid. Simulated by building the worker's ruleset (the host builds it) at
    ABI 5: the PID namespace alone keeps the target out of reach."""
    from sandbox._host import rulesets
    monkeypatch.setattr(rulesets, "_abi", 5)
    monkeypatch.setattr(rulesets, "_cache", {})  # none of the real ABI's rulesets, and ours go after
    path, policy = make_plugin(TGKILL, '[python]\npreload = ["ctypes"]\n')
    try:
        with sandbox.Worker(path, policy=policy) as w:
            assert rulesets._cache, "the host built no ruleset: the simulated ABI was not used"
            victim = _same_uid_sleeper(w.call("getuid"))
            try:
                assert w.call("tgkill", victim.pid, signal.SIGKILL) == [-1, ESRCH]
                time.sleep(0.1)
                assert victim.poll() is None
            finally:
                victim.kill()
                victim.wait()
    finally:
        for fd in rulesets._cache.values():
            os.close(fd)


SPAWNER = """
    import os, time

    def spawn():
        pid = os.fork()
        if pid == 0:
            os.setsid()  # out of the worker's session and process group
            time.sleep(120)
            os._exit(0)
        return "spawned"
"""
SPAWNER_POLICY = '[limits]\nprocesses = 4\n[seccomp]\ngroups = ["@process"]\n'


def _grandchild(w) -> int:
    end = time.monotonic() + 10
    while time.monotonic() < end:
        kids = children_of(w.pid)
        if kids:
            return kids[0]
        time.sleep(0.01)
    raise AssertionError("the worker's child never showed up")


def test_a_workers_child_dies_when_the_worker_is_killed(make_plugin):
    """17: SIGKILL from outside to the worker: its child (which left its session) dies too."""
    path, policy = make_plugin(SPAWNER, SPAWNER_POLICY)
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("spawn") == "spawned"
        child = _grandchild(w)
        os.kill(w.pid, signal.SIGKILL)
        assert procfs.wait_until(lambda: procfs.ended(child), 15), f"process {child} started by the worker outlived it"


HOST = """
import os, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
import sandbox
import procfs
from procfs import children_of
w = sandbox.Worker({plugin!r}, policy={policy!r})
assert w.call("spawn") == "spawned"
end = time.monotonic() + 10
kids = []
while not kids and time.monotonic() < end:
    kids = children_of(w.pid)
    time.sleep(0.01)
zygote = procfs.parent_of(w.pid)
print(w.pid, kids[0], zygote, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("victim", ["host", "zygote"])
def test_a_workers_child_dies_with_the_host_or_the_zygote(make_plugin, plugin_dir, victim):
    """17: SIGKILL of the host process (a subprocess here) or of its zygote: the worker dies,
    and with it, by the kernel's hand, whatever it started."""
    path, policy = make_plugin(SPAWNER, SPAWNER_POLICY)
    script = os.path.join(plugin_dir, "host.py")
    with open(script, "w") as f:
        f.write(HOST.format(root=ROOT, tests=os.path.join(ROOT, "tests"), plugin=path, policy=policy))
    host = subprocess.Popen([sys.executable, script], stdout=subprocess.PIPE, text=True)
    try:
        worker, child, zygote = map(int, host.stdout.readline().split())
        os.kill(host.pid if victim == "host" else zygote, signal.SIGKILL)
        assert procfs.wait_until(lambda: procfs.ended(worker), 15), "the worker outlived its " + victim
        assert procfs.wait_until(lambda: procfs.ended(child), 15), \
            f"process {child} started by the worker outlived the {victim}"
    finally:
        host.kill()
        host.wait()


NO_PID_NAMESPACES_HOST = r"""
import os, sys
sys.path.insert(0, {root!r})
from sandbox.child import syscalls as _sys
uid, gid = os.getuid(), os.getgid()
ready_r, ready_w = os.pipe()
go_r, go_w = os.pipe()
pid = os.fork()
if pid:
    # a user namespace for the host, mapped from outside (root: every id, as before; else its own)
    os.read(ready_r, 1)
    maps = [("uid_map", "0 0 4294967295"), ("gid_map", "0 0 4294967295")] if uid == 0 else \
        [("setgroups", "deny"), ("uid_map", f"{{uid}} {{uid}} 1"), ("gid_map", f"{{gid}} {{gid}} 1")]
    for name, text in maps:
        with open(f"/proc/{{pid}}/{{name}}", "w") as f:
            f.write(text)
    os.write(go_w, b"x")
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
_sys.unshare(_sys.CLONE_NEWUSER)
os.write(ready_w, b"x")
os.read(go_r, 1)
with open("/proc/sys/user/max_pid_namespaces", "w") as f:
    f.write("0")  # this user namespace and all below it: no PID namespace may be made
import sandbox
try:
    w = sandbox.Worker({plugin!r})
    print("STARTED", w.call("ping"))
except sandbox.ConfinementError as e:
    print("REFUSED", e.layer, e)
"""


def test_no_pid_namespace_means_no_worker(make_plugin, plugin_dir):
    """37: where the kernel refuses a PID namespace (here: user.max_pid_namespaces = 0 in a
    user namespace the host runs in), the worker refuses to start and names the layer."""
    path, _ = make_plugin("def ping():\n    return 1\n")
    script = os.path.join(plugin_dir, "host.py")
    with open(script, "w") as f:
        f.write(NO_PID_NAMESPACES_HOST.format(root=ROOT, plugin=path))
    got = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    last = got.stdout.strip().splitlines()[-1]
    assert last.startswith("REFUSED pid_namespace"), last
    assert "PID namespace" in last and "ENOSPC" in last
