"""Policy files: every error names the file and the key; extends, groups, explain; the BPF is real."""
import ctypes
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from sandbox import PolicyError
from sandbox.child.seccomp import install_filter, set_no_new_privs
from sandbox.policy import Policy
from sandbox.policy.dangerous import DANGEROUS
from helpers import DEFAULT_POLICY, ROOT

pytestmark = pytest.mark.unpriv


@pytest.fixture
def write(tmp_path):
    def w(name, text):
        p = tmp_path / name
        p.write_text(textwrap.dedent(text))
        return str(p)
    return w


@pytest.mark.parametrize("text,key,words", [
    ("[limits]\ntimeot = 3\n", "limits.timeot", "did you mean 'timeout'"),
    ("[limts]\n", "limts", "did you mean 'limits'"),
    ("[limits]\ntimeout = 'soon'\n", "limits.timeout", "number"),
    ("[limits]\ntimeout = -1\n", "limits.timeout", ">="),
    ("[limits]\nopen_files = 2.5\n", "limits.open_files", "integer"),
    ("[filesystem]\nscratch = 'yes'\n", "filesystem.scratch", "true or false"),
    ("[identity]\nuid_range = [0, 10]\n", "identity.uid_range", "uid 0"),
    ("[network]\nfamilies = ['bluetooth']\n", "network.families", "unknown socket family"),
    ("[seccomp]\ndefault_action = 'maybe'\n", "seccomp.default_action", "kill"),
    ("[seccomp]\nallow = ['sockett']\n", "seccomp.allow", "did you mean 'socket'"),
    ("[seccomp]\ngroups = ['@pyhton-runtime']\n", "seccomp.groups", "did you mean '@python-runtime'"),
    ("[seccomp]\nerrno = { clone3 = 'ENOSYSS' }\n", "seccomp.errno", "did you mean 'ENOSYS'"),
    ("[seccomp]\nallow = ['ptrace']\n", "seccomp.allow", "allow_dangerous"),
    ("[seccomp]\nallow = ['seccomp']\nallow_dangerous = ['seccomp']\n", "seccomp.allow", "never"),
    ("[[seccomp.rule]]\nsyscall = 'ioctl'\nwhen = ['arg9 == 1']\n", "seccomp.rule[1]", "bad condition"),
    ("[[seccomp.rule]]\nsyscall = 'ioctl'\nwhen = ['arg1 = 1']\n", "seccomp.rule[1]", "bad condition"),
    ("limits = 3\n", "limits", "table"),
])
def test_errors_name_the_file_and_the_key(write, text, key, words):
    path = write("bad.toml", text)
    with pytest.raises(PolicyError) as ei:
        Policy.load(path)
    msg = str(ei.value)
    assert path in msg and f"[{key}]" in msg and words in msg, msg
    assert ei.value.path == path and ei.value.key == key


def test_toml_syntax_error_has_the_line(write):
    path = write("bad.toml", "[limits]\ntimeout = = 3\n")
    with pytest.raises(PolicyError, match=r"line 2"):
        Policy.load(path)


def test_missing_file_and_missing_parent(write, tmp_path):
    with pytest.raises(PolicyError, match="not found"):
        Policy.load(str(tmp_path / "nope.toml"))
    path = write("child.toml", "extends = 'ghost'\n")
    with pytest.raises(PolicyError, match="ghost.toml does not exist") as ei:
        Policy.load(path)
    assert ei.value.key == "extends"


def test_cycles_in_extends_are_refused(write):
    write("a.toml", "extends = 'b'\n")
    write("b.toml", "extends = 'c'\n")
    c = write("c.toml", "extends = 'a'\n")
    with pytest.raises(PolicyError, match="cycle in extends"):
        Policy.load(c)
    selfish = write("self.toml", "extends = 'self'\n")
    with pytest.raises(PolicyError, match="cycle"):
        Policy.load(selfish)


