"""Fresh process per call: calls/s of a trivial function, each call in a process no call touched.

Three ways, each driven by one caller, one call after the other:
- sandbox_fresh: `sandbox.fresh.FreshWorker` (a confined worker per call, the next one started
  in the background while the current call runs), for a few `spares` settings; and
  `AsyncFreshWorker` at the best of them;
- subprocess_python: `python -I -c <snippet>` per call (the snippet imports nothing);
- exec_per_call: codejail-style: the snippet written to a fresh temp dir, `python -I -S -B` run
  there with the input as JSON on stdin and the result read as JSON from stdout.
Where the time of one fresh call goes is measured beside: start (Worker() until READY), the call,
and terminate (SIGKILL until reaped), each p50 over sequential cycles.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from . import ours
from .stats import p50

PY = sys.executable
SNIPPET = "def ping():\n    return 'pong'\n"
JAILED = SNIPPET + "import json, sys\njson.dump({'result': ping(**json.load(sys.stdin))}, sys.stdout)\n"


def _rate(fn, seconds: float, at_least: int) -> float:
    fn()
    n, t = 0, time.perf_counter()
    while n < at_least or time.perf_counter() - t < seconds:
        fn()
        n += 1
    return round(n / (time.perf_counter() - t), 1)


def _cpu_of(pid: int) -> tuple[float, float]:
    """(own, reaped children's) CPU seconds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(v[11]) + int(v[12])) / tick, (int(v[13]) + int(v[14])) / tick


def ours_rate(pol, spares: int, seconds: float, cpu: dict | None = None) -> float:
    """Calls/s; with `cpu`, also fills in the CPU ms per call of the host, the zygote and the
    workers (which the zygote reaps, so their time is its children's)."""
    from sandbox._host import zygote_client
    from sandbox.fresh import FreshWorker
    with FreshWorker(ours.PLUGIN, policy=pol, spares=spares) as fw:
        for _ in range(10):
            fw.call("ping")
        zygote = zygote_client.get(bool(pol.network.allow)).pid
        h0, z0, c0 = os.times(), fw.calls, _cpu_of(zygote)
        rate = _rate(lambda: fw.call("ping"), seconds, 50)
        h1, n, z1 = os.times(), fw.calls - z0, _cpu_of(zygote)
    if cpu is not None:
        cpu.update({"host": round((h1.user + h1.system - h0.user - h0.system) / n * 1000, 3),
                    "zygote": round((z1[0] - c0[0]) / n * 1000, 3),
                    "workers": round((z1[1] - c0[1]) / n * 1000, 3)})
    return rate


def ours_async_rate(pol, spares: int, seconds: float) -> float:
    import asyncio
    from sandbox.fresh import AsyncFreshWorker

    async def main():
        async with AsyncFreshWorker(ours.PLUGIN, policy=pol, spares=spares) as fw:
            for _ in range(10):
                await fw.call("ping")
            n, t = 0, time.perf_counter()
            while n < 50 or time.perf_counter() - t < seconds:
                await fw.call("ping")
                n += 1
            return round(n / (time.perf_counter() - t), 1)
    return asyncio.run(main())


def subprocess_call():
    out = subprocess.run([PY, "-I", "-c", SNIPPET + "print(ping())"], capture_output=True, check=True)
    assert out.stdout.strip() == b"pong"


def exec_call():
    d = tempfile.mkdtemp(prefix="bench-jail-")
    try:
        with open(os.path.join(d, "jailed_code"), "w") as f:
            f.write(JAILED)
        out = subprocess.run([PY, "-I", "-S", "-B", "jailed_code"], cwd=d, input=b"{}", capture_output=True,
                             check=True)
        assert json.loads(out.stdout)["result"] == "pong"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def where_time_goes(pol, n: int) -> dict:
    import sandbox
    start, call, term = [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        w = sandbox.Worker(ours.PLUGIN, policy=pol)
        t1 = time.perf_counter()
        w.call("ping")
        t2 = time.perf_counter()
        w.terminate()
        t3 = time.perf_counter()
        start.append(t1 - t0)
        call.append(t2 - t1)
        term.append(t3 - t2)
    return {"start_ms": round(p50(start) * 1000, 3), "call_ms": round(p50(call) * 1000, 3),
            "terminate_ms": round(p50(term) * 1000, 3)}


def run(pol, quick: bool) -> dict:
    seconds = 1.0 if quick else 4.0
    cpu = {}
    by_spares = {str(s): ours_rate(pol, s, seconds, cpu if s == 2 else None) for s in (1, 2, 4)}
    best = max(by_spares, key=lambda k: by_spares[k])
    return {
        "sandbox_fresh": by_spares[best],
        "sandbox_fresh_best_spares": int(best),
        "sandbox_fresh_by_spares": by_spares,
        "sandbox_fresh_async": ours_async_rate(pol, int(best), seconds),
        "subprocess_python": _rate(subprocess_call, seconds / 2, 10),
        "exec_per_call": _rate(exec_call, seconds / 2, 10),
        "breakdown_ms": where_time_goes(pol, 100 if quick else 400),
        "cpu_ms_per_call_spares_2": cpu,
    }
