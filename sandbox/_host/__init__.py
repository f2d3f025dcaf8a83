"""The host's private core: everything that runs in the host process behind the public API.

    handle.py        what Worker and AsyncWorker share: one worker's state as the host sees it
    channel.py       one worker's protocol state: bytes from the child in, typed events out (no I/O)
    resources.py     what a worker owns on the host side (uid, scratch dir, pipes), acquired and
                     released in one place
    plan.py          the plan the child's confinement steps read, built once in the host
    zygote_client.py starts the zygote and asks it for workers
    uids.py          a uid of its own per worker (root hosts), unique on the machine
    hub.py           the one thread per host process that watches idle workers
    notify.py        reads seccomp user notifications (which syscall a worker tried)
    pool_core.py     the pool's decisions, shared by Pool and AsyncPool

Nothing here is public; the public surface is `sandbox.Worker`, `sandbox.AsyncWorker`,
`sandbox.Pool`, `sandbox.AsyncPool`, `sandbox.Policy`, `sandbox.errors` and `sandbox.plugin`.
"""
