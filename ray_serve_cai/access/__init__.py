"""Talking to a running cluster through its application URL, from anywhere (a laptop, a CI runner):
the URL a person opens for the dashboard (with a one-time login link in the local workspace), and
the REST APIs behind the head's proxy — Ray's Jobs API (`access.jobs`), Serve's REST API
(`access.serve`) and a node's Ray logs (`access.logs`). CML lets programs through with
`Authorization: Bearer <API key>`; the head's HTTP server adds the Ray token. Uses `config` and
`cml` only, and never imports Ray."""

from ray_serve_cai.access.dashboard import DashboardError, dashboard_url, find_head_application

__all__ = ["DashboardError", "dashboard_url", "find_head_application"]
