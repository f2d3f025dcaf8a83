"""Escape attempts from ../shared/ATTACKS.md, tried against real workers.

Each test says which layer must stop the attack and checks: (1) it failed with the expected
error, (2) its effect did not happen, (3) the host is intact (answers, no leaked fd, no zombie),
(4) a sibling worker started before the attack still answers. The item numbers are ATTACKS.md's.
"""
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time

import pytest

import sandbox
from sandbox import PluginError, PluginMemoryError, PluginTimeout, PolicyViolation, ProtocolViolation
from conftest import DEFAULT_POLICY, ROOT, open_fds, zombies_of

pytestmark = pytest.mark.unpriv
PLUGIN_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attack_plugins", "attacks.py")
BASE = f'extends = "{DEFAULT_POLICY}"\n[python]\npreload = ["ctypes"]\n[filesystem]\nread_only = ["/proc/self"]\n'


@pytest.fixture(scope="module")
def lab():
    d = tempfile.mkdtemp(prefix="sandbox-attacks-")
    os.chmod(d, 0o755)
    shutil.copy(PLUGIN_SRC, os.path.join(d, "attacks.py"))
    os.chmod(os.path.join(d, "attacks.py"), 0o644)

    def policy(extra="", scratch=False):
        path = os.path.join(d, f"p{abs(hash((extra, scratch)))}.toml")
        with open(path, "w") as f:
            f.write(BASE + ("scratch = true\n" if scratch else "") + extra)
        return path

    yield d, policy
    shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def intact(lab, extra="", scratch=False):
    """Yield a worker to attack; afterwards prove the host and a sibling are unharmed."""
    d, policy = lab
    sibling = sandbox.Worker(os.path.join(d, "attacks.py"), policy=policy())
    fds_before = open_fds()
    w = sandbox.Worker(os.path.join(d, "attacks.py"), policy=policy(extra, scratch))
    try:
        yield w
    finally:
        w.close()
    assert sibling.call("sys", 39) [0] == sibling.pid  # getpid through ctypes: the sibling is fine
    sibling.close()
    fresh = sandbox.Worker(os.path.join(d, "attacks.py"), policy=policy())
    assert fresh.call("read", "/proc/self/status")[:5] == b"Name:"
    fresh.close()
    time.sleep(0.05)
    assert open_fds() <= fds_before | set()  # nothing leaked by the attack
    assert zombies_of(os.getpid()) == []


def violation(w, fn, *args, syscall=None):
    with pytest.raises(PolicyViolation) as ei:
        w.call(fn, *args)
    if syscall is not None:
        assert ei.value.syscall == syscall
    return ei.value


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


# ---- 1-8: reach the host or its neighbours ----------------------------------------------------

@pytest.mark.parametrize("nr,name,args", [
    (101, "ptrace", (16, "HOST", 0, 0)),                   # 1 PTRACE_ATTACH the host
    (310, "process_vm_readv", ("HOST", 0, 1, 0, 1, 0)),    # 1
    (311, "process_vm_writev", ("HOST", 0, 1, 0, 1, 0)),   # 1
    (438, "pidfd_getfd", (3, 3, 0)),                        # 1
    (434, "pidfd_open", ("HOST", 0)),                       # 1
])
def test_reaching_into_the_host_is_a_violation(lab, nr, name, args):
    """seccomp: the ptrace family is not in any group (dangerous list)."""
    args = [os.getpid() if a == "HOST" else a for a in args]
    with intact(lab) as w:
        violation(w, "sys", nr, *args, syscall=name)


@pytest.mark.parametrize("what", ["environ", "mem", "cmdline", "fd/0"])
def test_host_proc_files_are_out_of_reach(lab, what):
    """2: Landlock (only /proc/self is granted here) and the unique uid."""
    with intact(lab) as w:
        got = w.call("read", f"/proc/{os.getpid()}/{what}")
        assert isinstance(got, str) and got.startswith("refused")


