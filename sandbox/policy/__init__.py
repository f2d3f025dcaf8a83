"""Policy files as data: load, validate, resolve `extends` and groups, compile to BPF.

    policy = Policy.load("policies/thumbnail.toml")   # PolicyError names the file and the key
    policy.bpf()          # compiled once, cached: what each worker installs
    policy.explain()      # the effective policy, as plain data

The host does all of this before any fork; a worker never reads a policy file.
"""
import copy
import os
from types import SimpleNamespace

from ..errors import PolicyError
from . import compile as _compile, loader, schema

MIB = schema.MIB


class Policy:
    def __init__(self, tables: dict, path: str | None, chain: list, description: str = ""):
        self.path = path
        self.name = os.path.splitext(os.path.basename(path))[0] if path else "inline"
        self.chain = chain
        self.description = description
        self._tables = tables
        base = os.path.dirname(path) if path else os.getcwd()
        lim = tables["limits"]
        self.limits = SimpleNamespace(
            timeout=float(lim["timeout"]), cpu_seconds=lim["cpu_seconds"],
            memory_bytes=lim["memory_mb"] * MIB, open_files=lim["open_files"],
            file_size_bytes=lim["file_size_mb"] * MIB, max_message_bytes=lim["max_message_bytes"],
            processes=lim["processes"])
        self.uid_range = tuple(tables["identity"]["uid_range"])
        fs = tables["filesystem"]
        self.filesystem = SimpleNamespace(read_only=loader.absolute_paths(fs["read_only"], base),
                                          writable=loader.absolute_paths(fs["writable"], base),
                                          scratch=fs["scratch"])
        self.network = SimpleNamespace(**tables["network"])
        self.preload = list(tables["python"]["preload"])
        sec = tables["seccomp"]
        writes = bool(fs["scratch"] or fs["writable"])
        self._effective = _compile.effective(sec, tables["network"], lim["processes"], path, writes)
        self.seccomp = SimpleNamespace(default_action=sec["default_action"], default_errno=sec["default_errno"],
                                       groups=list(sec["groups"]), allowed=self._effective["allow"])
        self._bpf: dict[bool, bytes] = {}

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, path) -> "Policy":
        path = os.path.abspath(os.fspath(path))
        data = loader.read_file(path)
        return cls.from_dict(data, path=path, _validated=True)

    @classmethod
    def from_dict(cls, data: dict, path: str | None = None, base_dir: str | None = None,
                  _validated: bool = False) -> "Policy":
        if not _validated:
            data = schema.validate(data, path or "<policy>")
        base_dir = base_dir or (os.path.dirname(path) if path else os.getcwd())
        tables, chain = loader.load_chain(data, path, base_dir)
        return cls(tables, path, chain, data.get("description", ""))

    @classmethod
    def default(cls) -> "Policy":
        global _default
        if _default is None:
            _default = cls.load(loader.SHIPPED_DEFAULT)
        return _default

    def with_extra_read_only(self, paths) -> "Policy":
        tables = copy.deepcopy(self._tables)
        tables["filesystem"]["read_only"] = tables["filesystem"]["read_only"] + list(paths)
        return Policy(tables, self.path, self.chain, self.description)

    # ---- what the core reads ----------------------------------------------------------------
    def environment(self, host_env: dict) -> dict:
        env = {k: host_env[k] for k in self._tables["environment"]["pass"] if k in host_env}
        env.update(self._tables["environment"]["set"])
        return env

    def bpf(self, notify: bool = True) -> bytes:
        prog = self._bpf.get(notify)
        if prog is None:
            prog = self._bpf[notify] = _compile.build_bpf(
                self._effective, self.seccomp.default_action, self.seccomp.default_errno, notify)
        return prog

    def explain(self) -> dict:
        t = self._tables
        return {
            "name": self.name, "path": self.path, "description": self.description, "extends": self.chain[1:],
            "limits": dict(t["limits"]), "identity": {"uid_range": list(self.uid_range)},
            "filesystem": {"read_only": self.filesystem.read_only, "writable": self.filesystem.writable,
                           "scratch": self.filesystem.scratch},
            "network": dict(t["network"]), "environment": {"pass": t["environment"]["pass"],
                                                           "set": t["environment"]["set"]},
            "python": {"preload": self.preload},
            "seccomp": {
                "default_action": self.seccomp.default_action, "default_errno": self.seccomp.default_errno,
                "groups": ["@sandbox-runtime"] + [g for g in self.seccomp.groups if g != "@sandbox-runtime"],
                "allow": self._effective["allow"],
                "rules": [{"syscall": s, "when": w} for s, _, w in self._effective["rules"]],
                "errno": self._effective["errno"],
                "allow_dangerous": list(t["seccomp"]["allow_dangerous"]),
            },
        }

    def __repr__(self):
        return f"<Policy {self.name} ({self.path})>"


_default = None

__all__ = ["Policy", "PolicyError"]
