"""No worker ever holds another worker's data: the zygote and its spare hold no plan,
environment, path or payload of any earlier request when they fork.

Worker A runs under a policy that sets a secret variable, from a folder whose name is secret,
and is called with a secret payload. Then a worker of another plugin, forked after A by the
same zygote (from the spare, or by a fresh fork when the spare is gone), reads every readable
mapping of its own address space and looks for each secret, and for one the host holds in its
own memory and environment: a worker never execs, so anything its zygote or spare still held
at fork time would be found."""
import os
import secrets
import signal
import time

import pytest

import sandbox
import procfs
from helpers import DEFAULT_POLICY, ROOT
from procfs import children_of

pytestmark = pytest.mark.unpriv

SCANNER = os.path.join(ROOT, "tests", "plugins", "memscan", "worker.py")
HOST_SECRET_VAR = "SANDBOX_TEST_HOST_SECRET"

A_PLUGIN = """
import os

def use(payload):
    return [os.environ.get("API_TOKEN"), payload]
"""


def _split(secret: str) -> list[bytes]:
    """The scanner gets each secret as two halves it never joins."""
    half = len(secret) // 2
    return [secret[:half].encode(), secret[half:].encode()]


def _kill_spares(zygote: int, keep: set[int]) -> None:
    for pid in children_of(zygote):
        if pid not in keep:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # e.g. a template's spare, which ends by itself once its template is killed
    end = time.monotonic() + 10
    while [p for p in children_of(zygote) if p not in keep] and time.monotonic() < end:
        time.sleep(0.01)


@pytest.mark.parametrize("forked_from", ["spare", "fresh-fork"])
def test_a_later_worker_finds_nothing_of_an_earlier_one(plugin_dir, forked_from):
    token, path_word, payload = (f"{kind}-{secrets.token_hex(12)}" for kind in ("tok", "dir", "pay"))
    host_secret = f"host-{secrets.token_hex(12)}"
    os.environ[HOST_SECRET_VAR] = host_secret  # in the host's memory and environment only
    try:
        folder = os.path.join(plugin_dir, f"plugin_{path_word}")
        os.makedirs(folder, mode=0o755)
        worker_a = os.path.join(folder, "worker.py")
        with open(worker_a, "w") as f:
            f.write(A_PLUGIN)
        os.chmod(worker_a, 0o644)
        policy_a = os.path.join(plugin_dir, "a.toml")
        with open(policy_a, "w") as f:
            f.write(f'extends = "{DEFAULT_POLICY}"\n[environment]\nset = {{ API_TOKEN = "{token}" }}\n')
        policy_scan = os.path.join(plugin_dir, "scan.toml")
        with open(policy_scan, "w") as f:
            f.write(f'extends = "{DEFAULT_POLICY}"\n[filesystem]\nread_only = ["/proc/self"]\n')

        with sandbox.Worker(worker_a, policy=policy_a) as a:
            assert a.call("use", payload) == [token, payload]  # A really had them
            zygote = procfs.parent_of(a.pid)
            if forked_from == "fresh-fork":
                _kill_spares(zygote, {a.pid})
            with sandbox.Worker(SCANNER, policy=policy_scan) as scanner:
                assert procfs.parent_of(scanner.pid) == zygote  # the same zygote served both
                pairs = {"A's environment": _split(token), "A's plugin path": _split(path_word),
                         "A's payload": _split(payload), "the host's secret": _split(host_secret)}
                report = scanner.call("scan", pairs)
    finally:
        del os.environ[HOST_SECRET_VAR]
    assert report["scanned"] > 4 << 20, report  # the whole address space, not a sample
    assert report["hits"] == {}, f"a later worker found: {report['hits']}"


def test_the_scanner_finds_what_it_holds(plugin_dir):
    """The scan can fail: a secret in the scanning worker's own memory is found."""
    own = f"own-{secrets.token_hex(12)}"
    policy_scan = os.path.join(plugin_dir, "scan.toml")
    with open(policy_scan, "w") as f:
        f.write(f'extends = "{DEFAULT_POLICY}"\n[filesystem]\nread_only = ["/proc/self"]\n'
                f'[environment]\nset = {{ MINE = "{own}" }}\n')
    with sandbox.Worker(SCANNER, policy=policy_scan) as scanner:
        report = scanner.call("scan", {"own": _split(own)})
    assert "own" in report["hits"]


def test_a_worker_forked_from_a_template_finds_nothing_of_earlier_workers_of_its_set(plugin_dir):
    """A warm template (zygote/template.py) forks every worker of a preload set: it must hold
    nothing of any of them. Worker A1 (the first of the set, forked by the zygote while the
    template starts) and A2 (forked by the template) each get a secret in their environment
    and payload; then a scanner of the same preload set, forked by the same template, finds
    neither in its whole address space."""
    from sandbox._host import zygote_client
    preload = ["json", "sandbox.child.canary_template"]
    section = "[python]\npreload = [" + ", ".join(f'"{m}"' for m in preload) + "]\n"
    folder = os.path.join(plugin_dir, "plugin_a")
    os.makedirs(folder, mode=0o755)
    worker_a = os.path.join(folder, "worker.py")
    with open(worker_a, "w") as f:
        f.write(A_PLUGIN)
    os.chmod(worker_a, 0o644)
    policy_scan = os.path.join(plugin_dir, "scan.toml")
    with open(policy_scan, "w") as f:
        f.write(f'extends = "{DEFAULT_POLICY}"\n[filesystem]\nread_only = ["/proc/self"]\n{section}')

    def how():
        return zygote_client.get(False).templates.get(tuple(preload))

    pairs, seen = {}, []
    for n in (1, 2):
        token, payload = (f"{kind}{n}-{secrets.token_hex(12)}" for kind in ("tok", "pay"))
        policy_a = os.path.join(plugin_dir, f"a{n}.toml")
        with open(policy_a, "w") as f:
            f.write(f'extends = "{DEFAULT_POLICY}"\n{section}[environment]\nset = {{ API_TOKEN = "{token}" }}\n')
        end = time.monotonic() + 20
        while True:  # A2 must come from the template: start until the zygote says it did
            with sandbox.Worker(worker_a, policy=policy_a) as a:
                assert a.call("use", payload) == [token, payload]
            seen.append(how())
            if n == 1 or how() == "warm":
                break
            assert time.monotonic() < end, seen
            time.sleep(0.02)
        pairs[f"A{n}'s environment"], pairs[f"A{n}'s payload"] = _split(token), _split(payload)
    assert "warm" in seen
    with sandbox.Worker(SCANNER, policy=policy_scan) as scanner:
        assert how() == "warm", "the scanner did not come from the template"
        report = scanner.call("scan", pairs)
    assert report["scanned"] > 4 << 20, report
    assert report["hits"] == {}, f"a template's worker found: {report['hits']}"
