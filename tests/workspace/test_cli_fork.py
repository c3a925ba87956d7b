"""The tests' forked `ray-cai` (support.cli_fork) behaves as the executed one: same output, same exit
code, the caller's working directory and environment, and a deadline that kills the command."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import psutil
import pytest
from support import cli_fork
from support.fakes import REPO_ROOT, cli_env, wait_until

from ray_serve_cai.workspace.testing import WorkspaceHandle


def test_forked_commands_answer_as_executed_ones(workspace: WorkspaceHandle, tmp_path: Path) -> None:
    env = cli_env(workspace)
    assert cli_fork.zygote_for(env) is not None, "the suite's commands would not be forked"
    (tmp_path / "bad.yaml").write_text("ray_cluster:\n  name: Not_A_Name\n  num_workers: -1\n")
    cases = [
        (["--help"], REPO_ROOT),  # exit 0, the usage line names the program as `python -m` does
        (["config", "validate", "-c", "bad.yaml"], tmp_path),  # exit 2: the file, relative to the cwd
        (["status", "--project", "no-such-project", "--json"], REPO_ROOT),  # exit 1: an API call
        (["job", "rerun"], tmp_path),  # exit 2: typer's usage error on stderr
    ]
    codes = set()
    for args, cwd in cases:
        forked, reference = (
            cli_fork.run(args, cwd=cwd, env=env, timeout=120),
            cli_fork.execute(args, cwd=cwd, env=env),
        )
        codes.add(reference.returncode)
        assert (forked.returncode, forked.stdout, forked.stderr) == (
            reference.returncode,
            reference.stdout,
            reference.stderr,
        ), args
    assert codes == {0, 1, 2}


def test_a_forked_command_is_killed_at_its_deadline(tmp_path: Path) -> None:
    """The deadline of `subprocess.run`: TimeoutExpired, and no process of the command is left."""
    env = {**os.environ, "RAY_CAI_WORKSPACE_HOME": str(tmp_path / "home")}
    zygote = cli_fork.zygote_for(env)
    assert zygote is not None
    # A command that waits: `check` of a workspace that accepts the connection and never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        env |= {"CML_HOST": f"http://127.0.0.1:{silent.getsockname()[1]}", "CML_API_KEY": "k" * 20}
        with pytest.raises(subprocess.TimeoutExpired):
            zygote.run(["check", "--json"], cwd=tmp_path, env=env, timeout=3)
    wait_until(
        lambda: not psutil.Process(zygote.process.pid).children(recursive=True),
        timeout=10,
        what="the killed command and its supervisor to be gone",
    )
