"""`sandbox policy learn`: run a plugin's calls once and write the smallest policy they need.

    sandbox policy learn plugins/report/worker.py --call render '{"rows": 3}' --out report.toml

The worker is started as usual (own uid, rlimits, namespaces, Landlock, no_new_privs, seccomp),
but under a *learning* filter: every syscall the policy being extended does not grant, and
every path-taking call whether granted or not, stops in the kernel and is shown to this host
(seccomp user notification). The host decodes it, records it, and lets it through
(SECCOMP_USER_NOTIF_FLAG_CONTINUE) -- except what no policy should grant, which fails with an
errno and is recorded as refused: dangerous syscalls, signals or limits aimed at processes that
are not the worker's, connections when the policy has no network, sockets of families no policy
can name, new namespaces, TIOCSTI-like ioctls. Reads get a broad view (the whole tree, still
bounded by the worker's uid); writes stay where the policy and a scratch dir allow, and every
write attempted elsewhere is recorded (and refused by Landlock).

One run records everything; the result extends the given policy with grants in the terms an
operator writes (groups, `limits.threads`, `filesystem.read_only`, one `[[seccomp.rule]]` per
ioctl request), each commented with the call that needed it. Dangerous syscalls are never
granted: they appear as commented-out lines saying so.

Learning is for vetting a plugin on trusted inputs, never for serving untrusted traffic: it
widens the read view and lets through what the final policy may refuse.
"""
from __future__ import annotations

import argparse
import errno as errno_mod
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from ..errors import SandboxError, UsageError
from .learn_propose import propose
from .._host.lifecycle import Notification
from .learn_record import Recorder, largest_file

__all__ = ["learn", "main", "LearnResult", "Notification", "Recorder", "propose", "learning_bpf",
           "learning_policy"]


LEARN_TASKS = 64            # threads/processes a learning run may have at once (RLIMIT_NPROC)
LEARN_TIMEOUT = 120.0       # seconds per call and for the start: every open is a round trip

# Calls notified even when the policy allows them: their paths (and threads) are what we learn.
WATCHED = frozenset({
    "open", "openat", "openat2", "creat", "execve", "execveat", "mkdir", "mkdirat", "unlink", "unlinkat",
    "rmdir", "rename", "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat", "truncate",
    "chdir", "stat", "lstat", "newfstatat", "statx", "access", "faccessat", "faccessat2", "readlink",
    "readlinkat", "clone", "fork", "vfork", "socket", "connect", "bind",
})
LEARN_FILE_MB = 64  # RLIMIT_FSIZE while learning when the policy allows no file to grow


# ---- the learning filter and policy ------------------------------------------------------------

def _seccomp_module():
    try:
        import seccomp
    except ImportError:
        import pyseccomp as seccomp
    return seccomp


def learning_bpf(base) -> bytes:
    """The base policy's filter with NOTIFY instead of KILL, plus WATCHED calls notified too."""
    import tempfile
    from .compile import parse_condition
    sc = _seccomp_module()
    sec = base.explain()["seccomp"]
    f = sc.SyscallFilter(sc.NOTIFY)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    allow = set(sec["allow"])
    for name in sorted(allow - WATCHED):
        f.add_rule(sc.ALLOW, name)
    for rule in sec["rules"]:
        if rule["syscall"] not in WATCHED and rule["syscall"] not in allow:
            f.add_rule(sc.ALLOW, rule["syscall"], *[parse_condition(c, base.path, "learn") for c in rule["when"]])
    # fstat() is newfstatat(fd, "", AT_EMPTY_PATH): no path, and every open is followed by one
    for name, arg in (("newfstatat", 3), ("statx", 2)):
        if name in allow or any(r["syscall"] == name for r in sec["rules"]):
            f.add_rule(sc.ALLOW, name, sc.Arg(arg, sc.MASKED_EQ, 0x1000, 0x1000))
    for name, err in sec["errno"].items():
        if name not in allow:
            f.add_rule(sc.ERRNO(getattr(errno_mod, err)), name)
    with tempfile.TemporaryFile() as tmp:
        f.export_bpf(tmp)
        tmp.seek(0)
        return tmp.read()


