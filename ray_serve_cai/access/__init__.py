"""Talking to a running cluster through its application URL, from anywhere (a laptop, a CI runner):
the URL a person opens for the dashboard (with a one-time login link in the local workspace), and
the REST APIs behind the head's proxy. Uses `config` and `cml` only."""

from ray_serve_cai.access.dashboard import DashboardError, dashboard_url, find_head_application

__all__ = ["DashboardError", "dashboard_url", "find_head_application"]
