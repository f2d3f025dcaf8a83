"""Real plugins' start: start -> first call -> terminate, p50 per example plugin.

`sandbox` is the worker as it starts: forked from the warm template of its policy's preload set
(the zygote keeps one per set; the table waits until it is ready, and its `template_state`
column says what the zygote answered); `sandbox_no_template` is the same start the old way,
forked by the zygote and importing the preload set after its fork. Beside each: the same
plugin file imported and its same first call made by a fresh `subprocess`
(`python -I`), by the same inside bubblewrap (`--unshare-all`), and by a cold
`ProcessPoolExecutor` (created, one task, shut down). The peers import `sandbox.plugin` from a
stub, so that they pay for the plugin's imports and nothing of ours.

    python -m benchmarks.realstart --pool N   # the pool rows, in a fresh single-threaded process
"""
import concurrent.futures as cf
import importlib.util
import json
import multiprocessing as mp
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib

from .stats import p50

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXAMPLES = os.path.join(ROOT, "examples", "plugins")
PY = sys.executable


def _png(w: int = 64, h: int = 48) -> bytes:
    """A small RGB PNG, built without Pillow so that no process here has imported it."""
    raw = b"".join(b"\0" + bytes(v for x in range(w) for v in (x * 4 % 256, y * 5 % 256, 128)) for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def plugins() -> dict:
    """name -> (worker.py, policy file, function, args). The trivial plugin first."""
    out = {
        "trivial": (os.path.join(HERE, "plugins", "bench_worker.py"), os.path.join(ROOT, "policies", "default.toml"),
                    "ping", ()),
        "textstats": (None, None, "stats", ("the quick brown fox jumps over the lazy dog " * 20,)),
        "markdown_render": (None, None, "render", ("# Title\n\nSome *text*, a [link](http://x).\n\n* a\n* b\n",)),
        "template": (None, None, "render", ("Hello {{ name }}! {% for i in items %}{{ i }} {% endfor %}",
                                            {"name": "world", "items": [1, 2, 3]})),
        "thumbnail": (None, None, "thumbnail", (_png(), 32, 32)),
    }
    for name, (path, _pol, fn, args) in list(out.items()):
        if path is None:
            out[name] = (os.path.join(EXAMPLES, name, "worker.py"), os.path.join(ROOT, "policies", f"{name}.toml"),
                         fn, args)
    if importlib.util.find_spec("numpy") is not None:
        out["numpy"] = (os.path.join(HERE, "plugins", "numpy_plugin", "worker.py"), numpy_policy(), "mean",
                        ([1.0, 2.0, 3.5],))
    return out


def numpy_policy() -> str:
    """numpy's BLAS starts threads: the policy preloads it and allows threads."""
    import tempfile
    import atexit
    fd, path = tempfile.mkstemp(prefix="bench-numpy-", suffix=".toml")  # the tree may be read-only
    atexit.register(os.unlink, path)
    with os.fdopen(fd, "w") as f:
        f.write(f'extends = "{os.path.join(ROOT, "policies", "default.toml")}"\n'
                '[limits]\nprocesses = 8\nmemory_mb = 2048\n'
                '[python]\npreload = ["numpy"]\n[seccomp]\ngroups = ["@threads"]\n'
                '[environment]\nset = { OPENBLAS_NUM_THREADS = "1", OMP_NUM_THREADS = "1" }\n')
    return path


def _module(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


# ---- the peers ----------------------------------------------------------------------------------
def _snippet(path: str, fn: str, args: tuple) -> str:
    return ("import os, sys, types\n"
            "pkg = types.ModuleType('sandbox'); pkg.__path__ = []\n"
            "plug = types.ModuleType('sandbox.plugin'); plug.post = lambda obj: None\n"
            "sys.modules['sandbox'] = pkg; sys.modules['sandbox.plugin'] = plug\n"
            f"sys.path.insert(0, {os.path.dirname(path)!r})\n"
            f"import {_module(path)} as worker\n"
            f"worker.{fn}(*{args!r})\n"
            "os.write(1, b'x')\n")


def _exec_once(argv) -> float:
    t = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE)
    got = p.stdout.read(1)
    p.wait()
    d = time.perf_counter() - t
    if got != b"x":
        raise RuntimeError(f"{argv[0]} peer failed")
    return d


BWRAP = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]


def _ours_once(path, pol, fn, args) -> float:
    import sandbox
    t = time.perf_counter()
    w = sandbox.Worker(path, policy=pol)
    w.call(fn, *args)
    w.terminate()
    return time.perf_counter() - t


