"""Policy files: new keys, facts, and every refusal naming the file and the key."""
import textwrap

import pytest

from sandbox import PolicyError
from sandbox.policy import Destination, Policy
from sandbox.policy.loader import SHIPPED_DEFAULT


@pytest.fixture
def load(tmp_path):
    def go(text, name="p.toml"):
        p = tmp_path / name
        p.write_text(f'extends = "{SHIPPED_DEFAULT}"\n' + textwrap.dedent(text))
        return Policy.load(str(p))
    return go


@pytest.mark.parametrize("text,key,words", [
    ("[seccomp]\nallow = ['clone']\n", "seccomp.allow", "limits.threads"),
    ("[seccomp]\ndefault_action = 'maybe'\n", "seccomp.default_action", '"kill" or "deny"'),
    ("[seccomp]\nmax_denials = 0\n", "seccomp.max_denials", ">= 1"),
    ("[seccomp]\nerrno = { ioctl = 'ENOTTY' }\n", "seccomp.errno.ioctl", "deny"),
    ("[seccomp]\ndefault_errno = 'EWOULDBLOCKX'\n", "seccomp.default_errno", "unknown errno"),
    ("[[seccomp.rule]]\nsyscall = 'ioctl'\nwhen = ['arg1 > 1', 'arg1 < 5']\n", "seccomp.rule[1]", "one argument twice"),
    (f"[[seccomp.rule]]\nsyscall = 'ioctl'\nwhen = ['arg1 == {1 << 64}']\n", "seccomp.rule[1]", "2**64"),
    ("[filesystem]\nread_only = ['/does/not/exist']\n", "filesystem.read_only", "does not exist"),
    ("[filesystem]\nwritable = ['/does/not/exist']\n", "filesystem.writable", "does not exist"),
    ('[filesystem]\nread_only = ["/usr\\u0000/lib"]\n', "filesystem.read_only", "NUL"),
    ("[filesystem]\nscratch_mb = 0\n", "filesystem.scratch_mb", ">= 1"),
    ("[filesystem]\nscratch_inodes = 99999999999\n", "filesystem.scratch_inodes", "<="),
    ("[limits]\nthreads = -1\n", "limits.threads", ">= 0"),
    ("[limits]\ntimeout = nan\n", "limits.timeout", "finite"),
    ("[limits]\ntimeout = inf\n", "limits.timeout", "finite"),
    ("[limits]\nmemory_mb = 9223372036854775807\n", "limits.memory_mb", "<="),
    ("[network]\nconnect = ['127.0.0.1']\n", "network.connect", "host:port"),
    ("[network]\nconnect = ['127.0.0.1:99999']\n", "network.connect", "port"),
    ("[network]\nconnect = ['::1:80']\n", "network.connect", "neither"),
    ("[network]\nconnect = ['exa mple.com:80']\n", "network.connect", "neither"),
    ("[network]\nconnect = ['127.0.0.1:80']\n", "network.connect", "network.allow"),
    ("[environment]\nset = { 'A=B' = 'x' }\n", "environment.set", "variable name"),
    ('[environment]\nset = { A = "x\\u0000y" }\n', "environment.set", "NUL"),
    ("[environment]\npass = ['']\n", "environment.pass", "variable name"),
    ("[python]\npreload = ['os; import sys']\n", "python.preload", "module name"),
    ("extends2 = 1\n", "extends2", "unknown key"),
])
def test_refusals_name_file_and_key(load, tmp_path, text, key, words):
    with pytest.raises(PolicyError) as ei:
        load(text)
    assert ei.value.key == key, str(ei.value)
    assert words in str(ei.value) and str(tmp_path) in str(ei.value)


