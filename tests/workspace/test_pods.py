"""Pods: every application and job run in its own network and process namespaces, as on CML.

Distinct pod IPs and the same CDSW_APP_PORT in every pod; the application URL reaches the pod's
loopback (HTTP and WebSocket); pods reach each other, the API and the application URLs; a restart is a
new pod with a new IP; network faults (partition, netem) cut and slow what they name and end by
themselves; `ray-cai workspace exec` runs a command in a session pod; nothing (namespace, link,
address) is left after stop, delete, `workspace stop`, or a SIGKILL of the server and a new start.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from support.fakes import RAY_CAI, run_cli, wait_until

from ray_serve_cai.workspace.daemon import start_workspace, stop_workspace, workspace_info
from ray_serve_cai.workspace.pods import leftovers_of, pods_possible
from ray_serve_cai.workspace.testing import WorkspaceHandle

# A probe run inside a pod: GET each URL, print {url: status or error}.
PROBE = """
import json, sys, urllib.request
result = {}
for url in sys.argv[1:]:
    try:
        with urllib.request.urlopen(url, timeout=3) as answer:
            result[url] = answer.status
    except urllib.error.HTTPError as error:
        result[url] = error.code
    except Exception as error:
        result[url] = type(error).__name__
print(json.dumps(result))
"""

# Prints what a workload sees of its pod.
WHOAMI = """
import json, os
print(json.dumps({
    "ip": os.environ["CDSW_IP_ADDRESS"], "pid": os.getpid(), "cwd": os.getcwd(),
    "processes": len([p for p in os.listdir("/proc") if p.isdigit()]),
    "extra": os.environ.get("EXTRA"), "project": os.environ["CDSW_PROJECT_ID"],
}))
"""


@pytest.fixture(scope="module")
def pods(pods_workspace: WorkspaceHandle) -> WorkspaceHandle:
    return pods_workspace


@pytest.fixture(scope="module")
def project(pods: WorkspaceHandle, test_apps_dir: Path) -> dict[str, Any]:
    return pods.create_project(f"pods-{uuid.uuid4().hex[:8]}", files_from=test_apps_dir)


def create_app(ws: WorkspaceHandle, project: dict[str, Any], script: str = "stream_app.py") -> dict[str, Any]:
    name = f"pod-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "subdomain": name, "script": script, "runtime_identifier": ws.runtime_identifier()}
    app = ws.api_ok("POST", f"/api/v2/projects/{project['id']}/applications", json=body)
    ws.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"}, timeout=60)
    return app


def delete_app(ws: WorkspaceHandle, project: dict[str, Any], app: dict[str, Any]) -> None:
    ws.api_ok("DELETE", f"/api/v2/projects/{project['id']}/applications/{app['id']}")


def pod_ip_of(ws: WorkspaceHandle, project: dict[str, Any], app: dict[str, Any]) -> str:
    log = Path(ws.api_ok("GET", f"/api/v2/projects/{project['id']}/applications/{app['id']}")["log_path"])
    lines = [line for line in log.read_text().splitlines() if line.startswith("[workspace] pod ")]
    return lines[-1].split()[2]


def exec_in_pod(ws: WorkspaceHandle, project: dict[str, Any], *command: str, env: str = "") -> Any:
    """`ray-cai workspace exec` with a Python snippet; its stdout as JSON."""
    args = ["workspace", "exec", "--home", str(ws.home), "--project", project["name"]]
    if env:
        args += ["--env", env]
    done = run_cli([*args, "--", *command], timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _index(ws: WorkspaceHandle, ip: str) -> int:
    return int(ipaddress.ip_address(ip)) - int(ipaddress.ip_network(ws.network()["pod_cidr"]).network_address)


def netns_of(ws: WorkspaceHandle, ip: str) -> str:
    """The name of the pod's network namespace (`pods.py`: ray-cai-<home hash>-<index>)."""
    return f"ray-cai-{ws.network()['bridge'][3:]}-{_index(ws, ip)}"


def veth_of(ws: WorkspaceHandle, ip: str) -> str:
    return f"rcv{ws.network()['bridge'][3:]}{_index(ws, ip):04x}"


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def links() -> set[str]:
    listed = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in listed.splitlines()}


