"""The HTTP rows of the benchmark: requests/second through the HTTP host beside an in-process and a
ProcessPoolExecutor-backed host; AsyncWorker round trip beside a raw asyncio pipe floor."""
import asyncio
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

from .peers import ECHO_CHILD, _setpipe
from .placement import Pinned
from .stats import p50

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins", "bench_worker.py")


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(port, n, concurrency):
    import httpx
    url = f"http://127.0.0.1:{port}/plugins/bench/ping"
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(200):
            try:
                if (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                    break
            except httpx.HTTPError:
                await asyncio.sleep(0.05)
        for _ in range(20):
            await client.post(url, json=[])
        sem = asyncio.Semaphore(concurrency)
        ok = 0

        async def one():
            nonlocal ok
            async with sem:
                r = await client.post(url, json=[])
                ok += r.status_code == 200

        t = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return round(ok / (time.perf_counter() - t), 1)


def http_rps(quick):
    n = 500 if quick else 3000
    out = {}
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        os.makedirs(os.path.join(d, "plugins", "bench"), mode=0o755)
        os.makedirs(os.path.join(d, "policies"), mode=0o755)
        with open(PLUGIN_SRC) as src, open(os.path.join(d, "plugins", "bench", "worker.py"), "w") as dst:
            dst.write(src.read())
        os.chmod(os.path.join(d, "plugins", "bench", "worker.py"), 0o644)
        with open(os.path.join(d, "policies", "bench.toml"), "w") as f:
            f.write(f'extends = "{os.path.join(ROOT, "policies", "default.toml")}"\n')
        runs = {
            "sandbox_http": [os.path.join(ROOT, "examples", "host_app.py"), "--host", "127.0.0.1", "--plugins",
                             os.path.join(d, "plugins"), "--policies", os.path.join(d, "policies"),
                             "--pool-size", "2", "--log-level", "warning", "--port"],
            "inprocess_http": ["-m", "benchmarks.web_apps", "inprocess"],
            "processpool_http": ["-m", "benchmarks.web_apps", "processpool"],
        }
        for name, args in runs.items():
            port = _port()
            proc = subprocess.Popen([sys.executable, *args, str(port)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, cwd=ROOT)
            try:
                out[name] = asyncio.run(_load(port, n, 16))
            finally:
                proc.terminate()
                proc.wait(timeout=20)
    return out


class _EchoProto(asyncio.Protocol):
    def __init__(self):
        self.buf = bytearray()
        self.want = None
        self.fut = None

    def data_received(self, data):
        self.buf += data
        if self.want is None and len(self.buf) >= 4:
            self.want = 4 + struct.unpack("<I", self.buf[:4])[0]
        if self.want is not None and len(self.buf) >= self.want:
            data, self.buf, self.want = bytes(self.buf[4:self.want]), self.buf[self.want:], None
            self.fut.set_result(data)


async def _raw_asyncio(payload, n):
    loop = asyncio.get_running_loop()
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    for fd in (a_w, b_w):
        _setpipe(fd)
    subprocess.Popen([sys.executable, "-I", "-S", "-c", ECHO_CHILD, str(a_r), str(b_w)], pass_fds=(a_r, b_w)).wait()
    os.close(a_r)
    os.close(b_w)
    pid = struct.unpack("<i", os.read(b_r, 4))[0]  # the echo child announces itself first
    proto = _EchoProto()
    rt, _ = await loop.connect_read_pipe(lambda: proto, os.fdopen(b_r, "rb", buffering=0))
    wt, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(a_w, "wb", buffering=0))
    ts = []
    with Pinned([pid], "same_cpu"):
        for _ in range(n):
            proto.fut = loop.create_future()
            t = time.perf_counter()
            wt.write(struct.pack("<I", len(payload)) + payload)
            await proto.fut
            ts.append(time.perf_counter() - t)
    wt.close()
    rt.close()
    return ts


async def _ours_asyncio(payload, n):
    import sandbox
    w = await sandbox.AsyncWorker.start(PLUGIN_SRC, policy=os.path.join(ROOT, "policies", "default.toml"))
    ts = []
    try:
        with Pinned([w.pid], "same_cpu"):  # the same placement as the floor's (placement.py)
            for _ in range(n):
                t = time.perf_counter()
                await w.call("echo", payload)
                ts.append(time.perf_counter() - t)
    finally:
        await w.close()
    return ts


def aio_rtt(quick):
    out = {}
    for size in (16, 1048576):
        payload = os.urandom(size)
        n = (2000 if quick else 10000) if size == 16 else (100 if quick else 400)
        raw, ours = [], []
        for _ in range(3):  # alternate, so that noise hits both alike
            raw += asyncio.run(_raw_asyncio(payload, n // 3))
            ours += asyncio.run(_ours_asyncio(payload, n // 3))
        out[str(size)] = {"sandbox_async": round(p50(ours) * 1e6, 1), "raw_asyncio": round(p50(raw) * 1e6, 1)}
    return out


def run(quick: bool) -> dict:
    return {"aio_rtt_us": aio_rtt(quick), "http_rps": http_rps(quick)}
