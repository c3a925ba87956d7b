"""`ray-cai config` (the typer sub-app): exit 0 and a node summary when valid, exit 2 with one
line per problem on stderr (no traceback) when not."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ray_serve_cai.cli.config import app

ROOT = Path(__file__).resolve().parents[2]
BAD = Path(__file__).resolve().parents[1] / "support" / "bad_configs"
runner = CliRunner()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "RAY_NUM_WORKERS",
        "RAY_WORKER_GPUS",
        "RUNTIME_IDENTIFIER",
        "RAY_CLUSTER_NAME",
        "GITHUB_REPOSITORY",
        "CML_PROJECT_NAME",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with the shipped default files, as the working directory."""
    shutil.copy(ROOT / "ray_cluster_config.yaml", tmp_path / "ray_cluster_config.yaml")
    (tmp_path / "cai_integration").mkdir()
    shutil.copy(
        ROOT / "cai_integration" / "jobs_config.yaml", tmp_path / "cai_integration" / "jobs_config.yaml"
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_validate_defaults_ok(project: Path) -> None:
    result = runner.invoke(app, ["validate"])
    assert result.exit_code == 0, result.output
    assert "ray-default-head" in result.stdout and "ray-default-worker-1" in result.stdout
    assert "launch_ray_cluster" in result.stdout


def test_validate_json(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_NUM_WORKERS", "3")
    result = runner.invoke(app, ["validate", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["valid"] is True
    assert [n["name"] for n in data["nodes"]][-1] == "ray-default-worker-2"
    assert [j["key"] for j in data["deploy"]["jobs"]] == [
        "git_sync",
        "setup_environment",
        "launch_ray_cluster",
    ]


def test_validate_bad_config_exit_2(project: Path) -> None:
    result = runner.invoke(app, ["validate", "--config", str(BAD / "cluster_typo_num_worker.yaml")])
    assert result.exit_code == 2
    assert "ray_cluster.num_worker: unknown key; did you mean 'num_workers'?" in result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_validate_reports_both_files(project: Path) -> None:
    result = runner.invoke(
        app,
        [
            "validate",
            "-c",
            str(BAD / "cluster_port_duplicate.yaml"),
            "-j",
            str(BAD / "jobs_cycle.yaml"),
            "--json",
        ],
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert any("ports.dashboard" in line for line in lines)
    assert any("cycle" in line for line in lines)
    data = json.loads(result.stdout)
    assert data["valid"] is False
    assert {p["source"] for p in data["problems"]} == {
        str(BAD / "cluster_port_duplicate.yaml"),
        str(BAD / "jobs_cycle.yaml"),
    }


def test_validate_env_override_problem(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_WORKER_GPUS", "lots")
    result = runner.invoke(app, ["validate"])
    assert result.exit_code == 2
    assert "RAY_WORKER_GPUS: must be a whole number" in result.stderr


def test_validate_missing_file(project: Path) -> None:
    result = runner.invoke(app, ["validate", "--config", "missing.yaml"])
    assert result.exit_code == 2
    assert "missing.yaml: file not found" in result.stderr


def test_validate_without_jobs_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ray_cluster_config.yaml").write_text("ray_cluster:\n  num_workers: 1\n")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["validate"])
    assert result.exit_code == 0, result.output
    assert "ray-default-worker-0" in result.stdout


def test_schema() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert "ray_cluster" in schema["properties"]
    assert "num_workers" in result.stdout and "worker_groups" in result.stdout
    jobs = runner.invoke(app, ["schema", "--jobs"])
    assert (
        jobs.exit_code == 0 and "parent_job_key" in json.loads(jobs.stdout)["$defs"]["JobFile"]["properties"]
    )


def test_validate_as_a_process(project: Path) -> None:
    code = "from ray_serve_cai.cli.config import app; app()"
    bad = subprocess.run(
        [sys.executable, "-c", code, "validate", "-c", str(BAD / "cluster_negative_workers.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "ray_cluster.num_workers: must be 0 or more" in bad.stderr
    assert "Traceback" not in bad.stderr
    good = subprocess.run(
        [sys.executable, "-c", code, "validate"], capture_output=True, text=True, check=False
    )
    assert good.returncode == 0, good.stderr
