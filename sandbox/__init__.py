"""Run untrusted Python plugins in forked, confined worker processes.

    import sandbox
    with sandbox.Worker("plugins/echo/worker.py", policy="policies/echo.toml") as w:
        w.on("message", print)
        print(w.call("shout", "hello"))

Public surface: Worker, AsyncWorker, Pool, AsyncPool, Policy and the errors below. Everything
else is private and may change.
"""
import logging

from .errors import (ConfinementError, LoadError, PluginCrashed, PluginError, PluginMemoryError,
                     PluginTimeout, PolicyError, PolicyViolation, ProtocolViolation, QueueFull,
                     RestartLimit, SandboxError, WorkerClosed)
from .worker import Worker

logging.getLogger("sandbox").addHandler(logging.NullHandler())  # a library doesn't print on its own

__all__ = ["Worker", "AsyncWorker", "Pool", "AsyncPool", "Policy", "SandboxError", "PluginError",
           "LoadError", "PluginTimeout", "PolicyViolation", "PluginCrashed", "PluginMemoryError",
           "ProtocolViolation", "PolicyError", "ConfinementError", "WorkerClosed", "QueueFull",
           "RestartLimit"]


def __getattr__(name):
    # Imported on first use: the policy compiler pulls in libseccomp, which a plain
    # `import sandbox` (and the zygote) should not pay for.
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