@pytest.mark.parametrize("target", ["host", -1, 1, "sleeper"])
def test_kill_is_a_violation(lab, sleeper, target):
    """3: seccomp refuses kill() outright: the host, everyone (-1), init, a neighbour."""
    pid = {"host": os.getpid(), "sleeper": sleeper.pid}.get(target, target)
    with intact(lab) as w:
        violation(w, "kill", pid, signal.SIGKILL, syscall="kill")
    assert sleeper.poll() is None


def test_tgkill_to_others_is_refused(lab, sleeper):
    """3: tgkill is allowed for abort() of itself; to others, Landlock's signal scope (and the uid) refuse."""
    with intact(lab) as w:
        ret, err = w.call("tgkill", sleeper.pid, signal.SIGKILL)
        assert ret == -1 and err in (1, 3)  # EPERM (or ESRCH: a pid it can't even see)
        ret, err = w.call("tgkill", os.getpid(), signal.SIGKILL)
        assert ret == -1 and err in (1, 3)
    assert sleeper.poll() is None


def test_only_own_descriptors_by_fstat(lab):
    """5: arrange_fds closes everything but 0-4 (and the listener never reaches the plugin)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    secret = open(__file__)
    try:
        with intact(lab) as w:
            assert w.call("fds") == [0, 1, 2, 3, 4]
    finally:
        listener.close()
        secret.close()


@pytest.mark.parametrize("request_", [0x5412, 0x5412 | (1 << 32), 0x541C])
def test_terminal_injection_ioctls(lab, request_):
    """6: only TCGETS-style ioctls pass (exact 64-bit compare): TIOCSTI, with high bits, TIOCLINUX."""
    with intact(lab) as w:
        violation(w, "sys", 16, 0, request_, 0, syscall="ioctl")


@pytest.mark.parametrize("family,kind", [(1, 1), (2, 1), (2, 2), (10, 1), (16, 3), (40, 1), (17, 3)])
def test_sockets_of_any_family_are_violations(lab, family, kind):
    """7, 8: unix (abstract sockets, D-Bus), inet, inet6, netlink, vsock, packet: no socket() at all."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    with intact(lab) as w:
        violation(w, "sys", 41, family, kind, 0, syscall="socket")
    with pytest.raises(socket.timeout):
        listener.accept()  # nobody connected
    listener.close()


# ---- 9-14: become more than you are ----------------------------------------------------------

@pytest.mark.parametrize("nr,name,args", [
    (105, "setuid", (0,)), (117, "setresuid", (0, 0, 0)), (126, "capset", (0, 0)),
    (157, "prctl", (47, 2, 21, 0, 0)),                   # 9 PR_CAP_AMBIENT_RAISE
    (59, "execve", (0, 0, 0)), (322, "execveat", (0, 0, 0, 0, 0)), (319, "memfd_create", (0, 0)),  # 10
    (272, "unshare", (0x10000000,)), (308, "setns", (0, 0)),                                          # 11
    (56, "clone", (0x10000000 | 17, 0, 0, 0, 0)),                                                     # 11
    (425, "io_uring_setup", (1, 0)), (323, "userfaultfd", (0,)), (321, "bpf", (0, 0, 0)),           # 12
    (298, "perf_event_open", (0, 0, -1, -1, 0)), (250, "keyctl", (0, 0)), (248, "add_key", (0, 0, 0, 0, 0)),
    (304, "open_by_handle_at", (0, 0, 0)), (246, "kexec_load", (0, 0, 0, 0)), (175, "init_module", (0, 0, 0)),
    (165, "mount", (0, 0, 0, 0, 0)), (155, "pivot_root", (0, 0)), (167, "swapon", (0, 0)), (103, "syslog", (0, 0, 0)),
    (135, "personality", (0x0400000,)), (154, "modify_ldt", (0, 0, 0)),
    (317, "seccomp", (1, 0, 0)), (157, "prctl", (22, 2, 0, 0, 0)),                                  # 14
    (157, "prctl", (4, 1, 0, 0, 0)), (157, "prctl", (0x59616d61, -1, 0, 0, 0)),                     # 14
])
def test_privilege_and_kernel_surface_syscalls_are_violations(lab, nr, name, args):
    """9-12, 14: seccomp; each named by the host from the kernel's notification."""
    with intact(lab) as w:
        violation(w, "sys", nr, *args, syscall=name)


