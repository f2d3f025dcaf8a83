"""Run untrusted Python plugins in forked, confined worker processes.

    import sandbox
    with sandbox.Worker("plugins/echo/worker.py", policy="policies/echo.toml") as w:
        w.on("message", print)
        print(w.call("shout", "hello"))

Public surface: Worker, AsyncWorker, Pool, AsyncPool, Policy and the errors below; the modules
`sandbox.events`, `sandbox.metrics`, `sandbox.plugin` and `sandbox.integrations.*`. Everything
else is private and may change. The distribution is `sandbox-plugins` (see `sandbox.__about__`).
"""
from typing import TYPE_CHECKING

from .__about__ import __version__
from .errors import (ConfinementError, HostResourceError, LoadError, NotPlainData, PluginCrashed, PluginError,
                     PluginMemoryError, PluginTimeout, PolicyError, PolicyViolation, ProtocolViolation,
                     QueueFull, RestartLimit, SandboxError, UsageError, WorkerClosed, ZygoteDied)

if TYPE_CHECKING:  # the real names for type checkers; at run time they are imported on first use
    from .aio import AsyncWorker
    from .policy import Policy
    from .pool import AsyncPool, Pool
    from .worker import Worker

__all__ = ["Worker", "AsyncWorker", "Pool", "AsyncPool", "Policy", "SandboxError", "PluginError",
           "LoadError", "PluginTimeout", "PolicyViolation", "PluginCrashed", "PluginMemoryError",
           "ProtocolViolation", "PolicyError", "ConfinementError", "WorkerClosed", "QueueFull",
           "RestartLimit", "UsageError", "NotPlainData", "HostResourceError", "ZygoteDied", "__version__"]


def __getattr__(name: str) -> object:
    # Imported on first use. The zygote imports sandbox.child, hence this package: it must not
    # pull in the host's side (threads, logging, libseccomp). `threading` alone adds ~0.3 ms to
    # every fork through its at-fork hook.
    if name == "Worker":
        from .worker import Worker
        return Worker
    if name == "Policy":
        from .policy import Policy
        return Policy
    if name == "AsyncWorker":
        from .aio import AsyncWorker
        return AsyncWorker
    if name in ("Pool", "AsyncPool"):
        from . import pool
        return getattr(pool, name)
    raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
