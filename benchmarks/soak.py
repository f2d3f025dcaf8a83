"""Soak: N start/kill cycles of a trivial plugin; what the host holds before and after.

    python -m benchmarks.soak --cycles 10000

Prints one JSON object: fds, threads, RSS of the host, live children of the zygotes, uid
claim files, and the time the cycles took. A leak shows as a difference between before and after.
"""
import argparse
import json
import os
import shutil
import tempfile
import threading
import time

import sandbox

PLUGIN = "def ping():\n    return 'pong'\n"
CLAIMS = "/run/sandbox-uids"


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _zygote_children() -> int:
    from sandbox._host import zygote_client
    count = 0
    for z in list(zygote_client._zygotes.values()):
        pid = z.pid
        if pid is None:
            continue
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                count += len(f.read().split())
        except OSError:
            pass
    return count


def _claims() -> int:
    try:
        return len(os.listdir(CLAIMS))
    except OSError:
        return 0


def snapshot() -> dict:
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(),
            "rss_kib": _rss_kib(), "zygote_children": _zygote_children(), "uid_claim_files": _claims()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=10000)
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="sandbox-soak-")
    try:
        _soak(folder, args.cycles)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _soak(folder: str, cycles: int) -> None:
    os.chmod(folder, 0o755)
    path = os.path.join(folder, "worker.py")
    with open(path, "w") as f:
        f.write(PLUGIN)
    os.chmod(path, 0o644)
    with sandbox.Worker(path) as w:  # warm: the zygote and the hub exist before the first snapshot
        w.call("ping")
    time.sleep(0.5)
    before = snapshot()
    t0 = time.perf_counter()
    for i in range(cycles):
        w = sandbox.Worker(path)
        if i % 10 == 0:
            assert w.call("ping") == "pong"
        w.terminate()
    took = time.perf_counter() - t0
    time.sleep(0.5)
    after = snapshot()
    print(json.dumps({"cycles": cycles, "seconds": round(took, 2),
                      "per_cycle_ms": round(took / cycles * 1000, 3), "before": before, "after": after}))


if __name__ == "__main__":
    main()
