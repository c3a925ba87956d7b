"""The URL a person opens to see a cluster's Ray dashboard.

On CML it is the head application's URL: CML's own login page does the rest. In the local workspace
(the application object carries a `url`) it is a one-time login link minted by the workspace
(`POST /_workspace/applications/<id>/login-code`, bearer key): opening it within a minute, once,
sets a cookie for that application only and lands on the dashboard. The link is a credential: it is
returned to the caller and never logged or put in an error message.
"""

from __future__ import annotations

import httpx

from ray_serve_cai.cml import Application, CMLClient, application_url
from ray_serve_cai.config.cluster import head_app_name
from ray_serve_cai.errors import OperationFailed

__all__ = ["DashboardError", "dashboard_url", "find_head_application"]

LOGIN_CODE_PATH = "/_workspace/applications/{app_id}/login-code"


class DashboardError(OperationFailed):
    """The dashboard's URL could not be made (no head application, or the workspace refused)."""


def find_head_application(client: CMLClient, project_id: str, cluster: str) -> Application:
    """The head application of `cluster` in the project (one list call)."""
    name = head_app_name(cluster)
    found = [a for a in client.list_applications(project_id, search_filter={"name": name}) if a.name == name]
    if not found:
        raise DashboardError(
            f"cluster {cluster!r} has no head application {name!r} in project {project_id} (run `ray-cai up`)"
        )
    return found[0]


def dashboard_url(client: CMLClient, head: Application) -> str:
    """What a person opens: CML's app URL, or a local one-time login link (a secret, shown once)."""
    if application_url(head) is None:
        return client.app_url(head) + "/"
    return _local_login_link(client, head)


def _local_login_link(client: CMLClient, head: Application) -> str:
    settings = client.settings
    url = settings.host + LOGIN_CODE_PATH.format(app_id=head.id)
    headers = {"Authorization": f"Bearer {settings.api_key.get_secret_value()}"}
    try:
        response = httpx.post(url, headers=headers, timeout=settings.timeout, trust_env=False)
    except httpx.TransportError as error:
        raise DashboardError(
            f"cannot reach the local workspace at {settings.host} for a login link: {type(error).__name__}"
        ) from None
    if response.status_code != 200:
        raise DashboardError(
            f"the local workspace at {settings.host} refused a login link for {head.name!r} "
            f"(HTTP {response.status_code})"
        )
    try:
        link = response.json()["login_url"]
    except (ValueError, KeyError, TypeError):
        raise DashboardError("the local workspace answered a login-link request without a link") from None
    if not isinstance(link, str) or not link.startswith(("http://", "https://")):
        raise DashboardError("the local workspace answered a login-link request without a link")
    return link
