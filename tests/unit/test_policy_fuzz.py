"""Fuzzed policy files: every one either loads (and then compiles, explains, gives an
environment) or is refused with a PolicyError naming the file. Nothing else, ever.

Bounded here (a few hundred examples); a longer run by hand:
    prlimit --as=2000000000 .venv/bin/python -m pytest tests/unit/test_policy_fuzz.py \
        --hypothesis-seed=0 -p no:cacheprovider -o addopts="" -x -q \
        --hypothesis-profile=long    (registered below: 20,000 examples)
"""
import json
import math

from hypothesis import HealthCheck, given, settings, strategies as st

from sandbox import PolicyError
from sandbox.policy import Policy, schema
from sandbox.policy.groups import GROUPS
from sandbox.policy.loader import SHIPPED_DEFAULT

settings.register_profile("long", max_examples=20_000, deadline=None,
                          suppress_health_check=list(HealthCheck))

WEIRD_STR = st.one_of(
    st.sampled_from(["", "kill", "deny", "errno", "EPERM", "ENOSYS", "ENOTTY", "E2BIG", "read", "clone", "clone3",
                     "openat", "ioctl", "socket", "ptrace", "seccomp", "setuid", "@threads", "@process",
                     "@file-attributes", "@python-runtime", "inet", "unix", "inet6", "arg0 == 1",
                     "arg1 & 0x3 == 0", "arg0 == 18446744073709551616", "arg0 > 1", "arg9 == 1", "/usr/lib",
                     "/nonexistent", "/tmp", ".", "..", "relative", "127.0.0.1:80", "[::1]:443", "host:0",
                     "a\x00b", "default", "HOME", "os", "json.decoder", "\x1b[2J", "é", "\udcff"]),
    st.text(max_size=12))
SCALAR = st.one_of(WEIRD_STR, st.booleans(), st.integers(-2**63, 2**63 - 1),
                   st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63 - 1, 4096, 1 << 20]),
                   st.floats(allow_nan=True, allow_infinity=True))
VALUE = st.one_of(SCALAR, st.lists(SCALAR, max_size=4), st.dictionaries(WEIRD_STR, SCALAR, max_size=3),
                  st.lists(st.dictionaries(st.sampled_from(["syscall", "when", "x"]),
                                           st.one_of(WEIRD_STR, st.lists(WEIRD_STR, max_size=3)), max_size=3),
                           max_size=2))
KEYS = [(sec, key) for sec, keys in schema.SCHEMA.items() for key in keys]
SYSCALLS = st.sampled_from(["read", "clone", "clone3", "fork", "vfork", "openat", "ioctl", "socket", "ptrace",
                            "seccomp", "setuid", "mbind", "fchmod", "kill", "execve", "unshare", "prlimit64",
                            "socketpair", "mkdir", "sockett"])
CONDITION = st.one_of(st.builds(lambda a, op, v: f"arg{a} {op} {v:#x}", st.integers(0, 6),
                                st.sampled_from(["==", "!=", "<", ">=", "<=", ">"]),
                                st.sampled_from([0, 1, 2, 0x10000, 0x5401, 0x5413, 2**64 - 1, 2**64])),
                      st.builds(lambda a, m, v: f"arg{a} & {m:#x} == {v:#x}", st.integers(0, 5),
                                st.sampled_from([1, 3, 0x10000, 0x7e030000, 0xffffffff]),
                                st.sampled_from([0, 1, 0x10000, 4])))
