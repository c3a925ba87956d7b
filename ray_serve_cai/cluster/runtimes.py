"""Choosing a CML runtime when the config names none (ML Runtime projects require one)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ray_serve_cai.cml import Runtime
from ray_serve_cai.config import ClusterSpec
from ray_serve_cai.errors import OperationFailed

EDITOR_PREFERENCE = ("PBJ Workbench", "JupyterLab", "Workbench")


class RuntimeChoiceError(OperationFailed, RuntimeError):
    """No enabled runtime fits; the message says how to name one."""


def _is_gpu(runtime: Runtime) -> bool:
    text = f"{runtime.edition or ''} {runtime.image_identifier}".lower()
    return "gpu" in text or "cuda" in text


def choose_runtime(runtimes: Sequence[Runtime], *, gpu: bool, python: str | None = None) -> str:
    """The best enabled runtime: this Python version, GPU edition iff `gpu`, newest, PBJ editor first."""
    python = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [r for r in runtimes if r.is_enabled and _is_gpu(r) == gpu]
    if not candidates:
        kind = "GPU" if gpu else "standard (non-GPU)"
        raise RuntimeChoiceError(
            f"the workspace offers no enabled {kind} runtime; set runtime_identifier in "
            "ray_cluster_config.yaml or RUNTIME_IDENTIFIER (see `ray-cai check`)"
        )

    def rank(r: Runtime) -> tuple[int, int, str]:
        same_python = int(
            f"python {python}" in (r.kernel or "").lower() or f"python{python}" in r.image_identifier
        )
        editor = (
            EDITOR_PREFERENCE.index(r.editor) if r.editor in EDITOR_PREFERENCE else len(EDITOR_PREFERENCE)
        )
        return (same_python, -editor, r.full_version or "")

    return max(candidates, key=rank).image_identifier


def with_runtimes(spec: ClusterSpec, runtimes: Sequence[Runtime]) -> ClusterSpec:
    """The spec with a runtime chosen for the head and each group that names none (same Python for all)."""
    head_runtime = spec.runtime_of(None)
    groups = []
    for group in spec.worker_groups:
        runtime = spec.runtime_of(group.name)
        if runtime is None:
            runtime = choose_runtime(runtimes, gpu=group.gpus > 0)
        groups.append(group.model_copy(update={"runtime_identifier": runtime}))
    if head_runtime is None:
        head_runtime = choose_runtime(runtimes, gpu=spec.head.gpus > 0)
    head = spec.head.model_copy(update={"runtime_identifier": head_runtime})
    return spec.model_copy(update={"head": head, "worker_groups": groups})


def needs_runtime(spec: ClusterSpec) -> bool:
    return spec.runtime_of(None) is None or any(spec.runtime_of(g.name) is None for g in spec.worker_groups)
