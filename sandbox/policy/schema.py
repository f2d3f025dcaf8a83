"""The policy file's shape: sections, keys, types, defaults, and checks with clear errors."""
import difflib
import errno as errno_mod

from ..errors import PolicyError

MIB = 1024 * 1024

# key -> (checker, default). A checker returns the cleaned value or raises ValueError(reason).


def _number(lo=None, hi=None, integer=False):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            raise ValueError(f"must be {'an integer' if integer else 'a number'}, not {type(v).__name__} {v!r}")
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
    return list(v)


def _str_map(v):
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise ValueError("must be a table of string values")
    return dict(v)


def _uid_range(v):
    if (not isinstance(v, list) or len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            or not 0 < v[0] <= v[1] < 2**32 - 1):
        raise ValueError("must be [first, last] with 0 < first <= last < 4294967295 (uid 0 is never used)")
    return tuple(v)


def _action(v):
    if v not in ("kill", "errno"):
        raise ValueError(f'must be "kill" or "errno", not {v!r}')
    return v


def _errno_name(v):
    if not isinstance(v, str) or not isinstance(getattr(errno_mod, v, None), int):
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


SCHEMA = {
    "limits": {
        "timeout": (_number(lo=0.001, hi=86400), 10.0),
        "cpu_seconds": (_number(lo=1, hi=86400, integer=True), 60),
        "memory_mb": (_number(lo=16, hi=1 << 20, integer=True), 512),
        "open_files": (_number(lo=8, hi=1 << 20, integer=True), 64),
        "file_size_mb": (_number(lo=0, hi=1 << 20, integer=True), 0),
        "max_message_bytes": (_number(lo=1024, hi=1 << 30, integer=True), 16 * MIB),
        "processes": (_number(lo=0, hi=4096, integer=True), 0),
    },
    "identity": {"uid_range": (_uid_range, (200000, 265535))},
    "filesystem": {"read_only": (_list_of_str, []), "writable": (_list_of_str, []), "scratch": (_bool, False)},
    "network": {"allow": (_bool, False), "families": (_families, [])},
    "environment": {"pass": (_list_of_str, []), "set": (_str_map, {})},
    "python": {"preload": (_list_of_str, [])},
    "seccomp": {
        "default_action": (_action, "kill"),
        "default_errno": (_errno_name, "EPERM"),
        "groups": (_list_of_str, []),
        "allow": (_list_of_str, []),
        "allow_dangerous": (_list_of_str, []),
        "errno": (_errno_map, {}),
        "rule": (_rules, []),
    },
}
TOP_LEVEL = {"description": _str, "extends": _str}


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
                ("environment", "pass"), ("python", "preload"), ("seccomp", "groups"), ("seccomp", "allow"),
                ("seccomp", "allow_dangerous"), ("seccomp", "rule")}
MERGED_MAPS = {("environment", "set"), ("seccomp", "errno")}


def merge(base: dict, child: dict) -> dict:
    out = {sec: dict(vals) for sec, vals in base.items()}
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
