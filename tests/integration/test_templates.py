"""Warm templates (sandbox/zygote/template.py): a policy's preload set is imported once, in a
template, and its workers are forked from there, confined exactly like every other worker.

The evidence that a worker came from a template is its own: the preloaded test module
`sandbox.child.canary_template` records the pid of the process that imported it. A worker is
pid 1 of its own PID namespace, so one that imported the module itself finds 1; one forked
from a template finds the template's pid, a child of the zygote named `sandbox-tmpl`."""
import logging
import os
import signal
import time

import pytest

import sandbox
import procfs
from helpers import IS_ROOT
from procfs import children_of
from sandbox._host import zygote_client
from sandbox.policy import THREAD_CAPS

pytestmark = pytest.mark.unpriv

CANARY = "sandbox.child.canary_template"
PROBE = """
    import os
    import sys

    def imported_by():
        return sys.modules["sandbox.child.canary_template"].IMPORTED_BY

    def modules(names):
        return [n in sys.modules for n in names]
"""
# threads granted, every numeric library capped at one thread (a template serves only such a
# policy: it imports with the caps at 1; without them the policy's BLAS would start its pool)
THREADS = ('[limits]\nprocesses = 2\n[seccomp]\ngroups = ["@threads"]\n[environment]\nset = { '
           + ", ".join(f'{name} = "1"' for name in THREAD_CAPS) + ' }\n')
# what must be the same in a template's worker as in a cold one (Uid too, unprivileged)
CONFINEMENT = ("Seccomp", "NoNewPrivs", "CapEff", "CapPrm", "CapBnd", "CapInh", "Threads")


def _policy(preload: list[str], extra: str = "") -> str:
    return "[python]\npreload = [" + ", ".join(f'"{m}"' for m in preload) + "]\n" + extra


def _how(preload: list[str]) -> str | None:
    return zygote_client.get(False).templates.get(tuple(preload))


def _template_of(worker_pid: int) -> int | None:
    return procfs.parent_of(worker_pid)  # the zygote (CLONE_PARENT): the template is found by name


def _templates_of(zygote: int) -> list[int]:
    out = []
    for pid in children_of(zygote):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "sandbox-tmpl":
                    out.append(pid)
        except OSError:
            pass
    return out


def _start_until(path: str, policy: str, preload: list[str], wanted, limit: float = 20.0) -> sandbox.Worker:
    """Start workers (ending each that is not it) until the zygote's reply for this preload set
    satisfies `wanted`; the first start of a set is served before its template is ready."""
    end = time.monotonic() + limit
    while True:
        w = sandbox.Worker(path, policy=policy)
        if wanted(_how(preload)):
            return w
        w.close()
        assert time.monotonic() < end, f"the zygote still answers {_how(preload)!r} for {preload}"
        time.sleep(0.02)


def test_later_workers_come_from_the_template_and_are_confined_alike(make_plugin):
    preload = ["json", "decimal", CANARY]
    path, policy = make_plugin(PROBE, _policy(preload))
    with sandbox.Worker(path, policy=policy) as cold:
        assert _how(preload) == "cold"  # the first of a preload set: nobody waits for its import
        assert cold.call("imported_by") == 1  # it imported the modules itself
        cold_status = procfs.status(cold.pid)
        zygote = procfs.parent_of(cold.pid)
    warm = _start_until(path, policy, preload, lambda how: how == "warm")
    with warm, sandbox.Worker(path, policy=policy) as second:
        assert _how(preload) == "warm"
        template = warm.call("imported_by")
        assert template != 1 and template in _templates_of(zygote), "not imported in a template"
        assert second.call("imported_by") == template  # the same template serves the set
        assert warm.call("modules", ["json", "decimal"]) == [True, True]
        for w in (warm, second):
            assert procfs.parent_of(w.pid) == zygote  # the zygote's child: it reaps and reports
            st = procfs.status(w.pid)
            for key in CONFINEMENT:
                assert st[key] == cold_status[key], (key, st[key], cold_status[key])
            assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1" and int(st["CapEff"], 16) == 0
            assert len(st["NSpid"].split()) >= 2 and st["NSpid"].split()[-1] == "1"  # its own PID namespace
            assert st["Uid"].split()[0] != "0"
        uids = {procfs.status(w.pid)["Uid"] for w in (warm, second)}
        if IS_ROOT:
            assert len(uids) == 2, "template workers share a uid"
        else:
            assert uids == {cold_status["Uid"]}


def test_a_preload_that_leaves_a_thread_gets_no_template_and_says_so(make_plugin, caplog):
    preload = ["sandbox.child.canary_thread", CANARY]
    path, policy = make_plugin(PROBE, _policy(preload, THREADS))
    with caplog.at_level(logging.WARNING, logger="sandbox"):
        refused = _start_until(path, policy, preload, lambda how: (how or "").startswith("refused: "))
        with refused:
            assert "thread" in _how(preload), _how(preload)
            assert refused.call("imported_by") == 1  # started the old way: imported after its fork
            assert len(procfs.task_statuses(refused.pid)) == 2  # and its thread confined there (TSYNC)
        with sandbox.Worker(path, policy=policy) as again:
            assert again.call("imported_by") == 1
            assert _how(preload).startswith("refused: ")
    warnings = [r for r in caplog.records if "no warm template" in r.getMessage()
                and "canary_thread" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]  # once per preload set


