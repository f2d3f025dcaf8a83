"""Every way a call can go wrong, and ways it goes right."""
import os

from sandbox.plugin import post  # importable plumbing: never callable from outside

__all__ = ["echo", "greet", "blob", "length", "boom", "crash", "spin", "sock", "seen"]
_messages = []


def echo(x):
    return x


def greet(name, *, punctuation="!"):
    return f"hello {name}{punctuation}"


def blob(n):
    return bytes(range(n))


def length(data):
    return len(data)


def boom():
    raise ValueError("the plugin says no")


def crash():
    os._exit(3)


def spin():
    while True:
        pass


def sock():
    import socket
    socket.socket()


def seen():
    return len(_messages)


def on_message(msg):
    _messages.append(msg)
    post({"echo": msg})
