"""Test application: serves nothing, sleeps `APP_SLEEP` seconds, then exits with `APP_EXIT_CODE`."""

import os
import sys
import time

time.sleep(float(os.environ.get("APP_SLEEP", "0.3")))
sys.exit(int(os.environ.get("APP_EXIT_CODE", "1")))
