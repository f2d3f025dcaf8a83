"""From the effective seccomp table to a BPF program, with libseccomp, once per policy.

The result is raw `struct sock_filter[]` bytes: the worker hands them to seccomp(2) itself, so
no worker ever runs libseccomp (which would cost ~0.6 ms per start).

What a syscall gets, in order of precedence:
1. allowed: a plain name (a group's or `seccomp.allow`), or a conditional rule that matches;
2. an errno: the policy's `seccomp.errno` for that syscall, else a group's answer. Either covers
   only what the allows leave out ("threads yes, fork gets EPERM" is `limits.threads` plus
   `errno = {clone = "EPERM"}`), and is ignored (with a warning) for a plainly allowed name;
3. in deny mode, a dangerous syscall kills: the host, told through the notification (or the filter
   itself, in a program built without a listener);
4. the default: a user notification (the host kills, or answers with the deny errno), or without a
   listener KILL_PROCESS (kill mode) / ERRNO (deny mode).
"""
import difflib
import errno as errno_mod
import tempfile

try:
    import seccomp
except ImportError:  # the PyPI ctypes bindings, same API as libseccomp's own module
    def _import_pyseccomp():
        """pyseccomp finds the library with ctypes.util.find_library, which runs ldconfig: on a
        host out of processes that finds nothing ("Unable to find libseccomp") although the
        library is there. Then the loader's own name for it serves, which forks nothing."""
        import ctypes.util
        real = ctypes.util.find_library

        def find(name):
            found = real(name)
            if found is None and name == "seccomp":
                try:
                    ctypes.CDLL("libseccomp.so.2")
                except OSError:
                    return None
                return "libseccomp.so.2"
            return found
        ctypes.util.find_library = find
        try:
            import pyseccomp
        finally:
            ctypes.util.find_library = real
        return pyseccomp
    seccomp = _import_pyseccomp()

from ..errors import PolicyError
from . import conditions as C
from .dangerous import DANGEROUS
from .groups import CLONE_THREAD, FAMILIES, GROUPS, expand_all

# Always refused, even with allow_dangerous: a plugin must never approve its own syscalls.
NEVER = frozenset({"seccomp"})
# Granted only through allow_dangerous as a plain name: unfiltered clone takes namespace flags.
DANGEROUS_PLAIN = frozenset({"clone"})
PROCESS_CALLS = frozenset({"fork", "vfork", "clone3"})

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


def parse_atom(text: str, path, key) -> C.Atom:
    try:
        return C.parse(text)
    except ValueError:
        raise PolicyError(f"bad condition {text!r}: write 'argN OP VALUE' (OP one of == != < <= > >=) "
                          "or 'argN & MASK == VALUE', N in 0..5, values integers from 0 to 2**64-1",
                          path, key) from None


def parse_condition(text: str, path, key):
    """'arg1 == 0x5401' or 'arg2 & 0x3 == 0' -> a libseccomp argument comparison."""
    return C.to_seccomp([parse_atom(text, path, key)], seccomp)[0]


def errno_value(name: str) -> int:
    return getattr(errno_mod, name)


def effective(sec: dict, network: dict, grants: dict, path) -> dict:
    """Groups expanded, names checked, dangerous ones refused: allows, rules, errno rules.

    Grants elsewhere in the policy bring their syscalls along: threads (`limits.threads`),
    processes (`limits.processes`), sockets (`network.allow`), file writes (a scratch dir or
    writable paths, which Landlock still bounds)."""
    groups = ["@sandbox-runtime"] + [g for g in sec["groups"] if g != "@sandbox-runtime"]
    implied = [("@file-write", grants.get("writes")), ("@threads", grants.get("threads", 0) > 0),
               ("@fork", grants.get("processes", 0) > 0), ("@network-client", network["allow"])]
    for g, on in implied:
        if on and g not in groups:
            groups.append(g)
    for g in groups:
        if g not in GROUPS:
            near = difflib.get_close_matches(g, list(GROUPS), 1)
            raise PolicyError(f"unknown group {g!r}" + (f" (did you mean {near[0]!r}?)" if near else ""),
                              path, "seccomp.groups")
    plain, group_rules, group_answers = expand_all(groups)
    rules = [(s, list(w), "seccomp.groups") for s, w in group_rules]
    for i, r in enumerate(sec["rule"]):
        check_name(r["syscall"], path, f"seccomp.rule[{i + 1}]")
        rules.append((r["syscall"], r["when"], f"seccomp.rule[{i + 1}]"))
    if network["allow"]:
        for fam in network["families"]:
            rules.append(("socket", [f"arg0 == {FAMILIES[fam]}"], "network.families"))
    granted = set(sec["allow_dangerous"])
    for name in sec["allow_dangerous"]:
        check_name(name, path, "seccomp.allow_dangerous")
    allow = set(plain)
    for name in sec["allow"]:
        check_name(name, path, "seccomp.allow")
        if name in DANGEROUS_PLAIN and name not in granted:
            raise PolicyError(f"plain {name!r} grants fork and new namespaces, not only threads: threads come from "
                              "limits.threads, processes from limits.processes; list it in allow_dangerous "
                              "if you really mean unfiltered clone", path, "seccomp.allow")
        allow.add(name)
    for name in sorted(allow | {r[0] for r in rules}):
        check_name(name, path, "seccomp")
        if name in NEVER:
            raise PolicyError(f"{name!r} can never be allowed: a plugin must not install filters of its own",
                              path, "seccomp.allow")
        if name in DANGEROUS and name not in granted:
            raise PolicyError(f"{name!r} widens the kernel attack surface; list it in allow_dangerous "
                              "if you really mean it", path, "seccomp.allow")
    parsed = [(s, [parse_atom(c, path, key) for c in w], w, key) for s, w, key in rules if s not in allow]
    for s, atoms, w, key in parsed:
        if len({a.arg for a in atoms}) != len(atoms):
            raise PolicyError(f"rule for {s!r} compares one argument twice ({', '.join(w)}): libseccomp "
                              "takes one comparison per argument; write two rules, or a masked compare",
                              path, key)
    for name in sec["errno"]:
        check_name(name, path, f"seccomp.errno.{name}")
    errno_rules, warnings = _errno_rules(sec["errno"], group_answers, allow, parsed, path)
    kill = sorted((DANGEROUS | NEVER) - allow - {r[0] for r in parsed} - {r[0] for r in errno_rules})
    return {"allow": sorted(allow), "rules": [(s, a, w) for s, a, w, _ in parsed],
            "errno": dict(sec["errno"]), "errno_rules": errno_rules, "kill": kill,
            "groups": groups, "warnings": warnings}