def test_clone3_gets_enosys(lab):
    """11: clone3's flags live in memory a filter can't read: ENOSYS, so glibc falls back to clone."""
    with intact(lab) as w:
        assert w.call("sys", 435, 0, 0) == [-1, 38]


@pytest.mark.parametrize("nr", [0x40000000 | 39, 0x40000000 | 57, 1000, 0xFFFF])
def test_foreign_and_unknown_syscall_numbers_kill(lab, nr):
    """13: x32 numbers and numbers past the table never match a rule: the worker dies by SIGSYS."""
    with intact(lab) as w:
        with pytest.raises(PolicyViolation):
            w.call("sys", nr)


# ---- 15-21: outlive or outgrow the limits -------------------------------------------------

@pytest.mark.parametrize("fn", ["spin", "never_read", "block_on_pipe", "stop_myself"])
def test_deadline_always_wins(lab, fn):
    """15, 16: the host's own clock and SIGKILL; SIGSTOP or a blocking read don't help."""
    extra = '[seccomp]\nallow = []\n'
    with intact(lab, extra) as w:
        t = time.monotonic()
        with pytest.raises(PluginTimeout):
            w.call(fn, timeout=0.5)
        assert time.monotonic() - t < 5
        with pytest.raises(sandbox.WorkerClosed):
            w.call("sys", 39)
        w.terminate()  # reaped: nothing of it is left
        assert not os.path.exists(f"/proc/{w.pid}")


def test_thread_bomb_is_a_violation(lab):
    """17, 18: no clone without a grant; with threads granted, RLIMIT_NPROC caps them per uid."""
    with intact(lab) as w:
        violation(w, "thread_bomb", syscall="clone")


def test_mmap_of_a_huge_region(lab):
    """19: RLIMIT_AS: a clear memory error, not a mystery crash."""
    with intact(lab) as w:
        with pytest.raises((PluginMemoryError, PluginError)) as ei:
            w.call("mmap_huge")
        if isinstance(ei.value, PluginError):
            assert ei.value.type in ("OSError", "MemoryError")


def test_many_spinning_workers_still_meet_deadlines(lab):
    """21: each worker is its own process; the host enforces deadlines from its own thread."""
    d, policy = lab
    ws = [sandbox.Worker(os.path.join(d, "attacks.py"), policy=policy()) for _ in range(4)]
    import threading
    errors = []

    def go(w):
        try:
            w.call("spin", timeout=0.5)
        except PluginTimeout as e:
            errors.append(e)

    t = time.monotonic()
    threads = [threading.Thread(target=go, args=(w,)) for w in ws]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(errors) == 4 and time.monotonic() - t < 5
    for w in ws:
        w.close()


# ---- 22-28: attack the host through the protocol ---------------------------------------------

@pytest.mark.parametrize("data", [
    struct.pack("<2sBBIQ", b"SB", 1, 3, 0xFFFFFFFF, 1),        # 22 a 4 GiB header
    b"\x00\xffgarbage" * 3,                                      # 22 random bytes
    struct.pack("<2sBBIQ", b"SB", 1, 6, 4, 0) + b"\xc1\xc1\xc1\xc1",  # 22 valid header, garbage after
    struct.pack("<2sBBIQ", b"SB", 1, 6, 5, 0) + b"\xdd\x3b\x9a\xca\x00",  # 23 array of a billion
    struct.pack("<2sBBIQ", b"SB", 1, 2, 1, 0) + b"\xc0",         # a host-only frame type
])
def test_malformed_frames_kill_the_worker(lab, data):
    """22, 23, 26: the frame decoder's caps; the host's memory does not follow the lie."""
    with intact(lab) as w:
        rss = _rss()
        with pytest.raises(ProtocolViolation):
            w.call("write_protocol", data)
        assert _rss() - rss < 50 * 1024


