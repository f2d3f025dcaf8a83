"""`fork_worker()`: os.fork(), except that the child is pid 1 of a PID namespace of its own.

Why: a worker then addresses no process outside its own tree (kill, tgkill, getsid, pidfd_open
of any other pid find nothing: ESRCH), on every kernel, whatever Landlock's ABI; and when the
worker dies the kernel kills everything it started before the zygote can reap it, however the
worker, the zygote or the host ended.

How: clone(CLONE_NEWPID) puts only the new child in the new namespace and leaves the zygote's
own pid_ns_for_children alone, so no unshare/setns dance is needed -- which matters for an
unprivileged zygote: its user namespace may create PID namespaces, but setns() back into the
host's PID namespace needs CAP_SYS_ADMIN over the host's user namespace. Python has no clone,
so this mirrors what os.fork() does around glibc's fork(): PyOS_BeforeFork, the clone syscall
with glibc's own flags (the child's thread descriptor learns its new tid through
CLONE_CHILD_SETTID, as glibc's fork arranges), then PyOS_AfterFork_Child/_Parent. The zygote
is single-threaded, so no lock glibc's fork would take can be held by another thread.

The child also enters a private mount namespace of its own at once (child/mounts.py): that
needs no plan, so a spare pays for it while the zygote is idle.

A warm template (template.py) forks its workers with `fork_worker(parent=True)`: CLONE_PARENT
makes the worker the zygote's child, not the template's, so the zygote reaps it, reports its
status and opens its pidfd exactly as for a worker it forked itself.

When the kernel refuses the namespace (no CAP_SYS_ADMIN, user.max_pid_namespaces reached) a
plain fork serves instead and `refusal` says why; the child's first confinement step sees that
it is not pid 1 and refuses to start, naming the layer. Never a silent weaker worker.
"""
import ctypes
import errno
import os

from ..child import mounts

SYS_clone = 56  # x86_64
CLONE_NEWPID = 0x20000000
CLONE_PARENT = 0x00008000
CLONE_CHILD_CLEARTID = 0x00200000
CLONE_CHILD_SETTID = 0x01000000
SIGCHLD = 17
PR_GET_TID_ADDRESS = 40
# Errors that mean "no PID namespace for us here", as opposed to "no process at all" (EAGAIN, ENOMEM).
NO_NAMESPACE = {errno.EPERM, errno.EINVAL, errno.ENOSPC, errno.EUSERS}

# PyDLL: the GIL stays held across the syscall, exactly as os.fork() holds it across fork().
_py = ctypes.PyDLL(None, use_errno=True)
_py.syscall.restype = ctypes.c_long
_py.prctl.restype = ctypes.c_int
_api = ctypes.pythonapi
for _fn in (_api.PyOS_BeforeFork, _api.PyOS_AfterFork_Parent, _api.PyOS_AfterFork_Child):
    _fn.argtypes, _fn.restype = [], None

refusal: str | None = None  # why the last fork_worker() could not make a namespace (inherited by that child)
_tid_address: int | None = None


def _own_tid_address() -> int:
    """Where glibc keeps this thread's tid (what it gave set_tid_address at start), or 0."""
    global _tid_address
    if _tid_address is None:
        addr = ctypes.c_void_p()
        ok = _py.prctl(PR_GET_TID_ADDRESS, ctypes.byref(addr), 0, 0, 0) == 0
        _tid_address = (addr.value or 0) if ok else 0
    return _tid_address


def _clone(flags: int, ctid: int) -> int:
    """clone() as os.fork() would do it; in the child, a private mount namespace is entered."""
    _api.PyOS_BeforeFork()
    pid = _py.syscall(SYS_clone, ctypes.c_ulong(flags), None, None, ctypes.c_void_p(ctid or None), None)
    err = ctypes.get_errno()
    if pid == 0:
        _api.PyOS_AfterFork_Child()
        mounts.enter_private_namespace()  # needs no plan: a spare pays for it while the zygote idles
        return 0
    _api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone({'CLONE_NEWPID' if flags & CLONE_NEWPID else 'CLONE_PARENT'}): "
                           f"{os.strerror(err)}")
    return pid


def fork_worker(parent: bool = False) -> int:
    """Like os.fork(); the child is pid 1 of a new PID namespace, or (kernel refused) `refusal` is set.
    With `parent`, the child is our parent's child (CLONE_PARENT), not ours, in either case."""
    global refusal
    ctid = _own_tid_address()
    flags = SIGCHLD | ((CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID) if ctid else 0) | (CLONE_PARENT if parent else 0)
    try:
        pid = _clone(flags | CLONE_NEWPID, ctid)
    except OSError as e:
        if e.errno not in NO_NAMESPACE:
            raise  # no memory, no pids: the same failure os.fork() would report
        refusal = f"the kernel refused a PID namespace ({errno.errorcode.get(e.errno, e.errno)}: {e.strerror})"
        # still our parent's child when asked: the zygote must be able to reap it; its first
        # confinement step then refuses to start, naming the missing layer
        return _clone(flags, ctid) if parent else os.fork()
    refusal = None
    return pid


def in_own_namespace() -> bool:
    """True in a worker that is pid 1 of its namespace: the zygote's children can be pid 1 nowhere else."""
    return os.getpid() == 1
