"""What the sync Worker and the AsyncWorker share: the state of one worker as the host sees it,
and the parts that do no I/O of their own kind (liveness, violation reports, plugin output).

Each subclass brings its I/O: threads and poll() (worker.py), or the event loop (aio.py). Both
must provide `_kill(reason)`.
"""
import collections
import logging
import os

from . import channel as S, notify
from ..errors import LoadError, PolicyViolation, SandboxError, WorkerClosed

log = logging.getLogger("sandbox")
log.addHandler(logging.NullHandler())  # a library doesn't print on its own
LOG_LINE_MAX = 4096
LOG_BUDGET = 1 << 20  # bytes of plugin output forwarded per worker; the rest is counted, not kept
DEATH_WAIT = 5.0


def load_policy(policy):
    from ..policy import Policy
    if policy is None:
        return Policy.default()
    if isinstance(policy, (str, os.PathLike)):
        return Policy.load(os.fspath(policy))
    return policy


def plugin_name(path: str) -> str:
    base = os.path.basename(path)
    stem = os.path.splitext(base)[0]
    if stem == "worker":
        stem = os.path.basename(os.path.dirname(path)) or "worker"
    return "".join(c if c.isalnum() or c == "_" else "_" for c in stem) or "plugin"


class WorkerHandle:
    def __init__(self, worker_py, policy, name: str | None, start_timeout: float | None):
        self.plugin = os.path.abspath(os.fspath(worker_py))
        self.name = name or plugin_name(self.plugin)
        self.policy = load_policy(policy)
        self.pid = None
        self.exit_status = None  # raw wait status, once reaped
        self.death: SandboxError | None = None  # why it ended (None while alive or after a clean close)
        self.logs = collections.deque(maxlen=200)
        self.log_dropped = 0
        self._log_bytes = 0
        self._log_partial = b""
        self._callbacks = {"message": [], "exit": [], "log": []}
        self._reason: SandboxError | None = None
        self._closing = False
        self._finalized = False
        self._listener = None
        self._sp = None
        self._pidfd = None
        self._fds: dict[str, int] = {}
        self._session = S.Session(self.policy.limits.max_message_bytes)
        self.exports: tuple[str, ...] = ()  # what the plugin lets the host call, from its READY
        self._timeout = self.policy.limits.timeout
        self._start_timeout = start_timeout if start_timeout is not None else max(10.0, self._timeout or 0)
        if not os.path.isfile(self.plugin):
            raise LoadError("FileNotFoundError", f"plugin file not found: {self.plugin}")

    @property
    def alive(self) -> bool:
        """Started, not ended, and no reason to end recorded yet."""
        return self.pid is not None and not self._finalized and self._reason is None

    def _check_alive(self):
        if self._finalized or self._reason is not None:
            if self.death is not None and not self._closing:
                raise WorkerClosed(f"worker {self.name} has ended: {self.death}")
            raise WorkerClosed(f"worker {self.name} is closed")

    def _kill(self, reason: SandboxError | None):
        raise NotImplementedError

    def _on_violation(self):
        """One seccomp notification: the forbidden syscall, named, becomes the reason; kill."""
        got = notify.receive(self._listener)
        if got is None:
            return
        pid, nr, args = got
        name = notify.syscall_name(nr)
        shown = ", ".join(hex(a) if a > 0xFFFF else str(a) for a in args)
        where = f"policy {self.policy.path or self.policy.name}"
        err = PolicyViolation(f"plugin {self.name} made a forbidden syscall: {name}({shown}) [{where}]",
                              syscall=name, args=args, plugin=self.name, policy=self.policy.path)
        log.warning("%s", err)
        self._kill(err)

    # ---- plugin output ----------------------------------------------------------------------
    def _drain_log(self):
        fd = self._fds.get("log")
        try:
            while fd is not None:
                data = os.read(fd, 65536)
                if not data:
                    break
                self._take_log(data)
        except OSError:
            pass

    def _take_log(self, data: bytes):
        """Split into lines, cap each and the total, keep the last ones, tell the listeners."""
        if self._log_bytes >= LOG_BUDGET:
            self.log_dropped += len(data)
            return
        self._log_bytes += len(data)
        lines = (self._log_partial + data).split(b"\n")
        self._log_partial = lines.pop()[:LOG_LINE_MAX]
        for raw in lines:
            line = raw[:LOG_LINE_MAX].decode("utf-8", "replace")
            self.logs.append(line)
            log.debug("[%s] %s", self.name, line)
            for cb in list(self._callbacks["log"]):
                try:
                    cb(line)
                except Exception:
                    log.exception("log callback of worker %s failed", self.name)
