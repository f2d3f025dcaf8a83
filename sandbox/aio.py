"""`AsyncWorker`: the Worker API on an asyncio event loop.

    async with AsyncWorker("plugins/resize/worker.py", policy="policies/resize.toml") as w:
        w.on("message", print)
        print(await w.call("resize", data, width=64))
        async for msg in w.messages():
            ...

A driver of the lifecycle core (`_host/lifecycle.py`), like the sync Worker: the decisions are
the core's, this file owns the loop's readers, writers and timers. No thread per worker and no
polling: the child->host pipe, the status pipe, the log pipe and the seccomp listener are
watched with `loop.add_reader`; a write that would block waits in a buffer for
`loop.add_writer`. The zygote's fork runs in a thread (`run_in_executor`), so a stuck zygote
never stalls the loop, and the start is bounded by `start_timeout`.

Cancelling a task that awaits `call()` kills the worker (plugin code cannot be interrupted, and
a late reply must never answer the next call); the death is `WorkerClosed`.
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import select
import typing
import weakref
from os import close as _os_close, write as _os_write

from . import events as _events
from ._host import channel, hub as _hub, lifecycle as lc
from ._host.handle import DEATH_WAIT, EXITED_GRACE, WorkerHandle, log, weak_method
from .errors import LoadError, ProtocolViolation, WorkerClosed

READS_PER_WAKEUP = 16      # reads of the child's pipe per loop iteration: a flood can't starve the loop
MESSAGE_BACKLOG = 10_000   # undelivered messages per messages() iterator before the child is paused
BACKLOG_BYTES = lc.BUFFER_BUDGET // 2  # ... or undelivered bytes
SPAWN_MARGIN = 0.5          # s beyond start_timeout before an executor that never ran the spawn is given up on
_ENDED = lc._ENDED
_Reply = lc.Reply
_events_log = _events.log


class AsyncWorker(WorkerHandle):
    """One sandboxed worker driven by the running event loop. Create with
    `await AsyncWorker.start(path, policy=...)` or `async with AsyncWorker(path, policy=...)`."""
    _OFFLOAD = lc.OFFLOAD_AT  # a large map or array is decoded in a thread, never on the loop

    def __init__(self, worker_py, policy=None, *, name: str | None = None,
                 start_timeout: float | None = None, _on_syscall=None):
        super().__init__(worker_py, policy, name, start_timeout, _on_syscall)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()          # one call in flight
        self._waiter: asyncio.Future | None = None  # READY while starting, then the reply of the call
        self._out: collections.deque[bytes | memoryview] = collections.deque()  # frames (or tails) for the pipe
        self._drainers: list[asyncio.Future] = []
        self._dead: asyncio.Future | None = None
        self._death_timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None  # of the call in flight (monotonic, loop.time())
        self._deadline_timeout: float | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None  # one lazily re-armed timer, not one per call
        self._subscribers: weakref.WeakSet[Messages] = weakref.WeakSet()
        self._paused = False
        self._tasks: set[asyncio.Future[typing.Any]] = set()  # async callbacks still running
        self._started = False
        self._status_waiting = False         # the status came while a payload was being decoded

    # ---- public API -------------------------------------------------------------------------
    @classmethod
    async def start(cls, worker_py, policy=None, **kwargs) -> "AsyncWorker":
        w = cls(worker_py, policy, **kwargs)
        await w._start()
        return w

    async def __aenter__(self):
        if not self._started:
            await self._start()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    def on(self, event: str, callback) -> "AsyncWorker":
        """Register a callback (plain function or coroutine function) for message, exit, log or denied."""
        self._on_event_callback(event, self._wrap(callback))
        return self

    def messages(self) -> "Messages":
        """`async for msg in w.messages()`: every message posted from now on; ends when the worker does."""
        return Messages(self)

    def call(self, name: str, /, *args, **kwargs) -> "typing.Awaitable":
        """`await w.call(name, ...)`: call the plugin's function `name`; every argument and
        keyword goes to the plugin. (A plain function returning the call's coroutine: one
        coroutine less per call than an `async def` around it.)"""
        return self._call(name, args, kwargs, self._timeout)

    async def invoke(self, name: str, args=(), kwargs=None, *, timeout: float | None = None):
        """`call` with the library's own options beside, never among, the plugin's arguments:
        `timeout` in seconds (None: the policy's; math.inf: none)."""
        return await self._call(name, tuple(args), dict(kwargs or {}), self._call_timeout(timeout))

    async def post(self, obj, *, timeout: float | None = None) -> None:
        """Deliver obj to the plugin's on_message (plain data only); returns once it is written.
        A worker that does not read it within `timeout` is killed (PluginTimeout)."""
        timeout = self._call_timeout(timeout)
        core = self._require_core()
        self._send(core.encode_post(obj))
        if not self._out:
            return
        try:
            await asyncio.wait_for(self._drain(), timeout)
        except asyncio.TimeoutError:
            assert timeout is not None  # wait_for times out only when given a timeout
            self._apply(core.kill(channel.timeout_error(self.name, timeout)))
            raise core.ended_error() from None

    async def terminate(self) -> None:
        """Kill the worker now (SIGKILL) and wait, bounded, until it is reaped."""
        core = self._core
        if core is None or core.state is _ENDED:
            return
        self._apply(core.kill())
        assert self._dead is not None  # created by _start before the core
        await asyncio.shield(self._dead)

    async def close(self, grace: float = 1.0) -> None:
        """Ask the worker to exit (EOF on its input), then kill it if it hasn't within `grace`."""
        core = self._core
        if core is None or core.state is _ENDED:
            return
        self._apply(core.close())
        assert self._dead is not None  # created by _start before the core
        try:
            await asyncio.wait_for(asyncio.shield(self._dead), grace)
        except asyncio.TimeoutError:
            await self.terminate()

    def __del__(self):
        self._warn_unclosed()

    def __repr__(self):
        state = "alive" if self.alive else ("not started" if self._core is None else "ended")
        return f"<AsyncWorker {self.name} pid={self.pid} {state}>"

    # ---- calls ------------------------------------------------------------------------------
    def _require_core(self) -> lc.Lifecycle:
        if self._core is None:
            raise WorkerClosed(f"worker {self.name} was not started")
        return self._core

    async def _call(self, name, args, kwargs, timeout):
        async with self._lock:
            core = self._core or self._require_core()
            if core.state is lc._CLOSING and not core.closing and self._dead is not None:
                # dying on its own (its pipe closed, a kill under way): its exit status says why
                # in a moment (the death timer bounds the wait), and the caller is told that
                try:
                    await asyncio.wait_for(asyncio.shield(self._dead), DEATH_WAIT + EXITED_GRACE)
                except asyncio.TimeoutError:
                    pass
            frame = core.begin_call(name, args, kwargs)  # WorkerClosed unless READY
            loop = self._loop
            started = loop.time()
            fut = self._waiter = loop.create_future()
            try:
                if timeout is not None:
                    self._set_deadline(started + timeout, timeout)
                self._send(frame)  # (whatever is still queued was copied: the frame's buffer is free)
                frame = None
                reply = await fut
            except asyncio.CancelledError:
                if not (fut.done() and not fut.cancelled()):
                    # The plugin is still running this call: only killing it keeps the reply from
                    # answering a later call.
                    self._emit("cancelled", function=name)
                    self._apply(core.kill(WorkerClosed(
                        f"a call to {self.name}.{name} was cancelled; the worker was killed")))
                raise
            finally:
                self._deadline = None
                self._waiter = None
                core.call_over(sent=True)
        if reply.error is None and not (_events._subscribers or _events_log.isEnabledFor(20)):
            return reply.value  # the usual outcome, without the event nobody listens to
        return self._outcome(name, started, reply)

    # ---- start ------------------------------------------------------------------------------
    async def _start(self):
        if self._started:
            raise RuntimeError("this AsyncWorker was already started")
        self._started = True
        loop = self._loop = asyncio.get_running_loop()
        self._clock = loop.time
        self._dead = loop.create_future()
        t0 = loop.time()
        # The zygote's fork in a thread: a stopped or slow zygote never stalls the loop. The spawn
        # bounds its own wait for the zygote by start_timeout and says what went wrong exactly
        # as Worker's does (ZygoteDied for a zygote that did not answer); the margin here only
        # covers an executor too busy to run the spawn at all.
        spawn = loop.run_in_executor(None, self._spawn)
        try:
            await asyncio.wait_for(asyncio.shield(spawn), self._start_timeout + SPAWN_MARGIN)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            spawn.add_done_callback(_abandon(self))
            if isinstance(e, asyncio.CancelledError):
                raise
            raise LoadError("TimeoutError", f"plugin {self.name} did not start within {self._start_timeout:g} s "
                                            "(the event loop's executor did not run the start)") from None
        sp, fds = self._sp, self._fds
        loop.add_reader(fds["log"], weak_method(self._on_log))
        loop.add_reader(fds["from"], weak_method(self._on_from))
        loop.add_reader(fds["status"], weak_method(self._on_status))
        # The listener arrives before READY: take it as soon as it does, so that a forbidden
        # syscall made while worker.py loads is reported as such, not as a start timeout.
        loop.add_reader(sp.handoff.fileno(), weak_method(self._on_handoff))
        fut = self._waiter = loop.create_future()
        left = self._start_timeout - (loop.time() - t0)
        timer = loop.call_later(max(left, 0), self._on_start_timeout)
        try:
            await fut
        except asyncio.CancelledError:
            self._emit("cancelled")
            self._apply(self._core.kill(WorkerClosed(f"the start of worker {self.name} was cancelled")))
            raise
        finally:
            timer.cancel()
            self._waiter = None

    def _on_start_timeout(self):
        if self._core is not None and self._core.state is lc._STARTING:
            self._apply(self._core.deadline_passed(self._start_timeout))

    def _on_handoff(self):
        if self._core is not None and self._core.state is not _ENDED:
            self._apply(self._take_handoff())

    # ---- reading the child --------------------------------------------------------------------
    def _on_from(self):
        fd = self._fds.get("from")
        core = self._core
        reads = READS_PER_WAKEUP
        while reads:
            reads -= 1
            if fd is None or self._eof or core.state is _ENDED:
                break
            outs = self._read_child(fd)
            if outs is None:
                break
            if len(outs) == 1 and type(outs[0]) is _Reply:
                self._on_reply(outs[0])  # the usual read: exactly the awaited reply
            else:
                self._apply(outs)
            waiter = self._waiter
            if self._paused or core.decoding or (waiter is not None and waiter.done()):
                break  # the awaited reply is in: let its task run (more data wakes us again)
        if self._eof and fd is not None and core.state is not _ENDED:
            self._loop.remove_reader(fd)  # EOF stays readable: the status pipe says the rest

    def _on_listener_ready(self):
        core = self._core
        if core is None or core.state is _ENDED or self._listener is None:
            return
        outs = self._on_listener()
        if not outs and _hung_up(self._listener):
            self._loop.remove_reader(self._listener)  # every task under the filter is gone
        self._apply(outs)

    def _on_status(self):
        fd = self._fds.get("status")
        core = self._core
        if fd is None or core.state is _ENDED:
            return
        frm = self._fds.get("from")
        while frm is not None and not self._eof and core.state is not _ENDED:
            outs = self._read_child(frm)  # what it wrote before dying still counts
            if outs is None:
                break
            self._apply(outs)
        if core.decoding:
            # one of its last frames is being decoded: it counts first, the status waits for it
            self._status_waiting = True
            self._loop.remove_reader(fd)
            return
        if core.state is not _ENDED:
            self._apply(self._read_status(fd))

    def _on_log(self):
        fd = self._fds.get("log")
        if fd is not None and not self._read_log(fd):
            self._loop.remove_reader(fd)

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
                n = _os_write(fd, frame)
            except BlockingIOError:
                n = 0
            except OSError:
                return  # the child is gone; its death arrives on the status pipe
            if n == len(frame):
                return
            frame = memoryview(frame)[n:]
            self._loop.add_writer(fd, weak_method(self._on_writable))
        # queued: a copy, because a large payload is a view of the encoder's reusable buffer
        self._out.append(bytes(frame))

    def _on_writable(self):
        fd = self._fds.get("to")
        if fd is None:
            self._out.clear()
            return
        try:
            while self._out:
                head = self._out[0]
                n = _os_write(fd, head)
                if n < len(head):
                    self._out[0] = memoryview(head)[n:]
                    return
                self._out.popleft()
        except BlockingIOError:
            return
        except OSError:
            self._out.clear()  # the child is gone; its death arrives on the status pipe
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

    # ---- hooks the core's outputs call (handle.WorkerHandle._apply) -------------------------------
    def _on_reply(self, out):
        waiter = self._waiter  # (a Reply never comes while starting: no call is in flight then)
        if waiter is not None and not waiter.done():
            waiter.set_result(out)

    def _on_ready(self):
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_decode(self, out):
        fd = self._fds.get("from")
        if fd is not None and not self._paused:
            self._loop.remove_reader(fd)  # nothing more is read until this payload is decoded
        frame = out.frame
        fut = self._loop.run_in_executor(None, _decode, out.decode, frame.payload)
        done = weak_method(self._on_decoded)
        fut.add_done_callback(lambda f: done(frame, f))

    def _on_decoded(self, frame, fut):
        core = self._core
        obj, error = fut.result() if not fut.cancelled() else (None, ProtocolViolation("decode cancelled"))
        self._apply(core.decoded(frame, obj, error))
        if core.state is _ENDED:
            return
        fd = self._fds.get("from")
        if fd is not None and not self._paused and not self._eof and not core.decoding:
            self._loop.add_reader(fd, weak_method(self._on_from))
            self._on_from()  # what arrived meanwhile
        if self._status_waiting and not core.decoding:
            self._status_waiting = False
            self._on_status()

    def _on_killed(self):
        if self._death_timer is None and self._loop is not None:
            self._death_timer = self._loop.call_later(DEATH_WAIT, weak_method(self._on_death_timeout))
            if self._pidfd is not None:  # its exit, seen through the pidfd, shortens the wait
                self._loop.add_reader(self._pidfd, weak_method(self._on_exited))

    def _on_exited(self):
        """The pidfd says the worker exited: the zygote's status should follow at once."""
        loop, pidfd = self._loop, self._pidfd
        if loop is None or pidfd is None:
            return
        loop.remove_reader(pidfd)
        self._exited_seen = True
        timer = self._death_timer
        if timer is not None and timer.when() > loop.time() + EXITED_GRACE:
            timer.cancel()
            self._death_timer = loop.call_later(EXITED_GRACE, weak_method(self._on_death_timeout))

    def _on_death_timeout(self):
        self._death_timer = None
        self._apply(self._status_never_came())

    def _on_close_input(self):
        fd = self._fds.pop("to", None)
        if fd is not None:
            self._loop.remove_writer(fd)
            self._out.clear()
            _os_close(fd)
        self._wake_drainers(WorkerClosed(f"worker {self.name} is closing"))

    def _unwatch_handoff(self, fd):
        self._loop.remove_reader(fd)

    def _watch_listener(self, fd):
        self._loop.add_reader(fd, weak_method(self._on_listener_ready))

    def _release_elsewhere(self):
        loop, sp = self._loop, self._sp
        timers = [t for t in (self._death_timer, self._deadline_timer) if t is not None]
        watched = [fd for fd in (self._pidfd, sp.handoff.fileno() if sp is not None and sp.handoff is not None
                                 else None, *self._fds.values()) if fd is not None and fd >= 0]
        self._sp, self._fds, self._death_timer, self._deadline_timer = None, {}, None, None

        def release():  # on the loop's thread; no reference to the worker: it is being collected
            for timer in timers:
                timer.cancel()
            if loop is not None and not loop.is_closed():
                for fd in watched:  # before the descriptors close: never a reused number
                    loop.remove_reader(fd)
                    loop.remove_writer(fd)
            if sp is not None:
                sp.release()
        if loop is not None and loop.is_running():
            try:
                loop.call_soon_threadsafe(release)
                return
            except RuntimeError:
                pass  # closed meanwhile
        hub = _hub.current()
        if hub is not None:
            hub.call_soon(release)  # (a loop that is not running has no reader to race with)
        else:
            release()

    def _unwatch_all(self):
        for timer in (self._death_timer, self._deadline_timer):
            if timer is not None:
                timer.cancel()
        self._death_timer = self._deadline_timer = None
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        sp = self._sp
        watched = [self._pidfd, sp.handoff.fileno() if sp is not None and sp.handoff is not None else None,
                   *self._fds.values()]
        for fd in watched:
            if fd is None or fd < 0:
                continue  # never watched, or closed already (a start abandoned half-way)
            loop.remove_reader(fd)
            loop.remove_writer(fd)
        self._out.clear()

    def _on_ended(self, death):
        ended = self._core.ended_error()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ended)
        self._wake_drainers(ended)
        for sub in list(self._subscribers):
            sub._end()
        if self._dead is not None and not self._dead.done():
            self._dead.set_result(None)

    def _set_deadline(self, when: float, timeout: float):
        """Calls in a row with the same timeout share one timer: it is re-armed when it fires
        early for the call then in flight, instead of a call_later and a cancel per call."""
        self._deadline, self._deadline_timeout = when, timeout
        timer = self._deadline_timer
        if timer is None or timer.when() > when:
            if timer is not None:
                timer.cancel()
            loop = self._loop
            assert loop is not None  # a call runs on the loop that _start took
            self._deadline_timer = loop.call_at(when, weak_method(self._on_deadline))

    def _on_deadline(self):
        self._deadline_timer = None
        when, fut = self._deadline, self._waiter
        if when is None or fut is None or fut.done():
            return
        if self._loop.time() < when:
            self._deadline_timer = self._loop.call_at(when, weak_method(self._on_deadline))
            return
        self._apply(self._core.deadline_passed(self._deadline_timeout))

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

    def _on_deliver(self, out):
        msg = out.message
        for cb in list(self._callbacks["message"]):
            try:
                cb(msg)
            except Exception:
                log.exception("message callback of worker %s failed", self.name)
        # The core's budget covers what one batch of reads holds; the iterators' queues are kept
        # in bounds by back-pressure (the pipe is no longer read) instead.
        self._core.delivered(out.size)
        for sub in list(self._subscribers):
            sub._push(msg, out.size)
            if (len(sub._queue) >= MESSAGE_BACKLOG or sub._bytes >= BACKLOG_BYTES) and not self._paused \
                    and "from" in self._fds:
                # back-pressure: stop reading; the plugin blocks in post() until the consumer catches up
                self._paused = True
                self._loop.remove_reader(self._fds["from"])

    def _maybe_resume(self):
        if self._paused and all(len(s._queue) < MESSAGE_BACKLOG // 2 and s._bytes < BACKLOG_BYTES // 2
                                for s in list(self._subscribers)):
            self._paused = False
            if "from" in self._fds and not self._finalized and not self._eof:
                self._loop.add_reader(self._fds["from"], weak_method(self._on_from))


