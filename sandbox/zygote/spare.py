"""One pre-forked, unspecialised child kept ready by the zygote (Android calls these USAPs).

Forking a Python process is cheap; what a new child pays for is the copy-on-write fault on
every page it writes, and its first pass through the runtime's code touches a few hundred.
A spare pays the fork and that warm-up while the zygote is idle. When a spawn request comes,
the zygote hands the spare the worker's descriptors over a private socket; the spare reads its
plan from the host on the first of them and specialises exactly as a freshly forked child
would: same confinement steps, same order.

The spare holds nothing between its fork and its plan: every descriptor the zygote had is
closed at once, and no plan, uid or plugin is known yet, since the zygote never has one. What
it knows is what any child of the zygote knows.
"""
import ctypes
import os
import resource
import signal
import socket
import types
from typing import Any

import prctl

from .. import protocol
from ..child import landlock, minimal_view, seccomp, serve, steps, syscalls as _sys
from ..protocol import framing, plan as plan_wire
from ..protocol.zygote import WORKER_FD_COUNT
from .pidns import fork_worker


TEMPLATE_SPARE_NAME = "sandbox-tspare"  # comm of a template's spare (ps, top)


class Spare:
    """The zygote's side: at most one spare at a time. A warm template keeps one too
    (template.py), given the zygote's pid: its spare is then the zygote's child (CLONE_PARENT),
    like every worker, and dies with the zygote."""

    def __init__(self, zygote: int | None = None):
        self.pid: int | None = None
        self._sock: Any = None  # a socket while there is a spare
        self._zygote = zygote

    def fork(self) -> None:
        if self.pid is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        zygote = self._zygote or os.getpid()
        try:
            pid = fork_worker(parent=self._zygote is not None)  # a PID namespace of its own (pidns.py)
        except OSError:  # none for now: the next request forks on demand, then tries again
            ours.close()
            theirs.close()
            return
        if pid == 0:
            ours.detach()
            if self._zygote is not None:
                prctl.set_name(TEMPLATE_SPARE_NAME)  # not the template's name, which it inherited
            _spare_main(theirs, zygote)
        theirs.close()
        self.pid, self._sock = pid, ours

    def hand_off(self, fds: list[int]) -> int | None:
        """Give the spare a worker's descriptors (it reads its plan from the first; a Landlock
        ruleset may follow them): its pid, or
        None when a fresh fork must serve instead."""
        if self.pid is None:
            return None
        pid, sock = self.pid, self._sock
        self.pid = self._sock = None
        try:
            socket.send_fds(sock, [b"W"], fds)
        except OSError:
            if self._zygote is None:
                _kill(pid)  # it died or is wedged: either way it is not a worker
            # (a template's spare is the zygote's to reap: its pid may be another's by now,
            # and it is dead already, or ends at EOF on the socket closed below)
            return None
        finally:
            sock.close()
        return pid

    def reaped(self, pid: int) -> bool:
        """The zygote reaped `pid`: True if it was the (unused) spare, which is then gone."""
        if pid != self.pid:
            return False
        self._sock.close()
        self.pid = self._sock = None
        return True

    def kill(self):
        if self.pid is None:
            return
        if self._zygote is None:
            _kill(self.pid)
        else:  # not by pid (see hand_off): EOF on its socket ends it
            self._sock.close()
            self.pid = self._sock = None


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _spare_main(sock: socket.socket, zygote: int) -> None:
    """In the spare: drop every zygote descriptor, warm up, wait for a plan; never returns."""
    code = 0
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        prctl.set_pdeathsig(signal.SIGKILL)  # no zygote, no use: die with it
        fd = sock.fileno()
        _sys.close_range(3, fd - 1) if fd > 3 else None
        _sys.close_range(fd + 1)
        # The worker's own session now, while idle: setsid() also makes a new scheduler
        # autogroup, and a task just moved into one can wait behind every runnable process for
        # its first slice (milliseconds on a loaded host). The new_session step sees it done.
        try:
            os.setsid()
        except OSError:
            pass  # the step does it (and fails loudly if it cannot)
        try:
            warm_up()
        except Exception:  # noqa: BLE001 - only a speed-up: a spare that skipped it is still sound
            pass
        msg, fds, _, _ = socket.recv_fds(sock, 1, WORKER_FD_COUNT + 1)
        sock.close()
        if msg != b"W" or len(fds) not in (WORKER_FD_COUNT, WORKER_FD_COUNT + 1):
            os._exit(0)  # the zygote is closing, or sent nonsense: nothing to become
        # if the zygote died meanwhile, getppid() differs and die_with_parent exits
        serve.child_main(fds[:WORKER_FD_COUNT], zygote, fds[WORKER_FD_COUNT] if len(fds) > WORKER_FD_COUNT else None)
    except BaseException:  # noqa: BLE001 - a spare must never fall back into zygote code
        code = 70
    os._exit(code)


