"""What runs in the forked child only (never in the host, never in the zygote's own loop).

    steps.py        the confinement steps, in `STEPS` order, with `STEPS` right after them
    landlock.py     Landlock rulesets (the host builds shared ones with it too: _host/rulesets.py)
    seccomp.py      installs the host-compiled BPF program
    syscalls.py     the few raw kernel calls Python's os module lacks
    serve.py        the child's entry point and serve loop: confine, load worker.py, answer frames
    canary_plugin.py  the doctor's plugin: each function tries one thing a confined worker must not do

The zygote imports these before it forks, so that a child never imports after its filter is on.
"""
