"""Everything a worker owns on the host side, acquired and released in one place.

Shared by the sync Worker and the AsyncWorker: a uid of its own (root mode), an optional
scratch dir, five descriptors, the zygote's fork, and later the seccomp listener.
"""
import fcntl
import os
import shutil
import socket
import struct
import tempfile
from typing import NamedTuple

import msgpack

from ..errors import ConfinementError
from . import plan as plans, uids
from . import zygote_client as zygote

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
STATUS = struct.Struct("<ii")  # (pid, raw wait status) written by the zygote when it reaps
MAX_HANDOFF = 64 * 1024


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


def close_fd(fd):
    try:
        os.close(fd)
    except (OSError, TypeError):
        pass


class Spawned:
    """The host's side of one forked worker. `fds`: to, from, log, status (+ listener later)."""

    def __init__(self, policy, plugin: str, name: str):
        self.policy = policy
        self.uid = uids.allocate(*policy.uid_range) if os.geteuid() == 0 else None
        self.scratch = None
        self.fds: dict[str, int] = {}
        self.pid = self.pidfd = None
        self.handoff = None
        self._handoff = Handoff(None, None)
        child = []
        try:
            if policy.filesystem.scratch:
                self.scratch = tempfile.mkdtemp(prefix=f"sandbox-{name}-")
                if self.uid is not None:
                    os.chown(self.scratch, self.uid, self.uid)
            to_r, to_w = _pipe()
            child.append(to_r)
            self.fds["to"] = to_w
            from_r, from_w = _pipe()
            child.append(from_w)
            self.fds["from"] = from_r
            self.handoff, h_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            child.append(h_child.detach())
            log_r, log_w = os.pipe2(os.O_CLOEXEC)
            child.append(log_w)
            self.fds["log"] = log_r
            st_r, st_w = os.pipe2(os.O_CLOEXEC)
            child.append(st_w)
            self.fds["status"] = st_r
            for fd in self.fds.values():
                os.set_blocking(fd, False)
            self.plan = plans.build(policy, plugin, name, self.uid, self.scratch)
            self.pid, self.pidfd = zygote.get(bool(policy.network.allow)).spawn(self.plan, child)
        except BaseException:
            self.release()
            raise
        finally:
            for fd in child:
                close_fd(fd)

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
        uids.release(self.uid)
        self.uid = None
        if self.scratch:
            # rmtree works on fds and never follows a symlink the worker left behind
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