def test_a_preload_that_fails_in_the_template_fails_the_worker_as_before(make_plugin):
    preload = ["json", "sandbox.child.no_such_module_here"]
    path, policy = make_plugin(PROBE, _policy(preload))
    end = time.monotonic() + 20
    while not (_how(preload) or "").startswith("refused: "):
        with pytest.raises(sandbox.LoadError) as ei:
            sandbox.Worker(path, policy=policy)
        assert "no_such_module_here" in str(ei.value)
        assert time.monotonic() < end, _how(preload)
        time.sleep(0.02)
    assert "no_such_module_here" in _how(preload)


def test_a_killed_template_is_replaced(make_plugin):
    preload = ["decimal", "json", CANARY]
    path, policy = make_plugin(PROBE, _policy(preload))
    with _start_until(path, policy, preload, lambda how: how == "warm") as warm:
        template = warm.call("imported_by")
        zygote = procfs.parent_of(warm.pid)
        assert template in _templates_of(zygote)
        os.kill(template, signal.SIGKILL)
        assert procfs.wait_until(lambda: procfs.gone(template), 10), "the zygote did not reap its template"
        assert warm.call("modules", ["json"]) == [True]  # its worker lives on
        with sandbox.Worker(path, policy=policy) as next_one:  # served the old way, or by a new one
            assert next_one.call("modules", ["json"]) == [True]
        with _start_until(path, policy, preload, lambda how: how == "warm") as replaced:
            assert replaced.call("imported_by") not in (1, template)


def test_a_template_imports_nothing_from_the_package_root(make_plugin):
    """In a checkout the zygote's first sys.path entry is the repository, plugins and all; a
    template imports before any confinement, so a preload found only there is refused (and the
    worker, which cannot read it either, fails to load as it always did)."""
    preload = ["tests.helpers"]
    assert os.path.exists(os.path.join(os.path.dirname(os.path.dirname(sandbox.__file__)), "tests", "helpers.py"))
    path, policy = make_plugin(PROBE, _policy(preload))
    end = time.monotonic() + 20
    while not (_how(preload) or "").startswith("refused: "):
        with pytest.raises(sandbox.LoadError):
            sandbox.Worker(path, policy=policy)
        assert time.monotonic() < end, _how(preload)
        time.sleep(0.02)
    assert "ModuleNotFoundError" in _how(preload), _how(preload)


HOST_THAT_EXITS = r"""
import json, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
import sandbox
from sandbox._host import zygote_client
preload = {preload!r}
end = time.monotonic() + 20
while True:
    w = sandbox.Worker({plugin!r}, policy={policy!r})
    if zygote_client.get(False).templates.get(tuple(preload)) == "warm" or time.monotonic() > end:
        break
    w.close()
print(json.dumps({{"template": w.call("imported_by"), "worker": w.pid}}), flush=True)
import os
os._exit(0)  # no clean-up: the zygote sees its host gone
"""


def test_templates_end_with_their_host(make_plugin, tmp_path):
    """The host ends without a word: its zygote, the zygote's template and the template's worker
    all end too (a file, not a pipe, for the output: a survivor would hold a pipe open)."""
    import json
    import subprocess
    import sys
    from helpers import ROOT, TESTS
    preload = ["json", "decimal", "fractions", CANARY]
    path, policy = make_plugin(PROBE, _policy(preload))
    script = HOST_THAT_EXITS.format(root=ROOT, tests=TESTS, preload=preload, plugin=path, policy=policy)
    with open(tmp_path / "out", "w+") as out, open(tmp_path / "err", "w+") as err:
        code = subprocess.run([sys.executable, "-c", script], stdout=out, stderr=err, timeout=60).returncode
        out.seek(0)
        err.seek(0)
        assert code == 0, err.read()[-2000:]
        seen = json.loads(out.read())
    assert seen["template"] != 1
    for pid in (seen["template"], seen["worker"]):
        assert procfs.wait_until(lambda pid=pid: procfs.ended(pid), 10), f"pid {pid} outlived its host"


def test_a_policy_granting_threads_without_caps_is_served_without_a_template(make_plugin):
    """A template imports with every BLAS cap at 1: a policy that grants threads and caps
    nothing would get one BLAS thread from it. Its workers import after their fork instead."""
    preload = ["fractions", "decimal"]
    path, policy = make_plugin(PROBE, _policy(preload, '[limits]\nprocesses = 2\n[seccomp]\ngroups = ["@threads"]\n'))
    for _ in range(3):
        with sandbox.Worker(path, policy=policy) as w:
            assert w.call("modules", preload) == [True, True]
    assert _how(preload) is None  # never asked for a template
    capped, capped_policy = make_plugin(PROBE, _policy(preload))  # threads not granted: templated
    _start_until(capped, capped_policy, preload, lambda how: how == "warm").close()
