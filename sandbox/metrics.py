"""Prometheus metrics for every worker of this host process, counted from `sandbox.events`.

    import sandbox.metrics
    sandbox.metrics.enable()                     # the default registry, or enable(registry=...)
    # ... then serve prometheus_client's exposition as usual (start_http_server, make_asgi_app)

Active only where `prometheus_client` is installed (`pip install 'sandbox-plugins[metrics]'`);
importing this module never needs it. The collector is a `sandbox.events` subscriber and
nothing else: it sees what every Worker, AsyncWorker and pool emits, without hooks of its own.

| metric | type | labels |
|---|---|---|
| sandbox_workers_alive | gauge | plugin |
| sandbox_worker_starts_total | counter | plugin |
| sandbox_worker_ends_total | counter | plugin, reason ("closed" or an error kind) |
| sandbox_worker_start_duration_seconds | histogram | plugin (the `ready` event's duration, else started -> ready) |
| sandbox_calls_total | counter | plugin, outcome ("ok" or an error kind) |
| sandbox_call_duration_seconds | histogram | plugin |
| sandbox_violations_total | counter | plugin, syscall |
| sandbox_denied_syscalls_total | counter | plugin, syscall |

Label values come from the host (plugin names, error kinds, syscall names from the kernel's
number): a plugin cannot invent new series.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from . import events
from .errors import SandboxError

# Calls: from a 10 µs echo to a minute-long job. Starts: about a millisecond when warm.
CALL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
START_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_lock = threading.Lock()
_enabled: dict[int, "Collector"] = {}  # id(registry) -> its collector


def _label(value: Any, default: str = "unknown") -> str:
    return str(value) if value not in (None, "") else default


class Collector:
    """The metric families of one registry, fed by one events subscription."""

    def __init__(self, registry: Any):
        from prometheus_client import Counter, Gauge, Histogram
        self.registry = registry
        self.workers_alive = Gauge("sandbox_workers_alive", "Workers started and not yet ended.", ["plugin"],
                                   registry=registry)
        self.starts = Counter("sandbox_worker_starts", "Workers forked.", ["plugin"], registry=registry)
        self.ends = Counter("sandbox_worker_ends", "Workers ended, by reason.", ["plugin", "reason"],
                            registry=registry)
        self.start_seconds = Histogram("sandbox_worker_start_duration_seconds",
                                       "From asking for a worker to its first READY.", ["plugin"],
                                       buckets=START_BUCKETS, registry=registry)
        self.calls = Counter("sandbox_calls", "Calls, by outcome.", ["plugin", "outcome"], registry=registry)
        self.call_seconds = Histogram("sandbox_call_duration_seconds", "Call latency as the host saw it.",
                                      ["plugin"], buckets=CALL_BUCKETS, registry=registry)
        self.violations = Counter("sandbox_violations", "Workers stopped by a forbidden syscall.",
                                  ["plugin", "syscall"], registry=registry)
        self.denied = Counter("sandbox_denied_syscalls", "Syscalls the policy answered with an errno.",
                              ["plugin", "syscall"], registry=registry)
        self._alive: dict[str, set[Any]] = {}
        self._starting: dict[Any, float] = {}  # pid -> monotonic time of its `started` event
        self._alive_lock = threading.Lock()
        self._families = [self.workers_alive, self.starts, self.ends, self.start_seconds, self.calls,
                          self.call_seconds, self.violations, self.denied]
        self._handlers: dict[str, Callable[[str, events.Event], None]] = {
            "started": self._started, "ready": self._ready, "ended": self._ended, "call": self._call,
            "violation": self._violation, "denied": self._denied}
        self._unsubscribe: Callable[[], None] | None = events.subscribe(self)

    def __call__(self, event: events.Event) -> None:
        handler = self._handlers.get(event.name)
        if handler is not None:
            handler(_label(event.get("plugin")), event)

    def _set_alive(self, plugin: str, pid: Any, alive: bool) -> None:
        with self._alive_lock:
            pids = self._alive.setdefault(plugin, set())
            if alive:
                pids.add(pid)
            else:
                pids.discard(pid)
            self.workers_alive.labels(plugin).set(len(pids))

    def _started(self, plugin: str, event: events.Event) -> None:
        self.starts.labels(plugin).inc()
        with self._alive_lock:
            self._starting[event.get("pid")] = event.monotonic
        self._set_alive(plugin, event.get("pid"), True)

    def _ready(self, plugin: str, event: events.Event) -> None:
        with self._alive_lock:
            since = self._starting.pop(event.get("pid"), None)
        duration = event.get("duration")
        if not isinstance(duration, (int, float)):  # the emitter's own figure, else started -> ready
            duration = event.monotonic - since if since is not None else None
        if duration is not None:
            self.start_seconds.labels(plugin).observe(duration)

    def _ended(self, plugin: str, event: events.Event) -> None:
        self.ends.labels(plugin, _label(event.get("reason"), "closed")).inc()
        with self._alive_lock:
            self._starting.pop(event.get("pid"), None)
        self._set_alive(plugin, event.get("pid"), False)

    def _call(self, plugin: str, event: events.Event) -> None:
        self.calls.labels(plugin, _label(event.get("outcome"), "ok")).inc()
        duration = event.get("duration")
        if isinstance(duration, (int, float)):
            self.call_seconds.labels(plugin).observe(duration)

    def _violation(self, plugin: str, event: events.Event) -> None:
        self.violations.labels(plugin, _label(event.get("syscall"))).inc()

    def _denied(self, plugin: str, event: events.Event) -> None:
        self.denied.labels(plugin, _label(event.get("syscall"))).inc()

    def close(self) -> None:
        """Stop counting and take the families out of the registry."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for family in self._families:
            try:
                self.registry.unregister(family)
            except KeyError:
                pass


def enable(registry: Any = None) -> Collector:
    """Count every worker event into `registry` (prometheus_client's default one if None).

    Once per registry: a second call returns the collector already counting there."""
    try:
        import prometheus_client
    except ImportError:
        raise SandboxError("sandbox.metrics needs prometheus_client: pip install 'sandbox-plugins[metrics]'") from None
    registry = prometheus_client.REGISTRY if registry is None else registry
    with _lock:
        collector = _enabled.get(id(registry))
        if collector is None:
            collector = _enabled[id(registry)] = Collector(registry)
        return collector


def disable(registry: Any = None) -> None:
    """Stop counting into `registry` (the default one if None) and remove the families."""
    with _lock:
        if registry is None:
            import prometheus_client
            registry = prometheus_client.REGISTRY
        collector = _enabled.pop(id(registry), None)
    if collector is not None:
        collector.close()
