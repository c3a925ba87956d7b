"""Retry arithmetic and the verdict on each attempt: `classify(call, response | error)` → done, retry
(after how long) or fail (with which error). Pure: the client does the I/O and the sleeping."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from ._errors import CMLConnectionError, CMLError, CreateOutcomeUnknown, error_from_response, request_id_of

__all__ = [
    "FIRST_CONTACT_DEADLINE",
    "RETRY_STATUSES",
    "Call",
    "Done",
    "Fail",
    "Retry",
    "RetryPolicy",
    "Verdict",
    "classify",
    "describe_transport_error",
    "is_action_path",
    "parse_retry_after",
    "request_never_sent",
]

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
    """``.../{id}:stop``, ``.../{id}:restart`` and ``.../files/{path}:download`` — POSTs that are safe
    to repeat."""
    last = path.rsplit("/", 1)[-1]
    return last.endswith((":stop", ":restart", ":download"))


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


# --------------------------------------------------------------------------- one attempt's verdict

#: Seconds a host this client has never reached is retried (a restart of the workspace's ingress
#: heals in that time; a wrong URL or closed port should be reported, not waited on for a minute).
FIRST_CONTACT_DEADLINE = 10.0


@dataclass(frozen=True)
class Call:
    """What one API call is: enough to judge any of its attempts without the client."""

    method: str
    path: str  # relative to /api/v2
    creates: bool = False  # a POST that creates something (never repeated blindly)
    host: str = ""
    secret: str | None = None  # scrubbed out of every message
    timeout: float = 30.0  # the per-request timeout, for messages
    raw: bool = False  # the answer is bytes (DownloadProjectFile), not JSON

    @property
    def full_path(self) -> str:
        return f"/api/v2{self.path}"

    @property
    def idempotent(self) -> bool:
        """Repeating it cannot do harm: reads, PATCH, DELETE and the :stop/:restart actions."""
        return not self.creates and (self.method != "POST" or is_action_path(self.path))


@dataclass(frozen=True)
class Done:
    """The call succeeded; `body` is the decoded JSON (``{}`` when empty)."""

    body: Any


@dataclass(frozen=True)
class Retry:
    """Try again after `delay` seconds."""

    delay: float


@dataclass(frozen=True)
class Fail:
    """Give up with `error`."""

    error: Exception


Verdict = Done | Retry | Fail


def classify(
    call: Call,
    outcome: httpx.Response | httpx.TransportError,
    *,
    attempt: int,
    elapsed: float,
    reached: bool,
    policy: RetryPolicy,
) -> Verdict:
    """Judge attempt number `attempt` (1-based), `elapsed` seconds into the call: done, retry, or fail.

    Pure: it reads the response (already received) or the transport error, and the policy's
    arithmetic. `reached` says whether this client has ever had an answer from CML (a host never
    reached gets `FIRST_CONTACT_DEADLINE`, not the whole retry deadline).
    """
    if isinstance(outcome, httpx.TransportError):
        return _classify_transport(
            call, outcome, attempt=attempt, elapsed=elapsed, reached=reached, policy=policy
        )
    return _classify_response(call, outcome, attempt=attempt, elapsed=elapsed, policy=policy)


def _classify_transport(
    call: Call, exc: httpx.TransportError, *, attempt: int, elapsed: float, reached: bool, policy: RetryPolicy
) -> Verdict:
    if not (call.idempotent or request_never_sent(exc)):
        return Fail(
            CreateOutcomeUnknown(
                f"the connection to CML broke during {call.method} {call.full_path} "
                f"({describe_transport_error(exc, call)}); "
                "the object may or may not have been created: list before creating it again"
            )
        )
    delay = policy.backoff(attempt)
    if policy.fits(elapsed, delay, _connect_deadline(exc, reached, policy)):
        return Retry(delay)
    return Fail(
        CMLConnectionError(
            f"cannot reach CML at {call.host} ({call.method} {call.full_path}): "
            f"{describe_transport_error(exc, call)}; gave up after {attempt} attempt(s) in {elapsed:.1f}s"
            f"{_connection_hint(exc)}"
        )
    )


def _classify_response(
    call: Call, response: httpx.Response, *, attempt: int, elapsed: float, policy: RetryPolicy
) -> Verdict:
    status = response.status_code
    if response.is_success:
        return _decoded(call, response)
    if call.method == "DELETE" and status == 404 and attempt > 1:
        return Done({})  # an earlier attempt deleted it and its answer was lost
    # A 500 is retried only where repeating cannot do harm: reads, PATCH, DELETE, :stop/:restart.
    retryable = (status in RETRY_STATUSES and (call.idempotent or status == 429)) or (
        status == 500 and call.idempotent
    )
    if retryable:
        delay = policy.backoff(attempt, parse_retry_after(response.headers.get("retry-after")))
        if policy.fits(elapsed, delay):
            return Retry(delay)
        note = f"gave up after {attempt} attempt(s) in {elapsed:.1f}s"
        return Fail(_api_error(call, response, note))
    if call.creates and status >= 500:
        # A gateway or server failure after the request arrived: CML may have created it.
        request_id = request_id_of(response)
        return Fail(
            CreateOutcomeUnknown(
                f"CML answered {status} {response.reason_phrase} to {call.method} {call.full_path}; the "
                "object may or may not have been created: list before creating it again"
                + (f" [request id {request_id}]" if request_id else ""),
                status_code=status,
                request_id=request_id,
            )
        )
    return Fail(_api_error(call, response))


def _api_error(call: Call, response: httpx.Response, note: str = "") -> Exception:
    return error_from_response(
        response, method=call.method, path=call.full_path, secret=call.secret, note=note
    )


def _decoded(call: Call, response: httpx.Response) -> Verdict:
    if call.raw:
        return Done(response.content)
    if not response.content:
        return Done({})
    try:
        return Done(response.json())
    except ValueError:
        kind = response.headers.get("content-type", "unknown content type").split(";")[0]
        return Fail(
            CMLError(
                f"CML answered {call.method} {call.full_path} with {kind}, not JSON; is CML_HOST "
                f"({call.host}) the workspace URL?"
            )
        )


def describe_transport_error(exc: httpx.TransportError, call: Call | None = None) -> str:
    """One line for a transport failure, the secret scrubbed out."""
    if isinstance(exc, httpx.TimeoutException):
        timeout = f" within {call.timeout:g}s" if call is not None else ""
        return f"no answer{timeout} ({type(exc).__name__})"
    text = str(exc)
    if call is not None and call.secret:
        text = text.replace(call.secret, "[redacted]")
    return " ".join((text or type(exc).__name__).split())


def _connect_deadline(exc: httpx.TransportError, reached: bool, policy: RetryPolicy) -> float | None:
    """How long to keep retrying a transport failure. A certificate failure never heals; a host
    this client has never reached (wrong URL, closed port, unknown name) gets a short grace, not
    the whole retry deadline; once CML has answered, a broken connection is retried fully."""
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return 0.0
    if not reached:
        return min(policy.deadline, FIRST_CONTACT_DEADLINE)
    return None


def _connection_hint(exc: httpx.TransportError) -> str:
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return "; set CML_CA_BUNDLE to the CA bundle that signed the workspace certificate"
    if isinstance(exc, httpx.ConnectError):
        return "; check CML_HOST and your network or proxy"
    return ""
