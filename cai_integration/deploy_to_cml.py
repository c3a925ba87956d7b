"""Deploy Orchestrator: `python cai_integration/deploy_to_cml.py [OPTIONS]` = `ray-cai deploy [OPTIONS]`."""

import sys

from _bootstrap import use_project_code

use_project_code(venv=False)

from ray_serve_cai.cli.main import main  # noqa: E402

sys.argv = [sys.argv[0], "deploy", *sys.argv[1:]]
main()
