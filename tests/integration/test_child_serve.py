"""The worker's side: what only evidence can say (confinement failures), a serve loop the
plugin can't break by changing builtins or sys.modules, exports, and the process title."""
import os

import pytest

import sandbox
from sandbox import ConfinementError, LoadError, PluginError

pytestmark = pytest.mark.unpriv

FORGER = """
    import os
    import msgpack
    from sandbox.protocol import framing

    # plugin code writing a load-error frame that calls itself a confinement failure
    payload = msgpack.packb({"type": "ConfinementError", "message": "forged: seccomp missing",
                             "traceback": "", "layer": "seccomp"})
    os.write(4, framing.encode_frame(framing.LOADERR, 0, payload))
    os._exit(1)
"""


def test_a_forged_confinement_error_from_plugin_code_is_a_load_error(make_plugin):
    path, policy = make_plugin(FORGER)
    with pytest.raises(sandbox.SandboxError) as ei:
        sandbox.Worker(path, policy=policy)
    assert not isinstance(ei.value, ConfinementError)
    assert isinstance(ei.value, LoadError)


def test_a_failed_preload_is_a_load_error_naming_the_module(make_plugin):
    """A preload that can't be imported fails the preload step, before any plugin code; it is
    the plugin's configuration that is wrong, not a missing layer: a LoadError naming it."""
    path, policy = make_plugin("def f():\n    return 1\n",
                               '[python]\npreload = ["no_such_module_for_sure"]\n')
    with pytest.raises(LoadError) as ei:
        sandbox.Worker(path, policy=policy)
    assert not isinstance(ei.value, ConfinementError)
    assert "no_such_module_for_sure" in str(ei.value)


BREAKER = """
    import builtins
    import sys

    def echo(x):
        return x

    def fail():
        raise ValueError("still reported")

    def my_len(x):
        return len(x)

    def break_things():
        builtins.len = lambda obj: 0
        builtins.isinstance = lambda *a: False
        builtins.type = lambda *a: int
        for name in ("os", "msgpack", "traceback", "sandbox.protocol", "sandbox.protocol.codec"):
            sys.modules[name] = None
        return "broken"
"""


def test_the_serve_loop_survives_a_plugin_replacing_builtins_and_modules(make_plugin):
    path, policy = make_plugin(BREAKER)
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("break_things") == "broken"
        assert w.call("echo", "abc") == "abc"
        assert w.call("echo", {"k": [1, 2.5, None, b"x"]}) == {"k": [1, 2.5, None, b"x"]}
        big = "y" * (1 << 20)
        assert w.call("echo", big) == big  # the large-payload path too
        with pytest.raises(PluginError) as ei:
            w.call("fail")
        assert ei.value.type == "ValueError" and "still reported" in str(ei.value)
        assert "Traceback" in ei.value.traceback
        assert w.call("my_len", "abcd") == 0  # the plugin's own change stays the plugin's


EXPORTS = {
    "all": """
        __all__ = ["a"]

        def a():
            return "a"

        def b():
            return "b"
    """,
    "decorated": """
        from sandbox.plugin import export

        @export
        def a():
            return "a"

        def b():
            return "b"
    """,
    "plain": """
        from sandbox.plugin import post

        def a():
            return "a"

        def on_message(msg):
            pass

        def _hidden():
            return "h"
    """,
}


@pytest.mark.parametrize("style", sorted(EXPORTS))
def test_only_exported_functions_can_be_called(make_plugin, style):
    path, policy = make_plugin(EXPORTS[style])
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("a") == "a"
        refused = ["b"] if style != "plain" else ["on_message", "post", "_hidden"]
        for name in refused:
            with pytest.raises(PluginError, match="no public function"):
                w.call(name, *([1] if name in ("on_message", "post") else []))
        assert w.exports == ("a",)


def test_the_worker_is_named_in_ps(make_plugin):
    path, policy = make_plugin("def f():\n    return 1\n", name="textstats")
    with sandbox.Worker(path, policy=policy) as w:
        with open(f"/proc/{w.pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{w.pid}/comm") as f:
            comm = f.read().strip()
    policy_name = os.path.splitext(os.path.basename(policy))[0]
    assert cmdline.split(b"\0")[0] == f"sandbox: textstats (policy {policy_name})".encode()
    assert comm == "sandbox: textstats (policy"[:15]


def test_the_async_worker_knows_the_exports_and_the_refusal_holds(make_plugin):
    import asyncio

    path, policy = make_plugin(EXPORTS["all"])

    async def main():
        async with sandbox.AsyncWorker(path, policy=policy) as w:
            assert w.exports == ("a",)
            assert await w.call("a") == "a"
            with pytest.raises(PluginError, match="no public function"):
                await w.call("b")

    asyncio.run(main())
