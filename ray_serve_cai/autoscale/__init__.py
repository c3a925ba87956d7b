"""The CML node provider that Ray's own autoscaler loads inside the head application.

`provider.type: external`, `module: ray_serve_cai.autoscale.CMLNodeProvider` (see
`ray_serve_cai.config.autoscaling` for the config the head writes). Uses config, cml and Ray.
"""

from ray_serve_cai.autoscale.provider import CMLNodeProvider, workload_settings

__all__ = ["CMLNodeProvider", "workload_settings"]
