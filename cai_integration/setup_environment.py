"""CML job `setup_environment`: see ray_serve_cai.deploy.steps.setup_environment."""

import sys

from _bootstrap import use_project_code

use_project_code(venv=False)

from ray_serve_cai.deploy.steps import main  # noqa: E402

sys.exit(main("setup_environment"))
