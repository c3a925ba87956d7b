"""CML job `git_sync`: see ray_serve_cai.deploy.steps.git_sync."""

import sys

from _bootstrap import use_project_code

use_project_code(venv=False)

from ray_serve_cai.deploy.steps import main  # noqa: E402

sys.exit(main("git_sync"))
