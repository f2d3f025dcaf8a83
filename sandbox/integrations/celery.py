"""Plugin functions as Celery tasks: each Celery worker process runs them on a sandbox pool of its own.

    from celery import Celery
    from sandbox.integrations.celery import plugin_task

    app = Celery("plugins", broker="redis://127.0.0.1:6379/0", backend="redis://127.0.0.1:6379/0")
    stats = plugin_task(app, "/srv/plugins/textstats/worker.py", "stats",
                        policy="/srv/policies/textstats.toml")

    stats.delay("to be or not to be").get(timeout=30)   # the plugin's value, or the same SandboxError

How it behaves:
- The pool (`sandbox.Pool`) is made on a process's first task, so in the prefork pool (Celery's
  default) each forked child starts its own zygote and workers after the fork, and the parent
  never starts one. With `--pool threads` (or solo) the worker process holds one pool per plugin,
  sized to the worker's concurrency; in a prefork child the pool has one worker (one task at a time).
- A sandbox error travels as JSON (`SandboxError.to_dict()`) and `AsyncResult.get()` raises it
  again on the client as the same class with its attributes (`e.syscall`, `e.timeout`, ...).
  Nothing is pickled: the result serializer stays JSON.
- Time limits agree with the sandbox: the call's deadline (`timeout=`, else the policy's
  `limits.timeout`) kills the plugin first; the task's soft limit is that deadline plus
  `START_ALLOWANCE` (a replacement worker's start), the hard limit `HARD_GRACE` later. Limits
  given in `task_options` must leave that room, or the declaration fails with `UsageError`.
  If the soft limit fires inside a call anyway (a client's shorter per-call limit), the task
  fails with `PluginTimeout` and the process's pool for that plugin is replaced.
- Worker shutdown (`worker_process_shutdown` in each prefork child, `worker_shutdown` in the
  main process) closes every pool and the zygotes: no worker, zygote or scratch folder is left.

The module declaring the tasks is imported by clients too: it reads the policy file (for the
deadline) unless `timeout=` is given, and never starts anything outside a Celery worker's task.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import signals
from celery.exceptions import SoftTimeLimitExceeded

from ..errors import PluginTimeout, SandboxError, UsageError

log = logging.getLogger("sandbox.integrations.celery")

START_ALLOWANCE = 10.0  # seconds a call may spend waiting for a (replacement) worker before its deadline runs
HARD_GRACE = 5.0  # between Celery's soft limit (an exception in the task) and its hard one (SIGKILL of the child)
CLOSE_TIMEOUT = 5.0  # how long shutdown lets calls in flight finish
DISCARD_GRACE = 0.1  # a pool given up on after Celery's soft limit: its calls are killed at once


class RemoteSandboxError(Exception):
    """What a task raises for a SandboxError: its `to_dict()` as the one argument.

    Celery's JSON result backend stores (module, class name, args) and, on the client, calls
    `RemoteSandboxError(record)`; that construction returns the original error class rebuilt
    by `SandboxError.from_dict`, so callers catch `sandbox.PolicyViolation`, not this."""

    def __new__(cls, record: Any = None, *rest: Any) -> Any:
        if isinstance(record, dict):
            return SandboxError.from_dict(record)  # not an instance of cls: __init__ is skipped
        return super().__new__(cls)

    @classmethod
    def carrying(cls, error: SandboxError) -> "RemoteSandboxError":
        exc = Exception.__new__(cls)
        Exception.__init__(exc, error.to_dict())
        return exc

    def _record(self) -> dict[str, Any]:
        record = self.args[0] if self.args else {}
        return record if isinstance(record, dict) else {"message": str(record)}

    def __str__(self) -> str:
        return str(self._record().get("message", ""))

    def __repr__(self) -> str:  # what Celery's log shows: the class it will be again, its message
        record = self._record()
        return f"{type(self).__name__}[{record.get('class', 'SandboxError')}]({str(self)!r})"


class _Registry:
    """This process's pools, one per (plugin, policy, options); forgotten in a forked child."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pools: dict[tuple, Any] = {}
        self.prefork_child = False
        self.concurrency: int | None = None

    def after_fork(self) -> None:
        # The parent's pools and their workers are not this process's to use or to close.
        self.lock = threading.Lock()
        self.pools = {}


_registry = _Registry()
os.register_at_fork(after_in_child=_registry.after_fork)


def _pool_size() -> int:
    if _registry.prefork_child:
        return 1
    return _registry.concurrency or os.cpu_count() or 1


class PluginSpec:
    """One plugin function as a task: where it is, its policy, its deadline and pool options."""

    def __init__(self, worker_py: str, function: str, policy: Any, timeout: float | None,
                 pool_size: int | None, pool_options: dict[str, Any]):
        self.worker_py = os.path.abspath(os.fspath(worker_py))
        self.function = function
        self.policy = os.path.abspath(os.fspath(policy)) if isinstance(policy, (str, os.PathLike)) else policy
        self.timeout = timeout
        self.pool_size = pool_size
        self.pool_options = dict(pool_options)
        self.key = (self.worker_py, self.policy if isinstance(self.policy, str) else id(self.policy),
                    pool_size, tuple(sorted(self.pool_options.items())))

    def pool(self) -> Any:
        with _registry.lock:
            pool = _registry.pools.get(self.key)
            if pool is None:
                from ..pool import Pool
                size = self.pool_size or _pool_size()
                pool = Pool(self.worker_py, policy=self.policy, size=size, **self.pool_options)
                _registry.pools[self.key] = pool
            return pool

    def run(self, args: tuple, kwargs: dict[str, Any], eager: bool = False, soft_limit: float | None = None) -> Any:
        pool = self.pool()
        invoke = getattr(pool, "invoke", None)
        try:
            if invoke is not None:
                return invoke(self.function, args, kwargs, timeout=self.timeout)
            return pool.call(self.function, *args, timeout=self.timeout, **kwargs)
        except SoftTimeLimitExceeded:
            # Celery's backstop fired inside the pool (the sandbox's own deadline should have come
            # first): the pool may be mid-call, so it is replaced, and the caller gets a timeout.
            self.discard(pool)
            error: SandboxError = PluginTimeout(
                f"{self.function}() of {self.worker_py} passed the task's soft time limit ({soft_limit} s)",
                timeout=soft_limit)
        except SandboxError as e:
            error = e
        if eager:  # task_always_eager / apply(): no backend in between, the error as it is
            raise error
        raise RemoteSandboxError.carrying(error)

    def discard(self, pool: Any) -> None:
        with _registry.lock:
            if _registry.pools.get(self.key) is pool:
                del _registry.pools[self.key]
        # closed off the task's thread: whatever held it up may hold up the close too
        threading.Thread(target=pool.close, args=(DISCARD_GRACE,), name="sandbox-pool-discard", daemon=True).start()


