"""Write a scale change back into `ray_cluster_config.yaml`, keeping its comments and layout.

The file stays the one source of truth for the cluster's size: after `ray-cai scale N`, `status`
and the next `up` want N workers too.
"""

from __future__ import annotations

from io import StringIO
from pathlib import Path

from ruamel.yaml import YAML

from ray_serve_cai.config.errors import ConfigError, Problem


def save_replicas(path: str | Path, replicas: int, group: str | None = None) -> str:
    """Set `num_workers` (flat config) or the group's `replicas`; returns the key path changed."""
    target = Path(path)
    yaml = YAML()  # round-trip: comments and order survive
    yaml.preserve_quotes = True
    data = yaml.load(target.read_text())
    cluster = data.get("ray_cluster") if isinstance(data, dict) else None
    if cluster is None:
        raise ConfigError([Problem("ray_cluster", "missing: cannot save the new size")], source=str(target))
    groups = cluster.get("worker_groups")
    if groups:
        matches = [g for g in groups if group is None or g.get("name") == group]
        if len(matches) != 1:
            raise ConfigError(
                [Problem("worker_groups", f"no single group {group!r} to save the new size in")],
                source=str(target),
            )
        matches[0]["replicas"] = replicas
        where = f"ray_cluster.worker_groups[{groups.index(matches[0])}].replicas"
    else:
        cluster["num_workers"] = replicas
        where = "ray_cluster.num_workers"
    out = StringIO()
    yaml.dump(data, out)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(out.getvalue())
    tmp.replace(target)
    return where
