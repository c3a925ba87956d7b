"""CML job of a scheduled Ray run (`scheduled_runs:` in jobs_config.yaml): see
ray_serve_cai.deploy.steps.scheduled_run — it becomes `ray-cai run` for the job's command."""

import sys

from _bootstrap import use_project_code

use_project_code(venv=True)

from ray_serve_cai.deploy.steps import main  # noqa: E402

sys.exit(main("scheduled_run"))