def test_pods_have_their_own_ip_the_same_app_port_and_reach_each_other(
    pods: WorkspaceHandle, project: dict[str, Any]
) -> None:
    network = pods.network()
    cidr = ipaddress.ip_network(network["pod_cidr"])
    first, second = create_app(pods, project), create_app(pods, project, "http_app.py")
    ips = [pod_ip_of(pods, project, app) for app in (first, second)]
    assert len(set(ips)) == 2 and all(ipaddress.ip_address(ip) in cidr for ip in ips)
    assert {first["id"], second["id"]} <= {a["id"] for a in pods.api_ok(
        "GET", f"/api/v2/projects/{project['id']}/applications")["applications"]}  # fmt: skip
    apps = [
        pods.api_ok("GET", f"/api/v2/projects/{project['id']}/applications/{a['id']}")
        for a in (first, second)
    ]
    # The same CDSW_APP_PORT in every pod (each serves on its own loopback), as on CML.
    assert len({a["url"] for a in apps}) == 2
    echoed = pods.app_request(second, "GET", "/x").json()
    assert echoed["path"] == "/x"

    # A session pod: its own IP and PID namespace, the project folder, a session's variables.
    seen = exec_in_pod(pods, project, "python", "-c", WHOAMI, env="EXTRA=given")
    assert seen["ip"] not in ips and ipaddress.ip_address(seen["ip"]) in cidr
    assert seen["pid"] == 2 and seen["processes"] < 5  # PID 1 is the pod's init; the host is not seen
    assert seen["extra"] == "given" and seen["project"] == project["id"]
    assert Path(seen["cwd"]) == pods.project_dir(project["id"])

    # From a pod: other pods on their own address (any port), the API and the application URLs.
    targets = [f"http://{ips[0]}:{network['app_port']}/", f"http://{ips[1]}:{network['app_port']}/hi",
               f"{pods.url}/api/v2/projects", f"{apps[1]['url']}/"]  # fmt: skip
    reached = exec_in_pod(pods, project, "python", "-c", PROBE, *targets)
    assert reached == {targets[0]: 200, targets[1]: 200, targets[2]: 401, targets[3]: 401}, reached

    # The application URL passes WebSockets into the pod.
    async def talk() -> str:
        url = "ws" + apps[0]["url"].removeprefix("http") + "/ws"
        headers = {"Authorization": f"Bearer {pods.api_key}"}
        async with websockets.connect(url, additional_headers=headers, proxy=None) as ws:  # type: ignore[arg-type]
            await ws.send("hello")
            return str(await ws.recv())

    assert asyncio.run(talk()) == "echo:hello"

    # A restart is a new pod with a new address; stop and delete remove the pod.
    pods.api_ok("POST", f"/api/v2/projects/{project['id']}/applications/{first['id']}:restart")
    pods.wait_for_app(project["id"], first["id"], {"APPLICATION_RUNNING"}, timeout=60)
    moved = pod_ip_of(pods, project, first)
    assert moved not in ips
    assert pods.app_request(first, "GET", "/").status_code == 200
    pods.api_ok("POST", f"/api/v2/projects/{project['id']}/applications/{second['id']}:stop")
    pods.wait_for_app(project["id"], second["id"], {"APPLICATION_STOPPED"})
    for app in (first, second):
        delete_app(pods, project, app)
    gone = {*ips, moved}
    wait_until(lambda: not gone & set(pods.network()["pods"]), timeout=30, what="their pods to be removed")
    names, own_links = leftovers_of(pods.home)
    assert not {netns_of(pods, ip) for ip in gone} & set(names) and network["bridge"] in own_links
    assert not {veth_of(pods, ip) for ip in gone} & links()


def test_job_runs_are_pods_too(pods: WorkspaceHandle, project: dict[str, Any]) -> None:
    (pods.project_dir(project["id"]) / "whoami_job.py").write_text(
        WHOAMI.replace("print(", "open('whoami.json', 'w').write(")
    )
    job = pods.api_ok(
        "POST",
        f"/api/v2/projects/{project['id']}/jobs",
        json={"name": "whoami", "script": "whoami_job.py", "runtime_identifier": pods.runtime_identifier()},
    )
    run = pods.api_ok("POST", f"/api/v2/projects/{project['id']}/jobs/{job['id']}/runs", json={})
    done = pods.wait_for_run(project["id"], job["id"], run["id"])
    assert done["status"] == "ENGINE_SUCCEEDED", Path(done.get("log_path", "")).name
    seen = json.loads((pods.project_dir(project["id"]) / "whoami.json").read_text())
    assert ipaddress.ip_address(seen["ip"]) in ipaddress.ip_network(pods.network()["pod_cidr"])
    assert seen["pid"] == 2
    wait_until(lambda: seen["ip"] not in pods.network()["pods"], timeout=30, what="the run's pod to go")
    assert netns_of(pods, seen["ip"]) not in namespaces()


