"""ray-serve-cai: Ray clusters on Cloudera AI Workbench (CML) applications.

The public Python API (what a notebook uses) is re-exported here as the layers land.
"""

__version__ = "0.1.0"

# The one Ray minor version this release is tested with (the `ray` extra pins it).
RAY_MINOR = "2.60"
