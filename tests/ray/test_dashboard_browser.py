"""A person opens the Ray dashboard: a real browser (Playwright driving the system's Chromium) on the URL
`ray-cai dashboard --local` prints, against the tier's shared real Ray cluster (`ray_cluster`: 1 head
+ 1 worker) in the local workspace.

The link logs the browser in (one-time code → cookie for that application only) and lands on the
dashboard, whose Cluster page lists every node ALIVE; a browser without the link, or with the link a
second time, gets the login refusal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from support.cli import LocalCluster

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs the system Chromium (apt-get install chromium)"
)
def test_the_dashboard_link_opens_the_cluster_page_in_a_browser_and_nothing_else_does(
    ray_cluster: LocalCluster,
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    nodes = ray_cluster.up_result["status"]["nodes"]
    printed = ray_cluster.cli("dashboard")
    assert printed.returncode == 0, printed.stderr
    url = printed.stdout.strip().splitlines()[-1]
    head_url = url.split("/_workspace/login", 1)[0]
    assert url.startswith("http://127.0.0.1:") and "code=" in url

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context().new_page()
            page.goto(url)  # no extra headers: the link alone logs in, then redirects to the dashboard
            assert page.url.rstrip("/").split("#")[0] == head_url
            page.get_by_role("link", name="Cluster", exact=True).first.click()
            page.wait_for_url("**/#/cluster**")
            node_rows = page.get_by_role("row").filter(has=page.locator("td"))
            alive_rows = node_rows.filter(has=page.get_by_text("ALIVE", exact=True))
            sync_api.expect(alive_rows).to_have_count(len(nodes), timeout=60_000)
            assert node_rows.count() == len(nodes) == 2  # every node listed is ALIVE
            assert alive_rows.filter(has_text="(Head)").count() == 1
            page.close()

            stranger = browser.new_context().new_page()
            refused = stranger.goto(head_url + "/")
            assert refused is not None and refused.status == 401
            assert "Login required" in stranger.content()
            again = stranger.goto(url)  # the same link, a second time
            assert again is not None and again.status == 401
            assert "not valid" in stranger.content()
        finally:
            browser.close()


def test_the_dashboard_rest_api_answers_curl_with_the_api_key(ray_cluster: LocalCluster) -> None:
    """README's example: the key goes to curl on stdin (`--config -`), never on a command line."""
    status = ray_cluster.cli("status", "--json")
    url = json.loads(status.stdout)["dashboard_url"]
    script = (
        'printf \'header = "Authorization: Bearer %s"\\n\' "$CML_API_KEY"'
        ' | curl -sf --config - "${url}api/version"'
    )
    env = {**os.environ, "CML_API_KEY": ray_cluster.workspace.api_key, "url": url}
    answer = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["ray_version"].startswith("2.60")
    refused = subprocess.run(["curl", "-s", "-o", os.devnull, "-w", "%{http_code}", f"{url}api/version"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
    assert refused.stdout == "401"
