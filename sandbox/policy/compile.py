"""From the effective seccomp table to a BPF program, with libseccomp, once per policy.

The result is raw `struct sock_filter[]` bytes: the worker hands them to seccomp(2) itself, so
no worker ever runs libseccomp (which would cost ~0.6 ms per start).
"""
import difflib
import errno as errno_mod
import re
import tempfile

try:
    import seccomp
except ImportError:  # the PyPI ctypes bindings, same API as libseccomp's own module
    import pyseccomp as seccomp

from ..errors import PolicyError
from .dangerous import DANGEROUS
from .groups import FAMILIES, GROUPS, expand

OPS = {"==": seccomp.EQ, "!=": seccomp.NE, "<": seccomp.LT, "<=": seccomp.LE, ">": seccomp.GT, ">=": seccomp.GE}
_CMP = re.compile(r"^\s*arg([0-5])\s*(==|!=|<=|>=|<|>)\s*(\S+)\s*$")
_MASKED = re.compile(r"^\s*arg([0-5])\s*&\s*(\S+)\s*==\s*(\S+)\s*$")
# Always refused, even with allow_dangerous: a plugin must never approve its own syscalls.
NEVER = frozenset({"seccomp"})

_known = None


def known_syscalls() -> list[str]:
    global _known
    if _known is None:
        names = []
        for nr in range(0, 512):
            try:
                raw = seccomp.resolve_syscall(seccomp.Arch.NATIVE, nr)
            except ValueError:
                continue
            names.append(raw.decode() if isinstance(raw, bytes) else raw)
        _known = sorted(set(names))
    return _known


def check_name(name: str, path, key) -> None:
    if name not in known_syscalls():
        near = difflib.get_close_matches(name, known_syscalls(), 1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise PolicyError(f"unknown syscall {name!r}{hint}", path, key)


def _value(text: str):
    return int(text, 0)


def parse_condition(text: str, path, key):
    """'arg1 == 0x5401' or 'arg2 & 0x3 == 0' -> seccomp.Arg."""
    try:
        m = _MASKED.match(text)
        if m:
            return seccomp.Arg(int(m[1]), seccomp.MASKED_EQ, _value(m[2]), _value(m[3]))
        m = _CMP.match(text)
        if m:
            return seccomp.Arg(int(m[1]), OPS[m[2]], _value(m[3]))
    except ValueError:
        pass
    raise PolicyError(f"bad condition {text!r}: write 'argN OP VALUE' (OP one of == != < <= > >=) "
                      "or 'argN & MASK == VALUE', N in 0..5, values as integers", path, key)


def effective(sec: dict, network: dict, processes: int, path, writes: bool = False) -> dict:
    """Groups expanded, names checked, dangerous ones refused: the allow set and the rules.

    Grants elsewhere in the policy bring their syscalls along: threads (`processes`), sockets
    (`network.allow`), file writes (a scratch dir or writable paths, which Landlock still bounds)."""
    groups = ["@sandbox-runtime"] + [g for g in sec["groups"] if g != "@sandbox-runtime"]
    if writes and "@file-write" not in groups:
        groups.append("@file-write")
    if processes > 0 and "@threads" not in groups:
        groups.append("@threads")
    if network["allow"] and "@network-client" not in groups:
        groups.append("@network-client")
    for g in groups:
        if g not in GROUPS:
            near = difflib.get_close_matches(g, list(GROUPS), 1)
            raise PolicyError(f"unknown group {g!r}" + (f" (did you mean {near[0]!r}?)" if near else ""),
                              path, "seccomp.groups")
    plain, group_rules = expand(groups)
    rules = [(s, list(w), "seccomp.groups") for s, w in group_rules]
    for i, r in enumerate(sec["rule"]):
        rules.append((r["syscall"], r["when"], f"seccomp.rule[{i + 1}]"))
    if network["allow"]:
        for fam in network["families"]:
            rules.append(("socket", [f"arg0 == {FAMILIES[fam]}"], "network.families"))
    allow = set(plain)
    for name in sec["allow"]:
        check_name(name, path, "seccomp.allow")
        allow.add(name)
    for name in sec["allow_dangerous"]:
        check_name(name, path, "seccomp.allow_dangerous")
    granted = set(sec["allow_dangerous"])
    for name in sorted(allow | {r[0] for r in rules}):
        check_name(name, path, "seccomp")
        if name in NEVER:
            raise PolicyError(f"{name!r} can never be allowed: a plugin must not install filters of its own",
                              path, "seccomp.allow")
        if name in DANGEROUS and name not in granted:
            raise PolicyError(f"{name!r} widens the kernel attack surface; list it in allow_dangerous "
                              "if you really mean it", path, "seccomp.allow")
    for name in sec["errno"]:
        check_name(name, path, f"seccomp.errno.{name}")
    parsed = [(s, [parse_condition(c, path, key) for c in w], w) for s, w, key in rules if s not in allow]
    return {"allow": sorted(allow), "rules": parsed, "errno": dict(sec["errno"])}


def build_bpf(eff: dict, default_action: str, default_errno: str, notify: bool) -> bytes:
    if default_action == "errno":
        action = seccomp.ERRNO(getattr(errno_mod, default_errno))
    else:
        action = seccomp.NOTIFY if notify else seccomp.KILL_PROCESS
    f = seccomp.SyscallFilter(action)
    # Foreign architectures (i386 via int 0x80, x32) never reach our rules: the process dies.
    f.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    for name in eff["allow"]:
        f.add_rule(seccomp.ALLOW, name)
    for name, conds, _ in eff["rules"]:
        f.add_rule(seccomp.ALLOW, name, *conds)
    for name, err in eff["errno"].items():
        if name not in eff["allow"]:
            f.add_rule(seccomp.ERRNO(getattr(errno_mod, err)), name)
    with tempfile.TemporaryFile() as tmp:
        f.export_bpf(tmp)
        tmp.seek(0)
        return tmp.read()
