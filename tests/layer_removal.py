"""Remove each protection in turn and show which tests catch it: `python -m tests.layer_removal`.

Every protection must have a test that fails when the protection is gone. This tool proves it
the direct way: for each entry of LAYERS it copies the checkout (without .venv) to a scratch
folder, patches the one protection out, runs the security tests and the integration tests that
name the layer against the patched copy (the copy's `sandbox` comes first on PYTHONPATH, so the
installed editable package is not used), and reports how many tests failed and which. A layer
that no test catches is reported as MISSED and the tool exits 1.

A patch is a literal (old, new) text replacement in one file; when `old` is not found any more
(the code moved), the entry is reported as STALE rather than silently passing. Run as root (the
root mode holds the most layers); `--only NAME` runs one entry, `--list` shows them.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOOP = "lambda plan, state: None"
PROBES = ["tests/security", "tests/integration/test_confine.py", "tests/integration/test_doctor.py"]


@dataclass(frozen=True)
class Patch:
    path: str          # file to patch, relative to the checkout
    old: str           # literal text to replace (must occur)
    new: str


@dataclass(frozen=True)
class Layer:
    name: str
    patches: tuple[Patch, ...]
    probes: tuple[str, ...] = tuple(PROBES)


def _layer(name: str, path: str, old: str, new: str, probes: tuple[str, ...] = tuple(PROBES)) -> Layer:
    return Layer(name, (Patch(path, old, new),), probes)


def _step(name: str) -> Layer:
    """One confinement step replaced by a no-op in STEPS."""
    return _layer(f"step {name}", "sandbox/child/steps.py", f'("{name}", {name}),', f'("{name}", {NOOP}),')


LAYERS = [
    Layer("step new_session (a spare makes its session early: both removed)", (
        Patch("sandbox/child/steps.py", '("new_session", new_session),', f'("new_session", {NOOP}),'),
        Patch("sandbox/zygote/spare.py", "            os.setsid()\n", "            pass\n"))),
    *(_step(s) for s in ("arrange_fds", "pid_namespace", "clear_environment", "read_only_view",
                         "set_rlimits", "restrict_filesystem", "drop_privileges", "die_with_parent",
                         "no_new_privs", "install_seccomp")),
    _layer("seccomp TSYNC (threads a preload started stay unfiltered)", "sandbox/child/seccomp.py",
          "SECCOMP_FILTER_FLAG_TSYNC | SECCOMP_FILTER_FLAG_TSYNC_ESRCH", "0",
          ("tests/security/test_preload_threads.py", "tests/security/test_namespaces.py")),
    _layer("plugin file opened following symlinks", "sandbox/child/serve.py",
          "RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS", "0"),
    _layer("per-message object budget in the decoder", "sandbox/protocol/codec.py",
          "MAX_OBJECTS = 1_000_000", "MAX_OBJECTS = 1 << 62",
          ("tests/security/test_attack_protocol.py", "tests/unit/test_protocol.py", "tests/unit/test_lifecycle.py",
           "tests/integration/test_drivers.py")),
    _layer("frame size cap", "sandbox/protocol/framing.py", "if length > self._max:", "if False:",
           ("tests/security/test_attack_protocol.py", "tests/unit/test_protocol.py")),
    _layer("scratch quota (size and inodes of its tmpfs)", "sandbox/child/mounts.py",
           'f"size={int(scratch_bytes)},nr_inodes={int(scratch_inodes)},', 'f"',
           ("tests/security/test_grants.py",)),
    _layer("minimal view for the unix family (host socket files out of reach)", "sandbox/child/steps.py",
           "    if plan.landlock.unix:  # it may make", "    if False:  # it may make",
           ("tests/security/test_unix_sockets.py",)),
    _layer("a gid per policy (workers of other policies share none)", "sandbox/_host/plan.py",
           "gid=gids.worker_gid(policy, uid)", "gid=uid", ("tests/integration/test_policy_gid.py",)),
    # deny mode (the shipped default): what still kills, and the budget of denials
    _layer("deny mode answers dangerous syscalls too (host side)", "sandbox/_host/lifecycle.py",
           'if self._mode == "deny" and n.name not in self._dangerous:', 'if self._mode == "deny":',
           ("tests/security",)),
    _layer("deny mode answers dangerous syscalls too (a filter without a listener)", "sandbox/policy/compile.py",
           "f.add_rule(seccomp.KILL_PROCESS, name)", "pass", ("tests/integration/test_policy_files.py",)),
    _layer("the policy's max_denials ignored", "sandbox/_host/handle.py",
           'denial_budget=getattr(sec, "max_denials_per_call", lc.DENIAL_BUDGET),', "",
           ("tests/security/test_deny_mode.py",)),
    Layer("no PID namespace (plain fork, no pid-1 check)", (
        Patch("sandbox/zygote/pidns.py", "pid = _clone(flags | CLONE_NEWPID, ctid)", "pid = _clone(flags, ctid)"),
        Patch("sandbox/child/steps.py", '("pid_namespace", pid_namespace),', f'("pid_namespace", {NOOP}),'))),
    _layer("grant paths follow any link (one a worker planted too)", "sandbox/child/grant_paths.py",
           "why = _why_untrusted(fd, folder, st, writable)", "why = None",
           ("tests/security/test_grant_links.py", "tests/unit/test_grant_paths.py")),
]


def _copy_checkout(dest: str) -> None:
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache", ".hypothesis",
                                    ".mypy_cache", ".ruff_cache", "build", "dist", "*.egg-info")
    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)
    os.chmod(dest, 0o755)


def _apply(copy: str, layer: Layer) -> str | None:
    """Patch the copy; the file whose text was not found (the entry is stale), else None."""
    for patch in layer.patches:
        path = os.path.join(copy, patch.path)
        with open(path) as f:
            text = f.read()
        if patch.old not in text:
            return patch.path
        with open(path, "w") as f:
            f.write(text.replace(patch.old, patch.new))
    return None


def _run(copy: str, layer: Layer, timeout: float) -> tuple[int, list[str]]:
    env = dict(os.environ, PYTHONPATH=copy, PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "-rf", "--dist", "loadgroup",
           "-o", "addopts=", *layer.probes]
    try:
        out = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout).stdout
    except subprocess.TimeoutExpired as e:
        return -1, [f"timed out after {timeout:.0f} s: {str(e.stdout or '')[-200:]}"]
    lines = out.splitlines()
    failed = [line.split(" ", 2)[1] for line in lines if line.startswith("FAILED ")]
    if not failed:
        failed = lines[-1:]  # pytest's summary: how many ran
    return (len(failed) if any(line.startswith("FAILED ") for line in lines) else 0), failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.layer_removal", description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="run the entries whose name contains this")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    layers = [la for la in LAYERS if not args.only or args.only in la.name]
    if args.list:
        for la in layers:
            print(f"{la.name}: {', '.join(p.path for p in la.patches)}")
        return 0
    bad = 0
    for layer in layers:
        with tempfile.TemporaryDirectory(prefix="layer-removal-") as tmp:
            os.chmod(tmp, 0o755)
            copy = os.path.join(tmp, "c")
            _copy_checkout(copy)
            stale = _apply(copy, layer)
            if stale:
                print(f"STALE   {layer.name}: the text to patch is not in {stale}", flush=True)
                bad += 1
                continue
            n, failed = _run(copy, layer, args.timeout)
        if n > 0:
            print(f"CAUGHT  {layer.name}: {n} failed, e.g. {', '.join(failed[:4])}", flush=True)
        else:
            print(f"MISSED  {layer.name}: {'; '.join(failed) or 'no test failed'}", flush=True)
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
