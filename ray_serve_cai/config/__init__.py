"""The declarative spec: cluster and deployment config, env overrides, validation, spec hashes.

Imports nothing else of the package.
"""

from ray_serve_cai.config._common import spec_digest
from ray_serve_cai.config.cluster import (
    DEFAULT_CLUSTER_FILE,
    ClusterSpec,
    HeadSpec,
    NodeSpec,
    RayPorts,
    WorkerGroupSpec,
    cluster_json_schema,
    desired_nodes,
    head_app_name,
    head_spec_hash,
    load_cluster_spec,
    parse_cluster_spec,
    validate_cluster_spec,
    worker_app_name,
    worker_spec_hash,
)
from ray_serve_cai.config.deploy import (
    DEFAULT_JOBS_FILE,
    DeploySpec,
    JobSpec,
    ProjectSpec,
    jobs_json_schema,
    load_deploy_spec,
    parse_deploy_spec,
)
from ray_serve_cai.config.errors import ConfigError, Problem

__all__ = [
    "DEFAULT_CLUSTER_FILE",
    "DEFAULT_JOBS_FILE",
    "ClusterSpec",
    "ConfigError",
    "DeploySpec",
    "HeadSpec",
    "JobSpec",
    "NodeSpec",
    "Problem",
    "ProjectSpec",
    "RayPorts",
    "WorkerGroupSpec",
    "cluster_json_schema",
    "desired_nodes",
    "head_app_name",
    "head_spec_hash",
    "jobs_json_schema",
    "load_cluster_spec",
    "load_deploy_spec",
    "parse_cluster_spec",
    "parse_deploy_spec",
    "spec_digest",
    "validate_cluster_spec",
    "worker_app_name",
    "worker_spec_hash",
]
