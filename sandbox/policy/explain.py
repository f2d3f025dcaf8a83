"""Readable summaries: an effective policy (`sandbox policy explain FILE|default`) and the groups
(`sandbox policy groups`)."""
import os
import shlex
import textwrap

from ..errors import PolicyError
from .groups import GROUPS


def share_commands(path: str, gid: int) -> str:
    """The operator's one-time step that makes a writable path the policy's (root hosts): its
    workers reach it through the group; setgid keeps what is made inside in that group."""
    mode = "2770" if os.path.isdir(path) else "660"
    return f"chgrp {gid} {shlex.quote(path)} && chmod {mode} {shlex.quote(path)}"


def _identity_lines(policy, e: dict) -> list[str]:
    from .._host.gids import policy_gid
    lo, hi = e["identity"]["uid_range"]
    lines = [f"identity    root hosts: a uid of its own per worker from {lo}-{hi}, no groups"]
    try:
        gid, how = policy_gid(policy)
    except PolicyError as err:
        return lines + [f"            gid: unusable here: {err}"]
    if gid is None:
        return lines + [f"            gid: {how}"]
    lines.append(f"            gid {gid}, shared by this policy's workers and no other policy's ({how})")
    writable = e["filesystem"]["writable"]
    if writable:
        lines.append("            workers write with umask 007; make each writable path the policy's, once:")
        lines += [f"              {share_commands(p, gid)}" for p in writable]
    return lines


def _mode(sec: dict) -> str:
    if sec["default_action"] == "kill":
        return "stop the worker and name the syscall"
    return (f"fail with {sec['default_errno']} and are reported; more than {sec['max_denials']} in one "
            "call stop the worker; dangerous ones always stop it")


def _enforced_lines(net: dict) -> list[str]:
    """What the kernel holds a networked worker to: Landlock matches TCP ports, not addresses."""
    if not net["allow"]:
        return []
    enf = net["enforced"]
    lines = [f"            TCP: {enf['tcp']}", f"            UDP: {enf['udp']}",
             f"            abstract unix sockets: {enf['abstract_unix']}",
             f"            pathname unix sockets: {enf['pathname_unix']}"]
    if enf["dns"]:
        lines.append("            DNS: a host name is granted: /etc/resolv.conf, /etc/hosts, /etc/nsswitch.conf, "
                     "/etc/gai.conf readable, TCP port 53 open")
    return lines


def explain_text(policy) -> str:
    e = policy.explain()
    lim = e["limits"]
    fs = e["filesystem"]
    net = e["network"]
    env = e["environment"]
    passed_env = ", " + ", ".join(env["pass"] + list(env["set"])) if env["pass"] or env["set"] else ""
    lines = [f"policy {e['name']}  ({e['path']})"]
    if e["description"]:
        lines.append(f"  {e['description']}")
    if e["extends"]:
        lines.append("  extends: " + " -> ".join(e["extends"]))
    for w in e["warnings"]:
        lines.append(f"  warning: {w}")
    scratch = (f" + a private scratch dir ({fs['scratch_mb']} MiB, {fs['scratch_inodes']} inodes)"
               if fs["scratch"] else "")
    lines += [
        "",
        f"limits      timeout {lim['timeout']} s per call, CPU {lim['cpu_seconds']} s, memory {lim['memory_mb']} MiB,",
        f"            {lim['open_files']} open files, files up to {lim['file_size_mb']} MiB, messages up to "
        f"{lim['max_message_bytes']} bytes,",
        f"            {lim['threads']} extra threads (limits.threads), {lim['processes']} child processes "
        "(limits.processes)",
        *_identity_lines(policy, e),
        f"files       read-only: runtime, plugin folder{', ' + ', '.join(fs['read_only']) if fs['read_only'] else ''}",
        f"            writable: {', '.join(fs['writable']) or 'nothing'}{scratch}",
        f"network     {'families ' + ', '.join(net['families']) if net['allow'] else 'none (empty network namespace)'}"
        f"{'; connect to ' + ', '.join(net['connect']) if net['connect'] else ''}",
        *_enforced_lines(net),
        f"environment HOME, USER, LOGNAME{', TMPDIR' if fs['scratch'] else ''}"
        f"{', thread caps (OPENBLAS_NUM_THREADS=1, ...)' if not e['facts']['may_thread'] else ''}"
        f"{passed_env}",
        f"preload     {', '.join(e['python']['preload']) or 'nothing'}",
        f"may         fork: {'yes' if e['facts']['may_fork'] else 'no'}, threads: "
        f"{'yes' if e['facts']['may_thread'] else 'no'}, network: {'yes' if e['facts']['may_network'] else 'no'}",
        "",
        f"seccomp     forbidden syscalls {_mode(e['seccomp'])}",
    ]
    for g in e["seccomp"]["groups"]:
        lines.append(f"  {g:18} {GROUPS[g]['why']}")
    lines.append(f"  allowed ({len(e['seccomp']['allow'])}): " + " ".join(e["seccomp"]["allow"]))
    for r in e["seccomp"]["rules"]:
        lines.append(f"  {r['syscall']} only when {' and '.join(r['when'])}")
    answered: dict[tuple, list[str]] = {}  # (syscall, errno, source) -> the conditions of each rule
    for r in e["seccomp"]["errno_rules"]:
        answered.setdefault((r["syscall"], r["errno"], r["from"]), []).append(" and ".join(r["when"]))
    for (name, err, source), whens in answered.items():
        when = "" if whens == [""] else f" when {' or '.join('(' + w + ')' for w in whens)}"
        lines.append(f"  {name} fails with {err}{when}  [{source}]")
    return "\n".join(lines)


def groups_text(data: dict) -> str:
    lines = []
    for name, g in data.items():
        lines.append(name)
        for part in textwrap.wrap(g["why"], 96):
            lines.append(f"    {part}")
        if g["compare"]:
            lines.append(f"    compared: {g['compare']}")
        if g["includes"]:
            lines.append(f"    includes: {' '.join(g['includes'])}")
        if g["allow"]:
            lines += ["    " + x for x in textwrap.wrap("allows: " + " ".join(g["allow"]), 96)]
        for r in g["rules"]:
            lines.append(f"    {r['syscall']} only when {' and '.join(r['when'])}")
        for a in g["answers"]:
            ruled = any(r["syscall"] == a["syscall"] for r in g["rules"])
            when = (f" when {' and '.join(a['when'])}" if a["when"]
                    else " otherwise" if ruled else "")
            lines.append(f"    {a['syscall']} fails with {a['errno']}{when}")
        lines.append("")
    return "\n".join(lines).rstrip()
