"""The peers and the floors, measured in the same run as the sandbox."""
import concurrent.futures as cf
import fcntl
import multiprocessing as mp
import os
import shutil
import struct
import subprocess
import sys
import time

F_SETPIPE_SZ = 1031
PY = sys.executable

# A raw echo child: 4-byte length prefix, os.read/os.write loops. The floor for a Python round trip.
ECHO_CHILD = r"""
import os, struct, sys
r, w = int(sys.argv[1]), int(sys.argv[2])
# Fork the echo loop from this fresh interpreter, the way the sandbox forks a worker from its
# zygote: an exec'd child is placed on CPUs differently (here that alone moved a 16 B round trip
# from ~7 to ~45 us), and the floor must not be slower than it should for that reason.
if os.fork():
    os._exit(0)
os.write(w, struct.pack("<i", os.getpid()))  # so that the host can place it on a CPU
def readn(n):
    chunks = []
    while n:
        b = os.read(r, min(n, 1 << 20))
        if not b:
            raise SystemExit(0)
        chunks.append(b); n -= len(b)
    return b"".join(chunks)
while True:
    h = readn(4)
    data = readn(struct.unpack("<I", h)[0])
    v = memoryview(h + data)
    while v:
        v = v[os.write(w, v):]
"""


def _setpipe(fd):
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass


class RawPipe:
    def __init__(self):
        a_r, self.a_w = os.pipe()
        self.b_r, b_w = os.pipe()
        for fd in (self.a_w, b_w):
            _setpipe(fd)  # same pipe size as the sandbox uses: a fair floor
        launcher = subprocess.Popen([PY, "-I", "-S", "-c", ECHO_CHILD, str(a_r), str(b_w)], pass_fds=(a_r, b_w))
        launcher.wait()  # the echo loop runs in its forked child, which exits on EOF
        os.close(a_r)
        os.close(b_w)
        self.pid = struct.unpack("<i", self._readn(4))[0]

    def roundtrip(self, payload: bytes):
        v = memoryview(struct.pack("<I", len(payload)) + payload)
        while v:
            v = v[os.write(self.a_w, v):]
        n = struct.unpack("<I", self._readn(4))[0]
        return self._readn(n)

    def _readn(self, n):
        chunks = []
        while n:
            b = os.read(self.b_r, min(n, 1 << 20))
            chunks.append(b)
            n -= len(b)
        return b"".join(chunks)

    def close(self):
        os.close(self.a_w)
        os.close(self.b_r)


def _mp_child(conn):
    conn.send(b"ready")
    while True:
        try:
            conn.send_bytes(conn.recv_bytes())
        except EOFError:
            return


def _echo(x):
    return x


def start_subprocess():
    t = time.perf_counter()
    p = subprocess.Popen([PY, "-I", "-S", "-c", "import os; os.write(1, b'x')"], stdout=subprocess.PIPE)
    p.stdout.read(1)
    d = time.perf_counter() - t
    p.wait()
    return d


def start_bwrap():
    t = time.perf_counter()
    p = subprocess.Popen(["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--dev", "/dev",
                          "--proc", "/proc", PY, "-I", "-S", "-c", "import os; os.write(1, b'x')"],
                         stdout=subprocess.PIPE)
    p.stdout.read(1)
    d = time.perf_counter() - t
    p.wait()
    return d


def start_mp(method):
    ctx = mp.get_context(method)

    def once():
        t = time.perf_counter()
        a, b = ctx.Pipe()
        p = ctx.Process(target=_mp_child, args=(b,))
        p.start()
        a.recv()
        d = time.perf_counter() - t
        a.close()
        p.kill()
        p.join()
        return d
    return once


def start_pool():
    t = time.perf_counter()
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as ex:
        ex.submit(_echo, 1).result()
        d = time.perf_counter() - t
    return d


def start_fork():
    t = time.perf_counter()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, b"x")
        os._exit(0)
    os.read(r, 1)
    d = time.perf_counter() - t
    os.waitpid(pid, 0)
    os.close(r)
    os.close(w)
    return d


def start_peers():
    """Peers that exec a fresh interpreter: safe to run from the benchmark's own (threaded) process."""
    peers = {"subprocess_python": start_subprocess, "mp_spawn": start_mp("spawn"),
             "mp_forkserver": start_mp("forkserver")}
    if shutil.which("bwrap"):
        peers["bwrap_python"] = start_bwrap
    return peers


def fork_peers(quick: bool) -> dict:
    """Peers that fork the measuring process. Forking a process that has threads (the sandbox's hub)
    can deadlock the child, which is the very reason the sandbox forks from a zygote: so these run
    in a fresh, single-threaded process of their own (`python -m benchmarks.peers`)."""
    import json
    out = subprocess.run([PY, "-m", "benchmarks.peers"] + (["--quick"] if quick else []), capture_output=True,
                         text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode != 0:
        raise RuntimeError(f"fork peers failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def _fork_peers_main(quick: bool) -> dict:
    from .stats import p50
    n = 50 if quick else 200
    res = {"start_ms": {}, "rtt_us": {}}
    for name, fn in (("os_fork", start_fork), ("process_pool_cold", start_pool)):
        fn()
        res["start_ms"][name] = round(p50([fn() for _ in range(n)]) * 1000, 3)
    # the round trips on one CPU, like the sandbox and the raw floor (see placement.py); the
    # children inherit it, and so do the pool's helper threads
    try:
        os.sched_setaffinity(0, {0})
    except OSError:
        pass
    for size in (16, 1024, 65536, 1048576):
        payload = os.urandom(size)
        reps = (2000 if quick else 10000) if size <= 65536 else (100 if quick else 400)
        row = {}
        for name, make in (("mp_pipe", MpPipe), ("process_pool", Pool)):
            c = make()
            c.roundtrip(payload)
            ts = []
            for _ in range(reps if name == "mp_pipe" else max(50, reps // 10)):
                t = time.perf_counter()
                c.roundtrip(payload)
                ts.append(time.perf_counter() - t)
            c.close()
            row[name] = round(p50(ts) * 1e6, 1)
        res["rtt_us"][str(size)] = row
    return res



class MpPipe:
    def __init__(self):
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_mp_child, args=(child,))
        self.proc.start()
        self.conn.recv()

    def roundtrip(self, payload):
        self.conn.send_bytes(payload)
        return self.conn.recv_bytes()

    def close(self):
        self.conn.close()
        self.proc.kill()  # the forked child holds both ends of the Pipe: it would never see EOF
        self.proc.join()


class Pool:
    def __init__(self):
        self.ex = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork"))
        self.ex.submit(_echo, b"").result()

    def roundtrip(self, payload):
        return self.ex.submit(_echo, payload).result()

    def close(self):
        self.ex.shutdown()


def pss_kib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return None


def idle_pss_peers():
    out = {}
    p = subprocess.Popen([PY, "-I", "-S", "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    time.sleep(0.3)
    out["subprocess_python"] = pss_kib(p.pid)
    p.stdin.close()
    p.wait()
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    proc = ctx.Process(target=_mp_child, args=(b,))
    proc.start()
    a.recv()
    time.sleep(0.2)
    out["mp_spawn"] = pss_kib(proc.pid)
    a.close()
    proc.kill()
    proc.join()
    return out


if __name__ == "__main__":
    import json
    print(json.dumps(_fork_peers_main("--quick" in sys.argv)))
