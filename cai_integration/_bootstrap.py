"""Shared start of every script CML runs by path: use the project's venv and the deployed code.

Standard library only: it runs on the runtime's own Python before anything is installed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def use_project_code(*, venv: bool = True) -> None:
    """Re-exec with `.venv/bin/python` when it exists (setup_environment built it), then make the
    deployed commit's `ray_serve_cai` importable ahead of any installed copy."""
    venv_dir = PROJECT_ROOT / ".venv"
    venv_python = venv_dir / "bin" / "python"
    if venv and venv_python.exists() and Path(sys.prefix).resolve() != venv_dir.resolve():
        os.execv(str(venv_python), [str(venv_python), *sys.argv])
    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