class _no_templates:
    """The old path, exactly: the spawn request names no preload set, so the zygote forks the
    worker itself and the worker imports the preload set after its fork."""

    def __enter__(self):
        from sandbox._host import resources
        self._saved, resources.template_key = resources.template_key, lambda preload: ()

    def __exit__(self, *exc):
        from sandbox._host import resources
        resources.template_key = self._saved


def _ours_no_template_once(path, pol, fn, args) -> float:
    with _no_templates():
        return _ours_once(path, pol, fn, args)


def template_state(pol) -> str:
    """What the zygote answered for this policy's preload set the last time ("none": no preload)."""
    from sandbox._host import zygote_client
    from sandbox.protocol.zygote import template_key
    key = template_key(pol.preload)
    if not key:
        return "none"
    return zygote_client.get(bool(pol.network.allow)).templates.get(key, "?")


def until_warm(path, pol, fn, args, limit: float = 15.0) -> str:
    """Start workers of this policy until its template serves them (or refuses): the state."""
    end = time.monotonic() + limit
    while True:
        _ours_once(path, pol, fn, args)
        state = template_state(pol)
        if state in ("none", "warm") or state.startswith("refused") or time.monotonic() > end:
            return state
        time.sleep(0.02)


def _run_plugin(path, fn, args):
    """In a pool's forked child: the plugin imported there, as in the other peers."""
    import types
    pkg = types.ModuleType("sandbox")
    pkg.__path__ = []
    plug = types.ModuleType("sandbox.plugin")
    plug.post = lambda obj: None
    sys.modules["sandbox"], sys.modules["sandbox.plugin"] = pkg, plug
    sys.path.insert(0, os.path.dirname(path))
    import importlib
    getattr(importlib.import_module(_module(path)), fn)(*args)
    return True


def _pool_once(path, fn, args) -> float:
    t = time.perf_counter()
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as ex:
        ex.submit(_run_plugin, path, fn, args).result()
    return time.perf_counter() - t


def _pool_rows(n: int, skip: list[str]) -> dict:
    out = {}
    for name, (path, _, fn, args) in plugins().items():
        if name in skip:
            continue
        ts = [_pool_once(path, fn, args) for _ in range(n + 1)][1:]
        out[name] = round(p50(ts) * 1000, 2)
    return out


def run(quick: bool) -> dict:
    """{plugin: {sandbox, sandbox_no_template, subprocess_python, bwrap_python, process_pool_cold:
    ms p50, template_state: the zygote's last answer for its preload set}}."""
    import sandbox
    n = 5 if quick else 20
    table = plugins()
    pols = {name: sandbox.Policy.load(pol) for name, (_, pol, _, _) in table.items()}
    contenders = {"sandbox": lambda name, path, fn, args: _ours_once(path, pols[name], fn, args),
                  "sandbox_no_template": lambda name, path, fn, args: _ours_no_template_once(path, pols[name],
                                                                                             fn, args),
                  "subprocess_python": lambda name, path, fn, args: _exec_once([PY, "-I", "-c",
                                                                                _snippet(path, fn, args)])}
    if shutil.which("bwrap"):
        contenders["bwrap_python"] = lambda name, path, fn, args: _exec_once(
            BWRAP + [PY, "-I", "-c", _snippet(path, fn, args)])
    failed = {}
    for name, (path, _, fn, args) in list(table.items()):
        try:
            for once in contenders.values():
                once(name, path, fn, args)  # warm the page cache and the zygote
            until_warm(path, pols[name], fn, args)  # the template imports while we wait, once
        except Exception as e:  # noqa: BLE001 - e.g. a preload the host refuses: shown, not fatal
            failed[name] = {"failed": f"{type(e).__name__}: {e}"[:300]}
            del table[name]
    samples = {name: {c: [] for c in contenders} for name in table}
    names, order = list(table), list(contenders)
    for r in range(n):  # rounds, so that noise hits every contender alike, each in every position
        for name in names[r % len(names):] + names[:r % len(names)]:
            path, _, fn, args = table[name]
            for c in order[r % len(order):] + order[:r % len(order)]:
                samples[name][c].append(contenders[c](name, path, fn, args))
    out = {name: {c: round(p50(v) * 1000, 2) for c, v in row.items()} for name, row in samples.items()}
    for name in out:
        out[name]["template_state"] = template_state(pols[name])
    out.update(failed)
    pool = subprocess.run([PY, "-m", "benchmarks.realstart", "--pool", str(n), *failed], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    if pool.returncode == 0:
        for name, ms in json.loads(pool.stdout).items():
            out[name]["process_pool_cold"] = ms
    else:
        print(f"realstart: pool rows failed: {pool.stderr[-500:]}", file=sys.stderr)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pool"]:
        print(json.dumps(_pool_rows(int(sys.argv[2]), sys.argv[3:])))
