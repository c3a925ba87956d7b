"""CML job `launch_ray_cluster`: see ray_serve_cai.deploy.steps.launch_ray_cluster."""

import sys

from _bootstrap import use_project_code

use_project_code(venv=True)

from ray_serve_cai.deploy.steps import main  # noqa: E402

sys.exit(main("launch_ray_cluster"))
