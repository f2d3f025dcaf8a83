"""The zygote: a fresh, single-threaded interpreter that forks one child per worker.

Started once by the host as `python -I <this file> <ctl-fd> <package-root>` with an empty
environment, it never holds the host's memory, so a forked worker can't find the host's secrets.
Its loop: wait for a spawn request or a child's death; fork; reap; report.
"""
import gc
import mmap
import os
import select
import signal
import socket
import struct
import sys

import msgpack
import prctl

from ..child import serve, steps  # imported here so children never import after fork
from . import rulesets
from .pidns import fork_worker
from .leftovers import Leftovers
from .spare import Spare

MAX_REQUEST = 1 << 20
SPAWN_FDS = 5  # from_host_r, to_host_w, handoff, log_w, status_w
STATUS = struct.Struct("<ii")  # pid, raw wait status


def run(ctl: socket.socket, pdeathsig: bool) -> None:
    if pdeathsig:
        prctl.set_pdeathsig(signal.SIGKILL)  # the host died: so do we (and, through ours, every worker)
    if os.getppid() == 1:
        os._exit(0)  # the host is already gone
    _raise_nofile()
    rd, wr = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wr)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    status_fds: dict[int, int] = {}
    # Everything imported so far is shared with every worker: keep the collector off those pages
    # so that children don't pay a copy-on-write fault for each object a collection would touch.
    gc.disable()
    gc.freeze()
    _leftovers.become_subreaper()
    _spare.fork()
    poller = select.poll()
    poller.register(ctl.fileno(), select.POLLIN)
    poller.register(rd, select.POLLIN)
    while True:
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        for fd, ev in events:
            if fd == rd:
                _drain(rd)
                _reap(status_fds)
            elif not _handle_request(ctl, status_fds, (rd, wr)):
                _shutdown(status_fds)


def _raise_nofile():
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _drain(fd):
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _reap(status_fds):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)  # our children: workers, the spare, orphans
        except ChildProcessError:
            break
        if pid == 0:
            break
        if _spare.reaped(pid):
            continue  # killed before it was needed; the next request forks afresh, then a new spare
        fd = status_fds.pop(pid, None)
        if fd is not None:
            _leftovers.worker_died(pid)  # before the report: the host frees the uid on it
            try:
                os.write(fd, STATUS.pack(pid, status))
            except OSError:
                pass
            os.close(fd)
        # else: an orphan a dead worker left us (we are a subreaper), or the uid killer
    _leftovers.sweep(set(status_fds) | {_spare.pid})


def _handle_request(ctl, status_fds, wake_fds) -> bool:
    try:
        msg, fds, flags = _receive(ctl)
    except InterruptedError:
        return True
    if not msg and not fds:
        return False  # host closed the control socket
    if len(fds) != SPAWN_FDS or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        _reply(ctl, {"error": "bad spawn request (wrong descriptors, or a plan over "
                              f"{MAX_REQUEST} bytes)"})
        return True
    plan = msgpack.unpackb(msg, raw=False)
    try:
        ruleset = rulesets.shared_ruleset(plan.get("landlock"))
    except OSError:
        ruleset = None  # the child builds its own and reports what fails
    pid = _spare.hand_off(msg, fds[:4], ruleset)
    if pid is None:
        plan["zygote_pid"] = os.getpid()  # taken here: in the child, getppid() may already be 1
        try:
            pid = fork_worker()  # a PID namespace of its own (pidns.py)
        except OSError as e:  # no memory, no pids: this request fails, the zygote and its workers don't
            for fd in fds:
                os.close(fd)
            _reply(ctl, {"error": f"fork failed: {e}"})
            return True
        if pid == 0:
            _in_child(ctl, status_fds, wake_fds, plan, fds, ruleset)
    try:
        pidfd = os.pidfd_open(pid)
        socket.send_fds(ctl, [msgpack.packb({"pid": pid})], [pidfd])
        os.close(pidfd)
    except OSError:
        os.kill(pid, signal.SIGKILL)
    for fd in fds[:4]:
        os.close(fd)
    status_fds[pid] = fds[4]
    _leftovers.watch(pid, plan)
    _spare.fork()  # the next request's child, paid for while we would otherwise be idle
    return True


# Allocated once (a fresh megabyte per request costs an mmap), untouched pages cost nothing, and
# MAP_PRIVATE because every worker inherits it: a shared mapping would let one write the next plan.
_request = mmap.mmap(-1, MAX_REQUEST, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
_FDS_SPACE = socket.CMSG_SPACE(SPAWN_FDS * 4)


def _receive(ctl):
    """One spawn request: (plan bytes, fds, flags), like socket.recv_fds but into _request."""
    n, ancdata, flags, _ = ctl.recvmsg_into([_request], _FDS_SPACE)
    fds = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += list(struct.unpack(f"{len(data) // 4}i", data[:len(data) - len(data) % 4]))
    return memoryview(_request)[:n], fds, flags


_spare = Spare()
_leftovers = Leftovers()


def _reply(ctl, obj):
    ctl.send(msgpack.packb(obj))


def _in_child(ctl, status_fds, wake_fds, plan, fds, ruleset):
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.close(fds[4])  # the status pipe is the zygote's to write
    # The remaining zygote fds (ctl, wake pipe, other workers' status pipes) are closed by the
    # first confinement step, which keeps only the worker's own descriptors.
    serve.child_main(plan, fds[:4], ruleset)


def _shutdown(status_fds):
    # The host is gone or done: take every worker with us.
    _spare.kill()
    for pid in list(status_fds):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def _keep_message_sized_memory():
    """Inherited by every worker: messages up to a few MiB are served from the heap and the
    freed space is kept for the next one. glibc's defaults would map and unmap each megabyte
    buffer afresh, and on a VM the page faults cost more than the copying they serve."""
    from ..child.syscalls import libc
    libc.mallopt(M_MMAP_THRESHOLD, 8 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 16 << 20)


def main(argv):
    ctl = socket.socket(fileno=int(argv[1]))
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
    from . import namespaces
    report = namespaces.prepare(argv[2:])
    if prctl.cap_effective.setpcap:
        steps.drop_bounding_set()  # inherited by every worker: one time here, not 41 syscalls each
    _keep_message_sized_memory()
    _reply(ctl, {"ready": os.getpid(), **report})
    run(ctl, "pdeathsig" in argv[2:])
