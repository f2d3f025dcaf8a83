"""The policy file's shape: sections, keys, types, defaults, and checks with clear errors."""
import difflib
import errno as errno_mod
import ipaddress
import math
import os
import re
from typing import Any, Callable

from ..errors import PolicyError

MIB = 1024 * 1024

# key -> (checker, default). A checker returns the cleaned value or raises ValueError(reason).


def _number(lo=None, hi=None, integer=False):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            raise ValueError(f"must be {'an integer' if integer else 'a number'}, not {type(v).__name__} {v!r}")
        if not math.isfinite(v):
            raise ValueError(f"must be a finite number, not {v!r}")
        if lo is not None and v < lo:
            raise ValueError(f"must be >= {lo}, not {v}")
        if hi is not None and v > hi:
            raise ValueError(f"must be <= {hi}, not {v}")
        return v
    return check


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, not {v!r}")
    return v


def _str(v):
    if not isinstance(v, str):
        raise ValueError(f"must be a string, not {type(v).__name__}")
    return v


def _list_of_str(v):
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError("must be a list of strings")
    for x in v:
        if "\x00" in x:
            raise ValueError(f"{x!r} contains a NUL byte")
    return list(v)


def _paths(v):
    v = _list_of_str(v)
    for x in v:
        if not x or len(x) > 4096:
            raise ValueError(f"{x!r} is not a usable path")
    return v


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _env_names(v):
    v = _list_of_str(v)
    for x in v:
        if not _ENV_NAME.match(x):
            raise ValueError(f"{x!r} is not an environment variable name")
    return v


def _str_map(v):
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise ValueError("must be a table of string values")
    for k, x in v.items():
        if not _ENV_NAME.match(k):
            raise ValueError(f"{k!r} is not an environment variable name")
        if "\x00" in x:
            raise ValueError(f"the value of {k} contains a NUL byte")
    return dict(v)


def _modules(v):
    v = _list_of_str(v)
    for x in v:
        if not _MODULE.match(x):
            raise ValueError(f"{x!r} is not a module name")
    return v


def _destinations(v):
    """network.connect: "host:port" ("[v6]:port" for IPv6), the host an IP address or a DNS name;
    or "unix:/absolute/path" for one pathname unix socket."""
    v = _list_of_str(v)
    for x in v:
        if x.startswith(UNIX_PREFIX):
            parse_unix_socket(x)
        else:
            parse_destination(x)
    return v


UNIX_PREFIX = "unix:"
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, the last one the terminating NUL


def parse_unix_socket(text: str) -> str:
    """"unix:/run/app.sock" -> "/run/app.sock": absolute, normalized (no ".", "..", "//"), short
    enough for connect() to name it."""
    path = text[len(UNIX_PREFIX):]
    if not path.startswith("/") or path != os.path.normpath(path) or path.startswith("//"):
        raise ValueError(f"{text!r}: a unix socket is named by an absolute, normalized path "
                         '(e.g. "unix:/run/app.sock")')
    if path == "/" or "\x00" in path:
        raise ValueError(f"{text!r} is not a socket path")
    if len(path.encode("utf-8", "surrogateescape")) > SUN_PATH_MAX:
        raise ValueError(f"{text!r}: longer than {SUN_PATH_MAX} bytes, which connect() cannot name")
    return path


_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def parse_destination(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port (port 1-65535)")
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), int(port)
        except ValueError:
            raise ValueError(f"{text!r}: {host} is not an IPv6 address") from None
    try:
        return str(ipaddress.IPv4Address(host)), int(port)
    except ValueError:
        pass
    if not _HOSTNAME.match(host) or host.replace(".", "").isdigit():
        raise ValueError(f"{text!r}: {host!r} is neither an IP address nor a host name "
                         "(write IPv6 as [addr]:port)")
    return host.lower(), int(port)


def _id_range(what: str):
    def check(v):
        if (not isinstance(v, list) or len(v) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)
                or not 0 < v[0] <= v[1] < 2**32 - 1):
            raise ValueError(f"must be [first, last] with 0 < first <= last < 4294967295 ({what} 0 is never used)")
        return tuple(v)
    return check


_uid_range = _id_range("uid")


def _gid(v):
    """identity.gid: one number, or unset (then derived from the policy file's path)."""
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 2**32 - 1:
        raise ValueError(f"must be a gid from 1 to 4294967294 (gid 0 is never used), not {v!r}")
    return v


def _action(v):
    # "errno" is the old spelling of "deny", kept as an alias (explain and lint warn about it)
    if v not in ("kill", "deny", "errno"):
        raise ValueError(f'must be "kill" or "deny", not {v!r}')
    return v