def _deadline(policy: Any, timeout: float | None) -> float | None:
    """The sandbox's per-call deadline in seconds, None for none (the library's one meaning)."""
    from .._host.options import timeout as one_timeout
    if timeout is not None:
        return one_timeout(timeout, None)
    from .._host.handle import load_policy
    return one_timeout(None, load_policy(policy).limits.timeout)


def time_limits(deadline: float | None, task_options: dict[str, Any]) -> tuple[float | None, float | None]:
    """(soft, hard) Celery limits that leave the sandbox's deadline room to act first."""
    soft = task_options.get("soft_time_limit")
    hard = task_options.get("time_limit")
    if deadline is None:  # no sandbox deadline: Celery's limits, if any, are the only ones
        return soft, hard
    needed = deadline + START_ALLOWANCE
    if soft is None:
        soft = needed if hard is None or hard > needed else None
    if soft is not None and soft < needed:
        raise UsageError(f"soft_time_limit {soft} s leaves no room for the sandbox deadline of {deadline} s "
                         f"(needs at least {needed} s: the deadline plus {START_ALLOWANCE} s for a worker's start)")
    if hard is None:
        hard = (soft if soft is not None else needed) + HARD_GRACE
    if hard < needed:
        raise UsageError(f"time_limit {hard} s leaves no room for the sandbox deadline of {deadline} s "
                         f"(needs at least {needed} s)")
    return soft, hard


def plugin_task(app: Any, worker_py: str, function: str, *, policy: Any = None, timeout: float | None = None,
                name: str | None = None, pool_size: int | None = None, pool_options: dict[str, Any] | None = None,
                **task_options: Any) -> Any:
    """Declare a Celery task on `app` that calls `function` of the plugin `worker_py` under `policy`.

    Positional and keyword arguments of the task go to the plugin function. `timeout` is the
    sandbox's per-call deadline (None: the policy's); `pool_size` and `pool_options` (any
    `sandbox.Pool` option) shape each process's pool; other keywords go to `app.task` (queue,
    acks_late, rate_limit, ...). Returns the Celery task."""
    spec = PluginSpec(worker_py, function, policy, timeout, pool_size, pool_options or {})
    soft, hard = time_limits(_deadline(policy, timeout), task_options)
    task_options.update(soft_time_limit=soft, time_limit=hard)
    plugin_dir = os.path.basename(os.path.dirname(spec.worker_py)) or "plugin"
    task_name = name or f"sandbox.{plugin_dir}.{function}"
    throws = tuple(task_options.pop("throws", ())) + (RemoteSandboxError,)  # logged without a traceback

    def run_plugin(task: Any, *args: Any, **kwargs: Any) -> Any:
        request = task.request
        sent = getattr(request, "timelimit", None)  # (hard, soft) when the client set its own
        soft_limit = sent[1] if sent and len(sent) == 2 and sent[1] else soft
        return spec.run(args, kwargs, eager=bool(getattr(request, "is_eager", False)), soft_limit=soft_limit)

    run_plugin.__name__ = run_plugin.__qualname__ = f"{plugin_dir}_{function}"
    run_plugin.__doc__ = f"Calls {function}() of {spec.worker_py} in a sandbox worker."
    task = app.task(name=task_name, throws=throws, bind=True, **task_options)(run_plugin)
    task.sandbox_spec = spec
    return task


def shutdown(timeout: float = CLOSE_TIMEOUT) -> None:
    """Close this process's pools (calls in flight get `timeout` s) and stop its zygotes, which ends
    every other worker of this process too: meant for the process's own shutdown."""
    with _registry.lock:
        pools = list(_registry.pools.values())
        _registry.pools.clear()
    for pool in pools:
        try:
            pool.close(timeout)
        except Exception:  # shutting down: one pool's failure must not keep the others open
            log.exception("closing %r failed", pool)
    from .._host import zygote_client
    stop = getattr(zygote_client, "shutdown_all", None)
    if stop is not None:
        stop()


@signals.worker_init.connect(weak=False)
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    concurrency = getattr(sender, "concurrency", None)
    if isinstance(concurrency, int) and concurrency > 0:
        _registry.concurrency = concurrency


@signals.worker_process_init.connect(weak=False)
def _on_process_init(**_: Any) -> None:
    _registry.prefork_child = True


@signals.worker_process_shutdown.connect(weak=False)
def _on_process_shutdown(**_: Any) -> None:
    shutdown()


@signals.worker_shutdown.connect(weak=False)
def _on_worker_shutdown(**_: Any) -> None:
    shutdown()
