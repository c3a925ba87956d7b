"""Test job: sleeps `SLEEP_SECONDS` (default 30) then exits 0; with `UNTIL_FILE` set, it ends as soon as
that file (relative to the project) exists instead, so a test decides when it ends (still at most
`SLEEP_SECONDS`)."""

import os
import time

deadline = time.monotonic() + float(os.environ.get("SLEEP_SECONDS", "30"))
until = os.environ.get("UNTIL_FILE")
while time.monotonic() < deadline and not (until and os.path.exists(until)):
    time.sleep(0.1 if until else max(0.0, deadline - time.monotonic()))
