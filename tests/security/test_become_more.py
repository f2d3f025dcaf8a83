"""Attacks 9-14 of the README's security table: become more than you are.
Each test names the layer meant to stop the attack."""

import signal

import pytest

from sandbox import PluginCrashed, PolicyViolation

from security.attack_lab import intact, stopped

pytestmark = pytest.mark.unpriv


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
def test_privilege_and_kernel_surface_syscalls_are_stopped(lab, mode, nr, name, args):
    """9-12, 14: seccomp; each named by the host from the kernel's notification. Kill mode: a
    violation. Deny mode (the default): EPERM and a "denied" report, except the dangerous ones
    (setuid, capset, prctl, unshare, io_uring, bpf, mount, ...), which kill there too."""
    with intact(lab, mode=mode) as w:
        stopped(w, mode, "sys", nr, *args, syscall=name)


def test_clone3_gets_enosys(lab):
    """11: clone3's flags live in memory a filter can't read: ENOSYS, so glibc falls back to clone."""
    with intact(lab) as w:
        assert w.call("sys", 435, 0, 0) == [-1, 38]


@pytest.mark.parametrize("nr", [0x40000000 | 39, 0x40000000 | 57, 1000, 0xFFFF])
def test_foreign_and_unknown_syscall_numbers_never_run(lab, mode, nr):
    """13: x32 numbers and numbers past the table never match a rule: the listener reports them,
    or the filter kills by SIGSYS (a bare SIGSYS death is reported as a crash, never a violation).
    Kill mode: the worker dies. Deny mode: it dies, or the call fails with EPERM and is reported."""
    with intact(lab, mode=mode) as w:
        if mode == "deny":
            try:
                got = w.call("sys", nr)
            except (PolicyViolation, PluginCrashed) as e:
                assert isinstance(e, PolicyViolation) or e.signal == signal.SIGSYS
            else:
                assert got == [-1, 1] and len(w.last_denials) == 1 and w.last_denials[0].nr == nr, got
            return
        with pytest.raises((PolicyViolation, PluginCrashed)) as ei:
            w.call("sys", nr)  # the listener names it, or the filter kills outright
        assert isinstance(ei.value, PolicyViolation) or ei.value.signal == signal.SIGSYS


def test_i386_syscalls_through_int_0x80_kill(lab):
    """13: the filter checks the architecture first: an i386 getpid via int 0x80 never reaches a rule."""
    with intact(lab) as w:
        with pytest.raises(PluginCrashed) as ei:
            w.call("int80_getpid")
        assert ei.value.signal == signal.SIGSYS