def test_extends_chain_overrides_scalars_and_merges_lists(write):
    write("base.toml", f"""
        extends = "{DEFAULT_POLICY}"
        [limits]
        timeout = 5
        memory_mb = 300
        [filesystem]
        read_only = ["/usr/share/zoneinfo"]
        [environment]
        set = {{ A = "1" }}
    """)
    write("mid.toml", """
        extends = "base"
        [limits]
        timeout = 2
        [seccomp]
        groups = ["@threads"]
        [environment]
        set = { B = "2" }
    """)
    leaf = write("leaf.toml", """
        extends = "mid"
        [filesystem]
        read_only = ["data"]
    """)
    os.mkdir(os.path.join(os.path.dirname(leaf), "data"))
    p = Policy.load(leaf)
    assert p.limits.timeout == 2 and p.limits.memory_bytes == 300 * 1024 * 1024
    assert p.filesystem.read_only == ("/usr/share/zoneinfo", os.path.join(os.path.dirname(leaf), "data"))
    env = p.environment({})
    assert env["A"] == "1" and env["B"] == "2"
    assert "set_robust_list" in p.seccomp.allowed  # @threads came through the chain
    assert [os.path.basename(x) for x in p.chain] == ["leaf.toml", "mid.toml", "base.toml", "default.toml"]


def test_default_resolves_to_the_shipped_policy(write):
    p = Policy.load(write("mine.toml", "extends = 'default'\n[limits]\ntimeout = 1\n"))
    assert p.limits.timeout == 1 and p.limits.open_files == 64
    assert os.path.samefile(p.chain[-1], DEFAULT_POLICY)


def test_environment_passes_only_named_variables(write):
    p = Policy.load(write("env.toml", "[environment]\npass = ['LANG', 'MISSING']\nset = { X = 'y', HOME = '/h' }\n"))
    env = p.environment({"LANG": "C", "SECRET": "s", "HOME": "/root"})
    assert env["LANG"] == "C" and env["X"] == "y" and "SECRET" not in env and "MISSING" not in env
    assert env["HOME"] == "/h"  # `set` has the last word over the worker's baseline


def test_groups_expand_and_grants_bring_their_syscalls(write):
    p = Policy.load(write("g.toml", "[seccomp]\ngroups = ['@time']\n[network]\nallow = true\nfamilies = ['inet']\n"))
    e = p.explain()
    assert "clock_nanosleep" in e["seccomp"]["allow"] and "connect" in e["seccomp"]["allow"]
    assert {"syscall": "socket", "when": ["arg0 == 2"]} in e["seccomp"]["rules"]
    d = Policy.default().explain()["seccomp"]
    assert "socket" not in d["allow"] and "clone" not in d["allow"] and "execve" not in d["allow"]
    assert not any(r["syscall"] == "clone" for r in d["rules"])


def test_dangerous_syscalls_need_explicit_consent(write):
    ok = Policy.load(write("d.toml", "[seccomp]\nallow = ['ptrace']\nallow_dangerous = ['ptrace']\n"))
    assert "ptrace" in ok.seccomp.allowed
    for name in ("bpf", "io_uring_setup", "userfaultfd", "unshare", "setns", "mount", "kexec_load"):
        assert name in DANGEROUS


