"""Command line: `sandbox call`, `sandbox policy explain`, `sandbox doctor`.

Scripts read two things: the exit code (one per error kind, below) and, on failure, the last
line of stderr: one JSON object `{"error": KIND, "detail": ...}`.
"""
import argparse
import base64
import json
import sys

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
    "error": 1,
}


def _jsonable(value):
    """JSON has no bytes: they travel as {"$bytes": base64}."""
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def error_record(exc: errors.SandboxError) -> dict:
    rec = {"error": exc.kind, "detail": str(exc)}
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


def fail(exc: errors.SandboxError) -> int:
    rec = error_record(exc)
    print(f"sandbox: {rec['error']}: {rec['detail']}", file=sys.stderr)
    print(json.dumps(rec), file=sys.stderr)
    return EXIT_CODES.get(exc.kind, 1)


def _json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r} ({e.msg})")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sandbox", description="Run untrusted Python plugins in confined workers.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("call", help="start a worker, call one function, print its JSON result")
    c.add_argument("worker_py", metavar="WORKER_PY")
    c.add_argument("function", metavar="FUNCTION")
    c.add_argument("args", metavar="JSON_ARG", nargs="*", type=_json_arg)
    c.add_argument("--policy", required=True, metavar="FILE", help="the plugin's policy file (TOML)")
    c.add_argument("--timeout", type=_seconds, metavar="SECONDS", help="call deadline (default: the policy's)")

    pol = sub.add_parser("policy", help="policy tools")
    psub = pol.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    e = psub.add_parser("explain", help="the effective policy after extends and groups")
    e.add_argument("file", metavar="FILE")
    e.add_argument("--json", action="store_true", help="machine-readable output")

    d = sub.add_parser("doctor", help="which protection layers work here, each proven by a canary")
    d.add_argument("--json", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "call":
            return _call(args)
        if args.command == "policy":
            return _explain(args)
        if args.command == "doctor":
            from .doctor import run
            return run(as_json=args.json)
    except errors.SandboxError as exc:
        return fail(exc)
    except KeyboardInterrupt:
        return 130
    return 2


def _call(args) -> int:
    from .policy import Policy
    from .worker import Worker
    policy = Policy.load(args.policy)
    with Worker(args.worker_py, policy=policy) as w:
        result = w.invoke(args.function, args.args, timeout=args.timeout)
    print(json.dumps(_jsonable(result)))
    return 0


def _explain(args) -> int:
    from .policy import Policy
    policy = Policy.load(args.file)
    if args.json:
        print(json.dumps(policy.explain(), indent=2, sort_keys=True))
    else:
        from .policy.explain import explain_text
        print(explain_text(policy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
