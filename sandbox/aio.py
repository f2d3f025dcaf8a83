"""`AsyncWorker`: the Worker API on an asyncio event loop.

    async with AsyncWorker("plugins/resize/worker.py", policy="policies/resize.toml") as w:
        w.on("message", print)
        print(await w.call("resize", data, width=64))
        async for msg in w.messages():
            ...

No thread per worker and no polling: the child->host pipe, the status pipe, the log pipe and the
seccomp listener are watched with `loop.add_reader`; a write that would block waits in a buffer
for `loop.add_writer`. The protocol rules live in `session.Session` (shared with the sync Worker);
the few pieces of Worker that are pure bookkeeping are borrowed from it, not copied.

Error semantics are the Worker's: a call past its deadline SIGKILLs the worker and raises
PluginTimeout; a forbidden syscall ends in PolicyViolation(syscall=...); any ProtocolViolation
kills; a death is explained by `session.classify_death`. Cancelling a task that awaits `call()`
kills the worker (plugin code cannot be interrupted, and a late reply must never answer the next
call); the death is `WorkerClosed`.
"""
import asyncio
import collections
import inspect
import logging
import os
import select
import signal
import weakref

from ._host import channel as S
from .errors import ConfinementError, LoadError, ProtocolViolation, SandboxError, WorkerClosed
from ._host.handle import DEATH_WAIT, WorkerHandle
from ._host.resources import STATUS, Spawned

log = logging.getLogger("sandbox")
READS_PER_WAKEUP = 16      # reads of the child's pipe per loop iteration: a flood can't starve the loop
MESSAGE_BACKLOG = 10_000   # undelivered messages per messages() iterator before the child is paused


