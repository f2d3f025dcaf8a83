"""A readable summary of an effective policy (`sandbox policy explain FILE`)."""
from .groups import GROUPS


def explain_text(policy) -> str:
    e = policy.explain()
    lim = e["limits"]
    lines = [f"policy {e['name']}  ({e['path']})"]
    if e["description"]:
        lines.append(f"  {e['description']}")
    if e["extends"]:
        lines.append("  extends: " + " -> ".join(e["extends"]))
    lines += [
        "",
        f"limits      timeout {lim['timeout']} s per call, CPU {lim['cpu_seconds']} s, memory {lim['memory_mb']} MiB,",
        f"            {lim['open_files']} open files, files up to {lim['file_size_mb']} MiB, messages up to "
        f"{lim['max_message_bytes']} bytes, {lim['processes']} extra threads",
        f"identity    a unique uid/gid from {e['identity']['uid_range'][0]}-{e['identity']['uid_range'][1]} (root hosts)",
        f"files       read-only: runtime, plugin folder{', ' + ', '.join(e['filesystem']['read_only']) if e['filesystem']['read_only'] else ''}",
        f"            writable: {', '.join(e['filesystem']['writable']) or 'nothing'}"
        f"{' + a private scratch dir' if e['filesystem']['scratch'] else ''}",
        f"network     {'families ' + ', '.join(e['network']['families']) if e['network']['allow'] else 'none (empty network namespace)'}",
        f"environment {', '.join(e['environment']['pass'] + list(e['environment']['set'])) or 'empty'}",
        f"preload     {', '.join(e['python']['preload']) or 'nothing'}",
        "",
        f"seccomp     forbidden syscalls: {'stop the worker and name the syscall' if e['seccomp']['default_action'] == 'kill' else 'fail with ' + e['seccomp']['default_errno']}",
    ]
    for g in e["seccomp"]["groups"]:
        lines.append(f"  {g:18} {GROUPS[g]['why']}")
    lines.append(f"  allowed ({len(e['seccomp']['allow'])}): " + " ".join(e["seccomp"]["allow"]))
    for r in e["seccomp"]["rules"]:
        lines.append(f"  {r['syscall']} only when {' and '.join(r['when'])}")
    for name, err in e["seccomp"]["errno"].items():
        lines.append(f"  {name} fails with {err}")
    return "\n".join(lines)
