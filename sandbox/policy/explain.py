"""Readable summaries: an effective policy (`sandbox policy explain FILE|default`) and the groups
(`sandbox policy groups`)."""
import textwrap

from .groups import GROUPS


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
        f"identity    a unique uid/gid from {e['identity']['uid_range'][0]}-{e['identity']['uid_range'][1]} "
        "(root hosts)",
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
