"""Turn (policy, plugin, identity) into the plain-data plan the child's confinement steps read.

Everything the child needs is decided here, in the host, before fork: the BPF program (compiled
once per policy), the Landlock paths, the rlimits, the environment.
"""
import os

from ..zygote.leftovers import may_start_processes
from .zygote_client import runtime_paths

# Read-only system paths every worker needs: shared libraries (C extensions dlopen them),
# the loader cache, and time zone data.
SYSTEM_READ = ("/usr/lib", "/lib", "/lib64", "/usr/lib64", "/etc/ld.so.cache", "/etc/localtime",
               "/usr/share/zoneinfo")

_runtime = None


def _runtime_read():
    global _runtime
    if _runtime is None:
        _runtime = tuple(runtime_paths()) + SYSTEM_READ
    return _runtime


def build(policy, plugin: str, module_name: str, uid: int | None, scratch: str | None) -> dict:
    lim = policy.limits
    own_userns = uid is None and lim.tasks > 0
    rlimits = {
        "core": 0,
        "cpu": lim.cpu_seconds,
        "as": lim.memory_bytes,
        "nofile": lim.open_files,
        "fsize": lim.file_size_bytes,
        # Counted per uid (and user namespace): a real per-worker cap because each worker has a
        # uid of its own (root host) or a user namespace of its own (unprivileged host, threads
        # or processes allowed). Without either, seccomp allows no new task at all.
        "nproc": (lim.tasks + 1) if uid is not None or own_userns else None,
    }
    fs = policy.filesystem
    read = list(_runtime_read()) + [os.path.dirname(plugin)] + list(fs.read_only)
    write = list(fs.writable) + ([scratch] if scratch else [])
    families = set(getattr(policy.network, "families", ()) or ())
    notify = policy.seccomp.default_action == "kill"
    return {
        "plugin": plugin,
        "module_name": module_name,
        "uid": uid,
        "gid": uid,
        "rlimits": rlimits,
        "env": policy.environment(dict(os.environ), scratch=scratch),
        "preload": list(policy.preload),
        "landlock": {"read": read, "write": write, "network": bool(policy.network.allow),
                     "abstract_unix": bool(policy.network.allow) and "unix" in families},
        "bpf": policy.bpf(notify=notify),
        "notify": notify,
        "max_frame": lim.max_message_bytes,
        "own_userns": own_userns,
        "may_fork": may_start_processes(policy),  # the zygote then kills what it started, too
        "cwd": scratch or "/",
    }