# Docker's default seccomp profile (moby/profiles seccomp/default.json), its unconditional allowlist.
DOCKER_DEFAULT = set("""
accept accept4 access adjtimex alarm bind brk cachestat capget capset chdir chmod chown chown32 clock_adjtime
clock_adjtime64 clock_getres clock_getres_time64 clock_gettime clock_gettime64 clock_nanosleep
clock_nanosleep_time64 close close_range connect copy_file_range creat dup dup2 dup3 epoll_create
epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2
execve execveat exit exit_group faccessat faccessat2 fadvise64 fadvise64_64 fallocate fanotify_mark fchdir
fchmod fchmodat fchmodat2 fchown fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr flistxattr flock fork
fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64 fsync ftruncate ftruncate64 futex
futex_requeue futex_time64 futex_wait futex_waitv futex_wake futimesat getcpu getcwd getdents getdents64
getegid getegid32 geteuid geteuid32 getgid getgid32 getgroups getgroups32 getitimer getpeername getpgid
getpgrp getpid getppid getpriority getrandom getresgid getresgid32 getresuid getresuid32 getrlimit
get_robust_list getrusage getsid getsockname getsockopt get_thread_area gettid gettimeofday getuid getuid32
getxattr getxattrat inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl
io_destroy io_getevents io_pgetevents io_pgetevents_time64 ioprio_get ioprio_set io_setup io_submit
ipc kill landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lchown32 lgetxattr link
linkat listen listmount listxattr listxattrat llistxattr _llseek lremovexattr lseek lsetxattr lstat
lstat64 madvise map_shadow_stack membarrier memfd_create memfd_secret mincore mkdir mkdirat mknod mknodat
mlock mlock2 mlockall mmap mmap2 mprotect mq_getsetattr mq_notify mq_open mq_timedreceive
mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink mremap mseal msgctl msgget msgrcv
msgsnd msync munlock munlockall munmap name_to_handle_at nanosleep newfstatat _newselect open openat
openat2 pause pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll
ppoll_time64 prctl pread64 preadv preadv2 prlimit64 process_mrelease pselect6 pselect6_time64 pwrite64
pwritev pwritev2 read readahead readlink readlinkat readv recv recvfrom recvmmsg recvmmsg_time64 recvmsg
remap_file_pages removexattr removexattrat rename renameat renameat2 restart_syscall rmdir rseq
rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait
rt_sigtimedwait_time64 rt_tgsigqueueinfo sched_getaffinity sched_getattr sched_getparam
sched_get_priority_max sched_get_priority_min sched_getscheduler sched_rr_get_interval
sched_rr_get_interval_time64 sched_setaffinity sched_setattr sched_setparam sched_setscheduler
sched_yield seccomp select semctl semget semop semtimedop semtimedop_time64 send sendfile sendfile64
sendmmsg sendmsg sendto setfsgid setfsgid32 setfsuid setfsuid32 setgid setgid32 setgroups setgroups32
setitimer setpgid setpriority setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid
setreuid32 setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address setuid setuid32
setxattr setxattrat shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4 sigprocmask
sigreturn socketcall socketpair splice stat stat64 statfs statfs64 statx symlink symlinkat sync
sync_file_range syncfs sysinfo tee tgkill time timer_create timer_delete timer_getoverrun timer_gettime
timer_gettime64 timer_settime timer_settime64 timerfd_create timerfd_gettime timerfd_gettime64
timerfd_settime timerfd_settime64 times tkill truncate truncate64 ugetrlimit umask uname unlink unlinkat
uretprobe utime utimensat utimensat_time64 utimes vfork vmsplice wait4 waitid waitpid write writev
arch_prctl modify_ldt clone clone3 socket personality
""".split())


def test_default_policy_is_a_small_strict_subset_of_dockers():
    d = Policy.default().explain()["seccomp"]
    mine = set(d["allow"]) | {r["syscall"] for r in d["rules"]} | set(d["errno"])
    assert mine <= DOCKER_DEFAULT, mine - DOCKER_DEFAULT
    assert len(mine) < len(DOCKER_DEFAULT) / 3


def _run_under_filter(bpf: bytes, action) -> int:
    """Fork, install the filter for real, run `action`; return its exit code as
    os.waitstatus_to_exitcode gives it: 0 when `action` returned, -SIGSYS when the filter
    killed it (never WEXITSTATUS, which is 0 for a process killed by a signal too)."""
    pid = os.fork()
    if pid == 0:
        try:
            set_no_new_privs()
            install_filter(bpf)
            action()
            os._exit(0)
        except BaseException:
            os._exit(3)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _libc_syscall(nr, *args):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(nr, *args)


def _workload():
    import decimal
    import hashlib
    import json
    import re
    json.dumps({"a": [1, 2]}), re.findall(r"\d+", "a1b22"), hashlib.sha256(b"x").hexdigest()
    decimal.Decimal("1.1") * 3
    x = bytearray(50 * 1024 * 1024)
    del x
    try:
        raise ValueError("x")
    except ValueError:
        pass


KILL_MODE = f'extends = "{DEFAULT_POLICY}"\n[seccomp]\ndefault_action = "kill"\n'


def test_default_bpf_runs_python_and_kills_what_it_forbids(write):
    """The filter alone (no listener), kill mode pinned over the default: what it forbids is SIGSYS."""
    bpf = Policy.load(write("kill.toml", KILL_MODE)).bpf(notify=False)
    assert _run_under_filter(bpf, _workload) == 0
    for attack in (lambda: socket.socket(), lambda: os.fork(),
                   lambda: _libc_syscall(39 | 0x40000000),  # x32 getpid
                   lambda: _libc_syscall(1000),               # past the table
                   lambda: os.kill(1, 0)):
        assert _run_under_filter(bpf, attack) == -signal.SIGSYS

    def write_open():  # answered, not killed: a read-only file system to the plugin
        try:
            open("/tmp/should-not-exist", "w")
        except OSError as e:
            os._exit(0 if e.errno == errno.EROFS else 4)
        os._exit(5)
    assert _run_under_filter(bpf, write_open) == 0
    assert not os.path.exists("/tmp/should-not-exist")


