"""One test per confinement layer; each fails if its layer is removed."""
import os

import pytest

import sandbox
from sandbox import PolicyViolation
from helpers import IS_ROOT
import procfs

pytestmark = pytest.mark.unpriv

PROBE = """
    import os, resource

    def status():
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
        return out

    def ids():
        return [list(os.getresuid()), list(os.getresgid()), os.getgroups()]

    def setuid_root():
        try:
            os.setuid(0)
        except OSError:  # EPERM, or EINVAL where uid 0 is not mapped (user namespace)
            return "refused"
        return "became root"

    def read(path):
        with open(path, "rb") as f:
            return f.read(32)

    def write(path):
        with open(path, "w") as f:
            f.write("x")
        return "written"

    def environ():
        return dict(os.environ)

    def limits():
        return {name: list(resource.getrlimit(getattr(resource, "RLIMIT_" + name)))
                for name in ("CORE", "NOFILE", "FSIZE", "AS", "CPU")}

    def fds():
        return sorted(int(x) for x in os.listdir("/proc/self/fd"))

    def session():
        return [os.getsid(0), os.getpid(), os.getpgid(0)]

    def net_devices():
        with open("/proc/self/net/dev") as f:
            return sorted(line.split(":")[0].strip() for line in f.readlines()[2:])

    def make_socket():
        import socket
        socket.socket()
        return "made a socket"

    def userns():
        return os.readlink("/proc/self/ns/user")

    def cwd_write(name):
        with open(name, "w") as f:
            f.write("scratch")
        return os.getcwd()
"""

PROC = '[filesystem]\nread_only = ["/proc/self"]\n'


@pytest.fixture
def probe(make_plugin):
    path, policy = make_plugin(PROBE, PROC + '[environment]\nset = { GREETING = "hi" }\n'
                               "[limits]\nopen_files = 32\nfile_size_mb = 1\nmemory_mb = 300\n")
    with sandbox.Worker(path, policy=policy) as w:
        yield w


@pytest.mark.skipif(not IS_ROOT, reason="root mode only: an unprivileged host cannot change uid")
def test_unique_uid_per_worker_not_root(make_plugin, probe):
    uids, gids, groups = probe.call("ids")
    assert len(set(uids)) == 1 and uids[0] != 0 and gids[0] != 0 and groups == []
    path, policy = make_plugin(PROBE, PROC)
    with sandbox.Worker(path, policy=policy) as other:
        assert other.call("ids")[0][0] != uids[0]


def test_kernel_confirms_no_new_privs_seccomp_and_no_capabilities(probe):
    st = probe.call("status")
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0 and int(st["CapAmb"], 16) == 0
    assert int(st["CapBnd"], 16) == 0


def test_setuid_root_is_refused_by_the_kernel(make_plugin):
    """seccomp lets setuid through here, so only the dropped uid and capabilities refuse it."""
    path, policy = make_plugin(PROBE, '[seccomp]\nallow = ["setuid"]\nallow_dangerous = ["setuid"]\n')
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("setuid_root") == "refused"


def test_setuid_is_a_violation_under_the_default_policy(probe):
    with pytest.raises(PolicyViolation) as ei:
        probe.call("setuid_root")
    assert ei.value.syscall == "setuid"


def test_landlock_refuses_unlisted_paths(probe):
    # /etc/hostname is world-readable: only Landlock stands between the worker and it.
    assert os.access("/etc/hostname", os.R_OK)
    with pytest.raises(sandbox.PluginError) as ei:
        probe.call("read", "/etc/hostname")
    assert ei.value.type == "PermissionError"


def test_opening_for_write_fails_with_erofs_by_default(probe):
    target = os.path.join(os.path.dirname(probe.plugin), "dropped.txt")
    with pytest.raises(sandbox.PluginError) as ei:  # the filter answers: a read-only file system
        probe.call("write", target)
    assert ei.value.type == "OSError" and "Read-only file system" in ei.value.message
    assert not os.path.exists(target)


