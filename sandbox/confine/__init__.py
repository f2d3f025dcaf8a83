"""The worker's confinement: an ordered list of named steps, run in the forked child.

The order is the kernel's, not taste: fds and session first (nothing inherited survives);
a user namespace of its own before the rlimits (the namespace records the limit in force when
it is made, and then caps every level above with it); Landlock while we may still restrict ourselves; the credential change (which clears
PDEATHSIG and resets dumpable, so those come right after it); no_new_privs; seccomp last,
because every step before it makes syscalls the plugin must not.
"""
from . import steps

STEPS = (
    ("arrange_fds", steps.arrange_fds),
    ("new_session", steps.new_session),
    ("clear_environment", steps.clear_environment),
    ("own_user_namespace", steps.own_user_namespace),
    ("set_rlimits", steps.set_rlimits),
    ("restrict_filesystem", steps.restrict_filesystem),
    ("drop_privileges", steps.drop_privileges),
    ("die_with_parent", steps.die_with_parent),
    ("preload_modules", steps.preload_modules),
    ("no_new_privs", steps.no_new_privs),
    ("install_seccomp", steps.install_seccomp),
)


class StepFailed(Exception):
    def __init__(self, step: str, error: BaseException):
        super().__init__(f"confinement step {step!r} failed: {type(error).__name__}: {error}")
        self.step = step
        self.error = error


def apply(plan: dict, state: dict) -> None:
    for name, step in STEPS:
        try:
            step(plan, state)
        except Exception as e:
            raise StepFailed(name, e) from None
