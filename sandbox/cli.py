"""Command line: `sandbox call`, `sandbox policy explain|groups`, `sandbox doctor`, `sandbox --version`.

Scripts read two things: the exit code (one per error kind, below) and, on failure, the last
line of stderr: one JSON object `{"error": KIND, "detail": ...}`. stdout carries only strict
JSON (no NaN or Infinity). Every human-readable line that holds text a plugin (or a policy
file) chose has its control characters escaped, so it cannot drive the operator's terminal;
the JSON line is exact (and ASCII: JSON's own escapes).

A syscall the policy denied (deny mode) is never silent: each one is a JSON line on stderr,
`{"denied": SYSCALL, "detail": ..., "errno": ..., "grant": ..., "plugin": ..., "policy": ...}`,
printed before the error object (which also lists them under "denials"), or on success beside
the result on stdout.
"""
import argparse
import base64
import errno as errno_mod
import json
import math
import os
import stat
import sys
from typing import Any

from . import errors

EXIT_CODES = {
    "plugin-error": 3,
    "timeout": 4,
    "violation": 5,
    "crashed": 6,
    "memory": 7,
    "protocol": 8,
    "policy-error": 9,
    "load-error": 10,
    "confinement-error": 11,
    "not-json": 12,
    "error": 1,
}

# C0 and C1 controls, DEL, and the bidirectional overrides that reorder what a terminal shows.
_UNSAFE = {c for c in range(0x20)} | {0x7f} | set(range(0x80, 0xa0)) | set(range(0x202a, 0x202f)) | \
    set(range(0x2066, 0x206a))


