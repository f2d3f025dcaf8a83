"""The zygote: a fresh, single-threaded interpreter that forks one child per worker.

Started once by the host as `python -I <this file> <ctl-fd> <package-root>` with an empty
environment, it never holds the host's memory, so a forked worker can't find the host's secrets.
Its loop: wait for a spawn request or a child's death; fork; reap; report.

A spawn request carries the worker's descriptors, its uid and whether it may start processes:
what the zygote needs to fork and reap, and nothing else. The plan (environment, paths, filter)
goes from the host to the worker over the worker's own input pipe, so the zygote and its spare
never hold one, and no worker can find an earlier worker's data in what it inherited. A request
also names the policy's preload modules: a policy that has some gets its workers from a warm
template that imported them once (template.py).
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
from ..protocol.zygote import (MAX_REQUEST, MAX_SPAWN_FDS, SPAWN_FD_COUNT, WORKER_FD_COUNT, encode_status,
                               SpawnFds, decode_request, encode_reply)
from .leftovers import Leftovers
from .pidns import fork_worker
from .spare import Spare
from .template import Templates


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
    _templates.attach(poller)
    while True:
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        for fd, _ev in events:
            if fd == rd:
                _drain(rd)
                _reap(status_fds)
            elif fd == ctl.fileno():
                if not _handle_request(ctl, status_fds, (rd, wr)):
                    _shutdown(status_fds)
            else:
                _templates.readable(fd)  # ready, refused or dead (nothing if already forgotten)
        _templates.start_wanted()  # between requests: no request is even a local here


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
            # our children: workers, the spare, orphans. wait4: the kernel's rusage of the worker
            # goes into its status record, the evidence of a death by its CPU or memory limit
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        if _spare.reaped(pid) or _templates.reaped(pid):
            continue  # killed before it was needed; the next request forks afresh, then a new spare
        fd = status_fds.pop(pid, None)
        if fd is not None:
            _leftovers.worker_died(pid)  # before the report: the host frees the uid on it
            try:
                os.write(fd, encode_status(pid, status, usage))
            except OSError:
                pass
            os.close(fd)
        # else: an orphan a dead worker left us (we are a subreaper), or the uid killer
    _leftovers.sweep(set(status_fds) | {_spare.pid})


def _handle_request(ctl, status_fds, wake_fds) -> bool:
    """One spawn request: False when the host hung up. Never raises: whatever a request holds,
    it fails alone, with an answer, and the zygote and its other workers carry on."""
    try:
        msg, fds, flags = _receive(ctl)
    except InterruptedError:
        return True
    except OSError as e:  # e.g. EMFILE while receiving the descriptors: this request fails alone
        _answer(ctl, error=f"the zygote could not receive the descriptors: {e.strerror or e}")
        return True
    if not msg and not fds:
        return False  # host closed the control socket
    try:
        _spawn(ctl, status_fds, msg, fds, flags)
    except BaseException as e:  # noqa: BLE001 - no request may end the zygote
        for fd in fds:  # those not yet passed on (_spawn empties the list once it has)
            _close(fd)
        _answer(ctl, error=f"the zygote could not start the worker: {type(e).__name__}: {e}")
    return True


def _spawn(ctl, status_fds, msg, fds: list[int], flags) -> None:
    if len(fds) not in (SPAWN_FD_COUNT, MAX_SPAWN_FDS) or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        raise ValueError(f"a spawn request is {SPAWN_FD_COUNT} descriptors (and a ruleset) and at most "
                         f"{MAX_REQUEST} bytes (got {len(fds)} descriptors{', truncated' if flags else ''})")
    request = decode_request(msg)
    worker = SpawnFds(*fds[:SPAWN_FD_COUNT])
    ruleset = fds[SPAWN_FD_COUNT] if len(fds) > SPAWN_FD_COUNT else None
    own = fds[:WORKER_FD_COUNT] + ([ruleset] if ruleset is not None else [])  # what the worker gets
    pid, how = _templates.fork_from(request.preload, own, lambda: _strays(status_fds))
    if pid is None:
        pid = _spare.hand_off(own)
    if pid is None:
        zygote = os.getpid()  # taken here: in the child, getppid() may already be 1
        try:
            pid = fork_worker()  # a PID namespace of its own (pidns.py)
        except OSError as e:  # no memory, no pids: this request fails, the zygote and its workers don't
            raise OSError(e.errno, f"fork failed: {e.strerror}") from None
        if pid == 0:
            _in_child(worker, ruleset, zygote)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as e:  # the worker is reaped and reported as usual; the host hears why now
        os.kill(pid, signal.SIGKILL)
        _answer(ctl, error=f"no pidfd for the worker: {e.strerror} (out of file descriptors?)")
    else:
        try:
            socket.send_fds(ctl, [encode_reply(pid, template=how)], [pidfd])
        except OSError:
            os.kill(pid, signal.SIGKILL)  # the host is gone: the next poll sees EOF
        finally:
            os.close(pidfd)
    fds.clear()  # from here on, they are the worker's (and the status pipe is ours to report on)
    for fd in own:
        _close(fd)
    status_fds[pid] = worker.status
    _leftovers.watch(pid, {"uid": request.uid, "may_fork": request.may_fork})
    _spare.fork()  # the next request's child, paid for while we would otherwise be idle


def _strays(status_fds) -> list[int]:
    """Our children that are no worker, spare or template we know of (a worker a dying template
    may have forked for a request that then failed): to be killed, never left half-known."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            children = {int(p) for p in f.read().split()}
    except OSError:
        return []
    return sorted(children - set(status_fds) - {_spare.pid} - _templates.pids)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


# Allocated once and small: a request is a few bytes (uid, may_fork) and holds nothing of a plan.
# MAP_PRIVATE because every worker inherits it: a shared mapping would let one write the next.
_request = mmap.mmap(-1, MAX_REQUEST, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
_FDS_SPACE = socket.CMSG_SPACE(MAX_SPAWN_FDS * 4)


def _receive(ctl):
    """One spawn request: (bytes, fds, flags), like socket.recv_fds but into _request."""
    n, ancdata, flags, _ = ctl.recvmsg_into([_request], _FDS_SPACE)
    fds = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += list(struct.unpack(f"{len(data) // 4}i", data[:len(data) - len(data) % 4]))
    data = bytes(_request[:n])
    _request[:n] = bytes(n)  # not retained: the next spare or worker finds zeros here
    return data, fds, flags


_spare = Spare()
_templates = Templates()
_leftovers = Leftovers()


def _reply(ctl, obj):
    ctl.send(msgpack.packb(obj))


def _answer(ctl, error: str) -> None:
    try:
        ctl.send(encode_reply(error=error[:1000]))
    except OSError:
        pass  # the host is gone: the next poll sees EOF


def _in_child(worker: SpawnFds, ruleset: int | None, zygote: int):
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.close(worker.status)  # the status pipe is the zygote's to write
    # The remaining zygote fds (ctl, wake pipe, other workers' status pipes) are closed by the
    # first confinement step, which keeps only the worker's own descriptors.
    try:
        serve.child_main(list(worker[:WORKER_FD_COUNT]), zygote, ruleset)
    finally:
        os._exit(70)  # never back into the zygote's loop


def _shutdown(status_fds):
    # The host is gone or done: take every worker with us.
    _spare.kill()
    _templates.kill_all()
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
