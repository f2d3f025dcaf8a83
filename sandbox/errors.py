"""The error types a host sees. Every one is a SandboxError; none is rebuilt from child data.

A remote failure is described by plain strings (type, message, traceback) that the host
copied out of a decoded frame, never by an object the child chose.
"""


class SandboxError(Exception):
    """Base of every error this library raises."""

    kind = "error"  # the CLI's error kind and the HTTP app's error name


class PluginError(SandboxError):
    """The plugin raised an exception; its description arrives as three strings."""

    kind = "plugin-error"

    def __init__(self, type: str, message: str, traceback: str = ""):
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.traceback = traceback


class LoadError(PluginError):
    """worker.py could not be loaded (missing file, syntax error, import failed)."""

    kind = "load-error"


class PluginTimeout(SandboxError):
    """A call passed its deadline; the worker was killed."""

    kind = "timeout"

    def __init__(self, message: str, timeout: float | None = None):
        super().__init__(message)
        self.timeout = timeout


class PolicyViolation(SandboxError):
    """The worker made a syscall its policy forbids and was stopped."""

    kind = "violation"

    def __init__(self, message: str, syscall: str | None = None, args: tuple | None = None,
                 plugin: str | None = None, policy: str | None = None):
        super().__init__(message)
        self.syscall = syscall
        self.arguments = tuple(args) if args is not None else None
        self.plugin = plugin
        self.policy = policy


class PluginCrashed(SandboxError):
    """The worker died on its own: an exit code or a signal."""

    kind = "crashed"

    def __init__(self, message: str, exit_code: int | None = None, signal: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.signal = signal


class PluginMemoryError(SandboxError):
    """The worker ran out of the memory its policy grants."""

    kind = "memory"


class ProtocolViolation(SandboxError):
    """The worker broke the message protocol (bad frame, over a cap, unexpected reply); it was killed."""

    kind = "protocol"


class PolicyError(SandboxError):
    """A policy file is wrong; the message names the file and the key."""

    kind = "policy-error"

    def __init__(self, message: str, path: str | None = None, key: str | None = None):
        where = ""
        if path and key:
            where = f"{path}: [{key}] "
        elif path:
            where = f"{path}: "
        elif key:
            where = f"[{key}] "
        super().__init__(where + message)
        self.path = path
        self.key = key
        self.detail = message


class ConfinementError(SandboxError):
    """A protection the policy requires is not available here; the worker was not started."""

    kind = "confinement-error"

    def __init__(self, message: str, layer: str | None = None):
        super().__init__(message)
        self.layer = layer


class WorkerClosed(SandboxError):
    """The worker is not running (terminated, or died earlier)."""

    kind = "closed"


class QueueFull(SandboxError):
    """A pool's bounded queue is full (back-pressure)."""

    kind = "queue-full"


class RestartLimit(SandboxError):
    """A pool's workers keep dying; restarts are paused to avoid a restart storm."""

    kind = "restart-limit"
