"""ray-serve-cai: Ray clusters on Cloudera AI Workbench (CML) applications.

The public Python API, the same operations as the `ray-cai` commands::

    from ray_serve_cai import CMLClient, CMLSettings, RayCluster, load_cluster_spec

Names are imported lazily: the job scripts import this package on a runtime's bare Python, before
any dependency is installed, so importing `ray_serve_cai` itself must need nothing but the stdlib.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The one Ray minor version this release is tested with (the `ray` extra pins it).
RAY_MINOR = "2.60"

_EXPORTS = {
    "CMLClient": "ray_serve_cai.cml",
    "CMLSettings": "ray_serve_cai.cml",
    "CMLError": "ray_serve_cai.cml",
    "ClusterSpec": "ray_serve_cai.config",
    "ConfigError": "ray_serve_cai.config",
    "load_cluster_spec": "ray_serve_cai.config",
    "load_deploy_spec": "ray_serve_cai.config",
    "RayCluster": "ray_serve_cai.cluster",
    "ClusterError": "ray_serve_cai.cluster",
    "ClusterStatus": "ray_serve_cai.cluster",
    "connect_info": "ray_serve_cai.cluster",
    "write_cluster_info": "ray_serve_cai.cluster",
    "DeployOptions": "ray_serve_cai.deploy.orchestrator",
    "CAIClusterManager": "ray_serve_cai.cai_cluster",
    "RayCaiError": "ray_serve_cai.errors",
    "BadInput": "ray_serve_cai.errors",
    "OperationFailed": "ray_serve_cai.errors",
}

__all__ = ["RAY_MINOR", "__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ray_serve_cai' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
