"""One background thread per host process that watches idle workers.

While a call is in flight the calling thread does its own I/O (no thread hop on the hot path);
the hub only looks after what happens between calls: messages a plugin posts, its log lines,
a death or a forbidden syscall. Worker fds are armed EPOLLONESHOT so the hub never spins on a
descriptor that a calling thread currently owns.

The hub reads, lets the worker's lifecycle core decide, and hands what users listen to over to
the worker's callback thread (`callbacks.CallbackRunner`, which never makes it wait): no user
callback runs here, so one worker's slow callback cannot delay noticing another worker's death.
A handler here must only do bounded, non-blocking work.

It also runs what a worker dropped without close() could not do in its __del__ (`call_soon`):
the collector runs __del__ in whatever thread allocates, possibly one inside a section that
holds this hub's lock or the uid registry's, so __del__ only kills and hands the release here.
"""
import collections
import logging
import os
import select
import threading

from .. import events as _events

ONESHOT = select.EPOLLIN | select.EPOLLONESHOT


class Hub:
    def __init__(self):
        self._ep = select.epoll()
        self._handlers: dict[int, callable] = {}
        self._lock = threading.Lock()
        # call_soon: a deque append and an eventfd write, neither takes a lock
        self._soon: collections.deque = collections.deque()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="sandbox-hub", daemon=True)
        self._thread.start()

    def watch(self, fd: int, handler, oneshot: bool = True, armed: bool = True) -> None:
        with self._lock:
            self._handlers[fd] = handler
            self._ep.register(fd, (ONESHOT if oneshot else select.EPOLLIN) if armed else select.EPOLLONESHOT)

    def arm(self, fd: int) -> None:
        try:
            self._ep.modify(fd, ONESHOT)
        except (OSError, ValueError):
            pass  # unwatched meanwhile (the worker ended)

    def disarm(self, fd: int) -> None:
        try:
            self._ep.modify(fd, select.EPOLLONESHOT)
        except (OSError, ValueError):
            pass

    def call_soon(self, fn) -> None:
        """Run fn() on the hub thread, soon. Safe from __del__ and from any thread."""
        self._soon.append(fn)
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass  # the counter is full: the hub is awake already

    def _run_soon(self) -> None:
        try:
            os.eventfd_read(self._wake)
        except OSError:
            pass
        while self._soon:
            fn = self._soon.popleft()
            try:
                fn()
            except Exception:  # noqa: BLE001 - one release failing must not stop the hub
                logging.getLogger("sandbox").exception("sandbox hub: a deferred release failed")

    def unwatch(self, fd: int) -> None:
        with self._lock:
            if self._handlers.pop(fd, None) is not None:
                try:
                    self._ep.unregister(fd)
                except (OSError, ValueError):
                    pass

    def _run(self):
        _events.defer_on_this_thread()  # subscribers of sandbox.events never hold up this thread
        while True:
            try:
                events = self._ep.poll()
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == self._wake:
                    self._run_soon()
                    continue
                with self._lock:
                    handler = self._handlers.get(fd)
                if handler is not None:
                    try:
                        handler(fd)
                    except Exception:  # a bug in one worker's handling must not stop the others'
                        logging.getLogger("sandbox").exception("hub handler failed for fd %d", fd)


_hub = None
_hub_lock = threading.Lock()


def current() -> "Hub | None":
    """The hub if it runs; never starts one (which would take locks)."""
    return _hub


def get() -> Hub:
    global _hub
    if _hub is None:
        with _hub_lock:
            if _hub is None:
                _hub = Hub()
    return _hub


def _after_fork_in_child() -> None:
    # The parent's hub thread does not exist here, and its epoll instance is shared with the
    # parent: a child registering its own fds there would feed the parent's hub. Start afresh.
    global _hub, _hub_lock
    old, _hub, _hub_lock = _hub, None, threading.Lock()
    if old is not None:
        _inherited.append(old)  # never freed here: nothing of it may act on a reused fd later
        old._ep.close()  # the child's copy only
        os.close(old._wake)


_inherited: list = []


os.register_at_fork(after_in_child=_after_fork_in_child)
