"""Recipe: plugin calls from Ray, through an async actor that holds a sandbox AsyncPool.

    pip install ray; python examples/recipes/ray_actors.py      # a local Ray instance

Tested when Ray is installed (`pip install ray`; a local Ray instance starts in a few seconds).
What to watch for:
- Each actor is a process of its own with its own zygote: one actor per plugin and machine,
  holding an AsyncPool sized to the concurrency you give it, beats many small actors.
- Make the pool inside the actor (on its event loop, on first use or in an async init method),
  never in the driver: pools and workers don't travel through pickling.
- Ray's `runtime_env` working_dir is unpacked under /tmp/ray with private permissions: a root
  host runs each worker under a uid of its own, which cannot read it. Deploy plugins and policies
  at world-readable paths on every node instead.
- `ray.kill(actor)` is a SIGKILL: call `close()` first so workers and scratch dirs are cleaned;
  if it is killed anyway, its zygote sees the control socket close and its workers die with it.
- SandboxError classes pickle with their attributes, so `ray.get` raises the same class.
"""
import asyncio
import os
import sys

import ray

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@ray.remote(max_concurrency=16)
class PluginActor:
    def __init__(self, worker_py: str, policy: str, size: int = 2):
        self.worker_py, self.policy, self.size = worker_py, policy, size
        self.pool = None
        self.lock = asyncio.Lock()

    async def _pool(self):
        async with self.lock:
            if self.pool is None:
                import sandbox
                self.pool = await sandbox.AsyncPool.start(self.worker_py, policy=self.policy, size=self.size)
            return self.pool

    async def call(self, function: str, *args, **kwargs):
        pool = await self._pool()
        return await pool.call(function, *args, **kwargs)

    async def close(self):
        if self.pool is not None:
            await self.pool.close()
            self.pool = None


def main() -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local demo reports nothing anywhere
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        actor = PluginActor.remote(os.path.join(ROOT, "examples", "plugins", "textstats", "worker.py"),
                                   os.path.join(ROOT, "policies", "textstats.toml"))
        texts = [f"to be or not to be {i}" for i in range(8)]
        for text, result in zip(texts, ray.get([actor.call.remote("stats", t) for t in texts]), strict=True):
            print(f"{text!r}: {result['words']} words")
        ray.get(actor.close.remote())
        import sandbox
        hostile = PluginActor.remote(os.path.join(ROOT, "examples", "plugins", "hostile_phone_home", "worker.py"),
                                     os.path.join(ROOT, "policies", "hostile_phone_home.toml"), 1)
        try:
            ray.get(hostile.call.remote("run"))
            print("hostile_phone_home: not stopped (!)")
            return 1
        except sandbox.PolicyViolation as e:  # Ray hands back the actor's exception, pickled
            print(f"hostile_phone_home: stopped, PolicyViolation syscall={e.syscall}")
        except sandbox.PluginError as e:  # the default's deny mode: socket() failed, the pool's host logged it
            print(f"hostile_phone_home: stopped, its socket() was denied: {e.type}")
        finally:
            ray.get(hostile.close.remote())
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