ERRNO = st.sampled_from(["EPERM", "ENOSYS", "EACCES", "EROFS", "ENOTTY", "EAGAIN", "EWOULDBLOCK", "E2BIG", "EFOO"])
PLAUSIBLE = {
    "threads": st.integers(0, 8), "processes": st.integers(0, 8), "timeout": st.floats(0.0005, 100),
    "cpu_seconds": st.integers(0, 100), "memory_mb": st.integers(0, 4096), "open_files": st.integers(0, 4096),
    "file_size_mb": st.integers(-1, 64), "max_message_bytes": st.integers(0, 1 << 31),
    "uid_range": st.lists(st.integers(0, 2**32), min_size=2, max_size=2),
    "scratch_mb": st.integers(0, 100), "scratch_inodes": st.integers(0, 10000),
    "read_only": st.lists(st.sampled_from(["/usr/lib", "/usr/share", "/nonexistent", "relative", "/tmp"]), max_size=3),
    "writable": st.lists(st.sampled_from(["/tmp", "/nonexistent", "."]), max_size=2),
    "scratch": st.booleans(), "allow": st.one_of(st.booleans(), st.lists(SYSCALLS, max_size=3)),
    "families": st.lists(st.sampled_from(["unix", "inet", "inet6", "can"]), max_size=2),
    "connect": st.lists(st.sampled_from(["127.0.0.1:80", "[::1]:8080", "example.org:443", "x:0"]), max_size=2),
    "pass": st.lists(st.sampled_from(["LANG", "HOME", "PATH", "1X"]), max_size=2),
    "set": st.dictionaries(st.sampled_from(["A", "HOME", "OMP_NUM_THREADS"]), st.sampled_from(["1", "", "x y"]),
                           max_size=2),
    "preload": st.lists(st.sampled_from(["json", "decimal", "os.path", "no such"]), max_size=2),
    "default_action": st.sampled_from(["kill", "deny", "errno"]), "default_errno": ERRNO,
    "max_denials": st.integers(0, 200), "groups": st.lists(st.sampled_from(list(GROUPS) + ["@nope"]), max_size=3),
    "allow_dangerous": st.lists(SYSCALLS, max_size=2), "errno": st.dictionaries(SYSCALLS, ERRNO, max_size=3),
}


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


@st.composite
def policies(draw):
    lines = []
    if draw(st.booleans()):
        parent = draw(st.sampled_from([SHIPPED_DEFAULT, SHIPPED_DEFAULT, "default", "nope", "a\x00"]))
        lines.append(f"extends = {json.dumps(parent)}")
    chosen = draw(st.lists(st.sampled_from(KEYS), max_size=6, unique=True))
    by_section: dict = {}
    for sec, key in chosen:
        if sec == "seccomp" and key == "rule":
            continue
        plausible = PLAUSIBLE.get(key)
        value = draw(plausible if plausible is not None and draw(st.integers(0, 9)) < 8 else VALUE)
        by_section.setdefault(sec, []).append(f"{key} = {toml_value(value)}")
    for sec, body in by_section.items():
        lines.append(f"[{sec}]")
        lines += body
    if draw(st.booleans()):
        lines.append("[[seccomp.rule]]")
        lines.append(f"syscall = {toml_value(draw(st.one_of(SYSCALLS, WEIRD_STR)))}")
        lines.append(f"when = {toml_value(draw(st.lists(st.one_of(CONDITION, CONDITION, WEIRD_STR), max_size=3)))}")
    text = "\n".join(lines) + "\n"
    if draw(st.integers(0, 3)) == 0:  # a byte-level mutation of the text
        i = draw(st.integers(0, max(0, len(text) - 1)))
        text = text[:i] + draw(st.sampled_from(["", "=", "[", "]", '"', "\n", "\x00", "#"])) + text[i + 1:]
    return text


def _check(path):
    try:
        p = Policy.load(path)
    except PolicyError as e:
        assert e.path and str(e)
        return False
    assert p.bpf(True) and p.bpf(False)
    json.dumps(p.explain(), allow_nan=False)
    env = p.environment({"HOME": "/h"}, scratch="/tmp/s")
    assert all("\x00" not in k + v for k, v in env.items())
    assert all("\x00" not in x for x in p.filesystem.read_only + p.filesystem.writable)
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(text=policies())
def test_fuzzed_policy_files_load_or_refuse(tmp_path, text):
    path = tmp_path / "fuzz.toml"
    path.write_text(text, errors="surrogatepass")
    _check(str(path))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(list(schema.SCHEMA) + ["extends", "description", "x"]),
                       st.one_of(VALUE, st.dictionaries(st.sampled_from([k for _, k in KEYS]), VALUE, max_size=3)),
                       max_size=4))
def test_fuzzed_dicts_load_or_refuse(data):
    try:
        p = Policy.from_dict(data)
    except PolicyError:
        return
    assert p.bpf(True)
