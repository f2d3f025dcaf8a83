"""When a worker that may start processes dies, whatever it started dies with it.

A timeout, a violation or a crash kills the worker through its pidfd; its children, if the
policy let it have any, would live on. The zygote, which reaps the worker, finishes the job
before it reports the death (and so before the host frees the worker's uid for reuse):

- root mode: every worker has a uid of its own, so a helper that takes that uid and calls
  kill(-1, SIGKILL) reaches every process the worker started, wherever it moved (a new
  session, a new process group). The kernel holds the task list while it delivers, so a
  fork racing the kill can't slip through.
- unprivileged mode (the worker's uid is the host's): the process group, then orphans.
  The zygote is a child subreaper, so a dead worker's children become the zygote's; any
  child of the zygote that is not a worker or the spare is such an orphan and is killed.
"""
import os
import signal

import prctl

def may_start_processes(policy) -> bool:
    """Can this policy's workers make a process (not just a thread)?"""
    return policy.may_fork


class Leftovers:
    def __init__(self):
        self._watched: dict[int, int | None] = {}  # worker pid -> its uid (None: unprivileged)
        self._orphans_possible = False

    @staticmethod
    def become_subreaper():
        prctl.set_child_subreaper(True)

    def watch(self, pid: int, plan: dict):
        if plan.get("may_fork"):
            self._watched[pid] = plan.get("uid")

    def worker_died(self, pid: int):
        if pid not in self._watched:
            return
        uid = self._watched.pop(pid)
        try:
            os.killpg(pid, signal.SIGKILL)  # the group outlives its leader while members live
        except OSError:
            pass
        if uid is not None:
            _kill_everything_of(uid)
        else:
            self._orphans_possible = True

    def sweep(self, known):
        """Unprivileged mode: kill the zygote's children that are neither workers nor the spare."""
        if not self._orphans_possible:
            return
        me, found = os.getpid(), False
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in known:
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == me:
                found = True
                try:
                    os.kill(int(entry), signal.SIGKILL)
                except OSError:
                    pass
        self._orphans_possible = found  # their own children become ours when they die: look again


def _kill_everything_of(uid: int):
    try:
        pid = os.fork()
    except OSError:
        return  # no process to spare for the helper: the process group kill above is what we have
    if pid == 0:
        try:
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)  # every process this uid may signal: the worker's, only
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
