"""One way to wait: `poll_until(check, timeout=..., interval=..., what=...)`.

Every wait in the project has a deadline and, when it runs out, an error that names what it waited
for and the last thing it saw. The clock and the sleep are injectable, so tests of waits need no
real time. Standard library only: every layer may use it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from ray_serve_cai.errors import WaitTimeout

T = TypeVar("T")


def poll_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    interval: float,
    what: str,
    max_interval: float | None = None,
    backoff: float = 1.0,
    describe_last: Callable[[], str] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `check` until it returns something other than None (or False) and return that.

    `check` runs at once, then every `interval` seconds (multiplied by `backoff` after each try, up
    to `max_interval`), never past the deadline: the last try happens at the deadline. When the
    deadline passes, `WaitTimeout` says `timed out after <timeout>s waiting for <what>`, plus
    `describe_last()` when given (the last status seen, a log hint). Exceptions from `check` propagate.
    """
    deadline = clock() + timeout
    delay = interval
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        remaining = deadline - clock()
        if remaining <= 0:
            detail = describe_last() if describe_last else ""
            message = f"timed out after {timeout:g}s waiting for {what}"
            raise WaitTimeout(message + (f"; {detail}" if detail else ""))
        sleep(min(delay, remaining))
        delay = delay * backoff
        if max_interval is not None:
            delay = min(delay, max_interval)


async def apoll_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    interval: float,
    what: str,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """`poll_until` for asyncio code (the local workspace's server): sleeps with `asyncio.sleep`."""
    import asyncio

    deadline = clock() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        remaining = deadline - clock()
        if remaining <= 0:
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(min(interval, remaining))