def _errno_name(v):
    if (not isinstance(v, str) or not v.startswith("E") or
            not isinstance(getattr(errno_mod, v, None), int) or not 0 < getattr(errno_mod, v) < 4096):
        near = difflib.get_close_matches(str(v), [n for n in dir(errno_mod) if n.startswith("E")], 1)
        raise ValueError(f"unknown errno name {v!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    return v


def _errno_map(v):
    if not isinstance(v, dict):
        raise ValueError("must be a table: syscall = \"ERRNO\"")
    return {k: _errno_name(x) for k, x in v.items()}


def _families(v):
    from .groups import FAMILIES
    v = _list_of_str(v)
    for f in v:
        if f not in FAMILIES:
            raise ValueError(f"unknown socket family {f!r} (known: {', '.join(FAMILIES)})")
    return v


def _rules(v):
    if not isinstance(v, list) or not all(isinstance(r, dict) for r in v):
        raise ValueError("must be an array of tables: [[seccomp.rule]] syscall = ..., when = [...]")
    out = []
    for i, r in enumerate(v):
        extra = set(r) - {"syscall", "when"}
        if extra or "syscall" not in r:
            raise ValueError(f"rule {i + 1} needs exactly 'syscall' and 'when' (got {sorted(r)})")
        out.append({"syscall": _str(r["syscall"]), "when": _list_of_str(r.get("when", []))})
    return out


# section -> key -> (a checker that returns the value or raises ValueError, the default)
SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    "limits": {
        "timeout": (_number(lo=0.001, hi=86400), 10.0),
        "cpu_seconds": (_number(lo=1, hi=86400, integer=True), 60),
        "memory_mb": (_number(lo=16, hi=1 << 20, integer=True), 512),
        "open_files": (_number(lo=8, hi=1 << 20, integer=True), 64),
        "file_size_mb": (_number(lo=0, hi=1 << 20, integer=True), 0),
        "max_message_bytes": (_number(lo=1024, hi=1 << 30, integer=True), 16 * MIB),
        "threads": (_number(lo=0, hi=4096, integer=True), 0),    # extra threads (clone with CLONE_THREAD)
        "processes": (_number(lo=0, hi=4096, integer=True), 0),  # child processes (fork)
    },
    # gid: the gid this policy's workers share (root hosts); None = derived from the file's path
    # into gid_range, which starts right above the default uid_range (see default.toml)
    "identity": {"uid_range": (_uid_range, (1879048192, 1879113727)), "gid": (_gid, None),
                 "gid_range": (_id_range("gid"), (1879113728, 1895890943))},
    "filesystem": {"read_only": (_paths, []), "writable": (_paths, []), "scratch": (_bool, False),
                   "scratch_mb": (_number(lo=1, hi=1 << 20, integer=True), 64),
                   "scratch_inodes": (_number(lo=16, hi=1 << 24, integer=True), 4096)},
    "network": {"allow": (_bool, False), "families": (_families, []), "connect": (_destinations, [])},
    "environment": {"pass": (_env_names, []), "set": (_str_map, {})},
    "python": {"preload": (_modules, [])},
    "seccomp": {
        "default_action": (_action, "kill"),
        "default_errno": (_errno_name, "EPERM"),
        "max_denials": (_number(lo=1, hi=1_000_000, integer=True), 100),
        "groups": (_list_of_str, []),
        "allow": (_list_of_str, []),
        "allow_dangerous": (_list_of_str, []),
        "errno": (_errno_map, {}),
        "rule": (_rules, []),
    },
}
def _extends(v):
    v = _str(v)
    if not v or "\x00" in v or len(v) > 4096:
        raise ValueError(f"{v!r} is not a policy name or path")
    return v


TOP_LEVEL = {"description": _str, "extends": _extends}


def _suggest(word, choices):
    near = difflib.get_close_matches(word, list(choices), 1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def validate(data: dict, path: str) -> dict:
    """Check one file's own content (before extends is applied). Returns the cleaned tables."""
    out = {}
    for key, value in data.items():
        if key in TOP_LEVEL:
            try:
                out[key] = TOP_LEVEL[key](value)
            except ValueError as e:
                raise PolicyError(str(e), path, key) from None
            continue
        if key not in SCHEMA:
            raise PolicyError(f"unknown key{_suggest(key, list(SCHEMA) + list(TOP_LEVEL))}", path, key)
        if not isinstance(value, dict):
            raise PolicyError("must be a table ([section])", path, key)
        section = {}
        for sub, v in value.items():
            spec = SCHEMA[key].get(sub)
            if spec is None:
                raise PolicyError(f"unknown key{_suggest(sub, SCHEMA[key])}", path, f"{key}.{sub}")
            try:
                section[sub] = spec[0](v)
            except ValueError as e:
                raise PolicyError(str(e), path, f"{key}.{sub}") from None
        out[key] = section
    return out


def defaults() -> dict:
    return {sec: {k: (list(d) if isinstance(d, list) else dict(d) if isinstance(d, dict) else d)
                  for k, (_, d) in keys.items()} for sec, keys in SCHEMA.items()}


# Lists that `extends` merges (the child adds to what the parent grants); everything else overrides.
MERGED_LISTS = {("filesystem", "read_only"), ("filesystem", "writable"), ("network", "families"),
                ("network", "connect"),
                ("environment", "pass"), ("python", "preload"), ("seccomp", "groups"), ("seccomp", "allow"),
                ("seccomp", "allow_dangerous"), ("seccomp", "rule")}
MERGED_MAPS = {("environment", "set"), ("seccomp", "errno")}
# Keys that belong to the one file that sets them: `extends` never passes them on. An explicit
# gid names one policy's files; two policies extending one base must not end up sharing it.
NOT_INHERITED = {("identity", "gid")}


def merge(base: dict, child: dict) -> dict:
    out = {sec: dict(vals) for sec, vals in base.items()}
    for sec, k in NOT_INHERITED:
        out[sec][k] = SCHEMA[sec][k][1]
    for sec, vals in child.items():
        if sec in TOP_LEVEL:
            continue
        for k, v in vals.items():
            if (sec, k) in MERGED_LISTS:
                out[sec][k] = out[sec][k] + [x for x in v if x not in out[sec][k]]
            elif (sec, k) in MERGED_MAPS:
                out[sec][k] = {**out[sec][k], **v}
            else:
                out[sec][k] = v
    return out
