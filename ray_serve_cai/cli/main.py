"""Entry point of `ray-cai`: registers the command groups of each layer."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="ray-cai",
    help="Ray clusters on Cloudera AI Workbench (CML) applications.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Each layer's commands live in their own module; import here so `--help` lists them all.
    from ray_serve_cai.cli import cluster as cluster_cmds
    from ray_serve_cai.cli import config as config_cmds
    from ray_serve_cai.cli import job as job_cmds
    from ray_serve_cai.cli import run as run_cmds
    from ray_serve_cai.cli import serve as serve_cmds
    from ray_serve_cai.cli import workspace as workspace_cmds
    from ray_serve_cai.cli.autostop import autostop_command
    from ray_serve_cai.cli.dashboard import dashboard_command
    from ray_serve_cai.cli.deploy import deploy_command
    from ray_serve_cai.cli.doctor import doctor_command

    cluster_cmds.register(app)
    app.command("deploy")(deploy_command)
    app.command("dashboard")(dashboard_command)
    app.command("doctor")(doctor_command)
    app.command("autostop")(autostop_command)
    app.add_typer(config_cmds.app, name="config", help="Validate the config files; print the JSON Schema.")
    job_cmds.register(app)
    run_cmds.register(app)
    app.add_typer(serve_cmds.app, name="serve", help="The cluster's Ray Serve applications.")
    app.add_typer(workspace_cmds.app, name="workspace", help="The local CML workspace (a stand-in for CML).")


def main() -> None:
    _register()
    app()


if __name__ == "__main__":
    main()