def _errno_rules(user: dict, answers: list, allow: set, parsed: list, path):
    """(syscall, [atoms], errno name, source) for every errno the filter gives, never overlapping
    an allow: a conditional allow keeps its ground and the errno covers the rest."""
    out, warnings = [], []
    by_syscall: dict[str, list[list[C.Atom]]] = {}
    for s, atoms, _, _ in parsed:
        by_syscall.setdefault(s, []).append(atoms)

    def rest(name, err, source, key):
        try:
            for atoms in C.complement(by_syscall.get(name, [])):
                out.append((name, atoms, err, source))
        except C.Unexpressible as e:
            raise PolicyError(f"an errno for {name!r} must leave its conditional allows in place, and "
                              f"what they leave out cannot be written as a filter ({e}); answer it with "
                              "default_action = \"deny\" instead", path, key) from None

    for name, err in user.items():
        if name in allow:
            warnings.append(f"seccomp.errno.{name} is ignored: {name} is allowed outright")
            continue
        rest(name, err, "seccomp.errno", f"seccomp.errno.{name}")
    for name, when, err in answers:
        if name in allow or name in user:
            continue
        if when is None:
            rest(name, err, "group answer", "seccomp.groups")
            continue
        atoms = [C.parse(c) for c in when]
        if any(C.overlap(atoms, a) for a in by_syscall.get(name, [])):
            continue  # a rule grants some of this: the grant wins
        out.append((name, atoms, err, "group answer"))
    return out, warnings


def facts(eff: dict, network: dict) -> dict:
    """What the compiled rules let a worker do: start processes, start threads, reach a network."""
    allow = set(eff["allow"])
    clone_rules = [atoms for s, atoms, _ in eff["rules"] if s == "clone"]

    def thread_only(atoms):  # the rule demands CLONE_THREAD set
        return any(a.arg == 0 and ((a.op == "&" and a.mask & a.value & CLONE_THREAD)
                                   or (a.op == "==" and a.value & CLONE_THREAD)) for a in atoms)

    def never_thread(atoms):  # the rule demands CLONE_THREAD clear
        return any(a.arg == 0 and ((a.op == "&" and a.mask & CLONE_THREAD and not a.value & CLONE_THREAD)
                                   or (a.op == "==" and not a.value & CLONE_THREAD)) for a in atoms)

    may_fork = (bool(PROCESS_CALLS & allow) or "clone" in allow
                or any(s in PROCESS_CALLS for s, _, _ in eff["rules"])
                or any(not thread_only(atoms) for atoms in clone_rules))
    may_thread = "clone" in allow or "clone3" in allow or any(not never_thread(a) for a in clone_rules)
    return {"may_fork": may_fork, "may_thread": may_thread, "may_network": bool(network["allow"])}


def build_bpf(eff: dict, default_action: str, deny_errno: str, notify: bool, path=None) -> bytes:
    if notify:
        default = seccomp.NOTIFY
    elif default_action == "kill":
        default = seccomp.KILL_PROCESS
    else:
        default = seccomp.ERRNO(errno_value(deny_errno))
    try:
        f = seccomp.SyscallFilter(default)
        # Foreign architectures (i386 via int 0x80, x32) never reach our rules: the process dies.
        f.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
        for name in eff["allow"]:
            f.add_rule(seccomp.ALLOW, name)
        for name, atoms, _ in eff["rules"]:
            f.add_rule(seccomp.ALLOW, name, *C.to_seccomp(atoms, seccomp))
        for name, atoms, err, _ in eff["errno_rules"]:
            if not notify and default_action != "kill" and err == deny_errno:
                continue  # the default action already: libseccomp refuses a rule equal to it
            f.add_rule(seccomp.ERRNO(errno_value(err)), name, *C.to_seccomp(atoms, seccomp))
        if default_action != "kill" and not notify:
            # Deny mode answers forbidden calls and lets the worker go on; never for these. With
            # a listener the host kills for them itself (and reports a violation by name).
            for name in eff["kill"]:
                if name in known_syscalls():
                    f.add_rule(seccomp.KILL_PROCESS, name)
        with tempfile.TemporaryFile() as tmp:
            f.export_bpf(tmp)
            tmp.seek(0)
            return tmp.read()
    except (OSError, ValueError, TypeError, OverflowError, RuntimeError) as e:
        # libseccomp rejects what the checks above missed (e.g. two comparisons on one argument)
        raise PolicyError(f"cannot be compiled to a seccomp filter: {e}", path, "seccomp") from None
