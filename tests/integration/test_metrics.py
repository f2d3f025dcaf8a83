"""sandbox.metrics with a real worker: its start, calls, violation and end, as Prometheus text."""
import time

import pytest

import sandbox
from sandbox import events

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402

import sandbox.metrics  # noqa: E402

pytestmark = pytest.mark.unpriv

PLUGIN = """
def ok():
    return 1

def bad():
    raise ValueError("no")

def phone_home():
    import socket
    socket.socket()

def mount():
    import ctypes
    return ctypes.CDLL(None, use_errno=True).syscall(165, 0, 0, 0, 0, 0)  # dangerous: kills in deny mode too
"""
KILL_MODE = '[seccomp]\ndefault_action = "kill"\n'


def test_a_real_worker_shows_in_the_exposition(make_plugin):
    """Kill mode pinned: the forbidden socket() is a violation, counted."""
    reg = CollectorRegistry()
    sandbox.metrics.enable(registry=reg)
    seen = []
    unsubscribe = events.subscribe(seen.append)
    try:
        path, policy = make_plugin(PLUGIN, KILL_MODE)
        with sandbox.Worker(path, policy=policy) as w:
            name = w.name
            if not any(e.name == "started" for e in seen):
                # sandbox.events is the only feed; until the worker lifecycle emits, nothing to count
                pytest.skip("this build's workers emit no lifecycle events")
            assert reg.get_sample_value("sandbox_workers_alive", {"plugin": name}) == 1
            assert w.call("ok") == 1
            with pytest.raises(sandbox.PluginError):
                w.call("bad")
            with pytest.raises(sandbox.PolicyViolation):
                w.call("phone_home")
        deadline = time.monotonic() + 10
        while reg.get_sample_value("sandbox_workers_alive", {"plugin": name}) != 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        text = generate_latest(reg).decode()
        value = reg.get_sample_value
        assert value("sandbox_workers_alive", {"plugin": name}) == 0, text
        assert value("sandbox_worker_starts_total", {"plugin": name}) == 1
        assert value("sandbox_calls_total", {"plugin": name, "outcome": "ok"}) == 1, text
        assert value("sandbox_calls_total", {"plugin": name, "outcome": "plugin-error"}) == 1, text
        assert value("sandbox_calls_total", {"plugin": name, "outcome": "violation"}) == 1, text
        assert value("sandbox_call_duration_seconds_count", {"plugin": name}) == 3
        assert value("sandbox_worker_start_duration_seconds_count", {"plugin": name}) == 1
        assert value("sandbox_violations_total", {"plugin": name, "syscall": "socket"}) == 1, text
        assert value("sandbox_worker_ends_total", {"plugin": name, "reason": "violation"}) == 1, text
    finally:
        unsubscribe()
        sandbox.metrics.disable(reg)


def test_denials_under_the_default_are_counted(make_plugin):
    """The shipped default (deny mode): the forbidden socket() fails in the plugin and is counted as
    a denial; the worker lives on; a dangerous syscall is still a violation."""
    reg = CollectorRegistry()
    sandbox.metrics.enable(registry=reg)
    try:
        path, policy = make_plugin(PLUGIN)  # no policy of its own: the shipped default
        with sandbox.Worker(path, policy=policy) as w:
            name = w.name
            with pytest.raises(sandbox.PluginError) as ei:
                w.call("phone_home")
            assert ei.value.type == "PermissionError"
            assert w.call("ok") == 1  # still alive
            with pytest.raises(sandbox.PolicyViolation):
                w.call("mount")
        value = reg.get_sample_value
        deadline = time.monotonic() + 10
        while ((value("sandbox_workers_alive", {"plugin": name}) != 0
                or value("sandbox_denied_syscalls_total", {"plugin": name, "syscall": "socket"}) is None)
               and time.monotonic() < deadline):
            time.sleep(0.01)
        text = generate_latest(reg).decode()
        assert value("sandbox_denied_syscalls_total", {"plugin": name, "syscall": "socket"}) == 1, text
        assert value("sandbox_calls_total", {"plugin": name, "outcome": "plugin-error"}) == 1, text
        assert value("sandbox_calls_total", {"plugin": name, "outcome": "ok"}) == 1, text
        assert value("sandbox_violations_total", {"plugin": name, "syscall": "mount"}) == 1, text
        assert value("sandbox_violations_total", {"plugin": name, "syscall": "socket"}) is None, text
    finally:
        sandbox.metrics.disable(reg)