class AsyncWorker(WorkerHandle):
    """One sandboxed worker driven by the running event loop. Create with
    `await AsyncWorker.start(path, policy=...)` or `async with AsyncWorker(path, policy=...)`."""

    def __init__(self, worker_py, policy=None, *, name: str | None = None,
                 start_timeout: float | None = None):
        super().__init__(worker_py, policy, name, start_timeout)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()          # one call in flight
        self._waiter: asyncio.Future | None = None  # READY while starting, then the reply of the call
        self._want: tuple = ()
        self._out = collections.deque()      # frames (or their tails) waiting for the pipe
        self._drainers: list[asyncio.Future] = []
        self._dead: asyncio.Future | None = None
        self._death_timer = None
        self._deadline = None                # of the call in flight (monotonic, loop.time())
        self._deadline_timer = None          # one lazily re-armed timer, not one per call
        self._subscribers = weakref.WeakSet()
        self._paused = False
        self._tasks = set()                  # async callbacks still running

    # ---- public API -------------------------------------------------------------------------
    @classmethod
    async def start(cls, worker_py, policy=None, **kwargs) -> "AsyncWorker":
        w = cls(worker_py, policy, **kwargs)
        await w._start()
        return w

    async def __aenter__(self):
        if self._sp is None:
            await self._start()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    def on(self, event: str, callback) -> "AsyncWorker":
        """Register a callback (plain function or coroutine function) for message, exit or log."""
        if event not in self._callbacks:
            raise ValueError(f"unknown event {event!r} (message, exit, log)")
        self._callbacks[event].append(self._wrap(callback))
        return self

    def messages(self) -> "Messages":
        """`async for msg in w.messages()`: every message posted from now on; ends when the worker does."""
        return Messages(self)

    async def call(self, name: str, *args, timeout: float | None = None, **kwargs):
        timeout = self._timeout if timeout is None else timeout
        async with self._lock:
            self._check_alive()
            loop = self._loop
            fut = None
            try:
                frame = self._session.encode_call(name, args, kwargs)
                fut = self._waiter = loop.create_future()
                self._want = (S.RESULT, S.FAILURE)
                if timeout:
                    self._set_deadline(loop.time() + timeout, timeout)
                self._send(frame)
                frame = None
                self._session.sent()  # whatever is still queued was copied
                kind, value = await fut
            except asyncio.CancelledError:
                if fut is not None and not (fut.done() and not fut.cancelled()):
                    # The plugin is still running this call: only killing it keeps the reply from
                    # answering a later call.
                    self._kill(WorkerClosed(f"a call to {self.name}.{name} was cancelled; the worker was killed"))
                raise
            finally:
                self._deadline = None
                self._waiter = None
                self._want = ()
                self._session.call_done()
        if kind == S.RESULT:
            return value
        raise value

    async def invoke(self, name: str, args=(), kwargs=None, *, timeout: float | None = None):
        """`call` with the library's own options beside, never among, the plugin's arguments:
        every keyword of `call` goes to the plugin; here `timeout` is the sandbox's deadline."""
        return await self.call(name, *args, timeout=timeout, **(kwargs or {}))

    async def post(self, obj, *, timeout: float | None = None) -> None:
        """Deliver obj to the plugin's on_message (plain data only); returns once it is written."""
        frame = S.Session.encode_post(obj)
        self._check_alive()
        self._send(frame)
        if not self._out:
            return
        timeout = timeout or self._timeout or 10.0
        try:
            await asyncio.wait_for(self._drain(), timeout)
        except asyncio.TimeoutError:
            self._kill(S.timeout_error(self.name, timeout))
            raise self._reason from None

    async def terminate(self) -> None:
        """Kill the worker now (SIGKILL) and wait, bounded, until it is reaped."""
        if self._sp is None or self._finalized:
            return
        self._closing = True
        self._kill(None)
        await asyncio.shield(self._dead)

    async def close(self, grace: float = 1.0) -> None:
        """Ask the worker to exit (EOF on its input), then kill it if it hasn't within `grace`."""
        if self._sp is None or self._finalized:
            return
        self._closing = True
        self._close_input()
        try:
            await asyncio.wait_for(asyncio.shield(self._dead), grace)
        except asyncio.TimeoutError:
            await self.terminate()

    def __repr__(self):
        state = "alive" if self.alive else ("not started" if self._sp is None else "ended")
        return f"<AsyncWorker {self.name} pid={self.pid} {state}>"

    # ---- start ------------------------------------------------------------------------------
    async def _start(self):
        if self._sp is not None:
            raise RuntimeError("this AsyncWorker was already started")
        loop = self._loop = asyncio.get_running_loop()
        self._dead = loop.create_future()
        self._sp = sp = Spawned(self.policy, self.plugin, self.name, self._start_timeout)  # the zygote's fork: ~1 ms
        self.pid, self._pidfd, self._fds = sp.pid, sp.pidfd, sp.fds
        fds = self._fds
        loop.add_reader(fds["log"], self._on_log)
        loop.add_reader(fds["from"], self._on_from)
        loop.add_reader(fds["status"], self._on_status)
        # The listener arrives before READY: take it as soon as it does, so that a forbidden
        # syscall made while worker.py loads is reported as such, not as a start timeout.
        loop.add_reader(sp.handoff.fileno(), self._on_handoff)
        fut = self._waiter = loop.create_future()
        self._want = (S.READY,)
        timer = loop.call_later(self._start_timeout, self._on_start_timeout, fut)
        try:
            _, ready = await fut
            self.exports = S.exports_of(ready)
        except asyncio.CancelledError:
            self._kill(WorkerClosed(f"the start of worker {self.name} was cancelled"))
            raise
        finally:
            timer.cancel()
            self._waiter = None
            self._want = ()
        self._on_handoff()
        if sp.plan.notify and self._listener is None:
            self._kill(ConfinementError("the worker did not hand over its seccomp listener", layer="seccomp"))
            await asyncio.shield(self._dead)
            raise self.death

    def _on_start_timeout(self, fut):
        if not fut.done():
            self._kill(LoadError("TimeoutError", f"plugin {self.name} did not start within "
                                                 f"{self._start_timeout:g} s"))

    def _on_handoff(self):
        sp = self._sp
        if sp is None or sp.handoff is None:
            return
        self._loop.remove_reader(sp.handoff.fileno())
        fd = sp.take_listener()
        if fd is not None and not self._finalized:
            self._listener = fd
            self._loop.add_reader(fd, self._on_listener)

    # ---- reading the child --------------------------------------------------------------------
    def _on_from(self):
        self._read_frames(READS_PER_WAKEUP)

    def _read_frames(self, budget):
        fd = self._fds.get("from")
        while fd is not None and budget and not self._finalized:
            budget -= 1
            try:
                events = self._session.read_from(fd)
            except BlockingIOError:
                return
            except ProtocolViolation as e:
                self._kill(ProtocolViolation(f"plugin {self.name} broke the protocol: {e}"))
                self._loop.remove_reader(fd)
                return
            except OSError:
                events = None
            if events is None:
                # EOF: the child closed its pipe or died; the status pipe says which (bounded wait).
                self._loop.remove_reader(fd)
                self._fds.pop("from", None)  # the same dict as Spawned.fds: closed here, once
                os.close(fd)
                self._arm_death_timer()
                return
            for kind, value in events:
                self._on_event(kind, value)
            if self._want and self._waiter is not None and self._waiter.done():
                return  # the awaited reply is in: let its task run (more data wakes us again)

    def _on_event(self, kind, value):
        if kind == S.MESSAGE:
            self._deliver(value)
        elif kind == S.LOAD_FAILED:
            self._kill(S.load_error(value, self.plugin))
        elif kind in self._want and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result((kind, value))
        elif kind == S.READY:
            pass
        else:
            # a reply nobody waits for: Session already checked ids, so this is a late reply
            self._kill(ProtocolViolation(f"plugin {self.name} sent an unexpected {kind} frame"))

    def _on_listener(self):
        if self._finalized or self._listener is None:
            return
        before = self._reason
        self._on_violation()
        if self._reason is before and _hung_up(self._listener):
            self._loop.remove_reader(self._listener)  # every task under the filter is gone

    def _on_status(self):
        fd = self._fds.get("status")
        if fd is None:
            return
        try:
            data = os.read(fd, STATUS.size)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if self._reason is None:
            self._read_frames(-1)  # what it wrote before dying still counts
        status = STATUS.unpack(data)[1] if len(data) == STATUS.size else None
        if self._reason is None and self._sp is not None:
            self._on_handoff()  # a confinement failure, reported there, names the step
            self._reason = self._sp.end_reason(status)
        self._finalize(status)

    def _on_log(self):
        fd = self._fds.get("log")
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except (OSError, TypeError):
            data = b""
        if not data:
            if fd is not None:
                self._loop.remove_reader(fd)
            return
        self._take_log(data)

    # ---- writing to the child ---------------------------------------------------------------
    def _send(self, frame):
        if type(frame) is tuple:  # a large frame: (header, payload), queued as two writes
            for part in frame:
                self._send(part)
            return
        fd = self._fds.get("to")
        if fd is None:
            raise WorkerClosed(f"worker {self.name} is closing")
        if not self._out:
            try:
                n = os.write(fd, frame)
            except BlockingIOError:
                n = 0
            except OSError:
                return  # the child is gone; its death arrives on the status pipe
            if n == len(frame):
                return
            frame = memoryview(frame)[n:]
            self._loop.add_writer(fd, self._on_writable)
        # queued: a copy, because a large payload is a view of the encoder's reusable buffer
        self._out.append(bytes(frame))

    def _on_writable(self):
        fd = self._fds.get("to")
        try:
            while self._out:
                head = self._out[0]
                n = os.write(fd, head)
                if n < len(head):
                    self._out[0] = memoryview(head)[n:]
                    return
                self._out.popleft()
        except BlockingIOError:
            return
        except (OSError, TypeError):
            self._out.clear()  # the child is gone; its death arrives on the status pipe
        if fd is not None:
            self._loop.remove_writer(fd)
        self._wake_drainers(None)

    async def _drain(self):
        if self._out:
            fut = self._loop.create_future()
            self._drainers.append(fut)
            await fut

    def _wake_drainers(self, exc):
        drainers, self._drainers = self._drainers, []
        for fut in drainers:
            if not fut.done():
                fut.set_exception(exc) if exc is not None else fut.set_result(None)

    def _close_input(self):
        fd = self._fds.pop("to", None)
        if fd is not None:
            self._loop.remove_writer(fd)
            self._out.clear()
            os.close(fd)
        self._wake_drainers(WorkerClosed(f"worker {self.name} is closing"))

    # ---- messages and callbacks ---------------------------------------------------------------
    def _wrap(self, callback):
        def run(*args):
            result = callback(*args)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._task_done)
        run.__wrapped__ = callback
        return run

    def _task_done(self, task):
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("callback of worker %s failed", self.name, exc_info=task.exception())

    def _deliver(self, msg):
        for cb in list(self._callbacks["message"]):
            try:
                cb(msg)
            except Exception:
                log.exception("message callback of worker %s failed", self.name)
        for sub in list(self._subscribers):
            sub._push(msg)
            if len(sub._queue) >= MESSAGE_BACKLOG and not self._paused and "from" in self._fds:
                # back-pressure: stop reading; the plugin blocks in post() until the consumer catches up
                self._paused = True
                self._loop.remove_reader(self._fds["from"])

    def _maybe_resume(self):
        if self._paused and all(len(s._queue) < MESSAGE_BACKLOG // 2 for s in list(self._subscribers)):
            self._paused = False
            if "from" in self._fds and not self._finalized:
                self._loop.add_reader(self._fds["from"], self._on_from)

    # ---- death ------------------------------------------------------------------------------
    def _kill(self, reason: SandboxError | None):
        if self._reason is None and reason is not None:
            self._reason = reason
        if self._pidfd is None:
            return
        try:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            pass
        self._arm_death_timer()

    def _arm_death_timer(self):
        if self._death_timer is None and not self._finalized and self._loop is not None:
            self._death_timer = self._loop.call_later(DEATH_WAIT, self._on_death_timeout)

    def _on_death_timeout(self):
        # The status pipe stayed silent: kill (again) and give it one more period, then give up.
        self._death_timer = None
        if self._finalized:
            return
        try:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        except (ProcessLookupError, OSError, TypeError):
            pass
        self._death_timer = self._loop.call_later(DEATH_WAIT, self._finalize, None)

    def _set_deadline(self, when: float, timeout: float):
        """Calls in a row with the same timeout share one timer: it is re-armed when it fires
        early for the call then in flight, instead of a call_later and a cancel per call."""
        self._deadline, self._deadline_timeout = when, timeout
        timer = self._deadline_timer
        if timer is None or timer.when() > when:
            if timer is not None:
                timer.cancel()
            self._deadline_timer = self._loop.call_at(when, self._on_deadline)

    def _on_deadline(self):
        self._deadline_timer = None
        when, fut = self._deadline, self._waiter
        if when is None or fut is None or fut.done():
            return
        if self._loop.time() < when:
            self._deadline_timer = self._loop.call_at(when, self._on_deadline)
            return
        self._kill(S.timeout_error(self.name, self._deadline_timeout))
        fut.set_exception(self._reason)

    def _finalize(self, status):
        if self._finalized:
            return
        self._finalized = True
        self.exit_status = status
        self.death, self._reason = S.settle_death(status, self._reason, self._closing, self.name)
        if self.death is not None and not isinstance(self.death, WorkerClosed):
            log.info("worker %s (pid %s) ended: %s", self.name, self.pid, self.death)
        self._release()
        ended = self.death or WorkerClosed(f"worker {self.name} was closed")
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ended)
        self._wake_drainers(ended)
        for sub in list(self._subscribers):
            sub._end()
        if not self._dead.done():
            self._dead.set_result(None)
        for cb in list(self._callbacks["exit"]):
            try:
                cb(self.death)
            except Exception:
                log.exception("exit callback of worker %s failed", self.name)

    def _release(self):
        if self._death_timer is not None:
            self._death_timer.cancel()
            self._death_timer = None
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        if "log" in self._fds:
            self._drain_log()
        loop = self._loop
        sp = self._sp
        if sp.handoff is not None:
            loop.remove_reader(sp.handoff.fileno())
        for fd in self._fds.values():
            loop.remove_reader(fd)
            loop.remove_writer(fd)
        self._out.clear()
        sp.release()
        self._fds = {}
        self._pidfd = None


class Messages:
    """Async iterator over a worker's messages (from its creation on); ends when the worker ends.

    Each iterator buffers up to MESSAGE_BACKLOG messages; past that the worker's pipe is no longer
    read (the plugin blocks in post()) until the consumer catches up. Drop or `aclose()` an
    iterator you no longer read.
    """

    def __init__(self, worker: AsyncWorker):
        self._worker = worker
        self._queue = collections.deque()
        self._waiter = None
        self._ended = worker._finalized
        worker._subscribers.add(self)

    def __aiter__(self):
        return self

    async def __anext__(self):
        while not self._queue:
            if self._ended:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        msg = self._queue.popleft()
        self._worker._maybe_resume()
        return msg

    async def aclose(self):
        self._ended = True
        self._queue.clear()
        self._worker._subscribers.discard(self)
        self._worker._maybe_resume()

    def _push(self, msg):
        if self._ended:
            return
        self._queue.append(msg)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _end(self):
        self._ended = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _hung_up(fd) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & (select.POLLHUP | select.POLLERR) and not ev & select.POLLIN for _, ev in p.poll(0))
