"""Policy files as data: load, validate, resolve `extends` and groups, compile to BPF.

    policy = Policy.load("policies/thumbnail.toml")   # PolicyError names the file and the key
    policy.bpf()          # compiled at load (so a policy that loads always compiles), cached
    policy.explain()      # the effective policy, as plain data
    policy.may_fork, policy.may_thread, policy.may_network   # what the compiled rules allow

The host does all of this before any fork; a worker never reads a policy file.
"""
import os
from dataclasses import dataclass

from ..errors import PolicyError
from . import compile as _compile, destinations, loader, schema

MIB = schema.MIB

# What a worker's environment holds before the policy's own `pass` and `set`: enough that the
# standard library never needs the user database (getpass, expanduser, sysconfig look at these
# first; glibc's getpwuid would otherwise ask the nscd socket), and, when the policy grants no
# threads, numeric libraries told to stay single-threaded instead of trying to start a pool.
WORKER_USER = "sandbox"
NO_HOME = "/nonexistent"  # the Debian convention for an account without a home
THREAD_CAPS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS")


@dataclass(frozen=True)
class Limits:
    timeout: float
    cpu_seconds: int
    memory_bytes: int
    open_files: int
    file_size_bytes: int
    max_message_bytes: int
    threads: int     # extra threads the worker may start
    processes: int   # child processes the worker may start

    @property
    def tasks(self) -> int:
        """Threads and processes together: what RLIMIT_NPROC must leave room for."""
        return self.threads + self.processes


@dataclass(frozen=True)
class Filesystem:
    read_only: tuple[str, ...]
    writable: tuple[str, ...]
    scratch: bool
    scratch_mb: int
    scratch_inodes: int

    @property
    def scratch_bytes(self) -> int:
        return self.scratch_mb * MIB


@dataclass(frozen=True)
class Destination:
    host: str
    port: int

    def __str__(self):
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Network:
    allow: bool
    families: tuple[str, ...]
    connect: tuple[Destination, ...]
    unix_sockets: tuple[str, ...] = ()  # "unix:/path" entries of network.connect, as paths


@dataclass(frozen=True)
class Seccomp:
    default_action: str          # "kill" or "deny" (the old "errno" is read as "deny")
    default_errno: str           # the errno name a denied call gets
    deny_errno: int              # the same, as a number
    max_denials_per_call: int    # deny mode: past this many denials in one call, the worker is killed
    groups: tuple[str, ...]
    allowed: tuple[str, ...]
    errno: dict                  # syscall -> errno name, as written in the policy


