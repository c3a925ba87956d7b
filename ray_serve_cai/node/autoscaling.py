"""What autoscaling adds to a node's `ray start`.

* Every node of a cluster with autoscaled groups advertises `NODE_ID_AS_RESOURCE` (from
  `RAY_CAI_NODE_ID_RESOURCE`): Ray's autoscaler, with `use_node_id_as_ip`, matches the provider's
  nodes (CML applications) to Ray nodes by it, as Ray on Spark does.
* The head (`RAY_CAI_AUTOSCALER=1`) writes Ray's autoscaling config from the applied spec in its
  environment (`RAY_CAI_APPLIED_SPEC`) to `.ray-cai/<cluster>/autoscaling.json` and passes
  `--autoscaling-config`, so `ray start --head` runs Ray's own monitor with our node provider. The
  monitor inherits the application's environment — that is how the provider gets the workload's
  API key (`CDSW_APIV2_KEY`); the key is never in the file or on a command line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ray_serve_cai
from ray_serve_cai.config import APPLIED_SPEC_VARIABLE, spec_from_applied
from ray_serve_cai.config.autoscaling import (
    autoscaling_config_path,
    decision_path,
    ray_autoscaling_config,
    write_autoscaling_config,
)
from ray_serve_cai.errors import OperationFailed
from ray_serve_cai.node.settings import NodeSettings


class AutoscalingSetupError(OperationFailed):
    """The head should run the autoscaler but its environment does not say how."""


def autoscaling_start(
    settings: NodeSettings, environ: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """Extra `ray start` arguments and environment for autoscaling (both empty without it)."""
    env = dict(os.environ if environ is None else environ)
    args: list[str] = []
    extra_env: dict[str, str] = {}
    if settings.node_id_resource is not None:
        args.append("--resources=" + json.dumps({"NODE_ID_AS_RESOURCE": settings.node_id_resource}))
    if settings.role == "head" and settings.autoscaler:
        spec = spec_from_applied(env.get(APPLIED_SPEC_VARIABLE))
        if spec is None:
            raise AutoscalingSetupError(
                f"RAY_CAI_AUTOSCALER=1 but {APPLIED_SPEC_VARIABLE} is missing or invalid in the "
                "head's environment; run `ray-cai up` again"
            )
        path = autoscaling_config_path(settings.project_dir, settings.cluster)
        write_autoscaling_config(path, ray_autoscaling_config(spec, project_dir=settings.project_dir))
        args.append(f"--autoscaling-config={path}")
        # Ray's monitor imports the provider: make this package importable in it.
        code_root = str(Path(ray_serve_cai.__file__).resolve().parents[1])
        python_path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        extra_env["PYTHONPATH"] = os.pathsep.join([code_root, *[p for p in python_path if p != code_root]])
    return args, extra_env


def autoscaler_state(settings: NodeSettings) -> dict[str, Any] | None:
    """The provider's last decision, for the head's status endpoint (None without autoscaling)."""
    if settings.role != "head" or not settings.autoscaler:
        return None
    try:
        data = json.loads(decision_path(settings.project_dir, settings.cluster).read_text())
    except (OSError, ValueError):
        return {"decision": "none yet"}
    return data if isinstance(data, dict) else None