def test_nul_in_extends_and_path(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text('extends = "de\\u0000fault"\n')
    with pytest.raises(PolicyError) as ei:
        Policy.load(str(p))
    assert ei.value.key == "extends"
    with pytest.raises(PolicyError):
        Policy.load(str(tmp_path) + "/\x00.toml")


def test_deny_mode_and_its_numbers(load):
    p = load("[seccomp]\ndefault_action = 'deny'\ndefault_errno = 'ENOSYS'\nmax_denials = 7\n")
    assert (p.seccomp.default_action, p.seccomp.deny_errno, p.seccomp.max_denials_per_call) == ("deny", 38, 7)
    assert p.bpf(notify=True) and p.bpf(notify=False)  # compiled, both ways, at load
    assert p.warnings == []
    old = load("[seccomp]\ndefault_action = 'errno'\ndefault_errno = 'ENOSYS'\n")  # clone3 errno == default
    assert old.seccomp.default_action == "deny" and "deny" in old.warnings[0]
    d = Policy.default()
    assert (d.seccomp.default_action, d.seccomp.deny_errno, d.seccomp.max_denials_per_call) == ("deny", 1, 100)


def test_facts(load):
    d = Policy.default()
    assert (d.may_fork, d.may_thread, d.may_network) == (False, False, False)
    t = load("[limits]\nthreads = 4\n")
    assert (t.may_fork, t.may_thread) == (False, True) and t.limits.tasks == 4
    f = load("[limits]\nprocesses = 2\n")
    assert (f.may_fork, f.may_thread) == (True, False)
    both = load("[limits]\nthreads = 2\nprocesses = 2\n")
    assert both.may_fork and both.may_thread and both.limits.tasks == 4
    assert load("[seccomp]\ngroups = ['@process']\n").may_fork
    assert load("[seccomp]\nallow = ['clone']\nallow_dangerous = ['clone']\n").may_fork
    n = load("[network]\nallow = true\nfamilies = ['inet']\n"
             "connect = ['127.0.0.1:8080', '[::1]:80', 'Example.com:443']\n")
    assert n.may_network
    assert n.network.connect == (Destination("127.0.0.1", 8080), Destination("::1", 80),
                                 Destination("example.com", 443))
    assert [str(x) for x in n.network.connect] == ["127.0.0.1:8080", "[::1]:80", "example.com:443"]


def test_sections_are_frozen():
    import dataclasses
    d = Policy.default()
    for section, attr in ((d.limits, "timeout"), (d.filesystem, "scratch"), (d.network, "allow"),
                          (d.seccomp, "default_action")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, attr, None)
    assert (d.filesystem.scratch_mb, d.filesystem.scratch_inodes) == (64, 4096)


def test_errno_never_overrides_a_conditional_allow(load):
    p = load("[limits]\nthreads = 2\n[seccomp]\nerrno = { clone = 'EPERM', openat = 'EACCES' }\n")
    e = p.explain()["seccomp"]
    assert {"syscall": "clone", "when": ["arg0 & 0x7e030000 == 0x10000"]} in e["rules"]
    clone = [r for r in e["errno_rules"] if r["syscall"] == "clone"]
    assert clone and all(r["errno"] == "EPERM" and r["when"] for r in clone)  # conditional, never all of clone
    opens = [r for r in e["errno_rules"] if r["syscall"] == "openat"]
    assert opens and all(r["errno"] == "EACCES" and r["when"] for r in opens)  # imports still open files
    ignored = load("[seccomp]\nerrno = { read = 'EIO' }\n")
    assert any("read is allowed outright" in w for w in ignored.warnings)


def test_environment_baseline(load, tmp_path):
    d = Policy.default()
    env = d.environment({"HOME": "/root", "SECRET": "x"})
    assert env["HOME"] == "/nonexistent" and "SECRET" not in env and env["OMP_NUM_THREADS"] == "1"
    env = d.environment({}, scratch="/tmp/s")
    assert env["HOME"] == env["TMPDIR"] == "/tmp/s"
    assert "OMP_NUM_THREADS" not in load("[limits]\nthreads = 1\n").environment({})
    passed = load("[environment]\npass = ['HOME']\n").environment({"HOME": "/home/op"})
    assert passed["HOME"] == "/home/op"


def test_file_attributes_are_apart_from_file_writes(load):
    w = load("[filesystem]\nscratch = true\n")
    assert "unlinkat" in w.seccomp.allowed and "fchmod" not in w.seccomp.allowed
    assert "utimensat" not in w.seccomp.allowed and "fchownat" not in w.seccomp.allowed
    a = load("[filesystem]\nscratch = true\n[seccomp]\ngroups = ['@file-attributes']\n")
    assert {"fchmod", "fchmodat", "utimensat", "fchownat"} <= set(a.seccomp.allowed)


def test_policy_file_that_is_not_a_regular_file(tmp_path):
    import os
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(PolicyError, match="not a regular file"):
        Policy.load(str(fifo))  # would block forever if opened for reading the usual way
    with pytest.raises(PolicyError, match="not a regular file"):
        Policy.load(str(tmp_path))
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * (2 << 20))
    with pytest.raises(PolicyError, match="larger than"):
        Policy.load(str(big))
