"""The host's cache of Landlock rulesets, one per distinct set of paths (runs in the host).

Building a ruleset costs an open() and a landlock_add_rule() per path (about 0.1 ms for the
default policy); the host builds each distinct one once and passes its descriptor with the
spawn request. The zygote only relays the descriptor, so it learns no path; each worker
applies the ruleset and closes it (restricting oneself with a ruleset does not change it).
"""
import os
import threading

from ..child import grant_paths, landlock
from ..protocol.plan import Landlock

MAX_CACHED = 64
_cache: dict[tuple, int] = {}
_lock = threading.Lock()
_abi: int | None = None
# Never use a Landlock ABI above this one (None: the kernel's own). Goes into every plan, so the
# host's rulesets and a worker that builds its own agree; a test (or a cautious operator) sets it
# to make this kernel behave as an older one, never a newer one.
ABI_MAX: int | None = None


def shared_ruleset(ll: Landlock, worker_writable: tuple[str, ...] = ()) -> int | None:
    """The cached ruleset fd for these rules (still the cache's: don't close it), or None when
    the worker must build its own: paths under /proc/self mean the worker's own /proc entry,
    which only it can resolve; and when this ABI lacks a layer the plan needs (no Landlock, no
    TCP rules for `connect`, no abstract-socket scope for unix sockets) the worker checks again
    and refuses to start, naming the layer."""
    global _abi
    if any(p == "/proc/self" or p.startswith("/proc/self/") for p in ll.read + ll.write):
        return None
    key = (ll.read, ll.write, ll.tcp, ll.connect, ll.abi_max)
    with _lock:
        fd = _cache.get(key)
        if fd is not None:
            return fd
        if _abi is None:
            _abi = landlock.abi_version()
        abi = _abi if ll.abi_max is None else min(_abi, ll.abi_max)
        if abi < 1:
            return None
        try:
            landlock.require(abi, port_rules=ll.tcp == "ports", unix_sockets=ll.unix)
        except landlock.MissingLayer:
            return None
        if len(_cache) >= MAX_CACHED:
            for old in _cache.values():
                os.close(old)
            _cache.clear()
        try:
            fd = landlock.build_ruleset(list(ll.read), list(ll.write), abi=abi, tcp=ll.tcp,
                                        connect_ports=ll.connect, worker_writable=worker_writable)
        except grant_paths.UnsafeGrant:
            raise  # a link a worker could have made: the start is refused, saying which
        except OSError:
            return None  # the worker builds its own and reports what fails
        _cache[key] = fd
        return fd
