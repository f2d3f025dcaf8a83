"""Everything a worker owns on the host side, acquired and released in one place.

Shared by the sync Worker and the AsyncWorker: a uid of its own (root mode), an optional
scratch dir, five descriptors, the zygote's fork, and later the seccomp listener.
"""
import fcntl
import os
import socket
import tempfile
import time
from typing import NamedTuple

import msgpack

from ..child.grant_paths import UnsafeGrant
from ..errors import ConfinementError, HostResourceError, PolicyError, SandboxError, ZygoteDied
from ..policy import THREAD_CAPS
from ..protocol import plan as plan_wire
from ..protocol.zygote import MAX_PLAN, STATUS, SpawnFds, SpawnRequest, plan_frame, template_key
from . import cleanup, mount_namespaces, plan as plans, rulesets, uids
from . import zygote_client as zygote

F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
PIPE_SIZE = 1 << 20
MAX_HANDOFF = 64 * 1024
SPAWN_TIMEOUT = 10.0  # when the caller gives none
__all__ = ["STATUS", "Spawned", "Handoff", "close_fd"]


class Handoff(NamedTuple):
    listener: int | None          # the seccomp listener fd, or None
    failure: ConfinementError | None  # the confinement step that failed, or None


def _failure(raw: bytes) -> ConfinementError:
    try:
        d = msgpack.unpackb(raw, raw=False, max_str_len=MAX_HANDOFF, max_array_len=0, max_map_len=8)
        message, layer = str(d.get("message", "")), d.get("layer")
    except Exception:  # noqa: BLE001 - still privileged code wrote it, but decode defensively
        message, layer = "a confinement step failed (its report was unreadable)", None
    return ConfinementError(message or "a confinement step failed", layer=layer if isinstance(layer, str) else None)


def _pipe():
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size for this user: the default size works, only slower
    return r, w


def _host_short_of(e: OSError) -> SandboxError:
    names = {24: "file descriptors", 23: "file descriptors", 12: "memory", 28: "disk space", 11: "processes"}
    what = names.get(e.errno) if e.errno is not None else None
    if what is None:
        return HostResourceError(f"a worker could not be set up: {e}")
    return HostResourceError(f"the host is out of {what} ({e.strerror})", resource=what)


def close_fd(fd):
    try:
        os.close(fd)
    except (OSError, TypeError):
        pass


def _template_preload(plan) -> tuple[str, ...]:
    """The warm template to fork from, by its preload set; none unless the plan's environment
    caps every numeric library at one thread (as it does when the policy grants no threads).
    A template imports with every cap at 1, since it must be single-threaded when it forks: a
    policy that grants threads and sets no cap (or OPENBLAS_NUM_THREADS=4) would get one thread
    from it whatever it says. Such a worker imports after fork, in its own environment, as the
    policy says (and the threads its preload starts get the filter: TSYNC)."""
    if any(plan.env.get(name, "").strip() != "1" for name in THREAD_CAPS):
        return ()
    return template_key(plan.preload)


