"""The error types a host sees. Every one is a SandboxError; none is rebuilt from child data.

A remote failure is described by plain strings (type, message, traceback) that the host
copied out of a decoded frame, never by an object the child chose.

Every error survives pickle (ProcessPoolExecutor, multiprocessing, Ray) and JSON
(`e.to_dict()` / `SandboxError.from_dict(d)`, e.g. through a Celery result backend) with all
its attributes: each class lists them in `_fields`, and its constructor takes them by name.
"""
from __future__ import annotations

from typing import Any, ClassVar


class SandboxError(Exception):
    """Base of every error this library raises."""

    kind: ClassVar[str] = "error"  # the CLI's error kind and the HTTP app's error name
    _fields: ClassVar[tuple[str, ...]] = ()  # attributes beyond the message, for pickle and JSON
    # The plugin's traceback, when the error came from one (PluginError, PluginMemoryError).
    traceback: str | None = None
    # Set on a failed start when the zygote may still have forked the request: a worker could run.
    worker_may_run: bool = False

    def __init__(self, message: str = "", **fields: Any):
        super().__init__(message)
        for name in self._fields:
            setattr(self, name, fields.get(name))

    @property
    def detail(self) -> str:
        return str(self)

    def __reduce__(self) -> tuple[Any, ...]:
        state = {name: getattr(self, name, None) for name in self._fields}
        extra = {k: v for k, v in self.__dict__.items() if k not in state}
        return (_rebuild, (type(self), str(self), state, extra))

    def to_dict(self) -> dict:
        """Plain data (JSON-safe): kind, class name, the error's text (`detail`; also `message`
        unless the class has a field of that name, as PluginError does) and its own fields."""
        d: dict[str, Any] = {"kind": self.kind, "class": type(self).__name__, "message": str(self),
                             "detail": str(self)}
        for name in self._fields:
            value = getattr(self, name, None)
            d[name] = list(value) if isinstance(value, tuple) else value
        tb = getattr(self, "traceback", None)
        if tb is not None and "traceback" not in d:
            d["traceback"] = tb
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SandboxError":
        """The same error again, from `to_dict()`'s output; an unknown class becomes SandboxError."""
        klass = _CLASSES.get(str(d.get("class", ""))) or _BY_KIND.get(str(d.get("kind", ""))) or SandboxError
        fields = {k: d.get(k) for k in klass._fields}
        err = _rebuild(klass, str(d.get("detail", d.get("message", ""))), fields, {})
        if "traceback" in d and "traceback" not in klass._fields:
            err.traceback = d["traceback"]
        return err


def _rebuild(klass: type[SandboxError], message: str, fields: dict, extra: dict) -> SandboxError:
    err = klass.__new__(klass)
    Exception.__init__(err, message)
    for name in klass._fields:
        value = fields.get(name)
        setattr(err, name, tuple(value) if name == "arguments" and value is not None else value)
    err.__dict__.update(extra)
    return err


class PluginError(SandboxError):
    """The plugin raised an exception; its description arrives as three strings."""

    kind = "plugin-error"
    _fields = ("type", "message", "traceback", "denied")
    traceback: str
    denied: str | None  # when a syscall was denied during the call: which, where, what grants it

    def __init__(self, type: str, message: str, traceback: str = "", denied: str | None = None):
        Exception.__init__(self, f"{type}: {message}")
        self.type = type
        self.message = message
        self.traceback = traceback
        self.denied = denied


class LoadError(PluginError):
    """worker.py could not be loaded (missing file, syntax error, import failed)."""

    kind = "load-error"


class PluginTimeout(SandboxError):
    """A call passed its deadline; the worker was killed."""

    kind = "timeout"
    _fields = ("timeout",)
    timeout: float | None

    def __init__(self, message: str, timeout: float | None = None):
        super().__init__(message, timeout=timeout)


