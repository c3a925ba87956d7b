"""CML application script of a Ray head: see ray_serve_cai.node.launcher.run_head."""

import sys

from _bootstrap import use_project_code

use_project_code(venv=True)

from ray_serve_cai.cluster.autostop import head_hooks  # noqa: E402
from ray_serve_cai.node import main  # noqa: E402

# Autostop acts through the CML API (cluster layer); the node layer gets it from here.
sys.exit(main(["head"], autostop_hooks=head_hooks))