class Spawned:
    """The host's side of one forked worker. `fds`: to, from, log, status (+ listener later)."""

    def __init__(self, policy, plugin: str, name: str, start_timeout: float | None = None):
        deadline = time.monotonic() + (SPAWN_TIMEOUT if start_timeout is None else start_timeout)
        self.policy = policy
        self.uid: int | None = None
        if os.geteuid() == 0:
            lo, hi = policy.uid_range
            self.uid = uids.allocate(lo, hi, policy_path=policy.path)
        self.scratch = None
        self.fds: dict[str, int] = {}
        self.pid = self.pidfd = None
        self.mnt_ns: int | None = None  # a reference to the worker's mount namespace (mount_namespaces.py)
        self.handoff = None
        self.zygote_proc = None
        self._handoff = Handoff(None, None)
        child: dict[str, int] = {}
        try:
            if policy.filesystem.scratch:
                self.scratch = tempfile.mkdtemp(prefix=f"sandbox-{name}-")
                if self.uid is not None:
                    os.chown(self.scratch, self.uid, self.uid)
            # Built and checked before anything is forked: a plan the policy can't make is a
            # PolicyError here, never a failure in the zygote.
            self.plan = plans.build(policy, plugin, name, self.uid, self.scratch)
            frame = plan_frame(plan_wire.encode(self.plan))
            if len(frame) > MAX_PLAN:
                raise SandboxError(f"the plan for {plugin} is {len(frame)} bytes, over {MAX_PLAN} "
                                   "(very long path or environment lists in the policy)")
            to_r, to_w = _pipe()
            child["from_host"] = to_r
            self.fds["to"] = to_w
            from_r, from_w = _pipe()
            child["to_host"] = from_w
            self.fds["from"] = from_r
            self.handoff, h_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            child["handoff"] = h_child.detach()
            log_r, log_w = os.pipe2(os.O_CLOEXEC)
            child["log"] = log_w
            self.fds["log"] = log_r
            st_r, st_w = os.pipe2(os.O_CLOEXEC)
            child["status"] = st_w
            self.fds["status"] = st_r
            for fd in self.fds.values():
                os.set_blocking(fd, False)
            if fcntl.fcntl(to_w, F_GETPIPE_SZ) < len(frame):
                raise SandboxError(f"the plan for {plugin} ({len(frame)} bytes) does not fit in the "
                                   "worker's input pipe")
            # Into the empty pipe before the fork, so the worker finds it at once (the whole frame
            # fits: checked above); a worker the zygote never forks never reads it.
            if os.write(to_w, frame) != len(frame):
                raise SandboxError("the plan could not be written to the worker's input at once")
            request = SpawnRequest(uid=self.uid, may_fork=self.plan.may_fork, preload=_template_preload(self.plan))
            fds = list(SpawnFds(**child))
            # The cache's (not closed here). A worker with scratch builds its own ruleset over its
            # private tmpfs, and its scratch path is unique: caching it would only fill the cache.
            ruleset = None if self.scratch else rulesets.shared_ruleset(self.plan.landlock,
                                                                           self.plan.worker_writable)
            if ruleset is not None:
                fds.append(ruleset)
            try:
                self.pid, self.pidfd, self.zygote_proc = zygote.get(bool(policy.network.allow)).spawn(
                    request, fds, max(deadline - time.monotonic(), 0.001),
                    asked=SPAWN_TIMEOUT if start_timeout is None else start_timeout)
            except SandboxError as e:
                if getattr(e, "worker_may_run", False):
                    # A stalled zygote may still fork this request when it resumes, or it forked
                    # and the pidfd never reached us: that worker is confined as usual and ends
                    # at once (its input ends after the plan; nobody reads its output). Its uid
                    # goes to no other worker until its status record says it was reaped, or
                    # the status pipe's end says the zygote is gone (and the worker with it).
                    status = self.fds.pop("status", None)
                    if status is not None and self.uid is not None:
                        release_when_reaped(status, self.uid)
                    self.uid = None
                raise
        except UnsafeGrant as e:  # a granted path leads through a link a worker could have made
            self.release()
            raise PolicyError(str(e), path=policy.path) from None
        except OSError as e:
            self.release()
            raise _host_short_of(e) from None
        except BaseException:
            self.release()
            raise
        finally:
            for fd in child.values():
                close_fd(fd)

    def end_reason(self, status: int | None) -> SandboxError | None:
        """Evidence the plugin can't forge for why a worker ended, if any: the confinement step
        that failed (from the handoff socket), or the zygote's death (no status record came:
        the zygote writes it, and the worker dies with the zygote)."""
        failure = self.take_handoff().failure
        if failure is not None:
            return failure
        if status is None:
            return self.zygote_death()
        return None

    def zygote_death(self) -> ZygoteDied:
        """Why a worker ended without a status record: the zygote, which writes it, died."""
        return zygote.zygote_death(self.zygote_proc)

    def take_listener(self) -> int | None:
        """The seccomp listener fd the child sent before READY (None if it sent none)."""
        return self.take_handoff().listener

    def take_handoff(self) -> "Handoff":
        """What the child sent on the handoff socket (fd 5 in the child), which it closes before
        the plugin's first line runs, so the plugin can never write here: b"L" with the seccomp
        listener fd, or b"F" + msgpack {message, layer} when a confinement step failed. Only this
        channel can produce a ConfinementError; a frame on the message pipe never does."""
        if self.handoff is None:
            return self._handoff  # taken already (or released: the worker ended during start)
        listener = failure = None
        try:
            self.handoff.setblocking(False)
            msg, fds, _, _ = socket.recv_fds(self.handoff, MAX_HANDOFF, 2)
        except OSError:
            msg, fds = b"", []
        finally:
            self.handoff.close()
            self.handoff = None
        if msg[:1] == b"L" and len(fds) == 1:
            listener = fds.pop()
            os.set_blocking(listener, False)
            self.fds["listener"] = listener
        elif msg[:1] == b"F":
            failure = _failure(msg[1:])
        for fd in fds:
            close_fd(fd)
        self._handoff = Handoff(listener, failure)
        return self._handoff

    def hold_mount_namespace(self) -> None:
        """(ready) Keep the worker's mount namespace alive past its exit: its teardown then
        happens on the host's closer thread, not in the worker's exit that terminate() waits for."""
        if self.mnt_ns is None and self.pidfd is not None:
            self.mnt_ns = mount_namespaces.hold(self.pidfd)

    def release(self):
        for fd in self.fds.values():
            close_fd(fd)
        self.fds = {}
        if self.handoff is not None:
            self.handoff.close()
            self.handoff = None
        if self.pidfd is not None:
            close_fd(self.pidfd)
            self.pidfd = None
        if self.mnt_ns is not None:
            mount_namespaces.release_later(self.mnt_ns)  # the kernel's unmounting, off this path
            self.mnt_ns = None
        uids.release(self.uid)
        self.uid = None
        if self.scratch:
            # The worker's scratch is a tmpfs in its own mount namespace, gone with it: this is
            # the empty mount point, removed without recursion or following links in any case.
            cleanup.remove_tree(self.scratch)
            self.scratch = None


def release_when_reaped(status_fd: int, uid: int) -> None:
    """Hold `uid` until the zygote writes the status of the worker that may have it (or closes
    its end of the status pipe): then free the uid and the descriptor. Nothing waits for it."""
    from . import hub as _hub

    hub = _hub.get()

    def on_status(fd: int) -> None:
        try:
            os.read(fd, 4096)  # a status record, or EOF: either way that worker is gone
        except BlockingIOError:
            hub.arm(fd)
            return
        except OSError:
            pass
        hub.unwatch(fd)
        close_fd(fd)
        uids.release(uid)

    hub.watch(status_fd, on_status)
