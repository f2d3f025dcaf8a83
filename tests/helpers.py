"""Paths and facts every test module shares, imported as a plain module (`from helpers import ROOT`).

Fixtures live in conftest.py; what is not a fixture lives here or, for /proc, in procfs.py.
"""
import asyncio
import os
import socket
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
PLUGINS = os.path.join(TESTS, "plugins")
POLICIES = os.path.join(ROOT, "policies")
DEFAULT_POLICY = os.path.join(POLICIES, "default.toml")
IS_ROOT = os.geteuid() == 0


def plugin(name: str) -> str:
    """The worker.py of tests/plugins/<name>."""
    return os.path.join(PLUGINS, name, "worker.py")


class GreetingServer:
    """A listening socket in the test process that greets each connection, counts it
    (`accepted`) and closes it: TCP on 127.0.0.1 (`tcp`), a socket file (`unix`), or any
    bound stream socket."""

    def __init__(self, sock: socket.socket, greeting: bytes):
        self.sock = sock
        self.greeting = greeting
        self.accepted = 0
        sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @classmethod
    def tcp(cls, greeting: bytes) -> "GreetingServer":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        return cls(s, greeting)

    @classmethod
    def unix(cls, path: str, greeting: bytes) -> "GreetingServer":
        """A world-writable socket file: its permissions alone let every uid connect."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        os.chmod(path, 0o777)
        server = cls(s, greeting)
        server.path = path
        return server

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                try:
                    conn.sendall(self.greeting)
                except OSError:
                    pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


class LoopThread:
    """An asyncio loop running on a thread of its own, for driving async APIs from sync tests."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
