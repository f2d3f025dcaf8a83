"""sandbox.metrics counts what sandbox.events carries, in Prometheus' text exposition."""
import pytest

from sandbox import events

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402

import sandbox.metrics  # noqa: E402


@pytest.fixture
def registry():
    reg = CollectorRegistry()
    sandbox.metrics.enable(registry=reg)
    yield reg
    sandbox.metrics.disable(reg)


def sample(reg, name, **labels):
    return reg.get_sample_value(name, labels)


def test_a_workers_life_in_numbers(registry):
    events.emit("started", plugin="resize", policy="p.toml", pid=101, uid=200001)
    events.emit("started", plugin="resize", policy="p.toml", pid=102, uid=200002)
    events.emit("ready", plugin="resize", policy="p.toml", pid=101, uid=200001, duration=0.0016)
    events.emit("call", plugin="resize", policy="p.toml", pid=101, function="go", duration=0.00002, outcome="ok")
    events.emit("call", plugin="resize", policy="p.toml", pid=101, function="go", duration=0.3, outcome="timeout")
    events.emit("ready", plugin="resize", policy="p.toml", pid=102, uid=200002)  # no duration: measured here
    events.emit("violation", plugin="resize", policy="p.toml", pid=102, syscall="socket")
    events.emit("ended", plugin="resize", policy="p.toml", pid=101, reason="timeout")
    assert sample(registry, "sandbox_worker_starts_total", plugin="resize") == 2
    assert sample(registry, "sandbox_workers_alive", plugin="resize") == 1
    assert sample(registry, "sandbox_worker_ends_total", plugin="resize", reason="timeout") == 1
    assert sample(registry, "sandbox_calls_total", plugin="resize", outcome="ok") == 1
    assert sample(registry, "sandbox_calls_total", plugin="resize", outcome="timeout") == 1
    assert sample(registry, "sandbox_call_duration_seconds_count", plugin="resize") == 2
    assert sample(registry, "sandbox_call_duration_seconds_bucket", plugin="resize", le="0.0001") == 1
    assert sample(registry, "sandbox_worker_start_duration_seconds_bucket", plugin="resize", le="0.002") >= 1
    assert sample(registry, "sandbox_worker_start_duration_seconds_count", plugin="resize") == 2
    assert sample(registry, "sandbox_violations_total", plugin="resize", syscall="socket") == 1
    text = generate_latest(registry).decode()
    assert 'sandbox_calls_total{outcome="timeout",plugin="resize"} 1.0' in text


def test_enable_is_once_per_registry_and_disable_stops_counting(registry):
    assert sandbox.metrics.enable(registry=registry) is sandbox.metrics.enable(registry=registry)
    events.emit("started", plugin="a", policy="p", pid=1, uid=1)
    sandbox.metrics.disable(registry)
    events.emit("started", plugin="a", policy="p", pid=2, uid=2)
    assert sample(registry, "sandbox_worker_starts_total", plugin="a") is None  # families removed
    sandbox.metrics.enable(registry=registry)  # the fixture's disable() still has one to remove
