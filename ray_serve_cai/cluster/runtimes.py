"""Choosing a CML runtime when the config names none (ML Runtime projects require one)."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping, Sequence

from ray_serve_cai.cml import Runtime
from ray_serve_cai.config import ClusterSpec
from ray_serve_cai.errors import OperationFailed

HEAD = "head"  # the key of the head's runtime (group names never equal it)

EDITOR_PREFERENCE = ("PBJ Workbench", "JupyterLab", "Workbench")


class RuntimeChoiceError(OperationFailed):
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


def python_of(runtime_identifier: str) -> str | None:
    """The Python version a runtime image names (`...-python3.11-...` → `3.11`), if it names one."""
    match = re.search(r"python(\d+\.\d+)", runtime_identifier)
    return match.group(1) if match else None


def resolve_runtimes(
    spec: ClusterSpec, known: Mapping[str, str], fetch: Callable[[], Sequence[Runtime]]
) -> tuple[ClusterSpec, dict[str, str]]:
    """The spec with a runtime for the head and every group, and those runtimes by part.

    A runtime the config names wins. Otherwise the one already `known` for that part (recorded with
    the cluster, or run by its applications) is kept, so the choice is made once, at the first
    creation, and not again by a caller with another Python or after a newer runtime appears. Only
    a part with neither is chosen (`fetch` lists the runtimes then, at most once), with the head's
    Python version when the head has a runtime already."""
    listed: list[Runtime] = []

    def runtimes() -> Sequence[Runtime]:
        if not listed:
            listed.extend(fetch())
        return listed

    chosen: dict[str, str] = {}
    head_runtime = spec.runtime_of(None) or known.get(HEAD)
    if head_runtime is None:
        head_runtime = choose_runtime(runtimes(), gpu=spec.head.gpus > 0)
    chosen[HEAD] = head_runtime
    python = python_of(head_runtime)
    groups = []
    for group in spec.worker_groups:
        runtime = spec.runtime_of(group.name) or known.get(group.name)
        if runtime is None:
            runtime = choose_runtime(runtimes(), gpu=group.gpus > 0, python=python)
        chosen[group.name] = runtime
        groups.append(group.model_copy(update={"runtime_identifier": runtime}))
    head = spec.head.model_copy(update={"runtime_identifier": head_runtime})
    return spec.model_copy(update={"head": head, "worker_groups": groups}), chosen
