"""The example plugins work under their own policies; the hostile ones are stopped; the demo runs."""
import io
import os
import subprocess
import sys

import pytest

import sandbox
from conftest import POLICIES, ROOT

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
    ("hostile_phone_home", sandbox.PolicyViolation, lambda e: e.syscall == "socket"),
    ("hostile_fork_bomb", sandbox.PolicyViolation, lambda e: e.syscall == "clone"),
    ("hostile_spinner", sandbox.PluginTimeout, lambda e: e.timeout == 1.0),
    ("hostile_memory_hog", sandbox.PluginMemoryError, lambda e: True),
    ("hostile_liar", sandbox.ProtocolViolation, lambda e: "exceeds" in str(e)),
])
def test_hostile_examples_are_stopped(name, error, check):
    with worker(name) as w:
        with pytest.raises(error) as ei:
            w.call("run")
    assert check(ei.value)


def test_hostile_secrets_finds_nothing():
    with worker("hostile_secrets") as w:
        found = w.call("run")
    assert found.pop("environment") == w.policy.environment({})  # the worker's baseline, nothing of the host
    assert all(v.startswith("refused") for v in found.values()), found


def test_demo_runs_end_to_end():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "demo.py")], capture_output=True,
                         text=True, timeout=180, cwd="/")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All plugins behaved as expected" in out.stdout