def inert(text) -> str:
    """`text` as one line a terminal shows literally: controls become \\xNN / \\uNNNN escapes."""
    text = str(text)
    out = []
    for ch in text:
        o = ord(ch)
        if o in _UNSAFE:
            out.append({0x0a: "\\n", 0x0d: "\\r", 0x09: "\\t"}.get(o)
                       or (f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"))
        elif 0xd800 <= o <= 0xdfff:  # lone surrogates (undecodable bytes in argv) cannot be printed
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


class NotJSON(errors.SandboxError):
    """A result that JSON cannot carry (NaN, infinities, keys that are not strings)."""
    kind = "not-json"


def _jsonable(value):
    """JSON has no bytes: they travel as {"$bytes": base64}."""
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def dumps(value) -> str:
    """Strict JSON, or NotJSON saying what JSON cannot carry."""
    try:
        return json.dumps(_jsonable(value), allow_nan=False)
    except ValueError:
        raise NotJSON("the result holds NaN or an infinity, which JSON cannot carry") from None
    except (TypeError, RecursionError) as e:
        raise NotJSON(f"the result cannot be written as JSON: {e}") from None


def error_record(exc: errors.SandboxError) -> dict:
    rec: dict[str, Any] = {"error": exc.kind, "detail": str(exc)}
    if isinstance(exc, errors.PluginError):
        rec.update(type=exc.type, message=exc.message, traceback=exc.traceback)
    if isinstance(exc, errors.PolicyViolation):
        rec.update(syscall=exc.syscall, arguments=list(exc.arguments) if exc.arguments else None,
                   plugin=exc.plugin, policy=exc.policy)
    if isinstance(exc, errors.PluginCrashed):
        rec.update(exit_code=exc.exit_code, signal=exc.signal)
    if isinstance(exc, errors.PluginTimeout):
        rec.update(timeout=exc.timeout)
    if isinstance(exc, errors.PolicyError):
        rec.update(path=exc.path, key=exc.key)
    if isinstance(exc, errors.ConfinementError):
        rec.update(layer=exc.layer)
    return rec


def _record_json(rec: dict) -> str:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if v is None or isinstance(v, (str, int, float, bool)):
            return v
        return str(v)
    return json.dumps(clean(rec), allow_nan=False)


def denial_record(fields: dict) -> dict:
    """One "denied" event's fields as the CLI reports them."""
    number = fields.get("errno")
    return {"denied": fields.get("syscall"), "detail": fields.get("detail"),
            "errno": errno_mod.errorcode.get(number, number) if isinstance(number, int) else number,
            "grant": fields.get("grant"), "plugin": fields.get("plugin"), "policy": fields.get("policy")}


def fail(exc: errors.SandboxError, denials: list | None = None) -> int:
    rec = error_record(exc)
    if denials:
        rec["denials"] = denials
    _err(f"sandbox: {rec['error']}: {inert(rec['detail'])}")
    _err(_record_json(rec))
    return EXIT_CODES.get(exc.kind, 1)


def _err(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _json_arg(text: str):
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise argparse.ArgumentTypeError(
            f"not valid JSON: {inert(text[:80])!r} ({inert(getattr(e, 'msg', e))})") from None


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {inert(text)!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _version() -> str:
    from importlib import metadata
    try:
        return metadata.version("sandbox-plugins")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sandbox", description="Run untrusted Python plugins in confined workers.")
    p.add_argument("--version", action="version", version=f"sandbox {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("call", help="start a worker, call one function, print its JSON result")
    c.add_argument("worker_py", metavar="WORKER_PY")
    c.add_argument("function", metavar="FUNCTION")
    c.add_argument("args", metavar="JSON_ARG", nargs="*", type=_json_arg)
    c.add_argument("--policy", default="default", metavar="FILE",
                   help='the plugin\'s policy file (TOML); "default" (the default) is the shipped default')
    c.add_argument("--timeout", type=_seconds, metavar="SECONDS", help="call deadline (default: the policy's)")

    pol = sub.add_parser("policy", help="policy tools")
    psub = pol.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    e = psub.add_parser("explain", help="the effective policy after extends and groups")
    e.add_argument("file", metavar="FILE", help='a policy file, or "default"')
    e.add_argument("--json", action="store_true", help="machine-readable output")
    g = psub.add_parser("groups", help="the syscall groups: what each holds and why")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    # These two parse their own arguments (sandbox/policy/lint.py and learn.py): see their --help.
    for name, text in (("lint", "review a policy file: grants that widen the attack surface, contradictions"),
                       ("learn", "run a plugin's calls once and write the smallest policy they need")):
        tool = psub.add_parser(name, help=text, add_help=False)
        tool.add_argument("rest", nargs=argparse.REMAINDER)

    d = sub.add_parser("doctor", help="which protection layers work here, each proven by a canary")
    d.add_argument("--json", action="store_true")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    tool = argv[1] if argv[:1] == ["policy"] and argv[1:2] in (["lint"], ["learn"]) else None
    args = build_parser().parse_args(argv) if tool is None else None
    try:
        if tool is not None:
            return _policy_tool(tool, argv[2:])  # tools with arguments (and --help) of their own
        assert args is not None
        if args.command == "call":
            return _call(args)
        if args.command == "policy" and args.policy_command == "groups":
            return _groups(args)
        if args.command == "policy":
            return _explain(args)
        if args.command == "doctor":
            from .doctor import run
            return run(as_json=args.json)
    except errors.SandboxError as exc:
        return fail(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # a bug of ours must still end in the JSON error contract
        return fail(errors.SandboxError(f"internal error: {type(exc).__name__}: {exc}"))
    return 2


def _policy_tool(name: str, rest: list[str]) -> int:
    if name == "lint":
        from .policy.lint import main as tool
    else:
        from .policy.learn import main as tool
    return tool(rest)


def _load_policy(name: str):
    from .policy import Policy
    return Policy.named(name)


def _await_denials(w, denials: list, bound: float = 1.0) -> None:
    """Events the hub thread saw reach subscribers on a thread of their own: wait (briefly) until
    every denial of the last call the worker counted has been heard."""
    import time
    deadline = time.monotonic() + bound
    expected = len(w.last_denials) if w is not None else 0
    while len(denials) < expected and time.monotonic() < deadline:
        time.sleep(0.005)


def _call(args) -> int:
    from .worker import Worker
    policy = _load_policy(args.policy)
    try:
        st = os.stat(args.worker_py)
    except (OSError, ValueError) as e:
        raise errors.LoadError(type(e).__name__,
                               f"{inert(args.worker_py)}: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block whoever opens it
        raise errors.LoadError("NotARegularFile", f"{inert(args.worker_py)} is not a regular file")
    from . import events
    denials: list[dict] = []

    def on_event(ev: events.Event) -> None:
        if ev.name == "denied":
            denials.append(denial_record(ev.fields))
    unsubscribe = events.subscribe(on_event)
    w = None
    try:
        with Worker(args.worker_py, policy=policy) as w:
            result = w.invoke(args.function, tuple(args.args), timeout=args.timeout)
    except errors.SandboxError as exc:
        _await_denials(w, denials)
        unsubscribe()
        for d in denials:
            _err(_record_json(d))
        return fail(exc, denials)
    _await_denials(w, denials)
    unsubscribe()
    for d in denials:
        _err(_record_json(d))
    line = dumps(result)
    print(line, flush=True)
    return 0


def _explain(args) -> int:
    policy = _load_policy(args.file)
    if args.json:
        print(json.dumps(policy.explain(), indent=2, sort_keys=True))
    else:
        from .policy.explain import explain_text
        print("\n".join(inert(line) for line in explain_text(policy).splitlines()))
    return 0


def _groups(args) -> int:
    from .policy.groups import GROUPS, contents
    data = {name: contents(name) for name in GROUPS}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    from .policy.explain import groups_text
    print(groups_text(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
