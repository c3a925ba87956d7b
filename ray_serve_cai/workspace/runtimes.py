"""The ML Runtimes the workspace offers (`GET /api/v2/runtimes`).

Every runtime runs `*.py` scripts with the workspace's own Python; the list exists so clients must pick
a valid `runtime_identifier` as on CML. The default list names the workspace's Python version; a
`runtimes.json` (a JSON list of runtime objects) in the workspace home replaces it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RUNTIME_REPOSITORY = "docker.repository.cloudera.com/cloudera/cdsw"
RUNTIME_VERSION = "2025.09.1-b5"


def default_runtimes() -> list[dict[str, Any]]:
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    runtimes = []
    for editor, editor_slug in (("JupyterLab", "pbj-jupyterlab"), ("PBJ Workbench", "pbj-workbench")):
        for edition, edition_slug in (("Standard", "standard"), ("Nvidia GPU", "cuda")):
            runtimes.append(
                {
                    "image_identifier": (
                        f"{RUNTIME_REPOSITORY}/ml-runtime-{editor_slug}-python{python}-{edition_slug}"
                        f":{RUNTIME_VERSION}"
                    ),
                    "editor": editor,
                    "kernel": f"Python {python}",
                    "edition": edition,
                    "description": f"{editor} Python {python} {edition} (local: {sys.executable})",
                    "full_version": RUNTIME_VERSION,
                    "status": "ENABLED",
                }
            )
    return runtimes


# The `Runtime` fields of the spec; a runtimes.json may hold more, the API shows these.
RUNTIME_FIELDS = ("image_identifier", "editor", "kernel", "edition", "description", "full_version", "status",
                  "register_user_id")  # fmt: skip


def as_api_runtime(runtime: dict[str, Any]) -> dict[str, Any]:
    return {key: runtime[key] for key in RUNTIME_FIELDS if key in runtime}


def load_runtimes(home: Path) -> list[dict[str, Any]]:
    custom = home / "runtimes.json"
    if custom.is_file():
        loaded = json.loads(custom.read_text())
        if not isinstance(loaded, list) or not all(
            isinstance(r, dict) and isinstance(r.get("image_identifier"), str) for r in loaded
        ):
            raise ValueError(f"{custom} must be a JSON list of objects with an image_identifier")
        return loaded
    return default_runtimes()