def test_plugin_folder_stays_read_only_even_with_file_writes(make_plugin):
    """@file-write lets openat(O_WRONLY) past seccomp: the read-only mount view (EROFS) and
    Landlock (EACCES) each refuse the path."""
    path, policy = make_plugin(PROBE, '[seccomp]\ngroups = ["@file-write"]\n')
    os.chmod(os.path.dirname(path), 0o777)  # DAC would allow it
    target = os.path.join(os.path.dirname(path), "dropped.txt")
    with sandbox.Worker(path, policy=policy) as w:
        with pytest.raises(sandbox.PluginError) as ei:
            w.call("write", target)
    assert ei.value.type in ("PermissionError", "OSError") and "Errno" in ei.value.message
    assert not os.path.exists(target)


def test_landlock_alone_refuses_a_write_the_mount_allows(make_plugin):
    """/proc stays a read-write mount in the worker's view, and DAC lets a process rewrite its
    own /proc/self/comm: only Landlock (read-only grant of /proc/self) refuses it."""
    path, policy = make_plugin(PROBE, PROC + '[seccomp]\ngroups = ["@file-write"]\n')
    with sandbox.Worker(path, policy=policy) as w:
        with pytest.raises(sandbox.PluginError) as ei:
            w.call("write", "/proc/self/comm")
        assert ei.value.type == "PermissionError"
        assert w.call("read", "/proc/self/comm") != b"x"


def test_forbidden_syscall_is_named_in_kill_mode(make_plugin):
    path, policy = make_plugin(PROBE, '[seccomp]\ndefault_action = "kill"\n')
    with sandbox.Worker(path, policy=policy) as w:
        with pytest.raises(PolicyViolation) as ei:
            w.call("make_socket")
        assert ei.value.syscall == "socket"
        assert ei.value.plugin == w.name
        assert "socket" in str(ei.value) and ei.value.grant == 'network.allow + network.families = ["inet"]'
        assert not w.alive


def test_forbidden_syscall_is_denied_and_named_under_the_default(probe):
    """The shipped default is deny mode: the socket() fails in the plugin, the host names it."""
    denials = []
    probe.on("denied", denials.append)
    with pytest.raises(sandbox.PluginError) as ei:
        probe.call("make_socket")
    assert ei.value.type == "PermissionError"
    assert [n.name for n in probe.last_denials] == ["socket"] and [n.name for n in denials] == ["socket"]
    assert probe.alive and probe.call("environ")["GREETING"] == "hi"


def test_errno_mode_returns_permission_error(make_plugin):
    path, policy = make_plugin(PROBE, '[seccomp]\ndefault_action = "errno"\n')
    with sandbox.Worker(path, policy=policy) as w:
        with pytest.raises(sandbox.PluginError) as ei:
            w.call("make_socket")
        assert ei.value.type == "PermissionError"
        with pytest.raises(sandbox.SandboxError) as ei:  # dangerous: killed even in deny mode
            w.call("setuid_root")
        assert not isinstance(ei.value, sandbox.PluginError)


