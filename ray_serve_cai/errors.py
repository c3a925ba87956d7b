"""The root of every error ray-serve-cai raises on purpose, and the drawing of the whole tree.

Two branches, as in httpx's `_exceptions.py`: `BadInput` (exit code 2: the caller asked for something
invalid; raised before any API call, nothing was changed) and `OperationFailed` (exit code 1: a
valid request that could not be carried out). The CLI maps the two roots, not a list of classes.
Single inheritance throughout, but for two roots that are also builtins because the standard
library's contract says so: `BadInput` is a `ValueError` (a value of the right type that is not
acceptable; pydantic and callers catch that) and `WaitTimeout` a `TimeoutError` (callers waiting
with a deadline catch that).
Each layer defines its own errors next to its code (module in brackets):

    RayCaiError
    ├── BadInput (+ ValueError)                    exit 2
    │   ├── ConfigError              [config.errors]
    │   │   └── ServeRejected        [access.serve]     Serve refused the config (HTTP 400)
    │   ├── CMLSettingsError         [cml]              connection settings missing or malformed
    │   ├── RefusedField (+ TypeError) [cml]            a field the spec does not let the call set
    │   ├── DeployInputError         [deploy.source]
    │   ├── ProjectNotGiven          [deploy.project]
    │   ├── JobInputError            [access.jobs]
    │   ├── SettingsError            [node.settings]    the node's environment is not a valid node
    │   └── ScheduleError            [workspace.schedules] a cron schedule or timezone that cannot be used
    └── OperationFailed                            exit 1
        ├── WaitTimeout (+ TimeoutError)  [errors]      a bounded wait ran out
        ├── CMLError                 [cml]
        │   ├── AmbiguousName                           an exact name matched several objects
        │   ├── CMLConnectionError
        │   │   └── CreateOutcomeUnknown                 a create whose answer was lost
        │   └── CMLAPIError                             an HTTP error answer
        │       ├── BadRequest (400)
        │       ├── Unauthorized (401)
        │       ├── Forbidden (403)
        │       ├── NotFound (404)
        │       ├── Conflict (409)
        │       ├── RateLimited (429)
        │       └── ServerError (5xx)
        ├── AccessError              [access.head]
        ├── DashboardError           [access.dashboard]
        ├── ServeAPIError            [access.serve]
        ├── NodeLogsError            [access.logs]
        ├── HistoryError             [access.records]   the history kept in the project
        │   └── RecordNotFound
        ├── JobsError                [access.jobs]
        │   ├── JobNotFound
        │   └── LogStreamUnavailable
        ├── ClusterError             [cluster.errors]
        │   ├── LockHeld                                another run holds the cluster's lock
        │   └── CatalogNeeded                           a pass lacks the runtime catalog it needs
        ├── RuntimeChoiceError       [cluster.runtimes]
        ├── RepoError                [deploy.fingerprint]
        ├── ProjectError             [deploy.project]
        ├── JobChainError            [deploy.jobs]
        ├── StepError                [deploy.steps]
        ├── NodeFailure              [node.launcher]
        ├── LeaseRefused             [node.head_guard]  another live head holds the cluster's head lease
        ├── AutoscalingSetupError    [node.autoscaling]
        ├── TokenError               [node.files]
        ├── RendezvousNotFound       [node.files]
        ├── WorkspaceError           [workspace.daemon]
        │   └── SessionError                            a session pod could not be opened
        ├── PodError                 [workspace.pods]   a pod or the bridge could not be made or changed
        └── StoreError               [workspace.store]

Outside the tree on purpose: the local workspace's server-side `WorkspaceAPIError` and
`ScriptError` (they become HTTP answers and job-run failures, never reach a user as exceptions) and
the node's `StopRequested` (a signal, not an error). `tests/unit/test_error_tree.py` keeps this
drawing and the code in step. Standard library only: every layer (the workspace and the node
included) may use this module.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class RayCaiError(Exception):
    """Base of every error ray-serve-cai raises on purpose; `exit_code` is what the CLI exits with."""

    exit_code: int = EXIT_FAILED


class BadInput(RayCaiError, ValueError):
    """Invalid input (config, flags, names): nothing was attempted. Exit code 2."""

    exit_code = EXIT_BAD_INPUT


class OperationFailed(RayCaiError):
    """A valid request that could not be carried out. Exit code 1."""

    exit_code = EXIT_FAILED


class WaitTimeout(OperationFailed, TimeoutError):
    """A bounded wait ran out; the message names what was waited for and the last thing seen."""
