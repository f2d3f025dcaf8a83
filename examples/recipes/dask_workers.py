"""Recipe: plugin calls as Dask tasks, one sandbox pool per Dask worker process.

    python examples/recipes/dask_workers.py            # a LocalCluster of 2 worker processes

A `WorkerPlugin` makes the pool when a Dask worker starts and closes it when the worker stops;
tasks find it through `get_worker()`. What to watch for:
- Dask worker processes are daemonic: `multiprocessing` and `ProcessPoolExecutor` refuse to start
  children there, but the sandbox's zygote is a plain subprocess and is fine.
- `setup` runs on the worker's event loop, in the process's main thread, so the zygote it starts
  is tied to that process (PDEATHSIG): a worker the nanny kills takes its zygote and workers
  with it. A pool made lazily inside a task would start the zygote from a task thread instead.
- Each Dask worker process has its own zygote and pool: size the pool to the worker's threads.
- The plugin files and policies must exist at the same paths on every Dask machine.
"""
import logging
import os
import sys

from distributed import Client, LocalCluster, WorkerPlugin, get_worker

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


class SandboxPools(WorkerPlugin):
    """One sandbox.Pool per plugin on each Dask worker, alive as long as the worker."""

    name = "sandbox-pools"

    def __init__(self, plugins: dict[str, tuple[str, str]], size: int = 1):
        self.plugins = plugins  # name -> (worker.py, policy file)
        self.size = size
        self.pools: dict = {}

    def setup(self, worker):
        import sandbox
        for name, (worker_py, policy) in self.plugins.items():
            self.pools[name] = sandbox.Pool(worker_py, policy=policy, size=self.size)

    def teardown(self, worker):
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()


def call_plugin(plugin: str, function: str, *args):
    """A Dask task: the plugin's result, or its SandboxError raised (Dask pickles it faithfully)."""
    pools = get_worker().plugins[SandboxPools.name].pools
    return pools[plugin].call(function, *args)


def main() -> int:
    import sandbox
    plugins = {name: (os.path.join(ROOT, "examples", "plugins", name, "worker.py"),
                      os.path.join(ROOT, "policies", f"{name}.toml"))
               for name in ("textstats", "hostile_phone_home")}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.CRITICAL) as cluster, \
            Client(cluster) as client:
        client.register_plugin(SandboxPools(plugins))
        texts = [f"to be or not to be {i}" for i in range(8)]
        futures = client.map(call_plugin, ["textstats"] * len(texts), ["stats"] * len(texts), texts, pure=False)
        for text, result in zip(texts, client.gather(futures), strict=True):
            print(f"{text!r}: {result['words']} words")
        try:
            client.submit(call_plugin, "hostile_phone_home", "run", pure=False).result()
            print("hostile_phone_home: not stopped (!)")
            return 1
        except sandbox.PolicyViolation as e:
            print(f"hostile_phone_home: stopped, PolicyViolation syscall={e.syscall}")
        except sandbox.PluginError as e:  # the default's deny mode: socket() failed, the pool's host logged it
            print(f"hostile_phone_home: stopped, its socket() was denied: {e.type}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
