"""Test job: records its argv, selected environment and cwd in `job-out-<run marker>.json`, exits 0."""

import json
import os
import sys

keys = [k for k in os.environ if k.startswith(("CDSW_", "JOB_", "PROJECT_", "RUN_"))]
env = {k: os.environ[k] for k in keys if k != "CDSW_APIV2_KEY"}
record = {"argv": sys.argv[1:], "cwd": os.getcwd(), "env": env}
record["has_api_key"] = bool(os.environ.get("CDSW_APIV2_KEY"))
with open(f"job-out-{os.environ['RAY_CAI_WORKLOAD_ID']}.json", "w") as handle:
    json.dump(record, handle)
print("job ok")