def test_deep_nesting_is_refused(lab):
    """23: msgpack's depth limit and our depth walk."""
    with intact(lab) as w:
        with pytest.raises(ProtocolViolation):
            w.call("deep_payload", 100_000)


@pytest.mark.parametrize("call_id_offset", [1, 1000])
def test_reply_with_another_calls_id(lab, call_id_offset):
    """24: one call in flight, ids matched strictly: a reply for another call is a violation."""
    with intact(lab) as w:
        w.call("sys", 39)  # call id 1; call id 2 is the next one
        with pytest.raises(ProtocolViolation):
            w.call("forged_reply", 2 + call_id_offset)


def test_second_reply_is_unsolicited(lab):
    """24: a plugin may lie about its own result, but a second reply to one call is a violation
    (here noticed by the next call; nothing it says can answer that next call)."""
    with intact(lab) as w:
        w.call("sys", 39)
        with pytest.raises(ProtocolViolation, match="unsolicited"):
            # both replies usually arrive in one read: the second is caught within the same call;
            # if they are read apart, the next call sees it before anything else
            w.call("forged_reply", 2)
            w.call("sys", 39)


def test_event_flood_does_not_grow_the_host(lab):
    """24: events are dispatched as read; the pipe gives back-pressure, memory stays flat."""
    with intact(lab) as w:
        got = []
        w.on("message", got.append)
        rss = _rss()
        assert w.call("flood_events", 200_000) == 200_000
        assert len(got) == 200_000 and _rss() - rss < 50 * 1024


def test_huge_exception_is_capped(lab):
    """28: messages and tracebacks are cut to 64 KiB in the worker."""
    with intact(lab, "[limits]\nmemory_mb = 1024\n") as w:
        with pytest.raises(PluginError) as ei:
            w.call("huge_error", 100)
        assert len(ei.value.message) < 70_000 and "characters cut" in ei.value.message


def test_host_writes_never_block_on_a_worker_that_stopped_reading(lab):
    """27: non-blocking writes under the call's deadline."""
    with intact(lab) as w:
        t = time.monotonic()
        with pytest.raises(PluginTimeout):
            w.call("never_read", b"x" * (12 * 1024 * 1024), timeout=1)
        assert time.monotonic() - t < 6


# ---- 29-32: the host's files and policy -------------------------------------------------------

def test_policy_files_are_out_of_reach(lab):
    """29: policies are read by the host before fork; Landlock keeps the policies folder out of
    sight, and even with @file-write granted nothing outside the worker's own grants is writable."""
    repo_policy = os.path.join(ROOT, "policies", "textstats.toml")
    before = open(repo_policy).read()
    with intact(lab, '[seccomp]\ngroups = ["@file-write"]\n') as w:
        got = w.call("read", repo_policy)
        assert isinstance(got, str) and got.startswith("refused")
        ret, err = w.call("sys", 257, -100, 0, 0o1001)  # openat(AT_FDCWD, NULL, O_WRONLY|O_TRUNC): no path
        assert ret == -1
        with pytest.raises(PluginError) as ei:
            w.call("write_file", repo_policy)
        assert ei.value.type == "PermissionError"
    assert open(repo_policy).read() == before


def test_symlinked_scratch_is_not_followed_by_the_host(lab):
    """31: scratch removal works on fds and never follows a symlink the worker made."""
    victim = tempfile.NamedTemporaryFile(prefix="host-file-", delete=False)
    victim.write(b"precious")
    victim.close()
    try:
        with intact(lab, scratch=True) as w:
            scratch = w.call("make_symlink", victim.name)
        assert not os.path.exists(scratch)
        assert open(victim.name, "rb").read() == b"precious"
    finally:
        os.unlink(victim.name)


def _rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
