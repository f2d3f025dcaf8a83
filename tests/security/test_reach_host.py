"""Attacks 1-8 of the README's security table: reach the host or its neighbours.
Each test names the layer meant to stop the attack."""
import os
import signal
import socket

import pytest

from security.attack_lab import intact, stopped

pytestmark = pytest.mark.unpriv


@pytest.mark.parametrize("nr,name,args", [
    (101, "ptrace", (16, "HOST", 0, 0)),                   # 1 PTRACE_ATTACH the host
    (310, "process_vm_readv", ("HOST", 0, 1, 0, 1, 0)),    # 1
    (311, "process_vm_writev", ("HOST", 0, 1, 0, 1, 0)),   # 1
    (438, "pidfd_getfd", (3, 3, 0)),                        # 1
    (434, "pidfd_open", ("HOST", 0)),                       # 1
])
def test_reaching_into_the_host_is_a_violation(lab, mode, nr, name, args):
    """seccomp: the ptrace family is not in any group (dangerous list): it kills in both modes."""
    args = [os.getpid() if a == "HOST" else a for a in args]
    with intact(lab, mode=mode) as w:
        stopped(w, mode, "sys", nr, *args, syscall=name)


@pytest.mark.parametrize("what", ["environ", "mem", "cmdline", "fd/0"])
def test_host_proc_files_are_out_of_reach(lab, what):
    """2: Landlock (only /proc/self is granted here) and the unique uid."""
    with intact(lab) as w:
        got = w.call("read", f"/proc/{os.getpid()}/{what}")
        assert isinstance(got, str) and got.startswith("refused")


@pytest.mark.parametrize("target", ["host", -1, 1, "sleeper"])
def test_kill_is_stopped(lab, mode, sleeper, target):
    """3: seccomp refuses kill() outright: the host, everyone (-1), init, a neighbour. Kill mode:
    a violation; deny mode: EPERM, reported. Either way nobody got the signal."""
    pid = {"host": os.getpid(), "sleeper": sleeper.pid}.get(target, target)
    with intact(lab, mode=mode) as w:
        stopped(w, mode, "kill", pid, signal.SIGKILL, syscall="kill")
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
def test_terminal_injection_ioctls(lab, mode, request_):
    """6: only TCGETS-style ioctls pass (exact 64-bit compare): TIOCSTI, with high bits, TIOCLINUX."""
    with intact(lab, mode=mode) as w:
        stopped(w, mode, "sys", 16, 0, request_, 0, syscall="ioctl")


@pytest.mark.parametrize("family,kind", [(1, 1), (2, 1), (2, 2), (10, 1), (16, 3), (40, 1), (17, 3)])
def test_sockets_of_any_family_are_stopped(lab, mode, family, kind):
    """7, 8: unix (abstract sockets, D-Bus), inet, inet6, netlink, vsock, packet: no socket() at all."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    with intact(lab, mode=mode) as w:
        stopped(w, mode, "sys", 41, family, kind, 0, syscall="socket")
    with pytest.raises(socket.timeout):
        listener.accept()  # nobody connected
    listener.close()
