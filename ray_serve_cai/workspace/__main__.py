"""`python -m ray_serve_cai.workspace serve --home H [--port P]`: the workspace server, in the foreground."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ray_serve_cai.errors import RayCaiError
from ray_serve_cai.workspace.controls import (
    DEFAULT_RESTART_ATTEMPTS,
    DEFAULT_RESTART_DELAY_SECONDS,
    RestartPolicy,
)
from ray_serve_cai.workspace.errors import WorkspaceAPIError
from ray_serve_cai.workspace.processes import DEFAULT_STOP_GRACE_SECONDS
from ray_serve_cai.workspace.server import serve
from ray_serve_cai.workspace.statefile import resolve_home


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ray_serve_cai.workspace")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the workspace server in the foreground")
    serve_parser.add_argument("--home", type=Path, default=None)
    serve_parser.add_argument("--port", type=int, default=0, help="default: the previous server's port")
    serve_parser.add_argument("--stop-grace-seconds", type=float, default=DEFAULT_STOP_GRACE_SECONDS)
    serve_parser.add_argument(
        "--app-restart", action=argparse.BooleanOptionalAction, default=True,
        help="restart failed applications automatically, as CML does by default",
    )  # fmt: skip
    serve_parser.add_argument("--app-restart-attempts", type=int, default=DEFAULT_RESTART_ATTEMPTS)
    serve_parser.add_argument("--app-restart-delay", type=float, default=DEFAULT_RESTART_DELAY_SECONDS)
    serve_parser.add_argument(
        "--pods", action=argparse.BooleanOptionalAction, default=None,
        help="every workload in its own pod (default: where possible)",
    )  # fmt: skip
    serve_parser.add_argument("--pod-cidr", default=None, help="the pods' addresses (default: a free /16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per app probe is noise
    policy = RestartPolicy()
    try:
        policy.update(
            {
                "enabled": args.app_restart,
                "max_attempts": args.app_restart_attempts,
                "delay_seconds": args.app_restart_delay,
            }
        )
        serve(resolve_home(args.home), args.port, args.stop_grace_seconds, policy, args.pods, args.pod_cidr)
    except RayCaiError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    except WorkspaceAPIError as exc:  # a bad restart-policy option
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
