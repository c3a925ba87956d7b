"""CML application script of a cluster's Serve gateway: see ray_serve_cai.node.gateway."""

import sys

from _bootstrap import use_project_code

use_project_code(venv=True)

from ray_serve_cai.node.gateway import main  # noqa: E402

sys.exit(main())
