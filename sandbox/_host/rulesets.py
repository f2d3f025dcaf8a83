"""The host's cache of Landlock rulesets, one per distinct set of paths (runs in the host).

Building a ruleset costs an open() and a landlock_add_rule() per path (about 0.1 ms for the
default policy); the host builds each distinct one once and passes its descriptor with the
spawn request. The zygote only relays the descriptor, so it learns no path; each worker
applies the ruleset and closes it (restricting oneself with a ruleset does not change it).
"""
import os
import threading

from ..child import landlock
from ..protocol.plan import Landlock

MAX_CACHED = 64
_cache: dict[tuple, int] = {}
_lock = threading.Lock()
_abi: int | None = None


def shared_ruleset(ll: Landlock) -> int | None:
    """The cached ruleset fd for these rules (still the cache's: don't close it), or None when
    the worker must build its own: paths under /proc/self mean the worker's own /proc entry,
    which only it can resolve, and without Landlock the worker fails closed with the reason."""
    global _abi
    if any(p == "/proc/self" or p.startswith("/proc/self/") for p in ll.read + ll.write):
        return None
    key = (ll.read, ll.write, ll.network, ll.abstract_unix)
    with _lock:
        fd = _cache.get(key)
        if fd is not None:
            return fd
        if _abi is None:
            _abi = landlock.abi_version()
        if _abi < 1:
            return None
        if len(_cache) >= MAX_CACHED:
            for old in _cache.values():
                os.close(old)
            _cache.clear()
        try:
            fd = landlock.build_ruleset(list(ll.read), list(ll.write), abi=_abi, deny_tcp=not ll.network,
                                        scope_abstract_unix=not ll.abstract_unix)
        except OSError:
            return None  # the worker builds its own and reports what fails
        _cache[key] = fd
        return fd
