"""Zygote faults: what a host sees, and how long it takes, when its zygote stops or dies.

    python -m benchmarks.faults

Prints one JSON object, one entry per scenario: the error kind and message the caller got,
the seconds it took, and whether the next worker started (on a new zygote). Only the zygote
this process started is stopped or killed, by its pid; a stopped zygote is always killed at
the end.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import time

import sandbox
from sandbox._host import zygote_client
from sandbox.errors import SandboxError

PLUGIN = "def ping():\n    return 'pong'\n"


def _zygote_pid() -> int:
    pids = [z.pid for z in zygote_client._zygotes.values() if z.pid is not None]
    assert len(pids) == 1, f"expected one zygote of ours, found {pids}"
    return pids[0]


def _outcome(fn) -> dict:
    t0 = time.perf_counter()
    try:
        fn()
        got = {"kind": "ok"}
    except SandboxError as e:
        got = {"kind": e.kind, "error": type(e).__name__, "message": str(e)[:200]}
    return {**got, "seconds": round(time.perf_counter() - t0, 3)}


def _next_start(path: str) -> dict:
    """The next worker: how long until one serves, and how many starts that took (a zygote that
    is stopped rather than dead is found out by the first start that times out, which retires it)."""
    t0 = time.perf_counter()
    ok, starts = False, 0
    while not ok and starts < 2:
        starts += 1
        try:
            with sandbox.Worker(path, start_timeout=1.0) as w:
                ok = w.call("ping") == "pong"
        except sandbox.errors.ZygoteDied:
            pass
    return {"ok": ok, "starts": starts, "seconds": round(time.perf_counter() - t0, 3)}


def _stopped(pid: int):
    """Context: the zygote `pid` SIGSTOPped, killed afterwards (a stopped zygote is retired)."""
    class _Stop:
        def __enter__(self):
            os.kill(pid, signal.SIGSTOP)

        def __exit__(self, *exc):
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
    return _Stop()


def _wait_dead(pid: int, limit: float = 5.0) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except OSError:
            return
        time.sleep(0.005)


def stopped_zygote_start(path: str) -> dict:
    with sandbox.Worker(path) as w:
        w.call("ping")
    with _stopped(_zygote_pid()):
        got = _outcome(lambda: sandbox.Worker(path, start_timeout=1.0).terminate())
        nxt = _next_start(path)
    return {"start_timeout": 1.0, **got, "next_start": nxt}


def stopped_zygote_terminate(path: str) -> dict:
    w = sandbox.Worker(path)
    w.call("ping")
    with _stopped(_zygote_pid()):
        got = _outcome(w.terminate)
        nxt = _next_start(path)
    return {**got, "next_start": nxt}


def stopped_zygote_async_start(path: str) -> dict:
    with sandbox.Worker(path) as w:
        w.call("ping")

    async def run() -> dict:
        lag = 0.0
        stop = False

        async def ticker():
            nonlocal lag
            while not stop:
                t = time.perf_counter()
                await asyncio.sleep(0.01)
                lag = max(lag, time.perf_counter() - t - 0.01)

        tick = asyncio.ensure_future(ticker())
        t0 = time.perf_counter()
        try:
            w = await sandbox.AsyncWorker.start(path, start_timeout=1.0)
            await w.terminate()
            got = {"kind": "ok"}
        except SandboxError as e:
            got = {"kind": e.kind, "error": type(e).__name__, "message": str(e)[:200]}
        got["seconds"] = round(time.perf_counter() - t0, 3)
        stop = True
        await tick
        return {**got, "event_loop_max_lag_ms": round(lag * 1000, 1)}

    with _stopped(_zygote_pid()):
        got = asyncio.run(run())
        nxt = _next_start(path)
    return {"start_timeout": 1.0, **got, "next_start": nxt}


def killed_zygote_call(path: str) -> dict:
    w = sandbox.Worker(path)
    w.call("ping")
    os.kill(_zygote_pid(), signal.SIGKILL)
    _wait_dead(w.pid)  # the worker dies with its zygote (PDEATHSIG): call once it has
    got = _outcome(lambda: w.call("ping"))
    w.close()
    return {**got, "next_start": _next_start(path)}


def nul_in_policy(path: str, folder: str) -> dict:
    with sandbox.Worker(path) as w:
        w.call("ping")
    before = _zygote_pid()
    policy = os.path.join(folder, "nul.toml")
    with open(policy, "w") as f:
        f.write('extends = "default"\n[filesystem]\nread_only = ["/usr\\u0000/lib"]\n')
    got = _outcome(lambda: sandbox.Worker(path, policy=policy).terminate())
    nxt = _next_start(path)
    return {**got, "zygote_survived": _zygote_pid() == before, "next_start": nxt}


def main() -> None:
    folder = tempfile.mkdtemp(prefix="sandbox-faults-")
    try:
        os.chmod(folder, 0o755)
        path = os.path.join(folder, "worker.py")
        with open(path, "w") as f:
            f.write(PLUGIN)
        os.chmod(path, 0o644)
        out = {
            "stopped_zygote_start": stopped_zygote_start(path),
            "stopped_zygote_terminate": stopped_zygote_terminate(path),
            "stopped_zygote_async_start": stopped_zygote_async_start(path),
            "killed_zygote_call": killed_zygote_call(path),
            "nul_in_policy": nul_in_policy(path, folder),
        }
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
