"""The HTTP host's /health while a hostile plugin sends the worst it can under its message cap.

The hostile reply is the one that costs a host most per byte: a list of empty maps, one byte
each, as many as the cap allows. Two clients call it back to back; a third asks /health every
20 ms. The figure is /health's p99 during the flood, beside its p99 with no flood.
"""
import asyncio
import os
import subprocess
import sys
import tempfile
import time

from .stats import p50, pct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTILE = '''"""Hostile: replies with as many empty maps as the message cap allows, in lists of
100,000 (each container stays under the decoder's per-container item limit)."""
CAP = {cap}
CHUNK = 100_000


def flood():
    return [[{{}}] * CHUNK for _ in range((CAP - 4096) // (CHUNK + 5))]
'''


def _port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _probe(client, url, until, out):
    while time.perf_counter() < until:
        t = time.perf_counter()
        r = await client.get(url)
        out.append(time.perf_counter() - t)
        assert r.status_code == 200
        await asyncio.sleep(0.02)


async def _flood(client, url, until, counts):
    while time.perf_counter() < until:
        try:
            r = await client.post(url, content=b"[]", headers={"content-type": "application/json"})
            counts[r.status_code] = counts.get(r.status_code, 0) + 1
        except Exception as e:  # noqa: BLE001 - a client-side timeout is a data point too
            counts[type(e).__name__] = counts.get(type(e).__name__, 0) + 1


async def _measure(port, seconds):
    import httpx
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(timeout=60) as probe, httpx.AsyncClient(timeout=60) as attacker:
        for _ in range(400):
            try:
                if (await probe.get(base + "/health")).status_code == 200:
                    break
            except httpx.HTTPError:
                await asyncio.sleep(0.05)
        idle = []
        await _probe(probe, base + "/health", time.perf_counter() + 1.0, idle)
        busy, counts = [], {}
        until = time.perf_counter() + seconds
        await asyncio.gather(_probe(probe, base + "/health", until, busy),
                             *(_flood(attacker, base + "/plugins/flood/flood", until, counts) for _ in range(2)))
    return idle, busy, counts


def run(quick: bool) -> dict:
    # quick: a 1 MiB cap. full: 4 MiB; at the default's 16 MiB one such reply took tens of seconds
    # and over a GB of host memory to decode on main, which would swamp the run and the machine.
    cap = (1 << 20) if quick else (4 << 20)
    seconds = 3.0 if quick else 15.0
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        plug = os.path.join(d, "plugins", "flood")
        os.makedirs(plug, mode=0o755)
        os.makedirs(os.path.join(d, "policies"), mode=0o755)
        with open(os.path.join(plug, "worker.py"), "w") as f:
            f.write(HOSTILE.format(cap=cap))
        os.chmod(os.path.join(plug, "worker.py"), 0o644)
        with open(os.path.join(d, "policies", "flood.toml"), "w") as f:
            f.write(f'extends = "{os.path.join(ROOT, "policies", "default.toml")}"\n'
                    f"[limits]\nmax_message_bytes = {cap}\nmemory_mb = 2048\ntimeout = 30\n")
        port = _port()
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", "host_app.py"), "--host", "127.0.0.1",
                                 "--port", str(port), "--plugins", os.path.join(d, "plugins"), "--policies",
                                 os.path.join(d, "policies"), "--pool-size", "2", "--log-level", "warning"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            idle, busy, counts = asyncio.run(_measure(port, seconds))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {"cap_bytes": cap, "empty_maps_per_reply": (cap - 4096) // 100_005 * 100_000, "flood_s": seconds,
            "hostile_replies": counts,
            "health_p50_ms": round(p50(busy) * 1000, 2), "health_p99_ms": round(pct(busy, 99) * 1000, 2),
            "health_max_ms": round(max(busy) * 1000, 2), "health_p99_idle_ms": round(pct(idle, 99) * 1000, 2),
            "health_samples": len(busy)}
