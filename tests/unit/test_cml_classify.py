"""`classify(call, response | error)`: the verdict on one attempt of a CML API call, as a table.

Pure: real `httpx.Response` / transport error objects in, Done / Retry / Fail out; no server, no sleep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from ray_serve_cai.cml import (
    BadRequest,
    CMLConnectionError,
    CMLError,
    CreateOutcomeUnknown,
    NotFound,
    RateLimited,
    ServerError,
)
from ray_serve_cai.cml._retry import FIRST_CONTACT_DEADLINE, Call, Done, Fail, Retry, RetryPolicy, classify

SECRET = "sk-classify-secret"


class _Ceiling(random.Random):
    """Jitter that always takes the whole backoff ceiling, so delays are exact in the table."""

    def uniform(self, a: float, b: float) -> float:
        return b


def policy(deadline: float = 60.0) -> RetryPolicy:
    return RetryPolicy(deadline=deadline, base=0.5, cap=8.0, rng=_Ceiling())


def response(
    status: int, body: Any = None, headers: dict[str, str] | None = None, text: str = ""
) -> httpx.Response:
    request = httpx.Request("GET", "https://cml.example.invalid/api/v2/x")
    if body is not None:
        return httpx.Response(status, json=body, headers=headers, request=request)
    return httpx.Response(status, text=text, headers=headers, request=request)


GET = Call("GET", "/projects", host="https://cml.example.invalid", secret=SECRET)
PATCH = Call("PATCH", "/projects/p1", host="https://cml.example.invalid", secret=SECRET)
DELETE = Call("DELETE", "/projects/p1/applications/a1", host="https://cml.example.invalid", secret=SECRET)
STOP = Call("POST", "/projects/p1/applications/a1:stop", host="https://cml.example.invalid", secret=SECRET)
CREATE = Call(
    "POST", "/projects/p1/applications", creates=True, host="https://cml.example.invalid", secret=SECRET
)


@dataclass
class Row:
    id: str
    call: Call
    outcome: Any
    expect: type  # Done, Retry or Fail
    attempt: int = 1
    elapsed: float = 0.0
    reached: bool = True
    delay: float | None = None  # Retry: the exact delay
    error: type | None = None  # Fail: the error class
    body: Any = None  # Done: the body
    deadline: float = 60.0


ROWS = [
    Row("200 json is done", GET, response(200, {"projects": []}), Done, body={"projects": []}),
    Row("204 empty is done with {}", DELETE, response(204), Done, body={}),
    Row("200 html is a failure naming CML_HOST", GET, response(200, text="<html>"), Fail, error=CMLError),
    Row("400 fails at once", GET, response(400, {"message": "bad"}), Fail, error=BadRequest),
    Row("404 fails at once", GET, response(404, {"message": "no"}), Fail, error=NotFound),
    Row("DELETE 404 after a lost answer is done", DELETE, response(404), Done, attempt=2, body={}),
    Row("DELETE 404 on the first try fails", DELETE, response(404), Fail, error=NotFound),
    Row("GET 503 retries with backoff", GET, response(503), Retry, attempt=3, delay=2.0),
    Row("GET 500 retries", GET, response(500), Retry, delay=0.5),
    Row("PATCH 502 retries", PATCH, response(502), Retry, delay=0.5),
    Row(":stop 500 retries (safe to repeat)", STOP, response(500), Retry, delay=0.5),
    Row("Retry-After wins over backoff", GET, response(429, headers={"retry-after": "3"}), Retry, delay=3.0),
    Row("create 429 retries (not acted on)", CREATE, response(429), Retry, delay=0.5),
    Row("create 503 may have happened", CREATE, response(503), Fail, error=CreateOutcomeUnknown),
    Row("create 500 may have happened", CREATE, response(500), Fail, error=CreateOutcomeUnknown),
    Row("create 400 fails", CREATE, response(400, {"message": "x"}), Fail, error=BadRequest),
    Row("429 past the deadline gives up", GET, response(429), Fail, elapsed=59.9, error=RateLimited),
    Row("503 past the deadline gives up", GET, response(503), Fail, elapsed=59.9, error=ServerError),
    Row("connect refused retries", GET, httpx.ConnectError("refused"), Retry, delay=0.5),
    Row(
        "create connect refused retries (never sent)", CREATE, httpx.ConnectError("refused"), Retry, delay=0.5
    ),
    Row(
        "create read error may have happened",
        CREATE,
        httpx.ReadError("reset"),
        Fail,
        error=CreateOutcomeUnknown,
    ),
    Row("GET read error retries", GET, httpx.ReadError("reset"), Retry, delay=0.5),
    Row(
        "never reached: given up after the first-contact deadline",
        GET,
        httpx.ConnectError("refused"),
        Fail,
        elapsed=FIRST_CONTACT_DEADLINE - 0.1,
        reached=False,
        error=CMLConnectionError,
    ),
    Row(
        "reached before: the same failure still retries",
        GET,
        httpx.ConnectError("refused"),
        Retry,
        elapsed=FIRST_CONTACT_DEADLINE - 0.1,
        reached=True,
        delay=0.5,
    ),
    Row(
        "certificate failure is never retried",
        GET,
        httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
        Fail,
        error=CMLConnectionError,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_classify(row: Row) -> None:
    verdict = classify(
        row.call,
        row.outcome,
        attempt=row.attempt,
        elapsed=row.elapsed,
        reached=row.reached,
        policy=policy(row.deadline),
    )
    assert isinstance(verdict, row.expect), verdict
    if isinstance(verdict, Retry):
        assert verdict.delay == pytest.approx(row.delay)
    if isinstance(verdict, Done):
        assert verdict.body == row.body
    if isinstance(verdict, Fail):
        assert row.error is not None and type(verdict.error) is row.error, verdict.error
        assert SECRET not in str(verdict.error)
        assert len(str(verdict.error).splitlines()) == 1


def test_failure_messages_say_what_to_do() -> None:
    html = classify(GET, response(200, text="<html>"), attempt=1, elapsed=0, reached=True, policy=policy())
    assert isinstance(html, Fail) and "is CML_HOST" in str(html.error)
    lost = classify(CREATE, httpx.ReadError("reset"), attempt=1, elapsed=0, reached=True, policy=policy())
    assert isinstance(lost, Fail) and "list before creating it again" in str(lost.error)
    cert = httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED]")
    tls = classify(GET, cert, attempt=1, elapsed=0, reached=True, policy=policy())
    assert isinstance(tls, Fail) and "CML_CA_BUNDLE" in str(tls.error)
    gave_up = classify(GET, response(503), attempt=4, elapsed=59.9, reached=True, policy=policy())
    assert isinstance(gave_up, Fail) and "gave up after 4 attempt(s)" in str(gave_up.error)


def test_a_secret_in_a_transport_error_is_scrubbed() -> None:
    leaky = httpx.ReadError(f"peer said {SECRET}")
    verdict = classify(CREATE, leaky, attempt=1, elapsed=0, reached=True, policy=policy())
    assert (
        isinstance(verdict, Fail) and SECRET not in str(verdict.error) and "[redacted]" in str(verdict.error)
    )