def _exits_with_errno(fn, expected: int):
    def action():
        try:
            fn()
        except OSError as e:
            os._exit(0 if e.errno == expected else 4)
        os._exit(5)
    return action


def _raw(nr, *args):
    def call():
        if _libc_syscall(nr, *args) == -1:
            raise OSError(ctypes.get_errno(), "raw syscall failed")
    return call


def test_default_bpf_denies_what_it_forbids_and_kills_the_dangerous():
    """The shipped default is deny mode. Its filter alone (no listener: the host's reporting is
    not there to help) answers a forbidden call with EPERM and kills at any dangerous one."""
    p = Policy.default()
    assert p.seccomp.default_action == "deny"
    bpf = p.bpf(notify=False)
    assert _run_under_filter(bpf, _workload) == 0
    for attack in (socket.socket, os.fork, lambda: os.kill(1, 0), _raw(1000),  # past the table
                   _raw(56, 0x10000000 | 17, 0, 0, 0, 0)):  # clone(CLONE_NEWUSER): EPERM, not a namespace
        assert _run_under_filter(bpf, _exits_with_errno(attack, errno.EPERM)) == 0
    assert _run_under_filter(bpf, _raw(39 | 0x40000000)) == -signal.SIGSYS  # x32 getpid: a foreign ABI
    assert _run_under_filter(bpf, _exits_with_errno(lambda: open("/tmp/should-not-exist", "w"), errno.EROFS)) == 0
    assert not os.path.exists("/tmp/should-not-exist")
    for nr, args in ((165, (0, 0, 0, 0, 0)), (101, (16, 1, 0, 0)), (272, (0x10000000,)), (321, (0, 0, 0)),
                     (425, (1, 0)), (157, (22, 2, 0, 0, 0))):  # mount, ptrace, unshare, bpf, io_uring, prctl
        assert _run_under_filter(bpf, _raw(nr, *args)) == -signal.SIGSYS, nr
    # every dangerous syscall the default neither allows nor answers (clone3: ENOSYS) is in the
    # filter's kill list, the rules build_bpf writes when there is no listener
    answered = {"clone3"}
    assert DANGEROUS - answered - set(p.seccomp.allowed) <= set(p._effective["kill"])


def test_clone3_gets_enosys_and_deny_mode_gets_eperm(write):
    bpf = Policy.default().bpf(notify=False)

    def clone3():
        ret = _libc_syscall(435, None, 0)
        if ret == -1 and ctypes.get_errno() == 38:
            os._exit(0)
        os._exit(4)
    assert _run_under_filter(bpf, clone3) == 0

    soft = Policy.load(write("soft.toml", "[seccomp]\ndefault_action = 'deny'\n")).bpf(notify=False)

    def sock():
        try:
            socket.socket()
        except PermissionError:
            os._exit(0)
        os._exit(4)
    assert _run_under_filter(soft, sock) == 0


def test_bpf_is_compiled_once_per_policy():
    p = Policy.default()
    assert p.bpf() is p.bpf()


def test_explain_cli_json_and_text():
    out = subprocess.run([sys.executable, "-m", "sandbox", "policy", "explain", DEFAULT_POLICY, "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    e = json.loads(out.stdout)
    assert e["seccomp"]["default_action"] == "deny" and e["seccomp"]["default_errno"] == "EPERM"
    assert e["seccomp"]["max_denials"] == 100
    assert e["seccomp"]["allow"] == sorted(e["seccomp"]["allow"]) and "read" in e["seccomp"]["allow"]
    text = subprocess.run([sys.executable, "-m", "sandbox", "policy", "explain", DEFAULT_POLICY],
                          capture_output=True, text=True, cwd=ROOT, timeout=60).stdout
    assert "@python-runtime" in text and "clone3 fails with ENOSYS" in text
    assert "forbidden syscalls fail with EPERM and are reported" in text and "dangerous ones always stop it" in text
