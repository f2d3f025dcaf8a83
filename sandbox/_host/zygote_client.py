"""Host side of the zygote: start it once (lazily), ask it for workers, restart it if it died.

One zygote per namespace profile: workers without network come from a zygote living in an
empty network namespace; a policy that grants network gets a zygote without one.
"""
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import msgpack

from ..errors import ConfinementError, HostResourceError, SandboxError, ZygoteDied
from ..protocol.zygote import MAX_REPLY, REFUSED, SpawnRequest, decode_spawn_reply, encode_request

log = logging.getLogger("sandbox")
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # sandbox/
_PKG_ROOT = os.path.dirname(_PKG_DIR)
_ZYGOTE_MAIN = os.path.join(_PKG_DIR, "zygote", "__main__.py")
REPLY_TIMEOUT = 10.0


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
        self._proc: subprocess.Popen | None = None
        self._ctl: socket.socket | None = None
        self._retired: list[tuple[subprocess.Popen, socket.socket]] = []
        self.report: dict = {}
        # preload set -> how the zygote forked its last worker: "warm" (from its template),
        # "cold" (itself: no template yet), or "refused: <why>" (the template could not be made)
        self.templates: dict[tuple[str, ...], str] = {}

    def _running(self) -> tuple[subprocess.Popen, socket.socket] | None:
        """The zygote's process and control socket while it runs; None when it must be (re)started."""
        if self._ctl is None or self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc, self._ctl

    def _start(self, timeout: float = REPLY_TIMEOUT) -> tuple[subprocess.Popen, socket.socket]:
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
        except OSError as e:
            host_end.close()
            short = _resource(e)
            why = f"the host is out of {short}" if short else "it could not be started"
            raise HostResourceError(f"no zygote to fork workers: {why} ({e.strerror or e})", resource=short) from None
        finally:
            child_end.close()
        host_end.settimeout(max(timeout, 0.001))
        try:
            hello = msgpack.unpackb(host_end.recv(65536), raw=False)
        except (OSError, ValueError) as e:
            host_end.close()
            self._proc.kill()
            self._proc.wait()
            raise ConfinementError(f"the zygote did not start: {e}", layer="zygote") from None
        if not isinstance(hello, dict) or "ready" not in hello:
            host_end.close()
            self._proc.kill()
            self._proc.wait()
            raise ConfinementError(f"the zygote did not start: {hello}", layer="zygote")
        self._ctl = host_end
        self.report = hello
        for problem in hello.get("errors", ()):
            # Not fatal (seccomp still refuses socket() without a network grant), never silent.
            log.warning("sandbox zygote: %s unavailable; workers run without it", problem)
        return self._proc, host_end

    @property
    def pid(self):
        return self._proc.pid if self._proc else None

    def spawn(self, request: SpawnRequest, fds: list[int], timeout: float = REPLY_TIMEOUT,
              asked: float | None = None) -> tuple[int, int, subprocess.Popen]:
        """Fork a worker: (pid, pidfd, the zygote's process), within `timeout` seconds.

        The zygote learns the descriptors and the request (uid, may_fork, the preload set's
        module names), nothing else: the plan goes to the worker over its own pipe. A zygote
        found dead is replaced once; a ZygoteDied says so when the replacement dies too, or
        when no answer came in time. `asked`: the caller's own timeout, the figure errors name
        (`timeout` is what is left of it)."""
        deadline = time.monotonic() + timeout
        said = f"{timeout if asked is None else asked:g} s"
        payload = encode_request(request)
        if not self._lock.acquire(timeout=max(timeout, 0)):
            raise ZygoteDied(f"the zygote did not take the request within {said} "
                             "(another start is waiting on it)")
        try:
            why = "it ended"
            for _ in (0, 1):
                live = self._running()
                if live is None:
                    self._kill()
                    live = self._start(max(deadline - time.monotonic(), 0.001))
                proc, ctl = live
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                ctl.settimeout(left)
                try:
                    socket.send_fds(ctl, [payload], fds)
                    msg, got, _, _ = socket.recv_fds(ctl, MAX_REPLY, 1)
                except socket.timeout:
                    self._retire()
                    err: SandboxError = ZygoteDied(f"the zygote did not answer within {said} (stopped or "
                                     "overloaded); it takes no more requests and the next worker "
                                     "starts on a new zygote")
                    err.worker_may_run = True  # it may still fork this request when it resumes
                    raise err from None
                except OSError as e:
                    why = self._bury(e.strerror or str(e))
                    continue
                if not msg:
                    why = self._bury("it closed the control socket")
                    continue
                pid, error, how = decode_spawn_reply(msg)
                if pid is not None and request.preload:
                    self._note_template(request.preload, how)
                if pid is not None and len(got) != 1:
                    for fd in got:
                        os.close(fd)
                    err = HostResourceError("the host is out of file descriptors: the new worker's pidfd "
                                            "could not be received", resource="file descriptors")
                    err.worker_may_run = True  # forked: it dies at its first write, nobody reads
                    raise err
                if pid is None or len(got) != 1:
                    for fd in got:
                        os.close(fd)
                    raise _refusal(error or "no pidfd came with the reply")
                return pid, got[0], proc
            else:
                raise ZygoteDied(f"the zygote died while starting a worker ({why}), and so did its replacement")
            raise ZygoteDied(f"no zygote answered within {said}")
        finally:
            self._lock.release()

    def _note_template(self, preload: tuple[str, ...], how: str) -> None:
        if len(self.templates) >= 256 and preload not in self.templates:
            self.templates.pop(next(iter(self.templates)))
        self.templates[preload] = how
        if how.startswith(REFUSED) and preload not in _warned:
            _warned.add(preload)
            log.warning("sandbox: no warm template for preload %s (%s); its workers import it after fork, "
                        "each paying the import", list(preload), how[len(REFUSED):])

    def _bury(self, seen: str) -> str:
        """The zygote failed mid-request: make sure it is gone; how it ended, in words."""
        proc = self._proc
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if proc is None:
            return seen
        try:
            proc.wait(0.2)  # it is exiting: its own exit status says why
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return f"{seen}; it was still running and was killed"
        return f"{seen}; it had {describe_exit(proc.returncode)}"

    def _retire(self):
        """A zygote that did not answer in time may still be serving its workers: leave it (and
        them) alone, send it nothing more, and start the next worker on a new one. Its control
        socket stays open, since EOF on it would make it kill every worker it has."""
        if self._proc is not None and self._ctl is not None:
            self._retired.append((self._proc, self._ctl))
        self._proc = self._ctl = None

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
            for proc, ctl in self._retired:
                ctl.close()
                proc.kill()
                proc.wait()
            self._retired.clear()

    def ensure_started(self):
        with self._lock:
            if self._ctl is None or self._proc.poll() is not None:
                self._restart()
        return self.report


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "not ended yet"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"been killed by signal {name}"
    return f"exited with code {returncode}"


