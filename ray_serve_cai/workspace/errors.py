"""Errors of the workspace API, shaped like CML's grpc-gateway errors.

CML answers a failed call with the spec's `runtimeError`: `{"error": str, "code": <grpc code>,
"message": str, "details": []}` (grpc-gateway repeats the message in `error`); the HTTP status follows
from the gRPC code. Messages never contain secrets.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class GrpcCode(IntEnum):
    """The gRPC status codes the workspace uses."""

    INVALID_ARGUMENT = 3
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    FAILED_PRECONDITION = 9
    ABORTED = 10
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


HTTP_STATUS_OF_CODE: dict[int, int] = {
    GrpcCode.INVALID_ARGUMENT: 400,
    GrpcCode.NOT_FOUND: 404,
    GrpcCode.ALREADY_EXISTS: 409,
    GrpcCode.FAILED_PRECONDITION: 400,
    GrpcCode.ABORTED: 409,
    GrpcCode.UNIMPLEMENTED: 501,
    GrpcCode.INTERNAL: 500,
    GrpcCode.UNAVAILABLE: 503,
    GrpcCode.UNAUTHENTICATED: 401,
}

GRPC_CODE_OF_HTTP_STATUS: dict[int, int] = {
    400: GrpcCode.INVALID_ARGUMENT,
    401: GrpcCode.UNAUTHENTICATED,
    403: 7,
    404: GrpcCode.NOT_FOUND,
    405: GrpcCode.UNIMPLEMENTED,
    409: GrpcCode.ABORTED,
    429: 8,
    500: GrpcCode.INTERNAL,
    501: GrpcCode.UNIMPLEMENTED,
    502: GrpcCode.UNAVAILABLE,
    503: GrpcCode.UNAVAILABLE,
    504: 4,
}


class WorkspaceAPIError(Exception):
    """A request the API refuses; rendered as a CML error body."""

    def __init__(self, code: int, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message
        self.http_status = http_status if http_status is not None else HTTP_STATUS_OF_CODE.get(code, 500)

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message)


def error_body(code: int, message: str) -> dict[str, Any]:
    """The JSON body of a CML error response."""
    return {"error": message, "code": int(code), "message": message, "details": []}


def invalid_argument(message: str) -> WorkspaceAPIError:
    return WorkspaceAPIError(GrpcCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> WorkspaceAPIError:
    return WorkspaceAPIError(GrpcCode.NOT_FOUND, message)


def already_exists(message: str) -> WorkspaceAPIError:
    return WorkspaceAPIError(GrpcCode.ALREADY_EXISTS, message)


def failed_precondition(message: str, http_status: int = 400) -> WorkspaceAPIError:
    return WorkspaceAPIError(GrpcCode.FAILED_PRECONDITION, message, http_status)