class PolicyViolation(SandboxError):
    """The worker made a syscall its policy forbids and was stopped."""

    kind = "violation"
    _fields = ("syscall", "arguments", "plugin", "policy", "grant")
    syscall: str | None
    arguments: tuple | None
    plugin: str | None
    policy: str | None
    grant: str | None

    def __init__(self, message: str, syscall: str | None = None, args: tuple | None = None,
                 plugin: str | None = None, policy: str | None = None, grant: str | None = None):
        super().__init__(message, syscall=syscall, arguments=tuple(args) if args is not None else None,
                         plugin=plugin, policy=policy, grant=grant)


class PluginCrashed(SandboxError):
    """The worker died on its own: an exit code or a signal."""

    kind = "crashed"
    _fields = ("exit_code", "signal")
    exit_code: int | None
    signal: int | None

    def __init__(self, message: str, exit_code: int | None = None, signal: int | None = None):
        super().__init__(message, exit_code=exit_code, signal=signal)


class PluginMemoryError(SandboxError):
    """The worker ran out of the memory its policy grants."""

    kind = "memory"


class ProtocolViolation(SandboxError):
    """The worker broke the message protocol (bad frame, over a cap, unexpected reply); it was killed."""

    kind = "protocol"


class PolicyError(SandboxError):
    """A policy file is wrong; the message names the file and the key."""

    kind = "policy-error"
    _fields = ("path", "key", "reason")
    path: str | None
    key: str | None
    reason: str | None

    def __init__(self, message: str, path: str | None = None, key: str | None = None):
        where = ""
        if path and key:
            where = f"{path}: [{key}] "
        elif path:
            where = f"{path}: "
        elif key:
            where = f"[{key}] "
        super().__init__(where + message, path=path, key=key, reason=message)

    @property
    def detail(self) -> str:  # the reason alone, without file and key
        return self.reason or ""


class ConfinementError(SandboxError):
    """A protection the policy requires is not available here; the worker was not started."""

    kind = "confinement-error"
    _fields = ("layer",)
    layer: str | None

    def __init__(self, message: str, layer: str | None = None):
        super().__init__(message, layer=layer)


class WorkerClosed(SandboxError):
    """The worker is not running (terminated, or died earlier)."""

    kind = "closed"
    # False when the worker ended after a call was written to it: a pool must not resend that call.
    never_sent: bool = True


class QueueFull(SandboxError):
    """A pool's bounded queue is full (back-pressure)."""

    kind = "queue-full"


class RestartLimit(SandboxError):
    """A pool's workers keep dying; restarts are paused to avoid a restart storm."""

    kind = "restart-limit"


class UsageError(SandboxError, ValueError):
    """An argument the library cannot take (a NaN or negative timeout, an unknown option).

    Also a ValueError, so code that validates its own arguments that way keeps working."""

    kind = "usage-error"


class NotPlainData(UsageError, TypeError):
    """A value that cannot cross between host and worker (not plain data, an int past 64 bits,
    a lone surrogate, nested deeper or holding more than the other side decodes); it was refused
    before anything was sent, and the worker is fine. Also a TypeError, as it always was.

    The host raises it for a call's arguments or a post; a plugin's reply that cannot cross
    arrives as a PluginError saying "not plain data" (the worker refused to send it)."""


class HostResourceError(SandboxError):
    """The host itself ran short of something a worker needs (file descriptors, processes,
    memory, disk, uids); the message names it. Nothing is wrong with the plugin."""

    kind = "host-resource"
    _fields = ("resource",)
    resource: str | None

    def __init__(self, message: str, resource: str | None = None):
        super().__init__(message, resource=resource)


class ZygoteDied(SandboxError):
    """The zygote (the process that forks workers) died; the next worker starts on a new one."""

    kind = "zygote-died"


def _all_classes(base: type[SandboxError]) -> list[type[SandboxError]]:
    out = [base]
    for sub in base.__subclasses__():
        out += _all_classes(sub)
    return out


_CLASSES = {c.__name__: c for c in _all_classes(SandboxError)}
_BY_KIND: dict[str, type[SandboxError]] = {}
for _c in _CLASSES.values():  # a base before its subclasses: a kind they share names the base
    _BY_KIND.setdefault(_c.kind, _c)
