"""The root of every error ray-serve-cai raises on purpose, in two branches (like httpx's tree).

- `BadInput` (exit code 2): the caller asked for something invalid — a config field, a flag, a
  name. Raised before any API call; nothing was changed.
- `OperationFailed` (exit code 1): the request was valid but could not be carried out — the API
  refused, a wait ran out, a node failed.

Each layer derives its own errors from one of the two, so the CLI maps two roots, not a list of
classes. Standard library only: every layer (the local workspace and the node included) may use it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class RayCaiError(Exception):
    """Base of every error ray-serve-cai raises on purpose; `exit_code` is what the CLI exits with."""

    exit_code: int = EXIT_FAILED


class BadInput(RayCaiError):
    """Invalid input (config, flags, names): nothing was attempted. Exit code 2."""

    exit_code = EXIT_BAD_INPUT


class OperationFailed(RayCaiError):
    """A valid request that could not be carried out. Exit code 1."""

    exit_code = EXIT_FAILED


class WaitTimeout(OperationFailed, TimeoutError):
    """A bounded wait ran out; the message names what was waited for and the last thing seen."""
