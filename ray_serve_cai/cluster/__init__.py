"""The reconciler for a Ray cluster made of CML applications: observe, plan, apply, wait, verify."""
