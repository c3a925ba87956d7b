"""Test job: sleeps `SLEEP_SECONDS` (default 30) then exits 0."""

import os
import time

time.sleep(float(os.environ.get("SLEEP_SECONDS", "30")))
