"""What runs inside an application pod: head and worker launchers, rendezvous, token, app HTTP.

Others use: `client_env` (what a Ray client in the project needs), `ensure_token` / `read_token`,
`read_rendezvous` / `Rendezvous`, and the path helpers `cluster_state_dir`, `rendezvous_path`,
`token_path`, `node_logs_dir`. The launchers (`run_head`, `run_worker`, `main`) import Ray lazily,
so this package can be imported where Ray is not installed.
"""

from __future__ import annotations

from typing import Any

from ray_serve_cai.node.files import (
    Rendezvous,
    RendezvousNotFound,
    TokenError,
    client_env,
    cluster_state_dir,
    ensure_token,
    node_logs_dir,
    read_rendezvous,
    read_token,
    rendezvous_path,
    token_path,
)

__all__ = [
    "Rendezvous",
    "RendezvousNotFound",
    "TokenError",
    "client_env",
    "cluster_state_dir",
    "ensure_token",
    "main",
    "node_logs_dir",
    "read_rendezvous",
    "read_token",
    "rendezvous_path",
    "run_head",
    "run_worker",
    "token_path",
]


def run_head(*args: Any, **kwargs: Any) -> int:
    from ray_serve_cai.node.launcher import run_head as _run_head

    return _run_head(*args, **kwargs)


def run_worker(*args: Any, **kwargs: Any) -> int:
    from ray_serve_cai.node.launcher import run_worker as _run_worker

    return _run_worker(*args, **kwargs)


def main(argv: list[str] | None = None, **kwargs: Any) -> int:
    from ray_serve_cai.node.launcher import main as _main

    return _main(argv, **kwargs)
