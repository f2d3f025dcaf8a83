"""Turn (policy, plugin, identity) into the typed Plan the worker's confinement steps read.

Everything the worker needs is decided here, in the host, before fork: the BPF program
(compiled once per policy), the Landlock paths, the rlimits, the environment. Checked here
too, so that nothing the policy says can fail later in the zygote or halfway through the
worker's confinement: a path or value with a NUL byte is a PolicyError naming the key.
"""
import os

from ..child import grant_paths
from ..errors import PolicyError, UsageError
from ..policy import destinations
from ..protocol.plan import Landlock, Plan, PlanError
from ..zygote.leftovers import may_start_processes
from . import gids, rulesets
from .zygote_client import runtime_paths

# Read-only system paths every worker needs: shared libraries (C extensions dlopen them),
# the loader cache, and time zone data.
SYSTEM_READ = ("/usr/lib", "/lib", "/lib64", "/usr/lib64", "/etc/ld.so.cache", "/etc/localtime",
               "/usr/share/zoneinfo")

_runtime: tuple[str, ...] | None = None


def _runtime_read() -> tuple[str, ...]:
    global _runtime
    if _runtime is None:
        _runtime = tuple(runtime_paths()) + SYSTEM_READ
    return _runtime


def _check_text(policy, key: str, values) -> None:
    for value in values:
        if not isinstance(value, str) or "\0" in value:
            raise PolicyError(f"{value!r} is not usable: a NUL byte (or not text)", path=policy.path, key=key)


def _title(name: str, policy) -> str:
    """What `ps` shows for the worker: printable, short."""
    text = f"sandbox: {name} (policy {policy.name})"
    return "".join(c if c.isprintable() else "?" for c in text)[:200]


def build(policy, plugin: str, module_name: str, uid: int | None, scratch: str | None) -> Plan:
    if "\0" in plugin or "\0" in module_name:
        raise UsageError(f"the plugin path {plugin!r} contains a NUL byte")
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
    _check_text(policy, "filesystem.read_only", fs.read_only)
    _check_text(policy, "filesystem.writable", fs.writable)
    _check_text(policy, "python.preload", policy.preload)
    env = policy.environment(os.environ, scratch=scratch)  # (it reads the few names `pass` lists: no copy of all)
    _check_text(policy, "environment", list(env) + list(env.values()))
    bad_names = [k for k in env if not k or "=" in k]
    if bad_names:
        raise PolicyError(f"{bad_names[0]!r} is not a variable name", path=policy.path, key="environment")
    network = bool(policy.network.allow)
    # TCP ports only (Landlock has no address rules); a host name brings DNS along
    ports = destinations.enforced_ports(policy.network, policy.path) if network else ()
    dns = destinations.DNS_FILES if destinations.needs_dns(policy.network) else ()
    read = _runtime_read() + (os.path.dirname(plugin),) + tuple(fs.read_only) + dns
    write = tuple(fs.writable) + ((scratch,) if scratch else ())
    families = set(getattr(policy.network, "families", ()) or ())
    # Both modes send what the filter does not allow to the host: kill mode kills and names it,
    # deny mode answers it with the errno and reports it (a denial is never silent).
    notify = policy.seccomp.default_action in ("kill", "deny")
    try:
        return Plan(
            plugin=plugin, module_name=module_name, title=_title(module_name, policy),
            uid=uid, gid=gids.worker_gid(policy, uid), rlimits=rlimits, env=env, preload=tuple(policy.preload),
            landlock=Landlock(read=read, write=write, network=network, connect=ports,
                              unix=network and "unix" in families, abi_max=rulesets.ABI_MAX),
            bpf=policy.bpf(notify=notify), notify=notify, max_frame=lim.max_message_bytes,
            own_userns=own_userns,
            may_fork=may_start_processes(policy),  # the zygote then kills what it started, too
            cwd=scratch or "/", scratch=scratch, scratch_bytes=fs.scratch_bytes,
            scratch_inodes=fs.scratch_inodes,
            # with the unix family, the only sockets besides those inside granted paths
            unix_sockets=tuple(policy.network.unix_sockets) if network and "unix" in families else (),
            # where any worker may write: the child follows no link found there (grant_paths.py)
            # (not scratch: a private tmpfs, unique per worker, it would only churn the record)
            worker_writable=grant_paths.note_writable(fs.writable) + ((scratch,) if scratch else ()))
    except PlanError as e:
        raise PolicyError(f"the policy does not make a usable plan: {e}", path=policy.path) from None
