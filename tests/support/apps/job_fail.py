"""Test job: prints to stderr and exits 3."""

import sys

print("job failing", file=sys.stderr)
sys.exit(3)
