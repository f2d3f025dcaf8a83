"""One meaning for every option the public API takes, checked in one place (host side).

`timeout` (Worker, AsyncWorker, Pool, AsyncPool, the CLI):
- None: the policy's `limits.timeout`;
- a finite number > 0: seconds from the start of the call; anything past NO_DEADLINE_AFTER
  seconds (about 11.6 days) means no deadline, so that no poll() or timer overflows;
- math.inf: no deadline at all;
- 0, a negative number, NaN, a bool or anything not a number: UsageError (a ValueError too).
"""
from __future__ import annotations

import math

from ..errors import UsageError

NO_DEADLINE_AFTER = 1e6


def timeout(value, default: float | None, what: str = "timeout") -> float | None:
    """The call's deadline in seconds, or None for no deadline."""
    if value is None:
        value = default
        if value is None:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{what} must be a number of seconds or None, not {type(value).__name__} {value!r}")
    if math.isnan(value):
        raise UsageError(f"{what} must be a number of seconds, not NaN")
    if value <= 0:
        raise UsageError(f"{what} must be > 0 seconds (math.inf for no deadline), not {value!r}")
    if value > NO_DEADLINE_AFTER:
        return None
    return float(value)
