"""`ray-cai check`: the connection and the API key, with one API call. Its own module: it needs the
client only, not the cluster machinery the other cluster commands load."""

from __future__ import annotations

from ray_serve_cai.cli.common import JsonFlag, LocalFlag, out_console, print_json, run_command, settings_for
from ray_serve_cai.cml import CMLClient


def check_command(local: LocalFlag = False, json_out: JsonFlag = False) -> None:
    """Test the connection and the API key with one API call (lists the runtimes)."""

    def run() -> None:
        settings = settings_for(local)
        with CMLClient(settings) as client:
            runtimes = client.list_runtimes()
        enabled = [r for r in runtimes if r.is_enabled]
        if json_out:
            print_json(
                {"host": settings.host, "ok": True, "runtimes": len(runtimes), "enabled": len(enabled)}
            )
        else:
            out_console.print(
                f"connected to {settings.host}: API key accepted, {len(enabled)} runtimes enabled"
            )

    run_command(run)


__all__ = ["check_command"]
