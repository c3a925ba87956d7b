"""Retry arithmetic: which failures are retried, and how long to wait (full-jitter backoff)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import httpx

__all__ = ["RETRY_STATUSES", "RetryPolicy", "is_action_path", "parse_retry_after", "request_never_sent"]

#: Statuses that say "not now" rather than "no": rate limiting and gateway/availability failures.
RETRY_STATUSES = frozenset({429, 502, 503, 504})


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def request_never_sent(exc: httpx.TransportError) -> bool:
    """True when the failure happened before any byte of the request reached the server."""
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))


def is_action_path(path: str) -> bool:
    """``.../{id}:stop`` and ``.../{id}:restart`` — POSTs that are safe to repeat."""
    last = path.rsplit("/", 1)[-1]
    return last.endswith((":stop", ":restart"))


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by ``deadline`` seconds per call.

    Attempt ``n`` (1-based, the attempt that just failed) waits ``uniform(0, min(cap, base * 2**(n-1)))``,
    or exactly the server's ``Retry-After`` when it sent one. A wait that would end past the deadline is
    not taken: the call fails with the last error instead.
    """

    deadline: float = 60.0
    base: float = 0.5
    cap: float = 8.0
    rng: random.Random = field(default_factory=random.Random)

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to sleep after failed attempt ``attempt`` (1-based)."""
        if retry_after:  # Retry-After: 0 falls through to the jittered backoff (no hot loop)
            return retry_after
        ceiling = min(self.cap, self.base * (2 ** max(0, attempt - 1)))
        return self.rng.uniform(0.0, ceiling)

    def fits(self, elapsed: float, delay: float, deadline: float | None = None) -> bool:
        """Whether sleeping ``delay`` more seconds still starts the next attempt before the deadline
        (``deadline`` overrides the policy's own, e.g. a shorter one before first contact)."""
        return elapsed + delay < (self.deadline if deadline is None else deadline)
