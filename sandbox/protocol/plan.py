"""The plan: everything one worker's confinement steps need, decided in the host before fork.

Built once by the host (`sandbox._host.plan.build`), sent to the worker over the worker's own
input pipe as its first frame, and rebuilt there by field name with a type check per field.
The zygote never sees it: a zygote (or a spare) that held plans would hand every later worker
the environment and paths of the earlier ones, since workers never exec.

A plain frozen class with a field table rather than a dataclass: `dataclasses` would pull
`inspect` and a dozen other modules into the zygote, and so into every worker.
"""
from typing import Any, Callable

import msgpack


class PlanError(ValueError):
    """A plan that does not have the fields and types below (a host bug, never plugin input)."""


def _is_str(v: Any) -> bool:
    return type(v) is str and "\0" not in v


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_opt_int(v: Any) -> bool:
    return v is None or type(v) is int


def _is_bool(v: Any) -> bool:
    return type(v) is bool


def _is_bytes(v: Any) -> bool:
    return type(v) is bytes


def _is_strs(v: Any) -> bool:
    return type(v) is tuple and all(_is_str(x) for x in v)


def _is_env(v: Any) -> bool:
    return type(v) is dict and all(_is_str(k) and k and "=" not in k and _is_str(x) for k, x in v.items())


def _is_rlimits(v: Any) -> bool:
    return type(v) is dict and all(_is_str(k) and _is_opt_int(x) for k, x in v.items())


class _Record:
    """Frozen, slotted, typed by FIELDS: {name: (check, what it is)}."""

    __slots__ = ()
    FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {}

    DEFAULTS: dict[str, Any] = {}

    def __init__(self, **fields: Any) -> None:
        fields = {**self.DEFAULTS, **fields}
        missing = self.FIELDS.keys() - fields.keys()
        extra = fields.keys() - self.FIELDS.keys()
        if missing or extra:
            raise PlanError(f"{type(self).__name__}: missing {sorted(missing)}, unknown {sorted(extra)}")
        for name, (check, what) in self.FIELDS.items():
            value = fields[name]
            if not check(value):
                raise PlanError(f"{type(self).__name__}.{name} must be {what}, not {type(value).__name__}")
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(getattr(self, f) == getattr(other, f) for f in self.FIELDS)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{f}=...' for f in self.FIELDS)})"  # never the values

    def to_wire(self) -> dict:
        out = {}
        for name in self.FIELDS:
            value = getattr(self, name)
            out[name] = value.to_wire() if isinstance(value, _Record) else value
        return out


def _is_ports(v: Any) -> bool:
    return type(v) is tuple and all(type(p) is int and 0 < p < 65536 for p in v)


class Landlock(_Record):
    """The worker's Landlock rules. `network`: the worker shares the host's network namespace.
    `connect`: with `network`, the only TCP ports it may connect to (empty: TCP is not limited);
    bind is then denied. `unix`: it may make AF_UNIX sockets there, so the abstract-socket scope
    is required (abstract sockets are always scoped; Landlock cannot grant one by name).
    `abi_max`: never use a Landlock ABI above this (a test, or a cautious operator, makes this
    kernel behave as an older one), None for the kernel's own."""

    __slots__ = ("read", "write", "network", "connect", "unix", "abi_max")
    read: tuple[str, ...]
    write: tuple[str, ...]
    network: bool
    connect: tuple[int, ...]
    unix: bool
    abi_max: int | None
    FIELDS = {
        "read": (_is_strs, "a tuple of paths"),
        "write": (_is_strs, "a tuple of paths"),
        "network": (_is_bool, "a bool (the host's network namespace)"),
        "connect": (_is_ports, "a tuple of TCP ports (1-65535)"),
        "unix": (_is_bool, "a bool (AF_UNIX sockets in the host's network namespace)"),
        "abi_max": (_is_opt_int, "an int or None (the highest Landlock ABI to use)"),
    }

    @property
    def tcp(self) -> str:
        """What Landlock does with TCP: "none" (no network), "ports" (connect rules), "any"."""
        if not self.network:
            return "none"
        return "ports" if self.connect else "any"

    @classmethod
    def from_wire(cls, d: Any) -> "Landlock":
        if type(d) is not dict:
            raise PlanError("Plan.landlock must be a map")
        d = dict(d)
        for key in ("read", "write", "connect"):
            if type(d.get(key)) is list:
                d[key] = tuple(d[key])
        return cls(**d)


def _is_opt_str(v: Any) -> bool:
    return v is None or _is_str(v)


def _is_landlock(v: Any) -> bool:
    return type(v) is Landlock


class Plan(_Record):
    __slots__ = ("plugin", "module_name", "title", "uid", "gid", "rlimits", "env", "preload", "landlock",
                 "bpf", "notify", "max_frame", "own_userns", "may_fork", "cwd", "scratch", "scratch_bytes",
                 "scratch_inodes", "unix_sockets", "worker_writable")
    plugin: str
    module_name: str
    title: str
    uid: int | None
    gid: int | None
    rlimits: dict[str, int | None]
    env: dict[str, str]
    preload: tuple[str, ...]
    landlock: Landlock
    bpf: bytes
    notify: bool
    max_frame: int
    own_userns: bool
    may_fork: bool
    cwd: str
    scratch: str | None
    scratch_bytes: int
    scratch_inodes: int
    unix_sockets: tuple[str, ...]
    worker_writable: tuple[str, ...]
    FIELDS = {
        "plugin": (_is_str, "the absolute path of worker.py"),
        "module_name": (_is_str, "the plugin's module name"),
        "title": (_is_str, "the process title"),
        "uid": (_is_opt_int, "an int or None"),
        "gid": (_is_opt_int, "an int or None"),
        "rlimits": (_is_rlimits, "a map of rlimit name to int or None"),
        "env": (_is_env, "a map of variable name to value"),
        "preload": (_is_strs, "a tuple of module names"),
        "landlock": (_is_landlock, "a Landlock record"),
        "bpf": (_is_bytes, "the compiled seccomp program"),
        "notify": (_is_bool, "a bool (the host receives seccomp notifications)"),
        "max_frame": (_is_int, "an int"),
        "own_userns": (_is_bool, "a bool"),
        "may_fork": (_is_bool, "a bool"),
        "cwd": (_is_str, "a path"),
        "scratch": (_is_opt_str, "a path or None (the worker's private tmpfs)"),
        "scratch_bytes": (_is_int, "an int (the scratch tmpfs's size=)"),
        "scratch_inodes": (_is_int, "an int (the scratch tmpfs's nr_inodes=)"),
        "unix_sockets": (_is_strs, "a tuple of socket paths (bound alone into the minimal view)"),
        "worker_writable": (_is_strs, "a tuple of paths (folders some worker may write: links there are not followed)"),
    }
    # fields a plan may leave out (their value then): nothing a missing field defaults to may grant more
    DEFAULTS: dict[str, Any] = {"unix_sockets": ()}

    @classmethod
    def from_wire(cls, d: Any) -> "Plan":
        if type(d) is not dict:
            raise PlanError("a plan must be a map")
        d = dict(d)
        d["landlock"] = Landlock.from_wire(d.get("landlock"))
        for key in ("preload", "unix_sockets", "worker_writable"):
            if type(d.get(key)) is list:
                d[key] = tuple(d[key])
        return cls(**d)


def encode(plan: Plan) -> bytes:
    return msgpack.packb(plan.to_wire(), use_bin_type=True)


def decode(data: bytes) -> Plan:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure is one kind of error here
        raise PlanError(f"the plan is not valid msgpack: {e}") from None
    return Plan.from_wire(obj)
