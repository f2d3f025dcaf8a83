"""CPython's own regression tests for pure-computation modules, inside workers and outside.

    python -m tests.cpython_suite [--quick] [--modes default,kill,default+scratch] [--json FILE] [MODULE ...]

Each module of the interpreter's `Lib/test` runs once in a plain subprocess (outside) and once
per mode inside a worker under the shipped default policy; only the limits are raised (a
module's tests may take minutes). Modes: "default" is the shipped default as it is (deny mode),
"kill" and "deny" pin `seccomp.default_action`, "+scratch" adds a scratch dir.
The table says, per module, what passed, failed and errored outside and inside, whether the
worker was killed, and which tests differ.
"""
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN = os.path.join(HERE, "plugin", "worker.py")

MODULES = [
    "test_json", "test_re", "test_math", "test_cmath", "test_decimal", "test_fractions", "test_statistics",
    "test_datetime", "test_struct", "test_hashlib", "test_csv", "test_enum", "test_dataclasses",
    "test_typing", "test_unicodedata", "test_string", "test_textwrap", "test_difflib", "test_heapq",
    "test_bisect", "test_collections", "test_itertools", "test_functools", "test_operator", "test_base64",
    "test_binascii", "test_random", "test_ipaddress", "test_zlib", "test_calendar", "test_html",
    "test_copy", "test_pprint", "test_graphlib", "test_fnmatch",
]
QUICK = ["test_math", "test_fractions", "test_bisect", "test_heapq", "test_string", "test_html",
         "test_operator"]

LIMITS = """
[limits]
timeout = 900.0
cpu_seconds = 1800
memory_mb = 2048
open_files = 256
"""


def stdlib_tests_present() -> bool:
    try:
        import test.support  # noqa: F401  (the interpreter ships Lib/test)
        return True
    except ImportError:
        return False


def policy_file(folder: str, mode: str) -> str:
    """The shipped default with raised limits; "kill" or "deny" pins its seccomp.default_action
    ("default" leaves it as shipped). "+scratch" adds the one file grant the test helpers want: a
    private scratch dir (their cwd and TMPDIR), so what is left differing is threads, processes and
    sockets."""
    from sandbox.policy import loader
    action, _, extra = mode.partition("+")
    path = os.path.join(folder, f"cpython-suite-{action}-{extra or 'plain'}.toml")
    with open(path, "w") as f:
        f.write(f'extends = "{loader.SHIPPED_DEFAULT}"\n{LIMITS}\n')
        if extra == "scratch":
            f.write("file_size_mb = 64\n[filesystem]\nscratch = true\nscratch_mb = 256\nscratch_inodes = 65536\n")
        if action != "default":
            f.write(f'[seccomp]\ndefault_action = "{action}"\n')
    return path


def run_outside(module: str, timeout: float = 900) -> dict:
    code = ("import json, runpy, sys; ns = runpy.run_path(sys.argv[1]); "
            "print(json.dumps(ns['run_module'](sys.argv[2])))")
    try:
        out = subprocess.run([sys.executable, "-c", code, PLUGIN, module], capture_output=True, text=True,
                             timeout=timeout, cwd=tempfile.gettempdir())
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        return {"module": module, "killed": f"outside: {type(e).__name__}"}


def run_inside(module: str, policy: str, timeout: float = 900) -> dict:
    import sandbox
    try:
        with sandbox.Worker(PLUGIN, policy=policy) as w:
            return w.invoke("run_module", (module,), timeout=timeout)
    except sandbox.PluginError as e:
        return {"module": module, "error": f"{e.type}: {e.message}"[:300]}
    except sandbox.SandboxError as e:
        return {"module": module, "killed": f"{e.kind}: {e}"[:300]}


def run(modules, modes=("default", "kill"), jobs: int = 4) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        policies = {m: policy_file(folder, m) for m in modes}
        with ThreadPoolExecutor(jobs) as pool:
            outside = dict(zip(modules, pool.map(run_outside, modules), strict=True))
            inside = {mode: dict(zip(modules, pool.map(lambda m, mode=mode: run_inside(m, policies[mode]), modules),
                                      strict=True))
                      for mode in modes}
    for m in modules:
        row = {"module": m, "outside": outside[m]}
        for mode in modes:
            got = inside[mode][m]
            got["differs"] = sorted(set(got.get("failed_ids", [])) - set(outside[m].get("failed_ids", [])))
            row[mode] = got
        rows.append(row)
    return rows


CAUSES = (("thread", "can't start new thread"), ("write", "Read-only file system"),
          ("write", "No usable temporary directory"), ("process/socket", "Operation not permitted"))


def causes(r: dict) -> str:
    """Why the tests that differ from outside failed inside, counted by kind."""
    count: dict[str, int] = {}
    for test_id in r.get("differs", []):
        why = next((x for x in r.get("reasons", []) if x.startswith(test_id + ":")), "")
        kind = next((k for k, text in CAUSES if text in why), "other")
        count[kind] = count.get(kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(count.items())) or "-"


def _cell(r: dict) -> str:
    if "killed" in r:
        return "KILLED"
    if "error" in r:
        return "load error"
    return f"{r['passed']}/{r['failures']}/{r['errors']}"


def table(rows, modes) -> str:
    head = "| module | outside p/f/e | " + " | ".join(f"{m} p/f/e | killed? | differs by" for m in modes) + " |"
    lines = [head, "|" + "---|" * (2 + 3 * len(modes))]
    for row in rows:
        cells = [row["module"], _cell(row["outside"])]
        for m in modes:
            cells += [_cell(row[m]), "yes" if "killed" in row[m] else "no", causes(row[m])]
        lines.append("| " + " | ".join(cells) + " |")
    done = {m: sum("killed" not in row[m] and "error" not in row[m] for row in rows) for m in modes}
    lines.append("")
    lines.append("completed inside: " + ", ".join(f"{m} mode {done[m]} of {len(rows)}" for m in modes))
    for row in rows:
        for m in modes:
            r = row[m]
            if "killed" in r:
                lines.append(f"  {row['module']} ({m}): {r['killed']}")
            elif causes(r) not in ("-",) and "other" in causes(r):
                lines.append(f"  {row['module']} ({m}) differs: " + "; ".join(r.get("reasons", [])[:3]))
    return "\n".join(lines)
