"""`sandbox policy lint FILE`: what a reviewer should look at in a policy before it ships.

    findings = lint("policies/thumbnail.toml")   # [Finding(level, key, message), ...]

Errors are policies that do not do what they say (a contradiction, a file that does not load,
an `extends` that names nothing); warnings are grants that widen the kernel's attack surface or
paths that are not there. Exit status of `main`: 0 clean, 1 warnings only, 2 any error.
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os
import sys
import tomllib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..errors import PolicyError
from . import destinations

if TYPE_CHECKING:
    from . import Policy

# Names that make a new process, run a program or signal another one.
PROCESS_CALLS = frozenset({"fork", "vfork", "clone", "execve", "execveat", "kill", "setsid", "setpgid",
                           "wait4", "waitid"})
# Opening files: an errno here fails every import, not only the plugin's own opens.
IMPORT_CALLS = frozenset({"openat", "open", "read", "mmap", "newfstatat", "fstat", "stat", "lstat", "statx",
                          "close", "getdents64", "lseek"})
# Imported, these start a BLAS/OpenMP thread pool at once (OpenBLAS raises SIGINT if it can't).
THREADED_IMPORTS = frozenset({"numpy", "scipy", "pandas", "sklearn", "numexpr", "torch"})
WIDENING_GROUPS = {"@process": "new processes and programs", "@network-client": "sockets and connections"}


@dataclass(frozen=True)
class Finding:
    level: str  # "error" | "warning"
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.level:7} {self.key}: {self.message}"


def _suggest_extends(value: str, policy_path: str) -> str:
    folder = os.path.dirname(policy_path)
    names = ["default"]
    try:
        names += sorted(os.path.splitext(f)[0] for f in os.listdir(folder) if f.endswith(".toml"))
    except OSError:
        pass
    names = [n for n in dict.fromkeys(names) if n != os.path.splitext(os.path.basename(policy_path))[0]]
    stem = os.path.splitext(os.path.basename(value))[0]
    near = difflib.get_close_matches(stem, names, 1, 0.5)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _read_raw(path: str) -> tuple[dict | None, list[Finding]]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f), []
    except FileNotFoundError:
        return None, [Finding("error", "file", f"policy file not found: {path}")]
    except IsADirectoryError:
        return None, [Finding("error", "file", f"is a directory, not a policy file: {path}")]
    except PermissionError as e:
        return None, [Finding("error", "file", f"cannot read {path}: {e.strerror}")]
    except tomllib.TOMLDecodeError as e:
        return None, [Finding("error", "file", f"not valid TOML: {e}")]


def _extends_findings(raw: dict, path: str) -> list[Finding]:
    value = raw.get("extends")
    if not isinstance(value, str):
        return []
    from .loader import resolve_extends
    target = resolve_extends(value, os.path.dirname(path), path)
    if os.path.exists(target):
        return []
    return [Finding("error", "extends",
                    f"extends {value!r}, but {target} does not exist{_suggest_extends(value, path)}")]


def _load(path: str) -> tuple[Policy | None, list[Finding]]:
    from . import Policy
    try:
        return Policy.load(path), []
    except PolicyError as e:
        key = getattr(e, "key", None) or "file"
        where = getattr(e, "path", None)
        origin = "" if not where or os.path.realpath(where) == os.path.realpath(path) else f" (in {where})"
        return None, [Finding("error", key, f"does not load: {e}{origin}")]


def _seccomp_findings(raw: dict, eff: dict) -> list[Finding]:
    out = []
    own = raw.get("seccomp", {}) if isinstance(raw.get("seccomp"), dict) else {}
    sec = eff.get("seccomp", {})
    allowed = set(sec.get("allow", ()))
    conditional: dict[str, list[str]] = {}
    for rule in sec.get("rules", ()):
        conditional.setdefault(rule["syscall"], []).append(" and ".join(rule["when"]) or "always")
    for name in sec.get("allow_dangerous", ()):
        out.append(Finding("warning", "seccomp.allow_dangerous",
                           f"{name!r} widens the kernel's attack surface (allowed because it is listed here)"))
    for group in sec.get("groups", ()):
        if group in WIDENING_GROUPS:
            out.append(Finding("warning", "seccomp.groups",
                               f"{group} widens the attack surface: {WIDENING_GROUPS[group]}"))
    for name in sorted(PROCESS_CALLS & allowed):
        if name == "clone":
            continue  # reported below, with what it really grants
        out.append(Finding("warning", "seccomp.allow", f"{name!r} lets the plugin start or signal processes"))
    if "clone" in allowed:
        out.append(Finding("error", "seccomp.allow",
                           'allow = ["clone"] grants fork too (clone without CLONE_THREAD makes a process); '
                           "for threads write limits.threads = N (or limits.processes = N)"))
    for name, err in sec.get("errno", {}).items():
        key = f"seccomp.errno.{name}"
        if name in allowed:
            out.append(Finding("error", key, f"{name} = {err!r} never applies: {name} is allowed outright "
                                             "(by a group or seccomp.allow), and an allow wins"))
        elif name in conditional:
            out.append(Finding("warning", key,
                               f"{name} = {err!r} sits over a conditional allow ({'; '.join(conditional[name])}): "
                               "check which calls each one answers (e.g. an errno on clone can stop threads too)"))
        if name in IMPORT_CALLS:
            out.append(Finding("error", key, f"an errno for {name} breaks every import, not only the plugin's "
                                             "own files; Landlock already decides which paths can be read"))
    if own.get("default_action") == "errno" or sec.get("default_action") == "errno":
        out.append(Finding("warning", "seccomp.default_action",
                           '"errno" is deprecated: it answers forbidden syscalls silently; use "kill" '
                           "(or the deny mode, which reports every denial)"))
    return out


def _network_findings(eff: dict) -> list[Finding]:
    net = eff.get("network", {})
    out = []
    if net.get("families") and not net.get("allow"):
        out.append(Finding("error", "network.families",
                           f"families {net['families']} have no effect without network.allow = true"))
    if net.get("allow"):
        fams = ", ".join(net.get("families") or []) or "no family: socket() stays forbidden"
        out.append(Finding("warning", "network.allow", f"grants network access ({fams})"))
    return out


def _path_findings(eff: dict) -> list[Finding]:
    out = []
    fs = eff.get("filesystem", {})
    for key in ("read_only", "writable"):
        for p in fs.get(key, ()):
            if not os.path.lexists(p):
                out.append(Finding("warning", f"filesystem.{key}", f"{p} does not exist"))
    if fs.get("writable"):
        for p in fs["writable"]:
            if os.path.realpath(p) in ("/", "/usr", "/etc", "/home", "/root", "/var"):
                out.append(Finding("warning", "filesystem.writable", f"{p} makes a system tree writable"))
    return out


def _gid_findings(policy: Policy, eff: dict) -> list[Finding]:
    """Root hosts run a policy's workers under uids of their own and the policy's gid: a writable
    path works for all of them only if that gid may write it, and stays theirs only if nobody
    else may."""
    from .._host.gids import policy_gid
    from .explain import share_commands
    try:
        gid, _ = policy_gid(policy)
    except PolicyError as e:
        return [Finding("error", getattr(e, "key", None) or "identity.gid", str(e))]
    if gid is None:
        return []
    out = []
    for p in eff.get("filesystem", {}).get("writable", ()):
        try:
            st = os.stat(p)
        except OSError:
            continue  # reported as missing
        folder = os.path.isdir(p)
        need = 0o7 if folder else 0o6
        mode = st.st_mode & 0o7777
        # a worker's uid never owns it: the group bits apply if the group is the policy's, else "other"
        granted = (mode >> 3) & 0o7 if st.st_gid == gid else mode & 0o7
        # a setgid folder of another group gives what is made inside that group, which no worker has
        foreign_setgid = folder and mode & 0o2000 and st.st_gid != gid
        if granted & need != need or foreign_setgid:
            why = (f"is setgid to group {st.st_gid}, so what a worker makes there is not its policy's" if
                   foreign_setgid and granted & need == need else
                   f"is not writable by the policy's gid {gid} (group {st.st_gid}, mode {mode:o})")
            out.append(Finding("warning", "filesystem.writable",
                               f"{p} {why}: on a root host this policy's workers cannot share what they write there; "
                               "run: " + share_commands(p, gid)))
        if mode & 0o002:
            out.append(Finding("warning", "filesystem.writable",
                               f"{p} is writable by every user (mode {mode:o}): other policies' workers granted it "
                               f"can change what this policy's write; chmod o-rwx {p}"))
    return out


def _preload_findings(eff: dict) -> list[Finding]:
    out = []
    lim, env = eff.get("limits", {}), eff.get("environment", {}).get("set", {})
    threads = lim.get("threads", 0) or lim.get("processes", 0)
    capped = "OPENBLAS_NUM_THREADS" in env or "OMP_NUM_THREADS" in env
    for name in eff.get("python", {}).get("preload", ()):
        if name.split(".", 1)[0] in THREADED_IMPORTS and not threads and not capped:
            out.append(Finding("warning", "python.preload",
                               f"{name!r} starts a thread pool at import, and this policy grants no threads: "
                               'on root hosts the preload fails; set environment.set OPENBLAS_NUM_THREADS = "1" (and '
                               "OMP_NUM_THREADS) or grant threads"))
        top = name.split(".", 1)[0]
        try:
            found = importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(Finding("warning", "python.preload", f"{name!r} is not installed for this interpreter"))
    return out


def lint(policy_path) -> list[Finding]:
    """Every finding for one policy file, errors first."""
    path = os.path.abspath(os.fspath(policy_path))
    raw, findings = _read_raw(path)
    if raw is None:
        return findings
    findings += _extends_findings(raw, path)
    if findings:
        return findings  # the chain does not load: nothing else can be judged
    policy, load_findings = _load(path)
    if policy is None:
        return load_findings
    eff = policy.explain()
    findings += _seccomp_findings(raw, eff) + _network_findings(eff) + _path_findings(eff)
    findings += [Finding(*f) for f in destinations.lint(policy.network)]
    findings += _preload_findings(eff) + _gid_findings(policy, eff)
    return sorted(findings, key=lambda f: f.level != "error")


def exit_code(findings: list[Finding]) -> int:
    if any(f.level == "error" for f in findings):
        return 2
    return 1 if findings else 0


def main(argv=None) -> int:
    """`sandbox policy lint FILE [--json]`."""
    p = argparse.ArgumentParser(prog="sandbox policy lint", description="review a policy file")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="one JSON object: {file, findings: [...]}")
    args = p.parse_args(argv)
    findings = lint(args.file)
    if args.json:
        print(json.dumps({"file": os.path.abspath(args.file), "findings": [asdict(f) for f in findings]}))
    else:
        for f in findings:
            print(f)
        if not findings:
            print(f"{args.file}: no findings")
    return exit_code(findings)


if __name__ == "__main__":
    sys.exit(main())
