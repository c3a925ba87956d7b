"""The declarative spec: cluster and deployment config, env overrides, validation, spec hashes.

Imports nothing else of the package.
"""
