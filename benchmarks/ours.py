"""The sandbox's own rows: a confined worker under the default policy (fully applied)."""
import os
import time

import sandbox

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN = os.path.join(HERE, "plugins", "bench_worker.py")
POLICY = os.path.join(os.path.dirname(HERE), "policies", "default.toml")


def policy():
    return sandbox.Policy.load(POLICY)


def start_once(pol):
    t = time.perf_counter()
    w = sandbox.Worker(PLUGIN, policy=pol)
    w.call("ping")
    d = time.perf_counter() - t
    w.terminate()
    return d


class Echo:
    def __init__(self, pol):
        self.w = sandbox.Worker(PLUGIN, policy=pol)
        self.pid = self.w.pid

    def roundtrip(self, payload):
        return self.w.call("echo", payload)

    def close(self):
        self.w.close()


def timeout_overshoot(pol, runs, timeout=0.2):
    out = []
    for _ in range(runs):
        w = sandbox.Worker(PLUGIN, policy=pol)
        t = time.monotonic()
        try:
            w.invoke("sleep_forever", timeout=timeout)
        except sandbox.PluginTimeout:
            out.append((time.monotonic() - t - timeout) * 1000)
        w.terminate()
    return out


def idle_pss(pol):
    from .peers import pss_kib
    w = sandbox.Worker(PLUGIN, policy=pol)
    w.call("ping")
    time.sleep(0.3)
    value = pss_kib(w.pid)
    w.close()
    return value
