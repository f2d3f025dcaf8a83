"""`sandbox doctor`: which protection layers this machine and user support, each proven.

A layer is reported "ok" only after a canary worker tried to get past it and failed in the
expected way; detection alone (a feature flag, a kernel version) is never taken as proof.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

from . import errors

# What to install when the seccomp library is missing, by distribution family.
LIBSECCOMP_HINT = ("install the system library libseccomp: `apt-get install libseccomp2` (Debian, Ubuntu), "
                   "`dnf install libseccomp` (Fedora, RHEL), `apk add libseccomp` (Alpine)")

CANARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child", "canary_plugin.py")


def _canary_policy(**seccomp: Any) -> Any:
    from .policy import Policy
    from .policy.loader import SHIPPED_DEFAULT
    # The canary may read its own /proc/self/status (resolved inside the worker: its own pid).
    return Policy.from_dict({"extends": SHIPPED_DEFAULT, "filesystem": {"read_only": ["/proc/self"]},
                             "seccomp": seccomp})


def _check(name: str, fn: Callable[[Any], tuple[bool, str]], policy: Any = None) -> dict[str, Any]:
    from .worker import Worker
    try:
        with Worker(CANARY, policy=policy or _canary_policy(), name="canary") as w:
            ok, detail = fn(w)
    except errors.SandboxError as e:
        ok, detail = False, f"{type(e).__name__}: {e}"
    return {"layer": name, "ok": ok, "detail": detail}


def _expect(exc_type: type[errors.SandboxError], fn: Callable[[Any], object],
            describe: Callable[[Any], str]) -> Callable[[Any], tuple[bool, str]]:
    def check(w: Any) -> tuple[bool, str]:
        try:
            got = fn(w)
        except exc_type as e:
            return True, describe(e)
        except errors.SandboxError as e:
            return False, f"unexpected {type(e).__name__}: {e}"
        return False, f"not stopped: returned {got!r}"
    return check


def _status_check(w: Any) -> tuple[bool, str]:
    st = w.call("status")
    problems = []
    if st.get("NoNewPrivs") != "1":
        problems.append(f"NoNewPrivs={st.get('NoNewPrivs')}")
    if st.get("Seccomp") != "2":
        problems.append(f"Seccomp={st.get('Seccomp')}")
    if int(st.get("CapEff", "1"), 16) != 0:
        problems.append(f"CapEff={st.get('CapEff')}")
    if os.geteuid() == 0 and st.get("Uid", "0").split()[0] == "0":
        problems.append("still uid 0")
    return (not problems, "; ".join(problems) or f"uid {st.get('Uid', '?').split()[0]}, no capabilities, "
            "no_new_privs, seccomp filter mode")


def _denied_check(w: Any) -> tuple[bool, str]:
    """Under the shipped default a forbidden socket() fails with EPERM, the worker lives on, and
    the host heard of it (the per-call list of denials names it)."""
    try:
        got = w.call("make_socket")
    except errors.PluginError as e:
        names = [n.name for n in w.last_denials]
        ok = e.type == "PermissionError" and names == ["socket"] and w.alive
        return ok, f"socket() failed with {e.type}, reported as denied: {', '.join(names) or 'nothing'}"
    return False, f"not stopped: returned {got!r}"


def libseccomp_problem() -> str | None:
    """Why the host cannot load libseccomp (it compiles every policy with it), or None."""
    try:
        try:
            import seccomp  # noqa: F401  (the distribution's own bindings, when installed)
        except ImportError:
            import pyseccomp  # noqa: F401  (ctypes bindings: loading them loads libseccomp.so.2)
    except (OSError, RuntimeError, ImportError) as e:
        # pyseccomp raises RuntimeError when find_library() finds nothing, OSError when the
        # dynamic loader refuses the file it found.
        return f"libseccomp.so.2 cannot be loaded ({type(e).__name__}: {e}); {LIBSECCOMP_HINT}"
    return None


def checks() -> list[dict[str, Any]]:
    problem = libseccomp_problem()
    if problem is not None:  # every other check needs a compiled policy: nothing to prove
        return [{"layer": "libseccomp", "ok": False, "detail": problem}]
    root = os.geteuid() == 0
    results = [
        _check("privileges", _status_check),
        # seccomp lets setuid through for this canary: the kernel's answer is what is tested
        _check("setuid(0) refused by the kernel", lambda w: (w.call("try_setuid_root").startswith("refused"),
                                                             w.call("try_setuid_root")),
               _canary_policy(allow=["setuid"], allow_dangerous=["setuid"])),
        _check("seccomp deny mode, the shipped default (forbidden syscall fails and is reported)", _denied_check),
        _check("seccomp kill mode (forbidden syscall killed and named)",
               _expect(errors.PolicyViolation, lambda w: w.call("make_socket"),
                       lambda e: f"socket() stopped, reported as {e.syscall!r}" if e.syscall == "socket"
                       else f"stopped but named {e.syscall!r}"),
               _canary_policy(default_action="kill")),
        _check("landlock (unlisted path refused)",
               _expect(errors.PluginError, lambda w: w.call("read_file", "/etc/hostname"),
                       lambda e: f"/etc/hostname: {e.type}")),
        _check("environment cleared", lambda w: (w.call("environment") == w.policy.environment({}),
                                                  "no variable inherited (only the worker's baseline)")),
        _check("deadline (SIGKILL on timeout)",
               _expect(errors.PluginTimeout, lambda w: w.invoke("sleep", (30,), timeout=0.3),
                       lambda e: "sleep(30) killed after 0.3 s")),
    ]
    from ._host import zygote_client as client
    report = client.get(network=False).ensure_started()
    ns = report.get("namespaces", [])
    results.append({"layer": "namespaces", "ok": "net" in ns,
                    "detail": f"zygote namespaces: {', '.join(ns) or 'none'}"
                    + (f"; problems: {'; '.join(report.get('errors'))}" if report.get("errors") else "")})
    results.append({"layer": "mode", "ok": True,
                    "detail": "root: unique uid per worker" if root else "unprivileged: user namespace, no uid change"})
    return results


def run(as_json: bool = False) -> int:
    results = checks()
    if not as_json and results and results[0]["layer"] == "libseccomp" and not results[0]["ok"]:
        print(f"sandbox doctor: {results[0]['detail']}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            mark = "ok " if r["ok"] else "FAIL"
            print(f"[{mark}] {r['layer']}: {r['detail']}")
    return 0 if all(r["ok"] for r in results) else 1
