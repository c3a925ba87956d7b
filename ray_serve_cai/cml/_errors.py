"""The one exception hierarchy of the CML client.

Every message is a single actionable line. None of them ever contains the API key or a request header:
messages are built from the method, the path, the status and the server's own ``message``, and the
client scrubs the key out of server text before it gets here.
"""

from __future__ import annotations

from typing import Any

import httpx

from ray_serve_cai.errors import BadInput, OperationFailed

__all__ = [
    "AmbiguousName",
    "BadRequest",
    "CMLAPIError",
    "CMLConnectionError",
    "CMLError",
    "CMLSettingsError",
    "Conflict",
    "CreateOutcomeUnknown",
    "Forbidden",
    "NotFound",
    "RateLimited",
    "RefusedField",
    "ServerError",
    "Unauthorized",
    "error_from_response",
    "parse_error_body",
    "request_id_of",
]


class CMLError(OperationFailed):
    """Base class of every error raised by :mod:`ray_serve_cai.cml` (a failed operation, exit 1).

    ``maybe_applied`` is True when the failed call created something and the server may have done it
    anyway (the response was lost or a gateway failed after forwarding): list again before re-creating.
    """

    maybe_applied: bool = False


class CMLSettingsError(BadInput):
    """The connection settings are missing or malformed (nothing was sent): bad input, exit 2."""


class RefusedField(BadInput, TypeError):
    """A field CML's spec does not let this call set (CML would silently ignore it): bad input, exit 2,
    refused before anything is sent."""


class AmbiguousName(CMLError):
    """An exact-name lookup matched more than one object; use the id instead."""


class CMLConnectionError(CMLError):
    """CML could not be reached: refused, reset, DNS, TLS or a timeout (after retries, where allowed)."""

    def __init__(self, message: str, *, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class CreateOutcomeUnknown(CMLConnectionError):
    """A create request reached CML but its answer was lost; the object may exist. Never retried.

    Raised when the connection broke after the request was sent (``status_code`` None) or a gateway
    answered 5xx (``status_code`` set) — in both cases CML may have created the object. List, then
    create again only if it is missing.
    """

    def __init__(
        self, message: str, *, status_code: int | None = None, request_id: str | None = None
    ) -> None:
        super().__init__(message, maybe_applied=True)
        self.status_code = status_code
        self.request_id = request_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class CMLAPIError(CMLError):
    """CML answered with an HTTP error status."""

    summary = "CML answered with an error"
    hint = ""

    def __init__(
        self,
        status_code: int,
        message: str,
        request_id: str | None = None,
        *,
        method: str = "",
        path: str = "",
        note: str = "",
    ) -> None:
        self.status_code = status_code
        self.message = message
        self.request_id = request_id
        self.method = method
        self.path = path
        super().__init__(self._line(note))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))

    def _line(self, note: str) -> str:
        where = f" on {self.method} {self.path}" if self.method else ""
        text = f"{self.summary} ({self.status_code}){where}"
        if self.message:
            text += f": {self.message}"
        if self.hint:
            text += f"; {self.hint}"
        if note:
            text += f"; {note}"
        if self.request_id:
            text += f" [request id {self.request_id}]"
        return " ".join(text.split())  # one line, whatever the server sent


class BadRequest(CMLAPIError):
    """400: CML rejected the request as invalid (field validation, precondition)."""

    summary = "CML rejected the request as invalid"


class Unauthorized(CMLAPIError):
    """401: the API key is missing, wrong or expired."""

    summary = "CML rejected the API key"
    hint = "check CML_API_KEY (an API v2 key from User Settings > API Keys in the workspace)"


class Forbidden(CMLAPIError):
    """403: the key's user may not do this."""

    summary = "CML refused the request"
    hint = "the API key's user lacks permission for this project or action"


class NotFound(CMLAPIError):
    """404: no such project, job, run or application."""

    summary = "Not found in CML"


class Conflict(CMLAPIError):
    """409: the object already exists or is in a state that forbids this action."""

    summary = "CML reported a conflict"


class RateLimited(CMLAPIError):
    """429: too many requests, still limited when the retry deadline ran out."""

    summary = "CML rate limit hit"


class ServerError(CMLAPIError):
    """5xx: CML (or a gateway in front of it) failed."""

    summary = "CML server error"


def _rebuild(cls: type[CMLError], args: tuple[Any, ...], state: dict[str, Any]) -> CMLError:
    """Unpickle an error without re-running its constructor (errors cross process boundaries)."""
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


_BY_STATUS: dict[int, type[CMLAPIError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    429: RateLimited,
}


def parse_error_body(response: httpx.Response) -> str:
    """The server's error text: body ``message``, then ``error``, then the reason phrase."""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("message", "error"):
            value = body.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
    text = response.text.strip() if body is None else ""
    if text and len(text) <= 200 and "<" not in text:  # short plain text, not an HTML error page
        return text
    return response.reason_phrase or ""


def request_id_of(response: httpx.Response) -> str | None:
    """The request id CML attaches (``x-cdp-request-id``, then ``x-request-id``)."""
    return response.headers.get("x-cdp-request-id") or response.headers.get("x-request-id") or None


def error_from_response(
    response: httpx.Response,
    *,
    method: str = "",
    path: str = "",
    secret: str | None = None,
    note: str = "",
) -> CMLAPIError:
    """Map an error response to its exception class; ``secret`` is scrubbed out of the server text."""
    status = response.status_code
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else CMLAPIError)
    message = parse_error_body(response)
    if secret:
        message = message.replace(secret, "[redacted]")
    return cls(
        status,
        message,
        request_id_of(response),
        method=method,
        path=path,
        note=note,
    )
