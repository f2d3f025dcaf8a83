"""Where the two ends of a round trip run, chosen rather than left to the scheduler.

Left free, the scheduler puts a ping-ponging pair on one CPU or on two, run by run; on this
kind of VM that alone swings a 16 B round trip between ~8 us and ~45 us (waking an idle vCPU
is the cost), for the raw floor as much as for the sandbox. Ratios between a free-running
contender and a free-running floor are then a coin toss. So each contender is measured with
its host thread and its child on the same CPU (software overhead in full view), and again on
two CPUs (wake-up cost included).
"""
import os

PLACEMENTS = {"same_cpu": (0, 0), "cross_cpu": (0, 1)}


class Pinned:
    """`with Pinned(pids, "same_cpu"):` the calling thread and `pids` on their CPUs; restored after."""

    def __init__(self, pids, placement: str):
        self.pids = list(pids)
        self.host_cpu, self.child_cpu = PLACEMENTS[placement]
        self.ok = False

    def __enter__(self):
        self._saved = os.sched_getaffinity(0)
        cpus = self._saved
        if self.host_cpu not in cpus or self.child_cpu not in cpus:
            return self
        try:
            os.sched_setaffinity(0, {self.host_cpu})
            for pid in self.pids:
                os.sched_setaffinity(pid, {self.child_cpu})
            self.ok = True
        except OSError:
            pass  # not allowed here (another user's process): measured unpinned, and says so
        return self

    def __exit__(self, *exc):
        os.sched_setaffinity(0, self._saved)
        for pid in self.pids:
            try:
                os.sched_setaffinity(pid, self._saved)
            except OSError:
                pass


def available() -> list[str]:
    n = len(os.sched_getaffinity(0))
    return [name for name, (a, b) in PLACEMENTS.items() if max(a, b) < n]