def learning_policy(base, program: bytes):
    """What the learning worker is started with: the base policy, plus a broad read view, a
    scratch dir, room for threads and processes (RLIMIT_NPROC still caps them), and the
    learning filter as its program."""
    from . import Policy, schema
    data: dict[str, Any] = {
        "extends": base.path,
        "filesystem": {"read_only": ["/"], "scratch": True},
        "limits": {**{k: LEARN_TASKS for k in ("processes", "threads") if k in schema.SCHEMA["limits"]},
                   "file_size_mb": max(base.limits.file_size_bytes // schema.MIB, LEARN_FILE_MB)},
        "seccomp": {"default_action": "kill", "groups": ["@process"]}}  # @process: the zygote then
    policy = Policy.from_dict(data, path=None, base_dir=os.path.dirname(base.path))  # reaps leftovers
    policy.name = base.name
    policy._bpf = {True: program, False: program}  # bpf() returns the learning filter, whatever it is asked
    return policy


# ---- what one run saw ------------------------------------------------------------------------


# ---- running it ------------------------------------------------------------------------------

def _view(base, plugin: str) -> tuple[list[str], list[str]]:
    """The read and write paths a worker of `base` sees (as the plan builder computes them)."""
    from .._host import plan as plans
    plan = plans.build(base, plugin, "learn", None, None)
    ll = plan.landlock
    return ([os.path.realpath(p) for p in ll.read] + list(ll.read),
            [os.path.realpath(p) for p in ll.write] + list(ll.write))


def _worker_class():
    from ..worker import Worker

    hooked = True  # Worker's _on_syscall hook: the notification's verdict is the recorder's

    class LearningWorker(Worker):
        """A Worker whose forbidden syscalls go to a Recorder instead of ending the worker."""

        def __init__(self, worker_py, policy, recorder: Recorder, **kw):
            self._recorder = recorder
            kw["_on_syscall"] = self._hook
            super().__init__(worker_py, policy, **kw)

        def _hook(self, n):
            rec = self._recorder
            rec.worker_pid = rec.worker_pid or self.pid
            if rec.scratch is None and self._sp is not None:
                rec.scratch = self._sp.scratch
            return rec.on_syscall(n, getattr(n, "listener", None) or self._listener)


    return LearningWorker, hooked


@dataclass
class LearnResult:
    text: str                                   # the proposed policy (TOML)
    outcomes: list[tuple[str, str | None]]      # (call, None or the error it ended in)
    recorder: Recorder
    hooked: bool                                # ran through Worker's _on_syscall hook
    results: list | None = None                 # what each successful call returned, in order

    @property
    def ok(self) -> bool:
        return all(err is None for _, err in self.outcomes)


def _label(name: str, args) -> str:
    text = f"{name}({', '.join(json.dumps(a) for a in args)})"
    return text if len(text) <= 80 else text[:77] + "..."


def learn(worker_py, calls=(), *, script: str | None = None, extends=None, out: str | None = None) -> LearnResult:
    """Run `calls` ([(function, [args...]), ...]) and then `script` once under learning; return
    (and with `out`, write) the proposed policy."""
    from . import Policy
    from .loader import SHIPPED_DEFAULT
    plugin = os.path.abspath(os.fspath(worker_py))
    if not os.path.isfile(plugin):
        raise UsageError(f"plugin file not found: {plugin}")
    if extends is None:
        extends = SHIPPED_DEFAULT
    elif "/" not in os.fspath(extends) and not os.fspath(extends).endswith(".toml"):
        from .loader import resolve_extends  # "default", or a policy's name next to the current folder
        extends = resolve_extends(os.fspath(extends), os.getcwd(), None)
    base = Policy.load(extends)
    if base.path is None:
        raise UsageError("learn extends a policy file; an inline policy has no path to extend")
    view_read, view_write = _view(base, plugin)
    rec = Recorder(base, plugin, view_read, view_write)
    LearningWorker, hooked = _worker_class()
    policy = learning_policy(base, learning_bpf(base))
    outcomes: list[tuple[str, str | None]] = []
    results: list = []
    worker = None
    try:
        worker = LearningWorker(plugin, policy, rec, start_timeout=LEARN_TIMEOUT)
        outcomes.append(("load", None))
        for name, args in calls:
            rec.current = "call " + _label(name, args)
            try:
                results.append(worker.invoke(name, tuple(args), timeout=LEARN_TIMEOUT))
                outcomes.append((rec.current, None))
            except SandboxError as e:
                outcomes.append((rec.current, f"{type(e).__name__}: {e}"))
                if not worker.alive:
                    break
            finally:
                rec.largest_file = max(rec.largest_file, largest_file(rec.scratch))
        if script is not None and worker.alive:
            rec.current = f"script {os.path.basename(script)}"
            try:
                with open(script) as f:
                    code = compile(f.read(), script, "exec")
                exec(code, {"__name__": "__learn__", "worker": worker})  # the operator's own code
                outcomes.append((rec.current, None))
            except (SandboxError, Exception) as e:  # noqa: BLE001 - reported in the proposal
                outcomes.append((rec.current, f"{type(e).__name__}: {e}"))
    except SandboxError as e:
        outcomes.append((rec.current, f"{type(e).__name__}: {e}"))
    finally:
        if worker is not None:
            worker.close()
    text = propose(rec, out_path=out, outcomes=outcomes)
    if out is not None:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, out)
    return LearnResult(text, outcomes, rec, hooked, results)


def _json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--call argument is not valid JSON: {text!r} ({e.msg})") from None


def main(argv=None) -> int:
    """`sandbox policy learn WORKER_PY --call FUNCTION [JSON_ARG ...] ... --out FILE`.
    Exit 0: written, every call succeeded; 1: written, some call failed (look at the comments)."""
    p = argparse.ArgumentParser(prog="sandbox policy learn",
                                description="run a plugin's calls once and write the policy they need")
    p.add_argument("worker_py", metavar="WORKER_PY")
    p.add_argument("--call", nargs="+", action="append", default=[], metavar=("FUNCTION", "JSON_ARG"),
                   help="a call to make (repeatable): the function's name, then its arguments as JSON")
    p.add_argument("--script", metavar="FILE", help="a Python file run with `worker` bound, after the calls")
    p.add_argument("--extends", metavar="POLICY", help="the policy to extend (default: the shipped default)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the learned policy")
    args = p.parse_args(argv)
    from ..cli import fail
    try:
        if not args.call and not args.script:
            raise UsageError("nothing to learn from: give at least one --call or a --script")
        calls = [(c[0], [_json_arg(a) for a in c[1:]]) for c in args.call]
        result = learn(args.worker_py, calls, script=args.script, extends=args.extends, out=args.out)
    except SandboxError as exc:
        return fail(exc)
    for label, err in result.outcomes:
        print(f"{label}: {'ok' if err is None else err}", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