def warm_up() -> None:
    """Walk the paths every worker takes, on harmless input, so their page faults are paid now
    (by a spare, and by a warm template once it has imported: template.py).

    Only pure computation: nothing here changes the process's credentials, limits or fds."""
    limits = protocol.Limits(max_bytes=1 << 20)
    payload = protocol.dumps(["ping", [1, "x", b"y", 1.5, None, True], {"k": [{}]}])
    frame = framing.encode_frame(framing.CALL, 1, payload)
    for f in framing.FrameDecoder(1 << 20, framing.HOST_TYPES).feed(frame):
        protocol.loads(f.payload, limits)
    compile("def f(x):\n    return x\n", "<warm-up>", "exec")
    _warm_up_steps()
    _warm_up_serve()


def _warm_up_serve() -> None:
    """The child's own first steps: a plan decoded (a made-up one: the spare has none), a file
    read the way worker.py is (this module's own source), a module's exports listed."""
    sample = plan_wire.Plan(
        plugin="/nonexistent/worker.py", module_name="warm_up", title="sandbox: warm-up", uid=None,
        gid=None, rlimits={"core": 0, "nproc": None}, env={"K": "v"}, preload=(),
        landlock=plan_wire.Landlock(read=("/usr/lib",), write=(), network=False, connect=(), unix=False,
                                    abi_max=None),
        bpf=b"\0" * 64, notify=True, max_frame=1 << 20, own_userns=False, may_fork=False, cwd="/",
        scratch=None, scratch_bytes=0, scratch_inodes=0, unix_sockets=(), worker_writable=())
    plan_wire.decode(plan_wire.encode(sample))
    serve.read_plugin_file(os.path.abspath(__file__))
    _sys.libc.setfsuid(-1), _sys.libc.setfsgid(-1)  # -1 changes nothing: only the lookups are paid
    os.getgroups()
    module = types.ModuleType("warm_up")
    exec(compile("def f(x):\n    return x\n", "<warm-up>", "exec"), module.__dict__)
    serve._exports(module)


def _warm_up_steps() -> None:
    """The ctypes and prctl paths the confinement steps take, through read-only queries."""
    for res in (resource.RLIMIT_AS, resource.RLIMIT_NOFILE):
        resource.getrlimit(res)
    _sys.libc.prctl(27, 0, 0, 0, 0)  # PR_GET_SECUREBITS
    _sys.libc.prctl(39, 0, 0, 0, 0)  # PR_GET_NO_NEW_PRIVS
    _sys.libc.prctl(steps.PR_CAP_AMBIENT, 1, 0, 0, 0)  # PR_CAP_AMBIENT_IS_SET
    steps.bounding_set_is_full()
    prctl.get_pdeathsig()
    prctl.get_dumpable()
    ctypes.get_errno()
    os.getresuid(), os.getresgid(), os.getppid()
    landlock.abi_version()
    seccomp.action_available()
    minimal_view.warm_up([os.path.dirname(os.__file__), "/usr/lib"])  # paths only to walk the code
