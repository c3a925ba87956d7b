"""The streaming proxy in its two real homes: the head node's HTTP server (in front of the dashboard,
and Serve under `/serve`) and the local workspace's per-application listeners.

Upstream is a real uvicorn app (`tests/support/apps/stream_app.py`); the head's server runs in its own process
(`tests/support/apps/head_http.py`) so its memory can be watched; clients are real (httpx, urllib, requests,
aiohttp, websockets).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import websockets

from ray_serve_cai.workspace.app_urls import SESSION_SECONDS, AppLogins, cookie_name
from ray_serve_cai.workspace.testing import WorkspaceHandle

TEST_TOKEN = "test-ray-token-" + uuid.uuid4().hex
CML_KEY_STANDIN = "cml-key-standin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 20.0, **kwargs: Any) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, trust_env=False, timeout=2, **kwargs)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not answer within {timeout} s") from None
            time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def upstream(test_apps_dir: Path) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, str(test_apps_dir / "stream_app.py"), str(port)])
    try:
        wait_http(f"http://127.0.0.1:{port}/")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


@pytest.fixture(scope="module")
def head(upstream: str, test_apps_dir: Path) -> Iterator[tuple[str, psutil.Process]]:
    """The head's HTTP server; the stand-in upstream is both the dashboard and Serve."""
    port = free_port()
    upstream_port = upstream.rsplit(":", 1)[1]
    process = subprocess.Popen(
        [sys.executable, str(test_apps_dir / "head_http.py"), str(port), upstream_port, upstream_port],
        env={**os.environ, "TEST_RAY_TOKEN": TEST_TOKEN},
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ray-cai/health")
        yield f"http://127.0.0.1:{port}", psutil.Process(process.pid)
    finally:
        stop(process)


@pytest.fixture(scope="module")
def app(workspace: WorkspaceHandle, test_apps_dir: Path) -> Iterator[dict[str, Any]]:
    """A workspace application running the stream app: reached at its own URL."""
    project = workspace.create_project(f"proxy-{uuid.uuid4().hex[:8]}", files_from=test_apps_dir)
    subdomain = f"stream-{uuid.uuid4().hex[:8]}"
    created = workspace.api_ok(
        "POST",
        f"/api/v2/projects/{project['id']}/applications",
        json={
            "name": subdomain,
            "subdomain": subdomain,
            "script": "stream_app.py",
            "runtime_identifier": workspace.runtime_identifier(),
        },
    )
    try:
        yield workspace.wait_for_app(project["id"], created["id"], {"APPLICATION_RUNNING"})
    finally:
        workspace.api_ok("DELETE", f"/api/v2/projects/{project['id']}")


@pytest.fixture(params=["node", "workspace"])
def through(request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    """(base URL, headers) of one of the two proxies."""
    if request.param == "node":
        base, _ = request.getfixturevalue("head")
        return base, {}
    workspace: WorkspaceHandle = request.getfixturevalue("workspace")
    return request.getfixturevalue("app")["url"], {"Authorization": f"Bearer {workspace.api_key}"}


# ------------------------------------------------------------------------------------ headers


def test_node_adds_the_ray_token_and_never_forwards_credentials(head: tuple[str, psutil.Process]) -> None:
    base, _ = head
    response = httpx.post(
        f"{base}/echo?x=1",
        content=b"payload",
        headers={"Authorization": f"Bearer {CML_KEY_STANDIN}", "X-Ray-Authorization": "Bearer forged"},
        trust_env=False,
    )
    assert response.status_code == 200
    seen = response.json()
    assert (seen["method"], seen["path"], seen["query"], seen["body_length"]) == ("POST", "/echo", "x=1", 7)
    assert seen["headers"]["x-ray-authorization"] == f"Bearer {TEST_TOKEN}"
    assert "authorization" not in seen["headers"]
    assert response.headers["x-upstream"] == "yes" and response.headers["set-cookie"] == "upstream=1; Path=/"
    # Serve is mounted under /serve with the prefix kept (Serve runs with root_path /serve); it gets no token.
    served = httpx.get(f"{base}/serve/echo", headers={"Authorization": "Bearer x"}, trust_env=False).json()
    assert served["path"] == "/serve/echo"
    assert "authorization" not in served["headers"] and "x-ray-authorization" not in served["headers"]


def test_workspace_listener_strips_its_credentials(workspace: WorkspaceHandle, app: dict[str, Any]) -> None:
    response = httpx.get(
        f"{app['url']}/echo",
        headers={"Authorization": f"Bearer {workspace.api_key}", "Cookie": "mine=1"},
        trust_env=False,
    )
    seen = response.json()
    assert response.status_code == 200 and response.headers["x-request-id"]
    assert "authorization" not in seen["headers"] and seen["headers"]["cookie"] == "mine=1"
    assert workspace.api_key not in json.dumps(seen)


def test_a_program_request_carrying_the_login_cookie_reaches_the_app_without_it(
    workspace: WorkspaceHandle, app: dict[str, Any]
) -> None:
    """The fast path (Bearer key) strips the listener's login cookie as the ASGI path does, keeps the
    app's own cookies, and answers with the listener's request id."""
    login_cookie = cookie_name(int(app["url"].rsplit(":", 1)[1]))
    for _ in range(3):  # the second and third reuse the listener's pooled connection to the app
        response = httpx.get(
            f"{app['url']}/echo?x=1",
            headers={"Authorization": f"Bearer {workspace.api_key}", "Cookie": f"a=1; {login_cookie}=v; b=2"},
            trust_env=False,
        )
        seen = response.json()
        assert response.status_code == 200 and len(response.headers["x-request-id"]) == 32
        assert seen["headers"]["cookie"] == "a=1; b=2" and seen["query"] == "x=1"
        assert seen["headers"]["x-forwarded-host"] == app["url"].removeprefix("http://")


# ---------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("path", ["/stream?chunks=4&interval=1", "/sse?events=4&interval=1"])
def test_a_stream_arrives_as_it_is_produced(through: tuple[str, dict[str, str]], path: str) -> None:
    base, headers = through
    arrivals: list[tuple[float, float]] = []  # (sent by upstream, received here), same clock
    with httpx.stream("GET", base + path, headers=headers, trust_env=False, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.strip():
                arrivals.append((float(line.split()[-1]), time.time()))
    assert len(arrivals) == 4
    # Each chunk came while the stream was still being produced: before the last one was sent (a
    # buffering proxy delivers them all after it). The lag itself, under 0.5 s on a quiet machine, is
    # measured by benchmarks/bench_deadlines.py.
    last_sent = arrivals[-1][0]
    assert all(received < last_sent for _, received in arrivals[:-1]), arrivals
    assert arrivals[0][1] < arrivals[-1][0] - 2.5  # the first was here seconds before the last was sent


def test_a_request_body_streams_upstream(through: tuple[str, dict[str, str]]) -> None:
    base, headers = through
    last_chunk_sent_at: list[float] = []

    def body() -> Iterator[bytes]:
        yield b"a" * 1000
        time.sleep(1.5)
        last_chunk_sent_at.append(time.time())
        yield b"b" * 1000

    response = httpx.post(f"{base}/upload", content=body(), headers=headers, trust_env=False, timeout=30)
    answer = response.json()
    assert response.status_code == 200 and answer["length"] == 2000
    assert answer["first_chunk_at"] < last_chunk_sent_at[0] - 1.0  # not buffered until the end


def _rss_peak_during(process: psutil.Process, work: Any) -> tuple[int, int, Any]:
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            done.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return baseline, peak, result


def _download(url: str, headers: dict[str, str]) -> int:
    received = 0
    with httpx.stream("GET", url, headers=headers, trust_env=False, timeout=60) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received += len(chunk)
    return received


def test_a_50_mb_download_keeps_the_proxy_memory_flat(
    head: tuple[str, psutil.Process], workspace: WorkspaceHandle, app: dict[str, Any]
) -> None:
    size = 50 * 1024 * 1024
    base, node_process = head
    _download(f"{base}/bytes?mb=1", {})  # warm up (first-use allocations are not what we measure)
    baseline, peak, received = _rss_peak_during(node_process, lambda: _download(f"{base}/bytes?mb=50", {}))
    assert received == size
    assert peak - baseline < 20 * 1024 * 1024, f"node RSS grew {(peak - baseline) / 2**20:.1f} MiB"

    workspace_process = psutil.Process(int(workspace.api_ok("GET", "/_workspace/health")["pid"]))
    auth = {"Authorization": f"Bearer {workspace.api_key}"}
    _download(f"{app['url']}/bytes?mb=1", auth)
    baseline, peak, received = _rss_peak_during(
        workspace_process, lambda: _download(f"{app['url']}/bytes?mb=50", auth)
    )
    assert received == size
    assert peak - baseline < 20 * 1024 * 1024, f"workspace RSS grew {(peak - baseline) / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------- WebSocket


def test_a_websocket_passes_both_ways(through: tuple[str, dict[str, str]]) -> None:
    base, headers = through
    url = "ws" + base.removeprefix("http") + "/ws"

    async def talk() -> tuple[str, bytes, str | None, int | None, str]:
        async with websockets.connect(
            url,
            additional_headers=headers,
            subprotocols=["chat"],
            proxy=None,  # type: ignore[list-item]
        ) as ws:
            await ws.send("hello")
            text = await ws.recv()
            await ws.send(b"\x00\x01" * 40000)  # 80 KB binary message
            data = await ws.recv()
            chosen = ws.subprotocol
            await ws.send("close:4001")
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                await ws.recv()
            return str(text), bytes(data), chosen, ws.close_code, ws.close_reason or ""

    text, data, chosen, code, reason = asyncio.run(talk())
    assert text == "echo:hello" and data == b"\x00\x01" * 40000 and chosen == "chat"
    assert (code, reason) == (4001, "asked to")


def test_a_websocket_without_credentials_is_refused(app: dict[str, Any]) -> None:
    async def attempt() -> None:
        async with websockets.connect("ws" + app["url"].removeprefix("http") + "/ws", proxy=None) as ws:
            await ws.recv()

    with pytest.raises((websockets.exceptions.InvalidStatus, websockets.exceptions.ConnectionClosed)):
        asyncio.run(attempt())


# ------------------------------------------------------------------------ every Python client


def test_every_python_client_works_with_the_app_url(workspace: WorkspaceHandle, app: dict[str, Any]) -> None:
    url = f"{app['url']}/echo?client=1"
    auth = {"Authorization": f"Bearer {workspace.api_key}"}
    answers: dict[str, dict[str, Any]] = {}

    # The app's first request (it has just started) gets room for a loaded machine: a 10 s read
    # timeout ran out once in a full run on 2 cores.
    answers["httpx"] = httpx.get(url, headers=auth, timeout=30).json()
    with urllib.request.urlopen(urllib.request.Request(url, headers=auth), timeout=10) as response:
        answers["urllib"] = json.loads(response.read())
    requests = pytest.importorskip("requests")
    answers["requests"] = requests.get(url, headers=auth, timeout=10).json()
    aiohttp = pytest.importorskip("aiohttp")

    async def with_aiohttp() -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(url, headers=auth) as response:
            assert response.status == 200
            return dict(await response.json())

    answers["aiohttp"] = asyncio.run(with_aiohttp())
    for name, seen in answers.items():
        assert seen["query"] == "client=1" and "authorization" not in seen["headers"], name
    refused = httpx.get(url, trust_env=False)
    assert refused.status_code == 401 and refused.json()["code"] == 16


# ----------------------------------------------------------------------------- browser login


def _login_url(workspace: WorkspaceHandle, app: dict[str, Any]) -> str:
    return str(workspace.api_ok("POST", f"/_workspace/applications/{app['id']}/login-code")["login_url"])


def test_a_login_link_works_once_and_its_cookie_opens_only_that_app(
    workspace: WorkspaceHandle, app: dict[str, Any]
) -> None:
    login_url = _login_url(workspace, app)
    assert login_url.startswith(app["url"] + "/_workspace/login?code=")
    with httpx.Client(trust_env=False) as browser:
        assert browser.get(f"{app['url']}/echo", headers={"Accept": "text/html"}).status_code == 401
        answer = browser.get(login_url)
        assert answer.status_code == 303 and answer.headers["location"] == "/"
        set_cookie = answer.headers["set-cookie"]
        assert set_cookie.startswith(cookie_name(int(app["url"].rsplit(":", 1)[1])) + "=")
        assert "HttpOnly" in set_cookie and "SameSite=lax" in set_cookie and "Path=/" in set_cookie
        seen = browser.get(f"{app['url']}/echo").json()  # the cookie now opens the app ...
        assert "ray-cai-app-" not in seen["headers"].get("cookie", "")  # ... and is not passed on
        # ... never the API, even on the same host (browsers share cookies across ports).
        cookie = "; ".join(f"{c.name}={c.value}" for c in browser.cookies.jar)
        assert cookie.startswith("ray-cai-app-")
        api = httpx.get(f"{workspace.url}/api/v2/projects", headers={"Cookie": cookie}, trust_env=False)
        assert api.status_code == 401
    with httpx.Client(trust_env=False) as other_browser:
        reused = other_browser.get(login_url, headers={"Accept": "text/html"})
        assert reused.status_code == 401 and "not valid" in reused.text  # single use
        assert other_browser.get(f"{app['url']}/echo").status_code == 401


def test_a_cookie_is_bound_to_its_application_and_codes_expire() -> None:
    now = [1000.0]
    wall = [1_700_000_000.0]
    logins = AppLogins("key", clock=lambda: now[0], wall_clock=lambda: wall[0])
    code = logins.mint("app-a")
    assert not logins.redeem(code, "app-b")  # minted for another app: refused and gone
    assert not logins.redeem(code, "app-a")
    late = logins.mint("app-a")
    now[0] += 61
    assert not logins.redeem(late, "app-a")  # expired after a minute
    value = logins.session_value("app-a")
    assert logins.session_valid(value, "app-a") and not logins.session_valid(value, "app-b")
    assert not AppLogins("another key").session_valid(value, "app-a")
    wall[0] += SESSION_SECONDS + 1
    assert not logins.session_valid(value, "app-a")
    assert "key" not in repr(logins)
