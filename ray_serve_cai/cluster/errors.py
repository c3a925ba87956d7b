"""Errors of the cluster layer: each message says what failed and where to look."""

from ray_serve_cai.errors import OperationFailed


class ClusterError(OperationFailed):
    """The cluster could not be brought to the desired state; the message says what and where."""


class LockHeld(ClusterError):
    """Another run holds the cluster's lock; the message says who and until when."""