def _decode(decode, payload):
    """In the executor: (object, None), or (None, the ProtocolViolation)."""
    try:
        return decode(payload), None
    except ProtocolViolation as e:
        return None, e


def _abandon(worker: AsyncWorker):
    """A spawn the start gave up on: if it completes after all, kill and release that worker."""
    ref = weakref.ref(worker)

    def done(fut):
        w = ref()
        if w is None or fut.cancelled() or fut.exception() is not None:
            return
        w._send_kill()
        core = w._core
        if core is not None and core.state is not _ENDED:
            # Ended through the core like any death: timers cancelled, resources released, and a
            # terminate() already waiting on it woken (a core set aside here left it waiting).
            w._apply(core.status_wait_over(0, WorkerClosed(f"the start of worker {w.name} was abandoned")))
        elif w._sp is not None:
            w._sp.release()
    return done


class Messages:
    """Async iterator over a worker's messages (from its creation on); ends when the worker ends.

    Each iterator buffers up to MESSAGE_BACKLOG messages (or BACKLOG_BYTES); past that the
    worker's pipe is no longer read (the plugin blocks in post()) until the consumer catches up.
    Drop or `aclose()` an iterator you no longer read.
    """

    def __init__(self, worker: AsyncWorker):
        self._worker = worker
        self._queue: collections.deque[tuple[typing.Any, int]] = collections.deque()  # (message, size)
        self._bytes = 0
        self._waiter: asyncio.Future[None] | None = None
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
        msg, size = self._queue.popleft()
        self._bytes -= size
        self._worker._maybe_resume()
        return msg

    async def aclose(self):
        self._ended = True
        self._queue.clear()
        self._bytes = 0
        self._worker._subscribers.discard(self)
        self._worker._maybe_resume()

    def _push(self, msg, size: int):
        if self._ended:
            return
        self._queue.append((msg, size))
        self._bytes += size
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

