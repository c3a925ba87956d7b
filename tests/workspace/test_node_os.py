"""Node code that touches the operating system: a launcher script run as CML runs it, and port choice
(real sockets, real lock files). No Ray, no workspace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ray_serve_cai.node.ports import pick_free_ports, reserve_worker_port_block

REPO = Path(__file__).resolve().parents[2]


def test_bad_environment_exits_2_with_one_clear_line(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_CAI_", "CDSW_"))}
    result = subprocess.run(
        [sys.executable, str(REPO / "cai_integration" / "ray_worker.py")],
        cwd=tmp_path,
        env=env | {"RAY_CAI_CLUSTER": "demo"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "RAY_CAI_NODE_NAME" in lines[0] and "CDSW_IP_ADDRESS" in lines[0]


def test_port_choice_is_distinct_and_worker_blocks_are_exclusive(tmp_path: Path) -> None:
    ports = pick_free_ports(12)
    assert len(set(ports)) == 12
    first = reserve_worker_port_block(tmp_path)
    second = reserve_worker_port_block(tmp_path)
    assert first is not None and second is not None
    assert first.last < second.first or second.last < first.first
    first.release()
    again = reserve_worker_port_block(tmp_path)
    assert again is not None and again.first == first.first
    again.release()
    second.release()
