"""The forked child's confinement: one small named step each, in the order the kernel needs,
with `STEPS` (the order) right after them. Runs in the forked child only.

Each step takes (plan, state): `plan` is the typed Plan the host built before fork,
`state` carries what one step hands to the next. Any exception stops the worker before the
plugin's first line runs; the serve loop reports which step failed.

The order is the kernel's, not taste: fds and session first (nothing inherited survives);
the proof that we are pid 1 of a PID namespace of our own (zygote/pidns.py); the read-only
mount view (child/mounts.py) while we may still mount, in the zygote's user namespace;
a user namespace of its own before the rlimits (the namespace records the limit in force when
it is made, and then caps every level above with it); Landlock while we may still restrict
ourselves; the credential change (which clears PDEATHSIG and resets dumpable, so those come
right after it); preloads while syscalls are still free; no_new_privs; seccomp last, because
every step before it makes syscalls the plugin must not.
"""
import ctypes
import fcntl
import importlib
import os
import resource
import signal
import socket

import prctl

from ..zygote import pidns
from . import landlock, minimal_view, mounts, seccomp, syscalls as _sys

from ..protocol.zygote import FROM_HOST, HANDOFF, STDERR, STDIN, STDOUT, TO_HOST  # noqa: F401 - the fixed numbers

PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
PR_CAPBSET_READ, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 23, 24, 28
# NOROOT (+lock), NO_CAP_AMBIENT_RAISE (+lock), and KEEP_CAPS / NO_SETUID_FIXUP locked *off*, so
# the setuid away from root clears every capability and nothing can turn that off again.
SECUREBITS_LOCKED_DOWN = 0x01 | 0x02 | 0x08 | 0x20 | 0x40 | 0x80
try:
    with open("/proc/sys/kernel/cap_last_cap") as _f:
        _LAST_CAP = int(_f.read())
except OSError:
    _LAST_CAP = 40
host_pid: int | None = None  # this worker's pid as the host sees it (os.getpid() is 1 here), set by watch_self
RULESET = 6  # a Landlock ruleset prepared by the zygote, closed as soon as it is applied


def arrange_fds(plan, state):
    """Keep only the worker's own fds at fixed numbers; close everything else the zygote had."""
    src = state.pop("fds")  # [from_host_r, to_host_w, handoff, log_w]
    ruleset = state.pop("ruleset", None)
    if ruleset is not None:
        src = src + [ruleset]
    high = [_dup_high(fd) for fd in src]
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, STDIN)
    for target, fd in ((FROM_HOST, high[0]), (TO_HOST, high[1]), (HANDOFF, high[2]),
                       (STDOUT, high[3]), (STDERR, high[3])):
        os.dup2(fd, target)  # dup2 clears CLOEXEC on the target
    if ruleset is not None:
        os.dup2(high[4], RULESET)
        state["ruleset"] = RULESET
    _sys.close_range(RULESET + 1 if ruleset is not None else HANDOFF + 1)


def _dup_high(fd):
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100)


def pid_namespace(plan, state):
    """The zygote forked us as pid 1 of a PID namespace of our own (zygote/pidns.py): no other
    process on the machine can be addressed from here, and all we start dies with us. The
    evidence is our own pid, which only the first process of a new namespace has."""
    if not pidns.in_own_namespace():
        raise OSError(f"the worker has no PID namespace of its own: {pidns.refusal or 'it is not pid 1'}")


def watch_self(plan, state):
    """Open what die_with_parent reads about this very process while the host's /proc is still
    there (the view step mounts the worker's own, and Landlock may grant no /proc at all); an
    open descriptor keeps answering."""
    global host_pid
    fd = state["self_stat"] = os.open("/proc/self/stat", os.O_RDONLY | os.O_CLOEXEC)
    host_pid = int(os.pread(fd, 64, 0).split(b" ", 1)[0])  # as the host's /proc numbers us


def new_session(plan, state):
    """No controlling terminal (TIOCSTI needs one) and out of the host's process group. A spare
    made its session while it waited (zygote/spare.py); a fresh fork makes it here."""
    if os.getsid(0) != os.getpid():
        os.setsid()
    os.chdir(plan.cwd)


def clear_environment(plan, state):
    if os.environ:
        os.environ.clear()
    for key, value in plan.env.items():
        os.environ[key] = value


