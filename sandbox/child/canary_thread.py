"""A preload that starts a thread at import, as OpenBLAS and some C extensions do.

Canary for the thread check (steps.preload_modules): a worker whose preload leaves a thread
running must refuse to start, because that thread would run beside the plugin without
seccomp or no_new_privs. Imported only by a worker whose policy preloads it; never by a host.
"""
import _thread
import time


def _linger() -> None:
    while True:
        time.sleep(3600)


_thread.start_new_thread(_linger, ())