class Policy:
    def __init__(self, tables: dict, path: str | None, chain: list, description: str = ""):
        self.path = path
        self.name = os.path.splitext(os.path.basename(path))[0] if path else "inline"
        self.chain = chain
        self.description = description
        self._tables = tables
        base = os.path.dirname(path) if path else os.getcwd()
        lim = tables["limits"]
        self.limits = Limits(
            timeout=float(lim["timeout"]), cpu_seconds=lim["cpu_seconds"],
            memory_bytes=lim["memory_mb"] * MIB, open_files=lim["open_files"],
            file_size_bytes=lim["file_size_mb"] * MIB, max_message_bytes=lim["max_message_bytes"],
            threads=lim["threads"], processes=lim["processes"])
        self.uid_range = tuple(tables["identity"]["uid_range"])
        self.gid: int | None = tables["identity"]["gid"]  # None: derived (sandbox/_host/gids.py)
        self.gid_range = tuple(tables["identity"]["gid_range"])
        fs = tables["filesystem"]
        self.filesystem = Filesystem(read_only=tuple(_existing(fs["read_only"], base, path, "filesystem.read_only")),
                                     writable=tuple(_existing(fs["writable"], base, path, "filesystem.writable")),
                                     scratch=fs["scratch"], scratch_mb=fs["scratch_mb"],
                                     scratch_inodes=fs["scratch_inodes"])
        net = tables["network"]
        inet, unix = destinations.split_connect(net["connect"])
        if inet and not (net["allow"] and {"inet", "inet6"} & set(net["families"])):
            raise PolicyError('needs network.allow = true and families with "inet" or "inet6"', path,
                              "network.connect")
        destinations.check_unix_sockets(unix, net, path)
        self.network = Network(allow=net["allow"], families=tuple(net["families"]),
                               connect=tuple(Destination(*schema.parse_destination(d)) for d in inet),
                               unix_sockets=unix)
        destinations.enforced_ports(self.network, path)  # refuses an address Landlock cannot enforce
        self.preload = list(tables["python"]["preload"])
        sec = tables["seccomp"]
        self.warnings: list[str] = []
        action = sec["default_action"]
        if action == "errno":
            self.warnings.append('seccomp.default_action = "errno" is the old name of "deny"')
            action = "deny"
        grants = {"writes": bool(fs["scratch"] or fs["writable"]), "threads": lim["threads"],
                  "processes": lim["processes"]}
        self._effective = _compile.effective(sec, net, grants, path)
        self.warnings += self._effective["warnings"]
        facts = _compile.facts(self._effective, net)
        self.may_fork: bool = facts["may_fork"]
        self.may_thread: bool = facts["may_thread"]
        self.may_network: bool = facts["may_network"]
        self.seccomp = Seccomp(default_action=action, default_errno=sec["default_errno"],
                               deny_errno=_compile.errno_value(sec["default_errno"]),
                               max_denials_per_call=sec["max_denials"], groups=tuple(sec["groups"]),
                               allowed=tuple(self._effective["allow"]), errno=dict(sec["errno"]))
        # Compiled now: a policy that loads is a policy every worker can install. The variant
        # without a listener differs only in its default action; it is compiled on first use.
        self._bpf: dict[bool, bytes] = {True: self._compile(True)}

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, path) -> "Policy":
        try:
            path = os.path.abspath(os.fspath(path))
        except (TypeError, ValueError) as e:
            raise PolicyError(f"not a usable policy path: {e}", str(path)) from None
        if "\x00" in path:
            raise PolicyError("the path contains a NUL byte", path)
        data = loader.read_file(path)
        return cls.from_dict(data, path=path, _validated=True)

    @classmethod
    def from_dict(cls, data: dict, path: str | None = None, base_dir: str | None = None,
                  _validated: bool = False) -> "Policy":
        if not isinstance(data, dict):
            raise PolicyError("a policy is a table of sections", path or "<policy>")
        if not _validated:
            data = schema.validate(data, path or "<policy>")
        base_dir = base_dir or (os.path.dirname(path) if path else os.getcwd())
        tables, chain = loader.load_chain(data, path, base_dir)
        return cls(tables, path, chain, data.get("description", ""))

    @classmethod
    def named(cls, name) -> "Policy":
        """"default" is the shipped default; anything else is a policy file's path."""
        if name == "default":
            return cls.default()
        return cls.load(name)

    @classmethod
    def default(cls) -> "Policy":
        global _default
        if _default is None:
            _default = cls.load(loader.SHIPPED_DEFAULT)
        return _default

    # ---- what the core reads ----------------------------------------------------------------
    def environment(self, host_env: dict, scratch: str | None = None) -> dict:
        """The worker's whole environment: a sane baseline, then `pass` from the host, then `set`."""
        env = {"HOME": scratch or NO_HOME, "USER": WORKER_USER, "LOGNAME": WORKER_USER}
        if scratch:
            env["TMPDIR"] = scratch
        if not self.may_thread:
            env.update({k: "1" for k in THREAD_CAPS})
        env.update({k: host_env[k] for k in self._tables["environment"]["pass"] if k in host_env})
        env.update(self._tables["environment"]["set"])
        return env

    def _compile(self, notify: bool) -> bytes:
        return _compile.build_bpf(self._effective, self.seccomp.default_action, self.seccomp.default_errno,
                                  notify, self.path)

    def bpf(self, notify: bool = True) -> bytes:
        notify = bool(notify)
        prog = self._bpf.get(notify)
        if prog is None:
            prog = self._bpf[notify] = self._compile(notify)
        return prog

    def explain(self) -> dict:
        t = self._tables
        eff = self._effective
        return {
            "name": self.name, "path": self.path, "description": self.description, "extends": self.chain[1:],
            "limits": dict(t["limits"]), "identity": {"uid_range": list(self.uid_range), "gid": self.gid,
                                                       "gid_range": list(self.gid_range)},
            "filesystem": {"read_only": list(self.filesystem.read_only), "writable": list(self.filesystem.writable),
                           "scratch": self.filesystem.scratch, "scratch_mb": self.filesystem.scratch_mb,
                           "scratch_inodes": self.filesystem.scratch_inodes},
            "network": {"allow": self.network.allow, "families": list(self.network.families),
                        "connect": [str(d) for d in self.network.connect]
                        + [schema.UNIX_PREFIX + p for p in self.network.unix_sockets],
                        "enforced": destinations.enforced(self.network)},
            "environment": {"pass": t["environment"]["pass"], "set": t["environment"]["set"]},
            "python": {"preload": self.preload},
            "facts": {"may_fork": self.may_fork, "may_thread": self.may_thread, "may_network": self.may_network},
            "seccomp": {
                "default_action": self.seccomp.default_action, "default_errno": self.seccomp.default_errno,
                "max_denials": self.seccomp.max_denials_per_call,
                "groups": eff["groups"],
                "allow": eff["allow"],
                "rules": [{"syscall": s, "when": list(w)} for s, _, w in eff["rules"]],
                "errno": eff["errno"],
                "errno_rules": [{"syscall": s, "when": [a.text() for a in atoms], "errno": e, "from": src}
                                for s, atoms, e, src in eff["errno_rules"]],
                "allow_dangerous": list(t["seccomp"]["allow_dangerous"]),
            },
            "warnings": list(self.warnings),
        }

    def __repr__(self):
        return f"<Policy {self.name} ({self.path})>"


def _existing(paths, base, path, key) -> list[str]:
    out = loader.absolute_paths(paths, base)
    for p in out:
        if not os.path.exists(p):
            raise PolicyError(f"{p} does not exist", path, key)
    return out


_default: Policy | None = None  # the shipped default, loaded once

__all__ = ["Policy", "PolicyError", "Limits", "Filesystem", "Network", "Seccomp", "Destination"]