def own_user_namespace(plan, state):
    """Unprivileged host, policy allowing threads or processes: a user namespace of the
    worker's own. The uid is the host's, so RLIMIT_NPROC would count every process of that
    user; in a namespace of its own it counts this worker's tasks only (the kernel charges
    per user and namespace). Before the rlimits: the namespace keeps the RLIMIT_NPROC in force
    when it is made as the cap on the levels above, which count the host's processes too.
    Before Landlock: the maps are files in /proc/self."""
    if not plan.own_userns:
        return
    uid, gid = os.geteuid(), os.getegid()
    _sys.unshare(_sys.CLONE_NEWUSER)
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        fd = os.open(f"/proc/self/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def scratch_path(plan) -> str | None:
    """The worker's scratch folder: the plan's `scratch`, else its cwd when that is one of the
    writable paths (which is where the host puts the scratch folder)."""
    if hasattr(plan, "scratch"):
        return plan.scratch or None
    cwd = plan.cwd
    return cwd if cwd and cwd != "/" and cwd in plan.landlock.write else None


def read_only_view(plan, state):
    """A mount namespace where all is read-only but the writable paths, and scratch is a tmpfs
    with a quota (child/mounts.py says why); with the unix family, one that holds only the
    granted paths and the named sockets (child/minimal_view.py). Before Landlock, which forbids
    mount changes, and before a user namespace of the worker's own, from which it could not mount here."""
    scratch = scratch_path(plan)
    owner = (plan.uid, plan.gid if plan.gid is not None else plan.uid) if plan.uid is not None \
        else (os.geteuid(), os.getegid())
    quota = {"scratch_bytes": getattr(plan, "scratch_bytes", mounts.DEFAULT_SCRATCH_BYTES),
             "scratch_inodes": getattr(plan, "scratch_inodes", mounts.DEFAULT_SCRATCH_INODES)}
    if plan.landlock.unix:  # it may make unix sockets: a root of its grants only (minimal_view.py)
        minimal_view.build(list(plan.landlock.read), list(plan.landlock.write),
                           list(getattr(plan, "unix_sockets", ())), scratch, owner=owner,
                           worker_writable=plan.worker_writable, **quota)
    else:
        mounts.read_only_view(plan.landlock.write, scratch, owner=owner, worker_writable=plan.worker_writable,
                              **quota)
    if scratch:
        state["own_ruleset"] = "scratch is the worker's own tmpfs"
        os.chdir(plan.cwd or scratch)  # the old cwd is the host folder now hidden beneath
    if any(p == "/proc" or p.startswith("/proc/") for p in plan.landlock.read + plan.landlock.write):
        state["own_ruleset"] = "its /proc is the worker's own"


def set_rlimits(plan, state):
    for name, value in plan.rlimits.items():
        res = getattr(resource, "RLIMIT_" + name.upper())
        if value is None:
            continue
        soft, hard = resource.getrlimit(res)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        if name == "as":
            _check_room(value)
        resource.setrlimit(res, (value, value))


def _check_room(limit: int) -> None:
    """An address-space limit below what this worker has mapped already (what it inherited from
    the zygote) would fail later, anywhere, as a bare MemoryError, an import that "failed to map
    segment" or a silent exit: say so now, in the limit's words (a worker started at that size
    has nothing left to allocate)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            mapped = int(f.read(64).split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return  # no figure: the limit still applies, only this early word is lost
    if limit < mapped:
        raise MemoryError(f"limits.memory_mb = {limit >> 20} is below what the worker needs to start "
                          f"(~{-(-mapped >> 20)} MiB, mapped before its plugin loads)")


def restrict_filesystem(plan, state):
    """Landlock: the paths, the TCP ports, the scopes. What this kernel cannot enforce of what the
    plan needs (TCP port rules, the abstract-socket scope) is refused here, naming the layer,
    whether the host prepared the ruleset or not: the ABI answer is this worker's own."""
    ll = plan.landlock
    abi = landlock.abi_version(ll.abi_max)
    ruleset = state.pop("ruleset", None)
    try:
        if abi >= 1:
            landlock.require(abi, port_rules=ll.tcp == "ports", unix_sockets=ll.unix)
    except BaseException:
        if ruleset is not None:
            os.close(ruleset)
        raise
    if ruleset is not None and state.get("own_ruleset"):
        # the host's ruleset names the host's inodes: its scratch folder, not the tmpfs over it,
        # and the host's /proc, not the worker's
        os.close(ruleset)
        ruleset = None
    if ruleset is not None:
        try:
            landlock.restrict_self(ruleset)
        finally:
            os.close(ruleset)
        return
    if abi < 1:
        raise OSError("Landlock is not available in this kernel (the policy's filesystem rules need it)")
    landlock.restrict(list(ll.read), list(ll.write), abi=abi, tcp=ll.tcp, connect_ports=ll.connect,
                      worker_writable=plan.worker_writable)


def drop_privileges(plan, state):
    """Root: a uid unique to this worker, its policy's gid, no groups, no capabilities, locked securebits."""
    uid, gid = plan.uid, plan.gid
    if uid is not None:
        if uid == 0 or gid == 0:
            raise OSError("refusing to run a worker as uid/gid 0")
        # No way back to root through exec or uid tricks, and the bits can't be unset.
        _prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_DOWN, "lock securebits")
        if bounding_set_is_full():
            drop_bounding_set()
        os.setgroups([])
        os.setresgid(gid, gid, gid)  # the policy's gid, shared by its workers only (_host/gids.py)
        os.setresuid(uid, uid, uid)
        os.umask(0o007)  # what it writes is its policy's: group read-write for the next worker, nothing for others
    elif prctl.cap_effective.setpcap and bounding_set_is_full():
        drop_bounding_set()  # unprivileged, but holding caps in a user namespace of its own
    _clear_capabilities()
    _sys.check(_sys.libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient caps")
    _prove_no_root()


def _prctl(option, arg, what):
    _sys.check(_sys.libc.prctl(option, arg, 0, 0, 0), what)


def bounding_set_is_full() -> bool:
    """Evidence, not an inherited flag: a worker that made a user namespace of its own got a
    full bounding set back with it, whatever the zygote dropped before the fork."""
    return _sys.libc.prctl(PR_CAPBSET_READ, 0, 0, 0, 0) == 1


def drop_bounding_set() -> None:
    """Empty the bounding set (41 prctl calls): the zygote does it once for all its workers."""
    for cap in range(_LAST_CAP + 1):
        _prctl(PR_CAPBSET_DROP, cap, f"drop capability {cap} from the bounding set")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


def _clear_capabilities():
    """Effective, permitted and inheritable all empty, in one capset()."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (ctypes.c_uint32 * 6)()
    _sys.check(_sys.libc.capset(ctypes.byref(header), data), "capset")


def _prove_no_root():
    try:
        os.setuid(0)
    except OSError:
        pass  # EPERM; or EINVAL in a user namespace where uid 0 is not even mapped
    else:
        if os.getuid() == 0 and os.geteuid() == 0 and _is_real_root():
            raise OSError("privilege drop failed: setuid(0) still succeeds")
    if os.geteuid() == 0 and _is_real_root():
        raise OSError("privilege drop failed: still euid 0")


def _is_real_root():
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split()[:3] == ["0", "0", "4294967295"]
    except OSError:
        return True


def die_with_parent(plan, state):
    """After the credential change, which clears PDEATHSIG and resets dumpable."""
    prctl.set_pdeathsig(signal.SIGKILL)
    if _parent_pid(state) != state["zygote_pid"]:
        os._exit(1)  # the zygote died before PDEATHSIG was armed
    prctl.set_dumpable(False)


def _parent_pid(state) -> int:
    """Our parent's pid as the zygote numbers it. getppid() says 0 in a PID namespace of our
    own (the parent lives outside it); /proc/self/stat, opened before Landlock, counts in the
    namespace /proc was mounted for, the zygote's."""
    fd = state.pop("self_stat", None)
    if fd is None:
        return os.getppid()
    try:
        data = os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    return int(data.rsplit(b")", 1)[1].split()[1])


class PreloadFailed(Exception):
    """A `[python] preload` module failed to import: reported as a load error naming it, whatever
    it raised (OpenBLAS that cannot start its threads raises SIGINT: a KeyboardInterrupt here)."""

    def __init__(self, module: str, error: BaseException):
        hint = (" (a SIGINT during the import: OpenBLAS sends one when it cannot start its threads; "
                "grant threads or set OPENBLAS_NUM_THREADS=1)") if isinstance(error, KeyboardInterrupt) else ""
        super().__init__(f"preload {module!r} failed: {type(error).__name__}: {error}{hint}")
        self.module = module


def preload_modules(plan, state):
    for name in plan.preload:
        try:
            importlib.import_module(name)
        except BaseException as e:  # noqa: BLE001 - named and reported, never swallowed
            raise PreloadFailed(name, e) from e


def no_new_privs(plan, state):
    seccomp.set_no_new_privs()


def install_seccomp(plan, state):
    """Last step: the policy's BPF; the listener fd goes to the host and never stays here."""
    bpf = plan.bpf
    if not bpf:
        raise OSError("no seccomp program in the plan: refusing to run unconfined")
    # built before the filter (construction makes syscalls); family and type given: no probing
    hand = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=HANDOFF)
    listener = seccomp.install_filter(bpf, listener=plan.notify)
    if listener is not None:
        try:
            socket.send_fds(hand, [b"L"], [listener])
        finally:
            os.close(listener)
    hand.detach()
    os.close(HANDOFF)


# The order is the kernel's, not taste (see the module docstring).
STEPS = (
    ("arrange_fds", arrange_fds),
    ("pid_namespace", pid_namespace),
    ("watch_self", watch_self),
    ("new_session", new_session),
    ("clear_environment", clear_environment),
    ("read_only_view", read_only_view),
    ("own_user_namespace", own_user_namespace),
    ("set_rlimits", set_rlimits),
    ("restrict_filesystem", restrict_filesystem),
    ("drop_privileges", drop_privileges),
    ("die_with_parent", die_with_parent),
    ("preload_modules", preload_modules),
    ("no_new_privs", no_new_privs),
    ("install_seccomp", install_seccomp),
)


class StepFailed(Exception):
    def __init__(self, step: str, error: BaseException):
        super().__init__(f"confinement step {step!r} failed: {type(error).__name__}: {error}")
        self.step = getattr(error, "layer", None) or step  # a layer the step found missing, by name
        self.error = error


def apply(plan, state: dict) -> None:
    for name, step in STEPS:
        try:
            step(plan, state)
        except Exception as e:
            raise StepFailed(name, e) from None
