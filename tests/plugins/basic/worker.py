"""The plugin most integration tests call: plain functions, posts, output, deaths."""
import os
import time

from sandbox.plugin import post


def add(a, b):
    return a + b


def echo(x):
    return x


def kw(a, *, scale=1):
    return a * scale


def fail():
    raise KeyError("no such thing")


def tell(n):
    for i in range(n):
        post({"i": i})
    return "told"


def on_message(msg):
    post({"echo": msg})


def noisy():
    for _ in range(20000):
        print("x" * 200)
    return "still fine"


def not_plain():
    return object()


def spin():
    while True:
        pass


def exit_with(code):
    os._exit(code)



def abort():
    os.abort()


def hog():
    return bytearray(2 * 1024 ** 3)


def grow():
    chunks = []
    while True:
        chunks.append(bytearray(1 << 20))


def pretend():
    raise MemoryError("pretend")


def hello():
    print("hello from the plugin", flush=True)
    return 1



def nap(s):
    time.sleep(s)
    return s



def _private():
    return "hidden"
