"""Plugin calls as Celery tasks on a real cluster: redis-server as broker and result backend, a
`celery worker` process (prefork with two children, then the threads pool), hundreds of tasks
mixing good calls and hostile plugins. Every result or error is checked, class and attributes;
no task is lost; after the worker stops, nothing it started is left (processes, scratch dirs).
"""
import glob
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

import sandbox
from helpers import DEFAULT_POLICY
import procfs
from procfs import children_of

celery = pytest.importorskip("celery")
redis = pytest.importorskip("redis")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server is missing (`make` installs it)", allow_module_level=True)

from sandbox.integrations.celery import START_ALLOWANCE, plugin_task, time_limits  # noqa: E402

# The good plugin's folder: its workers' scratch dirs are /tmp/sandbox-<NAME>-*. The pid keeps them
# apart from another run of this suite on the machine (or another xdist worker).
NAME = f"celerygood{os.getpid()}"

PLUGINS = {
    NAME: ("""
        def add(a, b):
            return a + b

        def echo(value):
            return value

        def boom(n):
            raise ValueError(f"bad input {n}")

        def nap(seconds):
            import time
            time.sleep(seconds)
        """, "[filesystem]\nscratch = true\n"),
    "spin": ("""
        def run():
            while True:
                pass
        """, "[limits]\ntimeout = 0.5\n"),
    "violate": ("""
        def run():
            import socket
            socket.socket()
        """, '[seccomp]\ndefault_action = "kill"\n'),  # kill mode pinned: a violation, not an EPERM
    "crash": ("""
        def run():
            import os
            os._exit(3)
        """, ""),
    "memory": ("""
        def run():
            hoard = []
            while True:
                hoard.append(bytearray(32 * 1024 * 1024))
        """, "[limits]\nmemory_mb = 192\n"),
}

