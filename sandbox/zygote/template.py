"""Warm templates: one process per preload set that has imported the policy's `[python] preload`
modules once, from which that policy's workers are forked.

Without them, every worker of a policy that preloads `markdown` or `numpy` imports it again
after its fork: tens of milliseconds per start. A template pays that once and then forks
workers that find the modules in `sys.modules` (their preload step costs a dictionary lookup),
sharing the imported pages copy-on-write.

What a template is:
- a plain os.fork() of the zygote (it stays in the zygote's PID namespace, so it may
  CLONE_PARENT), holding only its own socket to the zygote: every other descriptor is closed
  at once, as in a spare;
- it imports the modules by name through the zygote's sys.path (host-installed code: never
  anything of a plugin's folder, which is on no path here), with thread pools capped
  (OPENBLAS_NUM_THREADS=1, ...), then collects, freezes and warms up like a spare;
- it must be single-threaded, or its forks would carry locks held by threads that no longer
  exist and the threads themselves would be gone: a module that leaves a thread running (or
  fails to import) makes it refuse, and the zygote then serves that preload set the old way
  (fork, import in the worker, whose preload step reports the import error as a load error and
  whose seccomp filter is synchronised over every thread), and says so in each spawn reply;
- it holds no plan and no request: all it is ever sent is a worker's descriptors, which it
  hands to the worker it forks and closes. What a worker can read in its memory is what the
  zygote had (no plan either) plus the modules.

Forking a worker: the zygote sends the descriptors ("W"); the template hands them to its own
spare (forked ahead, like the zygote's: spare.py) or forks with pidns.fork_worker(parent=True)
(a PID namespace of the worker's own, and CLONE_PARENT: the worker is the zygote's child,
which reaps it, reports its status and opens its pidfd as for any other), and answers "P" +
pid, or "E"/"F" + why it did not fork (the zygote then forks itself).
The worker runs serve.child_main: the same steps, in the same order, as every worker.

The zygote keeps at most MAX_TEMPLATES, retiring the least recently used. The first request of
a preload set starts its template and is served the old way (nobody waits for an import); the
later ones use it once it said it is ready. A template that dies is forgotten, and the next
request of its set starts a new one.
"""
from __future__ import annotations

import gc
import importlib
import os
import select
import signal
import socket
import struct
import sys

import prctl

from ..child import serve, syscalls as _sys
from ..protocol.zygote import COLD, REFUSED, WARM, WORKER_FD_COUNT
from .pidns import fork_worker
from .spare import Spare, warm_up

MAX_TEMPLATES = 8
MAX_REFUSED = 64  # preload sets remembered as refused (oldest forgotten first: it may be retried)
REPLY_TIMEOUT = 5.0  # a fork takes a millisecond; a template this slow is broken (or the machine is)
NAME = b"sandbox-tmpl"  # its comm (ps, top): a template is told apart from workers and spares
# Read by BLAS libraries when they load: one thread each, so numpy & co. start no pool.
THREAD_CAPS = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                      "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS")}
_PID = struct.Struct("<i")


class TemplateLost(Exception):
    """A template took a worker's descriptors and gave no answer: whether it forked is unknown."""


class _Template:
    __slots__ = ("key", "pid", "sock", "ready")

    def __init__(self, key: tuple[str, ...], pid: int, sock: socket.socket):
        self.key, self.pid, self.sock, self.ready = key, pid, sock, False


