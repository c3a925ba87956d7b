"""`python -m ray_serve_cai.node head|worker`."""

import sys

from ray_serve_cai.node.launcher import main

sys.exit(main())
