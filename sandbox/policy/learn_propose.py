"""The learned policy as TOML text: grants in the keys an operator writes, each commented with
the call that needed it; what was refused, or is harmless, as comments."""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sys

from .._host import decode
from .learn_record import PROCESS_CALLS, Recorder, Seen, _beneath

# Why common system files get read, and what to do instead of granting them.
READ_HINTS = {
    "/etc/passwd": "glibc's getpwuid (os.path.expanduser or sysconfig without HOME): "
                   "environment.set HOME avoids it",
    "/etc/nsswitch.conf": "glibc's name-service lookup (getpwuid, getaddrinfo)",
    "/etc/group": "glibc's getgrgid",
}
PROC_SELF = re.compile(r"^/proc/(self|thread-self|\d+)(/|$)")
# Without network, these are granted only in the shape that was used: no destination address.
NO_ADDRESS_RULES = {"sendto": "arg4 == 0"}
# Harmless probes the kernel may refuse without harm to the caller: answered with an errno, not granted.
BENIGN_ERRNO = {"mbind": "EPERM"}  # OpenBLAS' NUMA placement; Docker's default answers it with EPERM
MAX_GROUP_EXTRA = 3  # a group is proposed only if it adds at most this many unused syscalls


def _clean(text: str, limit: int = 160) -> str:
    """Plugin-made text for a one-line comment: no newlines, no control characters, bounded."""
    text = json.dumps(text, ensure_ascii=False)[1:-1]
    return text if len(text) <= limit else text[:limit] + "..."


def _imports_of(files) -> set[str]:
    """Top-level names the plugin's own files import (parsed, never run)."""
    import ast
    names: set[str] = set()
    for path in files:
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read(8 * 1024 * 1024))
        except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".", 1)[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".", 1)[0])
    return names


_startup = None


def _startup_modules() -> set[str]:
    """What a bare `python -I -S` has imported before any plugin runs (never worth preloading)."""
    global _startup
    if _startup is None:
        import subprocess
        try:
            out = subprocess.run([sys.executable, "-I", "-S", "-c", "import sys; print(' '.join(sys.modules))"],
                                 capture_output=True, text=True, timeout=30, env={}).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        _startup = {m.split(".", 1)[0] for m in out.split()} | set(sys.builtin_module_names)
    return _startup


def _installed(name: str, plugin: str) -> bool:
    """A top-level module the host has installed, not one of the plugin's own (found, never imported)."""
    import importlib.machinery
    folder = os.path.dirname(plugin)
    try:
        spec = importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if p and
                                                               not _beneath(os.path.realpath(p), [folder])])
    except (ImportError, ValueError):
        return False
    return spec is not None


# ---- the proposal ----------------------------------------------------------------------------

def _q(text: str) -> str:
    return json.dumps(text)  # a TOML basic string


