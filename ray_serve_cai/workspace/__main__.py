"""`python -m ray_serve_cai.workspace serve --home H [--port P]`: the workspace server, in the foreground."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ray_serve_cai.workspace.processes import DEFAULT_STOP_GRACE_SECONDS
from ray_serve_cai.workspace.server import serve
from ray_serve_cai.workspace.statefile import resolve_home


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ray_serve_cai.workspace")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the workspace server in the foreground")
    serve_parser.add_argument("--home", type=Path, default=None)
    serve_parser.add_argument("--port", type=int, default=0)
    serve_parser.add_argument("--stop-grace-seconds", type=float, default=DEFAULT_STOP_GRACE_SECONDS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per app probe is noise
    serve(resolve_home(args.home), args.port, args.stop_grace_seconds)


if __name__ == "__main__":
    main()