def zygote_death(proc: subprocess.Popen | None, wait: float = 0.05) -> ZygoteDied:
    """What a worker's caller is told when its status never came: the zygote that would have
    written it died (the worker dies with it), and how, if that can be known in `wait` s."""
    if proc is None:
        return ZygoteDied("the zygote died, and the worker with it (why is unknown)")
    end = time.monotonic() + wait
    while proc.poll() is None and time.monotonic() < end:
        time.sleep(0.005)
    how = describe_exit(proc.returncode) if proc.returncode is not None else "ended (how is unknown)"
    return ZygoteDied(f"the zygote (pid {proc.pid}) died, and the worker with it: the zygote had {how}"
                      if proc.returncode is not None else
                      f"the zygote (pid {proc.pid}) stopped reporting, and the worker with it")


def _resource(e: OSError) -> str | None:
    return {errno.EMFILE: "file descriptors", errno.ENFILE: "file descriptors", errno.EAGAIN: "processes",
            errno.ENOMEM: "memory"}.get(e.errno) if e.errno is not None else None


def _refusal(error: str) -> SandboxError:
    """The zygote answered but did not fork: say what the host is short of, if that is it."""
    lowered = error.lower()
    if "fork failed" in lowered:
        return HostResourceError(f"the zygote could not fork a worker: {error}", resource="processes")
    if "descriptor" in lowered:
        return HostResourceError(f"the zygote refused the spawn: {error}", resource="file descriptors")
    return SandboxError(f"the zygote refused the spawn: {error}")


_zygotes: dict[tuple, Zygote] = {}
_warned: set[tuple[str, ...]] = set()  # preload sets whose refused template was logged (once each)
_zlock = threading.Lock()


def get(network: bool) -> Zygote:
    ns = ("ipc", "uts") if network else ("net", "ipc", "uts")
    with _zlock:
        z = _zygotes.get(ns)
        if z is None:
            z = _zygotes[ns] = Zygote(ns)
        return z


_inherited: list = []  # a forked child's copies of the parent's zygotes: kept, never used


def _after_fork_in_child() -> None:
    # The parent's zygotes are the parent's: requests from the child on the same control socket
    # would interleave with the parent's. Close the child's copy (so that a zygote still sees EOF
    # when its host ends) and let the child start its own on first use.
    global _zlock
    _zlock = threading.Lock()
    for z in _zygotes.values():
        if z._ctl is not None:
            z._ctl.close()
            z._ctl = None
        _inherited.append(z)
    _zygotes.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def shutdown_all():
    with _zlock:
        for z in _zygotes.values():
            z.close()
        _zygotes.clear()
