"""Project-directory files shared by the nodes of a cluster: token, rendezvous, collected logs.

Layout under the project directory (`/home/cdsw` on CML):
`.ray-cai/<cluster>/auth_token` (0600, created once), `.ray-cai/<cluster>/head.json` (written
atomically by the head), `.ray-cai/<cluster>/logs/<node-name>/` (Ray logs, kept as they grow by
`node.history`).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ray_serve_cai.atomic import write_atomically
from ray_serve_cai.errors import OperationFailed

STATE_DIR_NAME = ".ray-cai"
TOKEN_FILE_NAME = "auth_token"
RENDEZVOUS_FILE_NAME = "head.json"
LOGS_DIR_NAME = "logs"


class TokenError(OperationFailed):
    """The cluster token file is missing, empty or unreadable."""


class RendezvousNotFound(OperationFailed):
    """No head has published its address for this cluster (yet)."""


def cluster_state_dir(project_dir: Path | str, cluster: str) -> Path:
    """`<project>/.ray-cai/<cluster>`: where the nodes of one cluster meet."""
    return Path(project_dir) / STATE_DIR_NAME / cluster


def token_path(project_dir: Path | str, cluster: str) -> Path:
    return cluster_state_dir(project_dir, cluster) / TOKEN_FILE_NAME


def rendezvous_path(project_dir: Path | str, cluster: str) -> Path:
    return cluster_state_dir(project_dir, cluster) / RENDEZVOUS_FILE_NAME


def node_logs_dir(project_dir: Path | str, cluster: str, node_name: str) -> Path:
    """Where a node keeps its Ray logs (`node.history`): `.ray-cai/<cluster>/logs/<node-name>/`."""
    return cluster_state_dir(project_dir, cluster) / LOGS_DIR_NAME / node_name


def ensure_token(project_dir: Path | str, cluster: str, wait_seconds: float = 5.0) -> Path:
    """Create the cluster token once (O_EXCL, mode 0600) or reuse the existing one; return its path.

    A process that loses the creation race waits until the winner has written the token, so the
    returned file is never empty.
    """
    path = token_path(project_dir, cluster)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        deadline = time.monotonic() + wait_seconds
        while not _has_content(path):
            if time.monotonic() > deadline:
                raise TokenError(f"token file {path} exists but stays empty") from None
            time.sleep(0.05)
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return path
    try:
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, secrets.token_hex(32).encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return path


def read_token(project_dir: Path | str, cluster: str) -> str:
    """The cluster token (for HTTP headers only; processes get the file path, never the value)."""
    path = token_path(project_dir, cluster)
    try:
        token = path.read_text().strip()
    except OSError as error:
        raise TokenError(f"cannot read the token file {path}: {error.strerror}") from None
    if not token:
        raise TokenError(f"token file {path} is empty")
    return token


def _has_content(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def ray_auth_env(auth: str, token_file: Path | None) -> dict[str, str]:
    """Environment that makes a Ray process (node, CLI or client) use the cluster's auth mode."""
    if auth == "token":
        if token_file is None:
            raise TokenError("token auth needs a token file")
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    return {"RAY_AUTH_MODE": "disabled"}


@dataclass(frozen=True)
class Rendezvous:
    """What the head publishes in `head.json` so workers and clients can find it. No secrets."""

    ip: str
    gcs_port: int
    client_port: int
    dashboard_port: int
    ray_version: str
    python_version: str
    head_id: str
    started_at: str
    auth: str = "token"
    node_name: str = ""
    epoch: int = 0  # the head lease's epoch (head fault tolerance); workers follow only the newest
    # Head fault tolerance: the workers' reconnect window, and where the GCS keeps its state.
    fault_tolerant: bool = False

    @property
    def gcs_address(self) -> str:
        return f"{self.ip}:{self.gcs_port}"

    @property
    def client_address(self) -> str:
        return f"ray://{self.ip}:{self.client_port}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> Rendezvous:
        return cls(
            ip=str(data["ip"]),
            gcs_port=int(data["gcs_port"]),
            client_port=int(data["client_port"]),
            dashboard_port=int(data["dashboard_port"]),
            ray_version=str(data["ray_version"]),
            python_version=str(data["python_version"]),
            head_id=str(data["head_id"]),
            started_at=str(data["started_at"]),
            auth=str(data.get("auth", "token")),
            node_name=str(data.get("node_name", "")),
            epoch=int(data.get("epoch", 0)),
            fault_tolerant=bool(data.get("fault_tolerant", False)),
        )


def write_rendezvous(project_dir: Path | str, cluster: str, rendezvous: Rendezvous) -> Path:
    """Publish the head's address atomically (temp file in the same directory, then os.replace)."""
    path = rendezvous_path(project_dir, cluster)
    write_atomically(path, rendezvous.to_json())
    return path


def read_rendezvous(project_dir: Path | str, cluster: str) -> Rendezvous | None:
    """The published head address, or None when no head has published one (or it is unreadable)."""
    try:
        data = json.loads(rendezvous_path(project_dir, cluster).read_text())
        return Rendezvous.from_mapping(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_rendezvous(project_dir: Path | str, cluster: str, head_id: str | None = None) -> bool:
    """Remove `head.json` (only if it still names `head_id`, when given). True when removed."""
    path = rendezvous_path(project_dir, cluster)
    if head_id is not None:
        current = read_rendezvous(project_dir, cluster)
        if current is None or current.head_id != head_id:
            return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def client_env(project_dir: Path | str, cluster: str) -> dict[str, str]:
    """Environment for a Ray client in the same project: RAY_ADDRESS (Ray Client, `ray://ip:port`)
    plus the auth mode and token *path* the head published. Raises `RendezvousNotFound`."""
    rendezvous = read_rendezvous(project_dir, cluster)
    if rendezvous is None:
        raise RendezvousNotFound(
            f"no head rendezvous at {rendezvous_path(project_dir, cluster)}: is cluster {cluster!r} up?"
        )
    token_file = token_path(project_dir, cluster) if rendezvous.auth == "token" else None
    if token_file is not None and not _has_content(token_file):
        raise TokenError(f"token file {token_file} is missing or empty")
    env = ray_auth_env(rendezvous.auth, token_file)
    env["RAY_ADDRESS"] = rendezvous.client_address
    return env