TASKS = f'''
import os
from celery import Celery
from sandbox.integrations.celery import plugin_task

HERE = os.path.dirname(os.path.abspath(__file__))
BROKER = os.environ["SANDBOX_TEST_BROKER"]
app = Celery("sandbox_celery_test", broker=BROKER, backend=BROKER)
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                result_accept_content=["json"], broker_connection_retry_on_startup=True,
                worker_hijack_root_logger=False, worker_prefetch_multiplier=1)
POOL = {{"restart_limit": (1000, 60.0)}}  # the hostile plugins die on purpose, many times a minute


def declare(plugin, function):
    return plugin_task(app, os.path.join(HERE, "plugins", plugin, "worker.py"), function,
                       policy=os.path.join(HERE, "policies", plugin + ".toml"), pool_options=POOL,
                       name=f"test.{{plugin}}.{{function}}")


add = declare("{NAME}", "add")
echo = declare("{NAME}", "echo")
boom = declare("{NAME}", "boom")
spin = declare("spin", "run")
violate = declare("violate", "run")
crash = declare("crash", "run")
memory = declare("memory", "run")
nap = declare("{NAME}", "nap")
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _poll(condition, limit: float, step: float = 0.05):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        got = condition()
        if got:
            return got
        time.sleep(step)
    return condition()


# The module's redis broker and Celery project are made once, on one xdist worker.
pytestmark = pytest.mark.xdist_group("celery")


@pytest.fixture(scope="module")
def project():
    base = tempfile.mkdtemp(prefix="sandbox-celery-")
    os.chmod(base, 0o755)
    for name, (source, _) in PLUGINS.items():
        os.makedirs(os.path.join(base, "plugins", name))
        with open(os.path.join(base, "plugins", name, "worker.py"), "w") as f:
            f.write(textwrap.dedent(source))
    os.makedirs(os.path.join(base, "policies"))
    for name, (_, policy) in PLUGINS.items():
        with open(os.path.join(base, "policies", f"{name}.toml"), "w") as f:
            f.write(f'extends = "{DEFAULT_POLICY}"\n{policy}')
    with open(os.path.join(base, "tasks.py"), "w") as f:
        f.write(TASKS)
    subprocess.run(["chmod", "-R", "a+rX", base], check=True)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def broker(project):
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", project, "--protected-mode", "yes"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis(host="127.0.0.1", port=port)

    def answers():
        try:
            return client.ping()
        except redis.exceptions.ConnectionError:
            return False
    try:
        assert _poll(answers, 10), "redis-server did not answer"
        yield url
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def tasks(project, broker):
    os.environ["SANDBOX_TEST_BROKER"] = broker
    import importlib.util
    spec = importlib.util.spec_from_file_location("sandbox_celery_test_tasks", os.path.join(project, "tasks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    module.app.close()


class CeleryWorker:
    def __init__(self, project: str, broker: str, pool: str, concurrency: int):
        self.log_path = os.path.join(project, f"worker-{pool}.log")
        path = os.pathsep.join(p for p in (project, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, SANDBOX_TEST_BROKER=broker, PYTHONPATH=path)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool", pool, "-c", str(concurrency),
             "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-n", f"sandbox-test-{pool}-{random.randrange(1 << 30)}@localhost"],
            cwd=project, env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.seen: dict[int, str | None] = {}  # every process it started, with its start time

    def text(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self):
        assert _poll(lambda: " ready." in self.text() or self.proc.poll() is not None, 60), self.text()
        assert self.proc.poll() is None, self.text()

    def note_descendants(self) -> list[int]:
        found = children_of(self.proc.pid)
        for pid in found:
            self.seen.setdefault(pid, procfs.start_time(pid))
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown: what a service manager sends
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("the Celery worker did not stop within 60 s:\n" + self.text()[-3000:]) from None
        finally:
            self.log.close()

    def left_running(self) -> list[int]:
        return [pid for pid, started in self.seen.items() if started is not None and procfs.start_time(pid) == started]


def _workload(tasks, count: int) -> list[tuple]:
    """(async result, check) pairs: mostly good calls, a fifth hostile of four kinds."""
    rng = random.Random(count)
    kinds = ["add"] * 8 + ["echo"] * 4 + ["boom"] * 3 + ["spin", "violate", "crash", "memory"] * 1
    kinds = (kinds * (count // len(kinds) + 1))[:count]
    rng.shuffle(kinds)
    out = []
    for i, kind in enumerate(kinds):
        if kind == "add":
            out.append((kind, tasks.add.delay(i, 1000), i + 1000))
        elif kind == "echo":
            value = {"i": i, "raw": bytes([i % 256]) * 3, "nested": [1, [2, None], "x" * (i % 7)]}
            out.append((kind, tasks.echo.delay(value), value))
        elif kind == "boom":
            out.append((kind, tasks.boom.delay(i), i))
        else:
            out.append((kind, getattr(tasks, kind).delay(), None))
    return out


def _error_is_right(kind: str, e: sandbox.SandboxError, expected) -> bool:
    if kind == "boom":
        return (isinstance(e, sandbox.PluginError) and not isinstance(e, sandbox.LoadError)
                and e.type == "ValueError" and e.message == f"bad input {expected}" and "ValueError" in e.traceback)
    if kind == "spin":
        return isinstance(e, sandbox.PluginTimeout) and e.timeout == 0.5
    if kind == "violate":
        return (isinstance(e, sandbox.PolicyViolation) and e.syscall == "socket" and e.plugin == "violate"
                and e.policy.endswith("violate.toml"))
    if kind == "crash":
        return isinstance(e, sandbox.PluginCrashed) and e.exit_code == 3 and e.signal is None
    if kind == "memory":
        return isinstance(e, sandbox.PluginMemoryError)
    return False


def _check(kind: str, result, expected) -> str | None:
    """None when the task's outcome is right, else what was wrong."""
    try:
        value = result.get(timeout=120)
    except sandbox.SandboxError as e:
        return None if _error_is_right(kind, e, expected) else f"{kind}: {type(e).__name__} {e!r} {e.to_dict()}"
    except Exception as e:  # anything else is a wrong outcome, reported whole
        return f"{kind}: not a SandboxError: {type(e).__name__}: {e}"
    if kind in ("add", "echo") and value == expected:
        return None
    return f"{kind}: returned {value!r}, expected {expected!r}"


@pytest.mark.slow
@pytest.mark.parametrize("pool,concurrency,count", [("prefork", 2, 200), ("threads", 3, 40)])
def test_tasks_on_a_real_celery_worker(project, broker, tasks, pool, concurrency, count):
    for leftover in glob.glob(os.path.join(tempfile.gettempdir(), f"sandbox-{NAME}-*")):
        shutil.rmtree(leftover, ignore_errors=True)  # from an earlier, interrupted run
    worker = CeleryWorker(project, broker, pool, concurrency)
    try:
        worker.wait_ready()
        started = time.monotonic()
        sent = _workload(tasks, count)
        wrong = []
        for kind, result, expected in sent:
            problem = _check(kind, result, expected)
            if problem:
                wrong.append(problem)
            if len(wrong) > 10:
                break
        elapsed = time.monotonic() - started
        worker.note_descendants()
        if pool == "prefork":  # (the threads pool has no time limits)
            # A client's own shorter limit makes Celery's soft limit fire inside the sandbox call:
            # the backstop the integration turns into a timeout (and a fresh pool)
            with pytest.raises(sandbox.PluginTimeout) as ei:
                tasks.nap.apply_async((30,), soft_time_limit=1, time_limit=10).get(timeout=60)
            assert ei.value.timeout == 1 and "soft time limit" in str(ei.value)
            assert tasks.add.delay(1, 2).get(timeout=30) == 3  # and the next tasks are served
            worker.note_descendants()
        assert wrong == [], "\n".join(wrong) + "\n" + worker.text()[-3000:]
        print(f"\n{pool}: {len(sent)} tasks in {elapsed:.1f} s, outcomes "
              f"{ {k: sum(1 for s in sent if s[0] == k) for k in sorted({s[0] for s in sent})} }")
        # The pools were made after Celery's fork: no zygote is a child of the main process under prefork.
        zygotes = [pid for pid in worker.seen if b"sandbox/zygote" in procfs.cmdline(pid)]
        assert zygotes, "no zygote found among the worker's processes"
        if pool == "prefork":
            assert all(procfs.parent_of(z) != worker.proc.pid for z in zygotes), "a zygote was started before the fork"
    finally:
        worker.stop()
    assert _poll(lambda: not worker.left_running(), 15), f"left running: {worker.left_running()}"
    scratch = os.path.join(tempfile.gettempdir(), f"sandbox-{NAME}-*")
    assert _poll(lambda: glob.glob(scratch) == [], 15), f"scratch dirs left: {glob.glob(scratch)}"
    # (a plugin's own traceback is inside an error record, escaped: no line of its own)
    lines = worker.text().splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("Traceback")), None)
    assert first is None, "\n".join(lines[max(0, first - 5):first + 40])


def test_errors_cross_the_result_backend_as_their_own_class(tasks):
    # What the backend stores for a failed task (JSON) is turned back into the very class.
    from sandbox.integrations.celery import RemoteSandboxError
    original = sandbox.PolicyViolation("made a forbidden syscall: socket(2, 1, 0)", syscall="socket",
                                       args=(2, 1, 0), plugin="p", policy="/x/p.toml", grant="network.allow")
    backend = tasks.app.backend
    stored = backend.prepare_exception(RemoteSandboxError.carrying(original), "json")
    again = backend.exception_to_python(backend.decode(backend.encode(stored)))
    assert type(again) is sandbox.PolicyViolation
    assert (again.syscall, again.arguments, again.plugin, again.policy, again.grant, str(again)) == \
        ("socket", (2, 1, 0), "p", "/x/p.toml", "network.allow", str(original))


def test_celery_time_limits_leave_the_sandbox_deadline_room(tasks):
    assert tasks.spin.soft_time_limit == 0.5 + START_ALLOWANCE
    assert tasks.spin.time_limit > tasks.spin.soft_time_limit
    assert time_limits(None, {}) == (None, None)
    with pytest.raises(sandbox.UsageError, match="soft_time_limit"):
        plugin_task(tasks.app, "/nonexistent/worker.py", "f", timeout=30, soft_time_limit=5)
    with pytest.raises(sandbox.UsageError, match="time_limit"):
        plugin_task(tasks.app, "/nonexistent/worker.py", "f", timeout=30, time_limit=20)


def test_eager_tasks_raise_the_error_itself(tasks, plugin_dir):
    # task_always_eager (a project's own unit tests): no backend in between, same classes.
    from sandbox.integrations import celery as integration
    eager = celery.Celery("sandbox_eager_test")
    eager.conf.task_always_eager = True
    path = os.path.join(plugin_dir, "p", "worker.py")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write("def add(a, b):\n    return a + b\n\ndef net():\n    import socket\n    socket.socket()\n")
    subprocess.run(["chmod", "-R", "a+rX", plugin_dir], check=True)
    add = plugin_task(eager, path, "add", name="eager.add")
    net = plugin_task(eager, path, "net", name="eager.net")
    try:
        assert add.delay(2, 3).get() == 5
        with pytest.raises(sandbox.PluginError) as ei:  # the default's deny mode: socket() got EPERM
            net.delay().get()
        assert type(ei.value) is sandbox.PluginError and ei.value.type == "PermissionError"
    finally:
        integration.shutdown()
