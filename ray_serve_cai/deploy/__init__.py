"""The deploy orchestrator: project, chained jobs, fingerprints, run-and-follow."""