def test_exec_streams_exits_with_the_code_and_checks_its_input(
    pods: WorkspaceHandle, project: dict[str, Any]
) -> None:
    base = ["workspace", "exec", "--home", str(pods.home), "--project", project["id"]]

    def ray_cai(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_cli(list(args), timeout=timeout)

    done = ray_cai(*base, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (done.returncode, done.stdout, done.stderr) == (7, "out\n", "err\n")
    bad = ray_cai(*base, "--env", "NOEQUALS", "--", "true", timeout=60)
    assert bad.returncode == 2 and "--env" in bad.stderr and "Traceback" not in bad.stderr
    unknown = ray_cai(
        "workspace", "exec", "--home", str(pods.home), "--project", "no-such", "--", "true", timeout=60
    )
    assert unknown.returncode == 2 and "no-such" in unknown.stderr
    where = ray_cai(*base, "--", "sh", "-c", "echo $CDSW_IP_ADDRESS")
    ip = where.stdout.strip()
    assert where.returncode == 0 and ip  # the pod is gone once exec returns
    assert ip not in pods.network()["pods"] and netns_of(pods, ip) not in namespaces()


def test_partition_and_shape_cut_and_slow_a_pod_then_end_by_themselves(
    pods: WorkspaceHandle, project: dict[str, Any]
) -> None:
    cut, other = create_app(pods, project, "http_app.py"), create_app(pods, project, "http_app.py")
    cut_ip = pod_ip_of(pods, project, cut)
    port = pods.network()["app_port"]
    try:
        state = pods.partition([cut["name"]], seconds=0)
        assert [f["kind"] for f in state["faults"]] == ["partition"]
        assert unreachable(pods, cut)  # its URL is cut too
        assert pods.app_request(other, "GET", "/").status_code == 200
        target = f"http://{cut_ip}:{port}/"
        assert exec_in_pod(pods, project, "python", "-c", PROBE, target)[target] != 200
        pods.heal_network()
        assert pods.app_request(cut, "GET", "/").status_code == 200
        assert exec_in_pod(pods, project, "python", "-c", PROBE, target)[target] == 200

        # A timed partition heals by itself.
        pods.partition([cut["id"]], seconds=8)
        assert unreachable(pods, cut)
        wait_until(lambda: not pods.network()["faults"], timeout=15, what="the partition to end")
        wait_until(lambda: pods.app_request(cut, "GET", "/").status_code == 200, timeout=15, what="the URL")

        # netem: every packet the pod sends waits 300 ms (its answers through the URL too).
        pods.shape_network([cut["name"]], delay_ms=300, seconds=0)
        started = time.monotonic()
        assert pods.app_request(cut, "GET", "/").status_code == 200
        assert time.monotonic() - started >= 0.3
        fault = pods.network()["faults"][0]
        assert (fault["kind"], fault["delay_ms"]) == ("shape", 300)
        assert pods.heal_network()["healed"] == 1

        bad = pods.api("POST", "/_workspace/network/shape", json={"applications": [cut["id"]], "delay": 1})
        assert bad.status_code == 400 and "delay" in bad.json()["message"]
        missing = pods.api("POST", "/_workspace/network/partition", json={"applications": ["nope"]})
        assert missing.status_code == 404
    finally:
        pods.heal_network()
        for app in (cut, other):
            delete_app(pods, project, app)


def unreachable(ws: WorkspaceHandle, app: dict[str, Any]) -> bool:
    """The application URL does not answer (a gateway error, or no answer within 3 s)."""
    try:
        return ws.app_request(app, "GET", "/", timeout=3).status_code >= 500
    except httpx.TimeoutException:
        return True


@pytest.fixture
def private_home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "pods-home"
    try:
        yield home
    finally:
        stop_workspace(home)


def test_nothing_is_left_after_stop_or_a_sigkill_and_a_new_start(
    private_home: Path, test_apps_dir: Path
) -> None:
    ws = WorkspaceHandle(start_workspace(private_home, stop_grace_seconds=2.0, app_restart=False, pods=True))
    project = ws.create_project("left", files_from=test_apps_dir)
    kept, doomed = create_app(ws, project, "http_app.py"), create_app(ws, project, "http_app.py")
    kept_ip = pod_ip_of(ws, project, kept)
    bridge = ws.network()["bridge"]
    assert len(leftovers_of(private_home)[0]) == 2

    # SIGKILL: the pods stay (their workloads run on); the new server re-adopts the live one (same
    # address, its URL works) and removes the pod whose workload died meanwhile.
    os.kill(ws.info.pid, signal.SIGKILL)
    wait_until(lambda: workspace_info(private_home) is None, timeout=10, what="the killed server to be gone")
    ws.close()
    os.killpg(_group_of(doomed, private_home), signal.SIGKILL)  # dies while no server watches it
    started = subprocess.run(
        [*RAY_CAI, "workspace", "start", "--home", str(private_home), "--no-app-restart", "--pods"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert started.returncode == 0, started.stderr
    assert "network: pods" in started.stdout
    info = workspace_info(private_home)
    assert info is not None
    ws = WorkspaceHandle(info)
    try:
        assert ws.network()["pods"] == [kept_ip]
        assert ws.app_request(kept, "GET", "/").status_code == 200
        ws.wait_for_app(project["id"], doomed["id"], {"APPLICATION_FAILED"})
        names, _ = leftovers_of(private_home)
        assert len(names) == 1

        # Killed again, then `workspace stop` without a server: everything goes.
        os.kill(info.pid, signal.SIGKILL)
        wait_until(
            lambda: workspace_info(private_home) is None, timeout=10, what="the killed server to be gone"
        )
    finally:
        ws.close()
    stop_workspace(private_home)
    assert leftovers_of(private_home) == ([], [])
    assert not {n for n in namespaces() if n.startswith(f"ray-cai-{bridge[3:]}-")}
    assert bridge not in links()


def _group_of(app: dict[str, Any], home: Path) -> int:
    """The process group of an application's workload (its leader started a session)."""
    from ray_serve_cai.workspace.processes import WORKLOAD_MARKER, processes_with_marker

    found = processes_with_marker(WORKLOAD_MARKER, app["id"])
    assert found, f"no process of {app['id']} under {home}"
    return os.getpgid(found[0].pid)


def test_status_says_pods_or_shared_host(pods: WorkspaceHandle) -> None:
    args = ["workspace", "status", "--home", str(pods.home), "--json"]
    done = run_cli(args, timeout=60)
    status = json.loads(done.stdout)
    assert status["network"] == "pods" and status["pod_cidr"] == pods.network()["pod_cidr"]
    assert httpx.get(f"{pods.url}/_workspace/network").status_code == 401  # behind the API key


def test_start_makes_pods_by_default_and_no_pods_is_shared_host(tmp_path: Path) -> None:
    """`workspace start` without a choice makes pods where it can (root on Linux, as in CI), else runs
    shared-host and says why; with `--no-pods` every workload is on the host, status says so and why,
    and network faults are refused."""
    default, shared = tmp_path / "default", tmp_path / "shared"
    possible, why = pods_possible()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        done = run_cli(["workspace", *args], timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    try:
        cli("start", "--home", str(default), "--no-app-restart")
        status = json.loads(cli("status", "--home", str(default), "--json").stdout)
        if possible:
            assert status["network"] == "pods" and status["pod_cidr"], status
        else:
            assert status["network"] == "shared-host" and why in status["network_reason"], status
        cli("start", "--home", str(shared), "--no-pods", "--no-app-restart")
        status = json.loads(cli("status", "--home", str(shared), "--json").stdout)
        assert status["network"] == "shared-host" and status["pod_cidr"] is None, status
        assert "--no-pods" in status["network_reason"]
        said = cli("status", "--home", str(shared)).stdout
        assert "network: shared-host (asked for with --no-pods)" in said
        info = workspace_info(shared)
        assert info is not None
        ws = WorkspaceHandle(info)
        try:
            cut = ws.api("POST", "/_workspace/network/partition", json={"applications": ["x"], "seconds": 1})
            assert cut.status_code == 400 and "network faults need pods" in cut.text, cut.text
        finally:
            ws.close()
    finally:
        for home in (default, shared):
            stop = [*RAY_CAI, "workspace", "stop", "--home", str(home)]
            subprocess.run(stop, capture_output=True, timeout=120, check=False)
    assert leftovers_of(default) == ([], [])
