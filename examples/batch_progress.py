"""A batch of 1,000 plugin calls with a progress bar: no thread pool of your own.

    python examples/batch_progress.py [--calls 1000] [--size N]

Runs the textstats plugin (examples/plugins/textstats) under its policy on a `sandbox.Pool` set up
for batch work: as many workers as CPUs, no restart limit (a crash is one failed item, not a
reason to stop), and results as they complete. The bar is tqdm's when it is installed, else a
plain counter. What the plugin posts during each call (`post({"progress": ...})`) arrives on the
pool's callback thread with the worker's identity, and is counted per worker.
"""
import argparse
import collections
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

import sandbox  # noqa: E402

PLUGIN = os.path.join(HERE, "plugins", "textstats", "worker.py")
POLICY = os.path.join(os.path.dirname(HERE), "policies", "textstats.toml")


class Counter:
    """tqdm's update()/close() on a line of text, for when tqdm is not installed."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self._shown = total, desc, 0, 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._shown > 0.1 or self.n == self.total:
            self._shown = now
            print(f"\r{self.desc}: {self.n}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr)


def progress_bar(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return Counter(total, desc)
    return tqdm(total=total, desc=desc, unit="call")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--size", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)

    texts = [f"item {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 7) for i in range(args.calls)]
    posts = collections.Counter()
    words = failures = 0
    bar = progress_bar(len(texts), "textstats")
    started = time.monotonic()
    with sandbox.Pool(PLUGIN, policy=POLICY, size=args.size, restart_limit=None,
                      max_queue=len(texts)) as pool:
        pool.on("message", lambda worker, msg: posts.update([str(worker)]))
        for result in pool.map("stats", texts, ordered=False, return_exceptions=True):
            if isinstance(result, sandbox.SandboxError):
                failures += 1
            else:
                words += result["words"]
            bar.update(1)
        bar.close()
        stats = pool.stats()
    elapsed = time.monotonic() - started
    print(f"{len(texts)} calls in {elapsed:.2f} s on {args.size} workers: {words} words, {failures} failed; "
          f"progress messages per worker: {dict(sorted(posts.items()))}; restarts {stats['restarts']}")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
