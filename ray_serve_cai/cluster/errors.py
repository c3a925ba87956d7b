"""Errors of the cluster layer: each message says what failed and where to look."""

from ray_serve_cai.errors import OperationFailed


class ClusterError(OperationFailed):
    """The cluster could not be brought to the desired state; the message says what and where."""


class LockHeld(ClusterError):
    """Another run holds the cluster's lock; the message says who and until when."""


class CatalogNeeded(ClusterError):
    """A part of the spec has no runtime yet and the observation holds no runtime catalog (a pass
    observes with one whenever it needs it: seen outside the cluster layer, it is a bug)."""
