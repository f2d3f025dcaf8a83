"""Host side of the zygote: start it once (lazily), ask it for workers, restart it if it died.

One zygote per namespace profile: workers without network come from a zygote living in an
empty network namespace; a policy that grants network gets a zygote without one.
"""
import contextvars
import os
import socket
import subprocess
import sys
import logging
import threading

import msgpack

from ..errors import ConfinementError, SandboxError, ZygoteDied

log = logging.getLogger("sandbox")
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # sandbox/
_PKG_ROOT = os.path.dirname(_PKG_DIR)
_ZYGOTE_MAIN = os.path.join(_PKG_DIR, "zygote", "__main__.py")
REPLY_TIMEOUT = 10.0
# How long a spawn may wait for the zygote (its lock, then its reply): a handle sets it to what
# is left of its start_timeout, so that a stopped zygote can't hold a start past its bound.
spawn_timeout: contextvars.ContextVar[float] = contextvars.ContextVar("spawn_timeout", default=REPLY_TIMEOUT)


def runtime_paths() -> list[str]:
    """What every worker must be able to read: the interpreter, its stdlib, site-packages, us."""
    # the sandbox package itself, not the folder around it (in a checkout that is the whole repository)
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, _PKG_DIR,
             os.path.dirname(os.path.realpath(sys.executable))}
    import sysconfig
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            paths.add(p)
    for mod in ("msgpack", "prctl"):
        m = sys.modules.get(mod) or __import__(mod)
        f = getattr(m, "__file__", None)
        if f:
            paths.add(os.path.dirname(os.path.realpath(f)))
    return sorted(os.path.realpath(p) for p in paths)


def site_paths() -> list[str]:
    """site-packages folders for plugins' imports (the zygote runs without `site`)."""
    import site
    import sysconfig
    found = [sysconfig.get_paths().get(k) for k in ("purelib", "platlib")] + list(site.getsitepackages())
    return list(dict.fromkeys(p for p in found if p and os.path.isdir(p)))


class Zygote:
    def __init__(self, namespaces: tuple[str, ...]):
        self.namespaces = namespaces
        self._lock = threading.Lock()
        self._proc = None
        self._ctl = None
        self.report: dict = {}

    def _start(self):
        host_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # PDEATHSIG fires when the *thread* that started the zygote ends, so it is only asked for
        # when that thread is the main one; otherwise EOF on the control socket does the job alone.
        pdeath = ["pdeathsig"] if threading.current_thread() is threading.main_thread() else []
        args = [sys.executable, "-I", "-S", "-B", _ZYGOTE_MAIN,
                str(child_end.fileno()), *pdeath, *self.namespaces, *(f"path:{p}" for p in site_paths()),
                *(f"expose:{p}" for p in runtime_paths())]
        try:
            self._proc = subprocess.Popen(args, env={}, pass_fds=[child_end.fileno()], close_fds=True,
                                          stdin=subprocess.DEVNULL, cwd="/",
                                          # out of the host's process group: a terminal's Ctrl-C is
                                          # the host's to handle, not a reason for the zygote to die
                                          start_new_session=True)
        finally:
            child_end.close()
        host_end.settimeout(REPLY_TIMEOUT)
        try:
            hello = msgpack.unpackb(host_end.recv(65536), raw=False)
        except (OSError, ValueError) as e:
            self._proc.kill()
            self._proc.wait()
            raise ConfinementError(f"the zygote did not start: {e}", layer="zygote") from None
        if "ready" not in hello:
            raise ConfinementError(f"the zygote did not start: {hello}", layer="zygote")
        self._ctl = host_end
        self.report = hello
        for problem in hello.get("errors", ()):
            # Not fatal (seccomp still refuses socket() without a network grant), never silent.
            log.warning("sandbox zygote: %s unavailable; workers run without it", problem)

    @property
    def pid(self):
        return self._proc.pid if self._proc else None

    def spawn(self, plan: dict, fds: list[int]) -> tuple[int, int]:
        """Fork a worker; returns (pid, pidfd). The zygote never sees anything but the plan."""
        payload = msgpack.packb(plan, use_bin_type=True)
        limit = spawn_timeout.get()
        if not self._lock.acquire(timeout=limit):
            raise ZygoteDied(f"the zygote did not answer within {limit:g} s (another start holds it)")
        try:
            for attempt in (0, 1):
                if self._ctl is None or self._proc.poll() is not None:
                    self._restart()
                try:
                    self._ctl.settimeout(limit)
                    socket.send_fds(self._ctl, [payload], fds)
                    msg, got, _, _ = socket.recv_fds(self._ctl, 65536, 1)
                except socket.timeout:
                    # stopped or wedged: it is no use to anyone now; the next start gets a new one
                    self._kill()
                    raise ZygoteDied(f"the zygote did not answer within {limit:g} s") from None
                except (BrokenPipeError, ConnectionResetError) as e:
                    self._kill()
                    if attempt:
                        raise ZygoteDied(f"zygote failed: {e}") from None
                    continue
                if not msg:
                    self._kill()
                    continue
                reply = msgpack.unpackb(msg, raw=False)
                if "pid" not in reply or len(got) != 1:
                    for fd in got:
                        os.close(fd)
                    raise SandboxError(f"zygote refused the spawn: {reply.get('error', reply)}")
                return reply["pid"], got[0]
            raise ZygoteDied("zygote died twice while spawning")
        finally:
            self._lock.release()

    def _restart(self):
        self._kill()
        self._start()

    def _kill(self):
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def close(self):
        with self._lock:
            self._kill()

    def ensure_started(self):
        with self._lock:
            if self._ctl is None or self._proc.poll() is not None:
                self._restart()
        return self.report


_zygotes: dict[tuple, Zygote] = {}
_zlock = threading.Lock()


def get(network: bool) -> Zygote:
    ns = ("ipc", "uts") if network else ("net", "ipc", "uts")
    with _zlock:
        z = _zygotes.get(ns)
        if z is None:
            z = _zygotes[ns] = Zygote(ns)
        return z


def _after_fork_in_child():
    global _zygotes, _zlock
    # The parent's zygotes answer the parent: a forked child asking them would mix its replies
    # with the parent's. Forget them without closing or killing anything (that would end the
    # parent's workers); the child starts zygotes of its own on first use.
    # (Closing our copy of a control socket is harmless: the zygote sees EOF only when the
    # parent's copy closes too.)
    for z in _zygotes.values():
        z._proc = None       # never kill() the parent's zygote from here
        z._ctl = None
    _zygotes, _zlock = {}, threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def shutdown_all():
    with _zlock:
        for z in _zygotes.values():
            z.close()
        _zygotes.clear()
