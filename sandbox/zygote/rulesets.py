"""The zygote's cache of Landlock rulesets, one per distinct set of paths (runs in the zygote).

Building a ruleset costs an open() and a landlock_add_rule() per path; the zygote builds each
distinct one once and hands the workers a descriptor of it, which each applies and closes.
"""
import os

from ..child import landlock

MAX_CACHED = 64
_cache: dict[tuple, int] = {}


def shared_ruleset(ll: dict | None) -> int | None:
    """The cached ruleset for this plan, or None when the child must build its own (paths under
    /proc mean the worker's own /proc, mounted for its PID namespace, and a scratch folder the
    worker's own tmpfs: only the worker can resolve those)."""
    if ll is None or any(p == "/proc" or p.startswith("/proc/") for p in ll["read"] + ll["write"]):
        return None
    if ll.get("scratch"):
        return None  # the worker's scratch is a tmpfs only it can see: it builds its own ruleset
    abi_max = ll.get("abi_max")  # a cap on the ABI used (tests simulate older kernels with it)
    key = (tuple(ll["read"]), tuple(ll["write"]), ll["network"], ll["abstract_unix"], abi_max)
    fd = _cache.get(key)
    if fd is None:
        abi = landlock.abi_version(abi_max)
        if abi < 1:
            return None  # the child will fail closed with the reason
        if len(_cache) > MAX_CACHED:
            for old in _cache.values():
                os.close(old)
            _cache.clear()
        fd = _cache[key] = landlock.build_ruleset(ll["read"], ll["write"], abi=abi, deny_tcp=not ll["network"],
                                                  scope_abstract_unix=not ll["abstract_unix"])
    return fd
