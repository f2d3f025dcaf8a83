"""The example plugins work under their own policies; the hostile ones are stopped; the demo runs."""
import io
import os
import subprocess
import sys
import time

import pytest

import sandbox
from helpers import POLICIES, ROOT
import procfs
from procfs import children_of

pytestmark = pytest.mark.unpriv
PLUGINS = os.path.join(ROOT, "examples", "plugins")


def worker(name):
    return sandbox.Worker(os.path.join(PLUGINS, name, "worker.py"), policy=os.path.join(POLICIES, f"{name}.toml"))


def test_every_example_has_its_own_policy():
    for name in os.listdir(PLUGINS):
        assert os.path.exists(os.path.join(POLICIES, f"{name}.toml")), name
        sandbox.Policy.load(os.path.join(POLICIES, f"{name}.toml"))


def test_markdown_render():
    with worker("markdown_render") as w:
        assert w.call("render", "# Title\n\n*x*") == "<h1>Title</h1>\n<p><em>x</em></p>"


def test_thumbnail_with_pillow():
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (400, 200), (1, 2, 3)).save(buf, "PNG")
    with worker("thumbnail") as w:
        r = w.call("thumbnail", buf.getvalue(), 100, 100)
    img = Image.open(io.BytesIO(r["png"]))
    assert img.size == (100, 50) and r["size"] == [100, 50] and img.getpixel((5, 5)) == (1, 2, 3)


def test_template_and_expression():
    with worker("template") as w:
        assert w.call("render", "{{ a }}+{{ b }}={{ a + b }}", {"a": 2, "b": 3}) == "2+3=5"
        assert w.call("evaluate", "x * 2", {"x": 21}) == 42
        with pytest.raises(sandbox.PluginError) as ei:
            w.call("render", "{{ ''.__class__.__mro__[1].__subclasses__() }}")
        assert ei.value.type == "SecurityError"


def test_textstats_posts_and_takes_messages():
    with worker("textstats") as w:
        got = []
        w.on("message", got.append)
        r = w.call("stats", "a b a")
        assert r["words"] == 3 and r["most_common"][0] == ["a", 2]
        assert got == [{"progress": "counted words", "words": 3}]


@pytest.mark.parametrize("name,error,check", [
    # the shipped default's deny mode: socket() fails in the plugin, the host is told (below)
    ("hostile_phone_home", sandbox.PluginError, lambda e: e.type == "PermissionError"),
    ("hostile_fork_bomb", sandbox.PolicyViolation, lambda e: e.syscall == "clone"),  # kill mode pinned
    ("hostile_spinner", sandbox.PluginTimeout, lambda e: e.timeout == 1.0),
    ("hostile_memory_hog", sandbox.PluginMemoryError, lambda e: True),
    ("hostile_liar", sandbox.ProtocolViolation, lambda e: "exceeds" in str(e)),
])
def test_hostile_examples_are_stopped(name, error, check):
    with worker(name) as w:
        with pytest.raises(error) as ei:
            w.call("run")
        if error is sandbox.PluginError:  # denied, never silently: the host heard of the syscall
            assert [n.name for n in w.last_denials] == ["socket"] and w.alive
        else:
            assert w.last_denials == []
    assert type(ei.value) is error and check(ei.value)


def test_hostile_secrets_finds_nothing():
    with worker("hostile_secrets") as w:
        found = w.call("run")
    assert found.pop("environment") == w.policy.environment({})  # the worker's baseline, nothing of the host
    assert all(v.startswith("refused") for v in found.values()), found


@pytest.mark.slow
def test_demo_runs_end_to_end():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "demo.py")], capture_output=True,
                         text=True, timeout=180, cwd="/")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All plugins behaved as expected" in out.stdout


def _recipe(name):
    return os.path.join(ROOT, "examples", "recipes", name)


@pytest.mark.slow
@pytest.mark.parametrize("recipe,engine", [("dask_workers.py", "distributed"), ("ray_actors.py", "ray")])
def test_recipe_runs_and_stops_what_it_started(recipe, engine, plugin_dir):
    pytest.importorskip(engine)
    # Ray keeps its session files (sockets: a short path) under $RAY_TMPDIR and a token under $HOME
    # (and never reports usage statistics anywhere)
    env = dict(os.environ, RAY_TMPDIR=plugin_dir, HOME=plugin_dir, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen([sys.executable, _recipe(recipe)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/", env=env)
    seen, zygotes = {}, set()
    while proc.poll() is None:  # note every process the recipe's cluster starts, zygotes included
        for pid in children_of(proc.pid):
            if pid not in seen:
                seen[pid] = procfs.start_time(pid)
                if b"sandbox/zygote" in procfs.cmdline(pid):
                    zygotes.add(pid)
        time.sleep(0.02)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert out.count(" words") == 8 and "stopped, its socket() was denied: PermissionError" in out
    assert zygotes, "no zygote seen: no pool was made"

    def left():
        return [pid for pid, started in seen.items() if started is not None and procfs.start_time(pid) == started]
    deadline = time.monotonic() + 15
    while left() and time.monotonic() < deadline:  # the zygotes go when their engine's worker has gone
        time.sleep(0.05)
    assert not left(), f"left running: {[(pid, procfs.cmdline(pid)[:120]) for pid in left()]}"


def test_celery_recipe_declares_tasks_with_agreeing_limits():
    pytest.importorskip("celery")
    import importlib.util
    spec = importlib.util.spec_from_file_location("celery_recipe", _recipe("celery_tasks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    textstats = sandbox.Policy.load(os.path.join(POLICIES, "textstats.toml")).limits.timeout
    assert module.textstats.name == "plugins.textstats.stats"
    task = module.textstats
    assert task.soft_time_limit > textstats and task.time_limit > task.soft_time_limit


def test_the_readme_first_example_runs():
    # The README's opening example, as written, from the examples folder (where plugins/ is).
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.join(ROOT, "examples"))
    assert out.returncode == 0, out.stderr
    assert "'words': 6" in out.stdout and "counted words" in out.stdout
