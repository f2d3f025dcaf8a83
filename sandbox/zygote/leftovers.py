"""When a worker that may start processes dies, whatever it started dies with it.

Every worker is pid 1 of a PID namespace of its own (pidns.py; a worker without one refuses to
start). When pid 1 of a namespace dies, the kernel SIGKILLs every other process in it and
waits for them before the dead worker can be reaped: by the time the zygote reaps a worker
(and so before it reports the death, and the host frees the worker's uid), nothing it started
is left, whatever session, process group or uid that process moved to. No process of the
worker can leave its namespace (setns and unshare are not allowed), and orphans are reaped by
the worker, never reparented to the zygote.

What stays here is belt and braces that costs nothing: the worker's process group is killed
too. There is no uid-wide kill any more: a kill(-1) as the worker's uid would reach every
process of that uid on the machine, and a policy's uid range can overlap someone's.
"""
import os
import signal

import prctl

PROCESS_CALLS = frozenset({"fork", "vfork", "clone3"})


def may_start_processes(policy) -> bool:
    """Can this policy's workers make a process (not just a thread)?"""
    eff = policy._effective
    if PROCESS_CALLS.intersection(eff["allow"]) or "clone" in eff["allow"]:
        return True
    thread_only = "arg0 & 0x10000 == 0x10000"  # the @threads rule: clone with CLONE_THREAD
    return any(s in PROCESS_CALLS or (s == "clone" and list(w) != [thread_only]) for s, _, w in eff["rules"])


class Leftovers:
    def __init__(self):
        self._watched: set[int] = set()  # workers whose policy lets them start processes

    @staticmethod
    def become_subreaper():
        prctl.set_child_subreaper(True)

    def watch(self, pid: int, plan: dict):
        if plan.get("may_fork"):
            self._watched.add(pid)

    def worker_died(self, pid: int):
        if pid not in self._watched:
            return
        self._watched.discard(pid)
        try:
            os.killpg(pid, signal.SIGKILL)  # the group outlives its leader while members live
        except OSError:
            pass

    def sweep(self, known):
        """Nothing to sweep: a worker's orphans stay in its PID namespace and die with it."""
