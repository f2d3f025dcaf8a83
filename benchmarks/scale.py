"""500 live workers of the default policy at once: start them all, measure what they hold, kill
and reap them all. And what each confinement layer (policy variant) adds to one start."""
import asyncio
import os
import resource
import shutil
import tempfile
import time

from . import ours
from .peers import pss_kib
from .stats import p50

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "policies", "default.toml")


def _enough_fds(n_workers: int) -> bool:
    need = 16 * n_workers + 256  # five pipes' host ends, the listener, epoll and poll registrations
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need and (hard == resource.RLIM_INFINITY or hard >= need):
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        soft = need
    return soft >= need


async def _scale(pol, n: int) -> dict:
    import sandbox
    t = time.perf_counter()
    workers = await asyncio.gather(*(sandbox.AsyncWorker.start(ours.PLUGIN, policy=pol) for _ in range(n)))
    started = time.perf_counter() - t
    try:
        assert all(r == "pong" for r in await asyncio.gather(*(w.call("ping") for w in workers)))
        pss = [pss_kib(w.pid) for w in workers]
    finally:
        t = time.perf_counter()
        await asyncio.gather(*(w.terminate() for w in workers))
        killed = time.perf_counter() - t
    known = [v for v in pss if v is not None]
    return {"workers": n, "start_all_s": round(started, 3), "kill_reap_all_s": round(killed, 3),
            "pss_total_mib": round(sum(known) / 1024, 1) if known else None,
            "pss_per_worker_kib": round(sum(known) / len(known)) if known else None}


def scale_500(pol, n: int = 500) -> dict:
    if not _enough_fds(n):
        return {"workers": n, "skipped": f"RLIMIT_NOFILE below {16 * n + 256}"}
    return asyncio.run(_scale(pol, n))


def terminate_ms(pol, n: int) -> float:
    """terminate(): SIGKILL until the worker is reaped and its resources released, p50."""
    import sandbox
    out = []
    for _ in range(n + 1):
        w = sandbox.Worker(ours.PLUGIN, policy=pol)
        w.call("ping")
        t = time.perf_counter()
        w.terminate()
        out.append(time.perf_counter() - t)
    return round(p50(out[1:]) * 1000, 3)


# One variant per layer a policy can switch on; each extends the default by that grant alone.
VARIANTS = {
    "default": "",
    "scratch": "[filesystem]\nscratch = true\n",
    "threads": "[limits]\nprocesses = 4\n[seccomp]\ngroups = [\"@threads\"]\n",
    "network": "[network]\nallow = true\nfamilies = [\"inet\"]\n[seccomp]\ngroups = [\"@network-client\"]\n",
}


def start_by_policy(n: int) -> dict:
    """start -> first reply p50 (ms) per policy variant, measured in interleaved rounds."""
    d = tempfile.mkdtemp(prefix="bench-policies-")
    try:
        return _start_by_policy(n, d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _start_by_policy(n: int, d: str) -> dict:
    import sandbox
    pols = {}
    for name, body in VARIANTS.items():
        path = os.path.join(d, f"{name}.toml")
        with open(path, "w") as f:
            f.write(f'extends = "{DEFAULT}"\n{body}')
        try:
            pols[name] = sandbox.Policy.load(path)
            ours.start_once(pols[name])  # compiled, zygote up
        except sandbox.SandboxError as e:
            pols[name] = e
    samples = {name: [] for name, p in pols.items() if not isinstance(p, Exception)}
    rounds = 5
    for _ in range(rounds):
        for name in samples:
            samples[name] += [ours.start_once(pols[name]) for _ in range(max(1, n // rounds))]
    out = {name: round(p50(v) * 1000, 3) for name, v in samples.items()}
    out.update({name: f"refused: {type(p).__name__}: {p}" for name, p in pols.items() if isinstance(p, Exception)})
    return out


def numpy_pss_20(n: int = 20) -> dict | None:
    """Idle PSS of numpy workers with `n` of them alive (their shared pages are split n ways)."""
    import importlib.util
    import sandbox
    from . import realstart
    if importlib.util.find_spec("numpy") is None:
        return None
    path, pol, fn, args = realstart.plugins()["numpy"]
    pol = sandbox.Policy.load(pol)
    workers = []
    template = realstart.until_warm(path, pol, fn, args)  # forked from the numpy template, if it serves
    try:
        for _ in range(n):
            w = sandbox.Worker(path, policy=pol)
            w.call(fn, *args)
            workers.append(w)
        time.sleep(0.3)
        pss = [pss_kib(w.pid) for w in workers]
    except sandbox.SandboxError as e:
        return {"failed": f"{type(e).__name__}: {e}"[:300]}
    finally:
        for w in workers:
            w.terminate()
    known = [v for v in pss if v is not None]
    return {"workers": n, "pss_per_worker_kib": round(sum(known) / len(known)) if known else None,
            "template": template}
