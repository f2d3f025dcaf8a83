"""Attacks 15-21 of the README's security table: outlive or outgrow the limits.
Each test names the layer meant to stop the attack."""
import os
import threading
import time

import pytest

import sandbox
from sandbox import PluginError, PluginMemoryError, PluginTimeout
import procfs
from security.attack_lab import intact, stopped

pytestmark = pytest.mark.unpriv


@pytest.mark.parametrize("fn", ["spin", "never_read", "block_on_pipe"])
def test_deadline_always_wins(lab, fn):
    """15, 16: the host's own clock and SIGKILL; a blocking read doesn't help."""
    extra = '[seccomp]\nallow = []\n'
    with intact(lab, extra) as w:
        t = time.monotonic()
        with pytest.raises(PluginTimeout):
            w.invoke(fn, timeout=0.5)
        assert time.monotonic() - t < 5
        with pytest.raises(sandbox.WorkerClosed):
            w.call("sys", 39)
        w.terminate()  # reaped: nothing of it is left
        assert procfs.gone(w.pid)


def test_stopping_itself_does_nothing(lab):
    """16: a worker is pid 1 of its PID namespace, and the kernel ignores a signal pid 1 sends
    itself without a handler: its own SIGSTOP does not stop it (the host's still would)."""
    with intact(lab) as w:
        assert w.call("stop_myself") == [0, 0]
        assert procfs.state(w.pid) not in (None, "T")
        assert w.call("sys", 39)[0] == 1


def test_thread_bomb_is_stopped(lab, mode):
    """17, 18: no clone without a grant (kill mode: a violation; deny mode: the first thread fails
    with "can't start new thread", reported); with threads granted, RLIMIT_NPROC caps them per uid."""
    with intact(lab, mode=mode) as w:
        err = stopped(w, mode, "thread_bomb", syscall="clone")
        if mode == "deny":
            assert err.type == "RuntimeError" and "can't start new thread" in err.message  # at the first


def test_mmap_of_a_huge_region(lab):
    """19: RLIMIT_AS: a clear memory error, not a mystery crash."""
    with intact(lab) as w:
        with pytest.raises((PluginMemoryError, PluginError)) as ei:
            w.call("mmap_huge")
        if isinstance(ei.value, PluginError):
            assert ei.value.type in ("OSError", "MemoryError")


def test_many_spinning_workers_still_meet_deadlines(lab):
    """21: each worker is its own process; the host enforces deadlines from its own thread."""
    d, policy = lab
    ws = [sandbox.Worker(os.path.join(d, "attacks.py"), policy=policy()) for _ in range(4)]
    errors = []

    def go(w):
        try:
            w.invoke("spin", timeout=0.5)
        except PluginTimeout as e:
            errors.append(e)

    t = time.monotonic()
    threads = [threading.Thread(target=go, args=(w,)) for w in ws]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(errors) == 4 and time.monotonic() - t < 5
    for w in ws:
        w.close()