class Templates:
    """The zygote's side: its templates by preload set, and the sets that were refused."""

    def __init__(self, limit: int = MAX_TEMPLATES):
        self.limit = limit
        self._by_key: dict[tuple[str, ...], _Template] = {}  # in order of use, least recent first
        self._by_fd: dict[int, _Template] = {}
        self._refused: dict[tuple[str, ...], str] = {}  # oldest first
        self._wanted: list[tuple[str, ...]] = []
        self._poller: select.poll | None = None

    def attach(self, poller: select.poll) -> None:
        """The zygote's poller: a template's socket is watched for "ready", a refusal or EOF."""
        self._poller = poller

    @property
    def pids(self) -> set[int]:
        return {t.pid for t in self._by_key.values()}

    def owns(self, fd: int) -> bool:
        return fd in self._by_fd

    # ---- serving a request ------------------------------------------------------------------
    def fork_from(self, key: tuple[str, ...], fds: list[int], zygote_children) -> tuple[int | None, str]:
        """(pid, WARM) when the template of `key` forked the worker; else (None, how the zygote
        must fork it itself: COLD or REFUSED + why). Raises TemplateLost when a template took
        the descriptors and died or hung without an answer (after killing whatever it may
        have forked: `zygote_children()` lists the zygote's children not known as anything)."""
        if not key:
            return None, COLD
        if key in self._refused:
            return None, REFUSED + self._refused[key]
        t = self._by_key.get(key)
        if t is None:
            if key not in self._wanted:
                self._wanted.append(key)  # started after this request, from a zygote holding none of it
            return None, COLD
        if not t.ready:
            return None, COLD
        self._by_key[key] = self._by_key.pop(key)  # now the most recently used
        try:
            socket.send_fds(t.sock, [b"W"], fds)
        except OSError:
            self._forget(t, kill=True)  # it died or is wedged, and never got them
            return None, COLD
        try:
            t.sock.settimeout(REPLY_TIMEOUT)
            answer = t.sock.recv(1024)
        except OSError:
            answer = b""
        finally:
            try:
                t.sock.setblocking(False)
            except OSError:
                pass
        why = "it died or hung" if not answer else f"it answered {answer[:20]!r}"
        if answer[:1] == b"P" and len(answer) == 1 + _PID.size:
            pid = _PID.unpack(answer[1:])[0]
            if pid > 0 and _parent_of(pid) == os.getpid():
                return pid, WARM
            why = f"it named pid {pid}, which is no child of the zygote"
        if answer[:1] == b"E":  # it did not fork (e.g. a thread appeared): refused from now on
            self._refuse(key, answer[1:].decode(errors="replace"))
            self._forget(t, kill=True)
            return None, REFUSED + self._refused[key]
        if answer[:1] == b"F":  # it could not fork (no memory, no pids): the zygote tries itself
            self._forget(t, kill=True)
            return None, COLD
        self._forget(t, kill=True)
        for pid in zygote_children():  # a worker it may have forked before it died: never half-known
            _kill(pid)
        raise TemplateLost(f"the warm template for preload {list(key)} failed while forking the worker: {why}")

    # ---- the template's life ----------------------------------------------------------------
    def start_wanted(self) -> None:
        """Start the templates asked for since the last call: from the zygote's loop, between
        requests, so that no request's data is even a local when they fork."""
        while self._wanted:
            key = self._wanted.pop(0)
            if key in self._by_key or key in self._refused:
                continue
            while len(self._by_key) >= self.limit:
                self._forget(next(iter(self._by_key.values())), kill=True)
            self._start(key)

    def _start(self, key: tuple[str, ...]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        zygote = os.getpid()
        try:
            pid = os.fork()  # not fork_worker: it stays in our PID namespace, so it may CLONE_PARENT
        except OSError:
            ours.close()
            theirs.close()
            return  # no process for now: served cold, tried again on the next request
        if pid == 0:
            ours.detach()
            _template_main(theirs, zygote, key)
        theirs.close()
        ours.setblocking(False)
        t = _Template(key, pid, ours)
        self._by_key[key] = t
        self._by_fd[ours.fileno()] = t
        if self._poller is not None:
            self._poller.register(ours.fileno(), select.POLLIN)

    def readable(self, fd: int) -> None:
        """The template said something unasked: "R" (ready), "E" + why (refused), or EOF (dead)."""
        t = self._by_fd.get(fd)
        if t is None:
            return
        try:
            msg = t.sock.recv(1024)
        except BlockingIOError:
            return
        except OSError:
            msg = b""
        if msg == b"R" and not t.ready:
            t.ready = True
            return
        if msg[:1] == b"E":
            self._refuse(t.key, msg[1:].decode(errors="replace"))
        self._forget(t, kill=True)  # refused, dead, or saying what it should not

    def _refuse(self, key: tuple[str, ...], why: str) -> None:
        self._refused[key] = why[:500] or "no reason given"
        while len(self._refused) > MAX_REFUSED:
            del self._refused[next(iter(self._refused))]

    def _forget(self, t: _Template, kill: bool) -> None:
        if self._by_key.get(t.key) is t:
            del self._by_key[t.key]
        fd = t.sock.fileno()
        if self._by_fd.pop(fd, None) is not None and self._poller is not None:
            self._poller.unregister(fd)
        t.sock.close()
        if kill:
            _kill(t.pid)  # reaped by the zygote's loop like any child

    def reaped(self, pid: int) -> bool:
        """The zygote reaped `pid`: True if it was a template (now forgotten)."""
        for t in list(self._by_key.values()):
            if t.pid == pid:
                self._forget(t, kill=False)
                return True
        return False

    def kill_all(self) -> None:
        for t in list(self._by_key.values()):
            self._forget(t, kill=True)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


# ---- in the template ------------------------------------------------------------------------
def _template_main(sock: socket.socket, zygote: int, key: tuple[str, ...]) -> None:
    """Import, check, then fork workers on request; never returns."""
    code = 0
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        prctl.set_pdeathsig(signal.SIGKILL)  # no zygote, no use: die with it
        if os.getppid() != zygote:
            os._exit(0)
        fd = sock.fileno()
        _sys.close_range(3, fd - 1) if fd > 3 else None
        _sys.close_range(fd + 1)
        prctl.set_name(NAME.decode())
        problem = _prepare(key)
        if problem is not None:
            sock.send(b"E" + problem.encode(errors="replace")[:500])
            os._exit(0)
        sock.send(b"R")
        _serve(sock, zygote)
    except BaseException:  # noqa: BLE001 - a template must never fall back into zygote code
        code = 70
    os._exit(code)


def _prepare(key: tuple[str, ...]) -> str | None:
    """Import the preload set; None when this process may now fork workers, else why not."""
    _only_runtime_paths()
    os.environ.update(THREAD_CAPS)
    try:
        for name in key:
            try:
                importlib.import_module(name)
            except BaseException as e:  # noqa: BLE001 - named and reported, never swallowed
                return f"preload {name!r} failed to import in the template: {type(e).__name__}: {e}"
    finally:
        for name in THREAD_CAPS:
            os.environ.pop(name, None)  # read at load; the worker's environment is its plan's
    gc.collect()
    gc.freeze()  # the imported objects stay on shared pages in every worker
    try:
        warm_up()
    except Exception:  # noqa: BLE001 - only a speed-up
        pass
    threads = thread_count()
    if threads != 1:
        return (f"preload {list(key)} left {threads - 1} thread(s) running after import: a process with "
                "threads cannot be a template")
    return None


def _only_runtime_paths() -> None:
    """The zygote's sys.path starts with the folder holding the `sandbox` package, which in a
    checkout is the whole repository (its examples, its tests: plugin code). A template imports
    as the zygote's user, before any confinement, so it resolves names only where a worker could
    have imported them itself: the standard library and site-packages. `sandbox` is imported
    already, and its submodules are found through its own __path__."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if sys.path and os.path.abspath(sys.path[0]) == root:
        del sys.path[0]  # a second entry for it stays when it is site-packages itself
    importlib.invalidate_caches()


def _serve(sock: socket.socket, zygote: int) -> None:
    # One pre-forked worker-to-be, as the zygote keeps one (spare.py): the clone, the private
    # mount namespace and the warm-up's page faults are paid while nobody waits.
    spare = Spare(zygote)
    spare.fork()
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, 1, WORKER_FD_COUNT + 1)
        if msg != b"W" or len(fds) not in (WORKER_FD_COUNT, WORKER_FD_COUNT + 1):
            os._exit(0)  # the zygote closed, or sent nonsense: nothing to fork
        threads = thread_count()
        if threads != 1:  # a module started one since: no fork from here, ever again
            _close_all(fds)
            spare.kill()
            sock.send(b"E" + f"a preloaded module started {threads - 1} thread(s) after import".encode())
            os._exit(0)
        try:
            pid = spare.hand_off(fds) or fork_worker(parent=True)  # the zygote's child, pid 1 of its own namespace
        except OSError as e:
            _close_all(fds)
            sock.send(b"F" + f"the template could not fork: {e.strerror or e}".encode())
            os._exit(0)
        if pid == 0:
            sock.close()
            try:
                serve.child_main(fds[:WORKER_FD_COUNT], zygote,
                                 fds[WORKER_FD_COUNT] if len(fds) > WORKER_FD_COUNT else None)
            finally:
                os._exit(70)  # never back into the template's loop
        _close_all(fds)  # the worker's now; nothing of it stays here
        sock.send(b"P" + _PID.pack(pid))
        spare.fork()  # the next one, while the zygote answers the host


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