def test_environment_is_only_what_the_policy_sets(probe, monkeypatch):
    env = probe.call("environ")
    assert env.pop("GREETING") == "hi"
    assert env == {"HOME": "/nonexistent", "USER": "sandbox", "LOGNAME": "sandbox",
                   **{k: "1" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                       "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}}


def test_rlimits_from_the_policy(probe):
    lim = probe.call("limits")
    assert lim["CORE"] == [0, 0]
    assert lim["NOFILE"] == [32, 32]
    assert lim["FSIZE"] == [1024 * 1024, 1024 * 1024]
    assert lim["AS"] == [300 * 1024 * 1024, 300 * 1024 * 1024]


def test_only_its_own_descriptors(probe):
    # 0 /dev/null, 1+2 log pipe, 3 and 4 the protocol pipes; the listdir itself opens one more
    assert probe.call("fds")[:5] == [0, 1, 2, 3, 4] and len(probe.call("fds")) == 6


def test_new_session_without_terminal(probe):
    sid, pid, pgid = probe.call("session")
    assert sid == pid == pgid


def test_no_network_namespace_has_only_loopback(probe):
    with open("/proc/self/net/dev") as f:
        host_devices = sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
    if host_devices == ["lo"]:
        pytest.skip("this host has no interface but loopback: nothing to tell apart")
    assert probe.call("net_devices") == ["lo"]


def test_scratch_dir_is_private_and_removed(make_plugin):
    path, policy = make_plugin(PROBE, "[filesystem]\nscratch = true\n[limits]\nfile_size_mb = 1\n")
    w = sandbox.Worker(path, policy=policy)
    scratch = w.call("cwd_write", "note.txt")
    # the worker's scratch is a tmpfs in its own mount namespace: the host's folder stays empty
    assert scratch != "/" and os.listdir(scratch) == []
    if IS_ROOT:  # (an unprivileged host may not look into a non-dumpable worker's root)
        assert os.path.exists(f"/proc/{w.pid}/root{scratch}/note.txt")
    w.close()
    assert not os.path.exists(scratch)


FORKER = """
    import os, time

    def fork_many(n):
        kids, refused = [], None
        for i in range(n):
            try:
                pid = os.fork()
            except OSError as e:  # EAGAIN from RLIMIT_NPROC
                refused = [i, e.errno]
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            kids.append(pid)
        for pid in kids:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        return {"started": len(kids), "refused": refused}
"""


def test_process_limit_holds_per_worker_in_both_modes(make_plugin):
    """limits.processes is RLIMIT_NPROC counted for this worker alone: by its unique uid as root,
    by a user namespace of its own when the host is unprivileged (the uid is the host's there,
    and a plain RLIMIT_NPROC would count the host's processes, or nothing useful)."""
    import errno
    path, policy = make_plugin(FORKER, '[limits]\nprocesses = 2\n[seccomp]\ngroups = ["@process"]\n')
    with sandbox.Worker(path, policy=policy) as w, sandbox.Worker(path, policy=policy) as sibling:
        assert w.call("fork_many", 10) == {"started": 2, "refused": [2, errno.EAGAIN]}
        # a sibling under the same policy has its own count
        assert sibling.call("fork_many", 10) == {"started": 2, "refused": [2, errno.EAGAIN]}


def test_every_thread_a_preload_started_is_confined_like_the_main_one(make_plugin):
    """A thread started before seccomp and no_new_privs would run beside the plugin in its
    memory: the filter is installed with TSYNC, which also sets no_new_privs on every thread;
    credentials and the Landlock domain came before the preload, so the thread inherited them."""
    path, policy = make_plugin(PROBE, '[python]\npreload = ["sandbox.child.canary_thread"]\n'
                                      '[limits]\nprocesses = 2\n[seccomp]\ngroups = ["@threads"]\n')
    with sandbox.Worker(path, policy=policy) as w:
        tasks = procfs.task_statuses(w.pid)
        assert len(tasks) == 2, "the preload started no thread: nothing was tested"
        for key in ("Seccomp", "NoNewPrivs", "Uid", "Gid", "CapEff", "CapPrm", "CapBnd"):
            assert len({t[key] for t in tasks}) == 1, (key, tasks)
        assert tasks[0]["Seccomp"] == "2" and tasks[0]["NoNewPrivs"] == "1"
        assert int(tasks[0]["CapBnd"], 16) == 0 and int(tasks[0]["CapEff"], 16) == 0


def test_a_preload_without_threads_is_fine(make_plugin):
    path, policy = make_plugin(PROBE, PROC + '[python]\npreload = ["json"]\n'
                                            '[limits]\nprocesses = 2\n[seccomp]\ngroups = ["@threads"]\n')
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("status")["Threads"] == "1"


def test_a_worker_with_a_user_namespace_of_its_own_has_no_bounding_set(make_plugin):
    """Unprivileged host, threads allowed: the worker makes a user namespace of its own, which
    hands it a full bounding set again; it must be emptied there (root hosts: by the uid change)."""
    path, policy = make_plugin(PROBE, PROC + '[limits]\nprocesses = 2\n[seccomp]\ngroups = ["@threads"]\n')
    plain_path, plain_policy = make_plugin(PROBE, PROC)
    with sandbox.Worker(path, policy=policy) as w, sandbox.Worker(plain_path, policy=plain_policy) as plain:
        st = w.call("status")
        if not IS_ROOT:  # the evidence that this is the case the test is about
            assert w.call("userns") != plain.call("userns")
        assert int(st["CapBnd"], 16) == 0
        assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