def _toml_safe(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False  # undecodable bytes from the task: shown in a comment, never written as a key
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _why(seen: Seen) -> str:
    return _clean(f"{seen.why} in {seen.call}" + (f" ({seen.count}x)" if seen.count > 1 else ""))


def _choose(rec: Recorder) -> tuple[dict, dict]:
    """Syscalls not granted -> ({group: [names]}, {name: Seen}) to list in `allow`."""
    from ..policy.groups import GROUPS, expand
    already = set(rec._allow)
    if rec.threads:  # limits.threads (or processes) brings @threads with it
        already |= set(expand(["@threads"])[0])
    if rec.families:  # network.allow brings @network-client with it
        already |= set(expand(["@network-client"])[0])
    wanted = {n: s for n, s in rec.syscalls.items() if n not in PROCESS_CALLS
              and n not in already and n not in BENIGN_ERRNO}
    groups: dict[str, list[str]] = {}
    for name in sorted(wanted):
        best = None
        for g in GROUPS:
            if g in ("@sandbox-runtime", "@process", "@network-client", "@threads", "@file-write"):
                continue
            plain, rules = expand([g])
            members = set(plain) | {s for s, _ in rules}
            if name not in members:
                continue
            extra = members - already - set(wanted)
            if len(extra) <= MAX_GROUP_EXTRA and (best is None or len(members) < best[0]):
                best = (len(members), g)
        if best:
            groups.setdefault(best[1], []).append(name)
    in_group = {n for names in groups.values() for n in names}
    return groups, {n: s for n, s in wanted.items() if n not in in_group}


def _extends_value(base_path: str, out_path: str | None) -> str:
    from .loader import SHIPPED_DEFAULT
    if os.path.realpath(base_path) == os.path.realpath(SHIPPED_DEFAULT):
        folder = os.path.dirname(os.path.abspath(out_path)) if out_path else os.getcwd()
        if not os.path.exists(os.path.join(folder, "default.toml")):
            return "default"
    return os.path.abspath(base_path)


def _proposed_reads(rec: Recorder) -> tuple[list[tuple[str, Seen]], list[tuple[str, str]]]:
    grant, skipped = [], []
    for path, seen in sorted(rec.reads.items()):
        if not _toml_safe(path):
            skipped.append((path, "not valid UTF-8 text"))
        elif PROC_SELF.match(path):
            skipped.append((path, "the worker's own /proc entry: a path rule cannot name it"))
        elif not os.path.lexists(path):
            continue  # it was not there: a failed probe, nothing to grant
        else:
            grant.append((path, seen))
    return grant, skipped


def propose(rec: Recorder, *, out_path: str | None, outcomes: list[tuple[str, str | None]]) -> str:
    """The learned policy, as TOML text with a comment on every grant."""
    from . import schema
    L: list[str] = []
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    L.append(f"# Learned by `sandbox policy learn` from {_clean(rec.plugin, 300)} on {when}, in one run.")
    for label, err in outcomes:
        L.append(f"#   {_clean(label)}: " + ("ok" if err is None else "FAILED: " + _clean(err, 240)))
    L.append("# Review every grant: learning let each of these through once. Learning is for vetting a")
    L.append("# plugin on trusted inputs, not for serving untrusted traffic.")
    assert rec.base.path is not None  # learn() refuses a base policy that is not a file
    L.append(f"extends = {_q(_extends_value(rec.base.path, out_path))}")
    plugin_label = os.path.basename(os.path.dirname(rec.plugin)) + "/" + os.path.basename(rec.plugin)
    L.append(f"description = {_q('learned for ' + plugin_label)}")

    limits = []
    if "threads" in schema.SCHEMA["limits"]:
        if rec.threads:
            assert rec.thread_seen is not None  # recorded with the first thread counted
            limits.append(f"threads = {rec.threads}  # most threads at once: {_why(rec.thread_seen)}")
        if rec.process_seen:
            limits.append(f"processes = {max(rec.processes, 1)}  # NEW PROCESSES: {_why(rec.process_seen)}")
    elif rec.threads or rec.process_seen:
        total = rec.threads + (max(rec.processes, 1) if rec.process_seen else 0)
        why = "; ".join(_why(s) for s in (rec.thread_seen, rec.process_seen) if s)
        kind = "NEW PROCESSES and threads" if rec.process_seen else "threads (this version's processes counts them)"
        limits.append(f"processes = {total}  # {kind}, most at once: {why}")
    reads, skipped = _proposed_reads(rec)
    fs = []
    writes = bool(rec.writes_scratch or rec.writes_inside or rec.writes_unknown)
    if writes and rec.base.limits.file_size_bytes == 0:
        mib = max(1, -(-rec.largest_file // schema.MIB))
        limits.append(f"file_size_mb = {mib}  # files may grow (largest seen: {rec.largest_file} bytes); "
                      "raise it if the plugin writes bigger files")
    if limits:
        L += ["", "[limits]"] + limits
    if rec.writes_scratch:
        fs.append(f"scratch = true  # a private, emptied-on-exit dir: {_why(rec.writes_scratch['scratch'])}")
    elif rec.writes_unknown and not rec.base.filesystem.writable:
        fs.append("scratch = true  # a write whose path could not be read (unprivileged host), and the scratch "
                  f"dir was the only writable place: {_why(rec.writes_unknown['unknown'])}")
    if reads:
        fs.append("read_only = [")
        for path, seen in reads:
            kind = " (a directory: Landlock grants all beneath it)" if os.path.isdir(path) else ""
            hint = f" [{READ_HINTS[path]}]" if path in READ_HINTS else ""
            fs.append(f"    {_q(path)},  #{kind}{hint} {_why(seen)}")
        fs.append("]")
    if fs:
        L += ["", "[filesystem]"] + fs
    for path, why in skipped:
        L.append(f"# not granted: read {_clean(path)}: {why}")
    for path, seen in sorted(rec.writes_outside.items()):
        L.append(f"# not granted: write outside the policy's writable paths, refused during learning: "
                 f"{_clean(path)} ({_why(seen)}); add its folder to filesystem.writable only if the plugin needs it")

    fams = sorted(rec.families)
    if fams:
        L += ["", "[network]", "allow = true  # NETWORK: " + "; ".join(_why(rec.families[f]) for f in fams),
              f"families = [{', '.join(_q(f) for f in fams)}]"]
    connect, notes = _connect_entries(rec.destinations) if fams else ([], [])
    if connect:
        L.append("connect = [")
        L += [f"    {_q(entry)},  # {why}" for entry, why in connect]
        L.append("]")
    for dest, seen in sorted(rec.destinations.items()):
        L.append(f"# destination: {_clean(dest)} ({_why(seen)})")
    L += notes

    have = set(rec.base.preload)
    asked = _imports_of([rec.plugin] + sorted(rec.own_files))
    mods = sorted(m for m in rec.modules if m in asked and m not in have)
    guessed = not rec.modules and rec.unreadable_paths > 0
    if guessed:  # no path could be read: what the plugin's source imports, less what every worker has
        mods = sorted(m for m in asked - have - _startup_modules() if _installed(m, rec.plugin))
    if mods:
        L += ["", "[python]",
              f"preload = [{', '.join(_q(m) for m in mods)}]  # imported by the plugin (never its own modules"
              + ("; from its source: no path was readable" if guessed else "")
              + "); preloads are imported before the filter, in every worker"]

    groups, allow = _choose(rec)
    no_address = {n: c for n, c in NO_ADDRESS_RULES.items() if n in allow and not fams}
    allow = {n: v for n, v in allow.items() if n not in no_address}
    sec = []
    group_lines = {g: "; ".join(_why(rec.syscalls[n]) for n in names) for g, names in groups.items()}
    if rec.process_seen and "@process" not in rec.base.seccomp.groups:
        group_lines["@process"] = "NEW PROCESSES: " + _why(rec.process_seen)
    if group_lines:
        sec += ["groups = ["] + [f"    {_q(g)},  # {why}" for g, why in sorted(group_lines.items())] + ["]"]
    if allow:
        sec.append("allow = [")
        for name, seen in sorted(allow.items()):
            sec.append(f"    {_q(name)},  # {_why(seen)}")
        sec.append("]")
    errnos = {n: (e, f"{_why(rec.syscalls[n])}: harmless, answered with {e} instead of granted")
              for n, e in BENIGN_ERRNO.items() if n in rec.syscalls}
    if any("nscd" in note for note in rec.benign) and not fams:
        errnos["socket"] = ("EAFNOSUPPORT", _clean(decode.NSCD_NOTE) + ": answered with an errno, no network granted")
    if errnos:
        sec.append("errno = { " + ", ".join(f"{n} = {_q(e)}" for n, (e, _) in sorted(errnos.items())) + " }")
        sec += [f"#   {n}: {why}" for n, (_, why) in sorted(errnos.items())]
    for name, seen in sorted(rec.dangerous.items()):
        sec.append(f'# allow_dangerous = [{_q(name)}]  # DANGEROUS, not granted (denied with EPERM during '
                   f"learning): {_why(seen)}")
    if sec:
        L += ["", "[seccomp]"] + sec
    for name, cond in sorted(no_address.items()):
        L += ["", f"[[seccomp.rule]]  # {_why(rec.syscalls[name])}; only without a destination address",
              f"syscall = {_q(name)}", f"when = [{_q(cond)}]"]
    for req, seen in sorted(rec.ioctls.items()):
        L += ["", f"[[seccomp.rule]]  # ioctl {decode.ioctl_name(req)}: {_why(seen)}",
              'syscall = "ioctl"', f'when = ["arg1 == {req:#x}"]']

    notes = []
    for text, seen in sorted(rec.refused.items()):
        notes.append(f"# refused during learning, not granted: {_clean(text)} ({_why(seen)})")
    for note, seen in sorted(rec.benign.items()):
        notes.append(f"# known harmless: {_clean(note)} ({_why(seen)})")
    for path, _seen in sorted(rec.looked.items())[:40]:
        notes.append(f"# looked at (stat/access, which Landlock does not limit; nothing to grant): {_clean(path)}")
    if len(rec.looked) > 40:
        notes.append(f"# ... and {len(rec.looked) - 40} more paths looked at")
    if rec.unreadable_paths:
        notes.append(f"# {rec.unreadable_paths} paths could not be read from the worker's memory (an unprivileged "
                     "host cannot read a non-dumpable worker): run learn as root for exact paths")
    if rec.dropped:
        notes.append(f"# {rec.dropped} further distinct observations were counted, not kept")
    if notes:
        L += [""] + notes
    return "\n".join(L) + "\n"


def _connect_entries(destinations: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """`network.connect` entries for the destinations seen: what the policy can enforce, said
    plainly (Landlock matches TCP ports, not addresses; an abstract socket has no grant)."""
    import ipaddress
    out: dict[str, str] = {}
    notes = []
    for dest, seen in sorted(destinations.items()):
        family, _, rest = str(dest).partition(":")
        if family == "AF_UNIX" and rest.startswith("/"):
            out.setdefault(f"unix:{rest}", f"that socket alone: {_why(seen)}")
        elif family == "AF_UNIX":
            notes.append(f"# not granted: abstract socket {_clean(rest)} (abstract sockets stay scoped)")
        elif family in ("AF_INET", "AF_INET6") and rest.rpartition(":")[2].isdigit():
            host, _, port = rest.rpartition(":")
            try:
                loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
            except ValueError:
                continue
            if loopback:
                out.setdefault(f"{host}:{port}", _why(seen))
            else:
                any_ = "0.0.0.0" if family == "AF_INET" else "[::]"
                out.setdefault(f"{any_}:{port}", f"port {port} at any address (Landlock matches ports): seen "
                               f"{_clean(host)}; {_why(seen)}")
    return list(out.items()), notes
