"""CML application script of a Ray worker: see ray_serve_cai.node.launcher.run_worker."""

import sys

from _bootstrap import use_project_code

use_project_code(venv=True)

from ray_serve_cai.node import main  # noqa: E402

sys.exit(main(["worker"]))
