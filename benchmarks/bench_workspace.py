"""Benchmark of the local workspace's durable state (issue 13), run by hand.

1. Re-adoption: N running apps (tests/support/apps/http_app.py), SIGKILL the server, start it again
   on the same home; time until it answers, until every app is listed RUNNING again and until a
   request routed to each app (Host routing) answers.
2. `GET /api/v2/projects/{id}/applications` requests per second (one keep-alive client, sequential),
   and `PATCH` of an application (a write: committed to SQLite before the answer), on a server of this
   tree (SQLite) and of a baseline tree (`--baseline /work/main`: the in-memory server), same machine,
   same apps, one server at a time. Target: SQLite GET >= 0.8 x in-memory GET.

    python benchmarks/bench_workspace.py --baseline /work/main --sizes 1,8,32 --apps 16

Writes its figures to `benchmarks/results/bench_workspace.json` (or `--out`); exits 1 when the
request-rate target is missed. Stops every server and app it started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
TEST_APPS = REPO / "tests" / "support" / "apps"
TARGET_RATIO = 0.8


class Server:
    """A workspace server of the code in `tree`, in the foreground of a subprocess (no daemon API, so
    the baseline tree's code runs unchanged)."""

    def __init__(self, tree: Path, home: Path) -> None:
        self.tree, self.home = tree, home
        self.process: subprocess.Popen[bytes] | None = None
        self.client: httpx.Client | None = None

    def start(self) -> float:
        """Start and wait until it answers; returns the seconds that took."""
        env = {**os.environ, "PYTHONPATH": str(self.tree)}
        env.pop("CML_HOST", None)
        env.pop("CML_API_KEY", None)
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / "bench-server.log", "ab")  # noqa: SIM115 - kept open for the server
        started = time.monotonic()
        command = [sys.executable, "-m", "ray_serve_cai.workspace", "serve", "--home", str(self.home)]
        command += ["--stop-grace-seconds", "2"]
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.tree)
        deadline = started + 60
        while time.monotonic() < deadline:
            state = _read_json(self.home / "state.json")
            if state.get("pid") == self.process.pid and state.get("url"):
                client = httpx.Client(
                    base_url=state["url"],
                    headers={"Authorization": f"Bearer {state['api_key']}"},
                    timeout=60,
                    trust_env=False,
                )
                try:
                    if client.get("/_workspace/health").status_code == 200:
                        self.client = client
                        return time.monotonic() - started
                except httpx.HTTPError:
                    pass
                client.close()
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited; see {self.home / 'bench-server.log'}")
            time.sleep(0.02)
        raise RuntimeError("server did not answer within 60 s")

    @property
    def api(self) -> httpx.Client:
        assert self.client is not None
        return self.client

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.api.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.client is not None:
            self.client.close()
        tag = _read_json(self.home / "state.json").get("workspace_tag")
        if tag:  # anything left (a killed run of the benchmark) carries the tag
            for process in psutil.process_iter():
                try:
                    if process.environ().get("RAY_CAI_WORKSPACE_TAG") == tag:
                        process.kill()
                except (psutil.Error, OSError):
                    continue


def _read_json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def ok(response: httpx.Response) -> Any:
    if response.status_code != 200:
        raise RuntimeError(
            f"{response.request.method} {response.request.url} -> {response.status_code}: {response.text}"
        )
    return response.json()


def make_apps(server: Server, count: int, name: str) -> tuple[str, list[dict[str, Any]]]:
    api = server.api
    project = ok(api.post("/api/v2/projects", json={"name": name, "template": "local"}))
    while ok(api.get(f"/api/v2/projects/{project['id']}"))["creation_status"] == "creating":
        time.sleep(0.05)
    project_dir = server.home / "projects" / project["id"]
    (project_dir / "http_app.py").write_text((TEST_APPS / "http_app.py").read_text())
    runtime = ok(api.get("/api/v2/runtimes"))["runtimes"][0]["image_identifier"]
    apps = [
        ok(
            api.post(
                f"/api/v2/projects/{project['id']}/applications",
                json={
                    "name": f"a{i}",
                    "subdomain": f"{name}-a{i}",
                    "script": "http_app.py",
                    "runtime_identifier": runtime,
                },
            )
        )
        for i in range(count)
    ]
    wait_running(server, project["id"], count)
    return project["id"], apps


def list_apps(server: Server, project_id: str) -> list[dict[str, Any]]:
    path = f"/api/v2/projects/{project_id}/applications"
    return ok(server.api.get(path, params={"page_size": 1000}))["applications"]


def wait_running(server: Server, project_id: str, count: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        apps = list_apps(server, project_id)
        if len(apps) == count and all(a["status"] == "APPLICATION_RUNNING" for a in apps):
            return
        time.sleep(0.05)
    raise RuntimeError(f"apps not running within {timeout} s")


def routed(server: Server, app: dict[str, Any]) -> bool:
    """A request reaches the app: at its own URL when it has one, else routed by Host."""
    port = int(str(server.api.base_url).rsplit(":", 1)[1].rstrip("/"))
    target, headers = f"http://127.0.0.1:{port}/", {"Host": f"{app['subdomain']}.localhost:{port}"}
    if app.get("url"):
        target, headers = f"{app['url']}/", {}
    try:
        response = server.api.get(target, headers=headers)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def bench_readoption(tree: Path, size: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-readopt-") as tmp:
        server = Server(tree, Path(tmp) / "home")
        try:
            server.start()
            project_id, apps = make_apps(server, size, f"readopt{size}")
            tag = _read_json(server.home / "state.json")["workspace_tag"]
            pids_before = {p.pid for p in psutil.process_iter() if _tagged(p, tag)}
            server.kill()
            started = time.monotonic()
            answered = server.start()
            wait_running(server, project_id, size)
            listed = time.monotonic() - started
            pending = list(apps)
            while pending:
                pending = [a for a in pending if not routed(server, a)]
            all_routed = time.monotonic() - started
            pids_after = {p.pid for p in psutil.process_iter() if _tagged(p, tag)}
            if pids_after != pids_before:
                raise RuntimeError("re-adoption changed the apps' processes")
            return {"apps": size, "answers_s": answered, "all_running_s": listed, "all_routed_s": all_routed}
        finally:
            server.stop()


def _tagged(process: psutil.Process, tag: str) -> bool:
    try:
        return process.environ().get("RAY_CAI_WORKSPACE_TAG") == tag
    except (psutil.Error, OSError):
        return False


def request_rates(trees: dict[str, Path], apps: int, seconds: float, repeat: int) -> dict[str, Any]:
    """Every tree's server up at once with the same apps; rounds alternate between them, so a
    change in the machine's load hits both alike."""
    with tempfile.TemporaryDirectory(prefix="bench-rate-") as tmp:
        servers = {name: Server(tree, Path(tmp) / name) for name, tree in trees.items()}
        try:
            paths = {}
            for name, server in servers.items():
                server.start()
                project_id, created = make_apps(server, apps, "rate")
                paths[name] = (f"/api/v2/projects/{project_id}/applications", created[0]["id"])
            gets: dict[str, list[float]] = {name: [] for name in servers}
            patches: dict[str, list[float]] = {name: [] for name in servers}
            for _ in range(repeat):
                for name, server in servers.items():
                    path, app_id = paths[name]
                    get = _getter(server, path)
                    gets[name].append(_rate(get, seconds))
                    patches[name].append(_rate(_patcher(server, f"{path}/{app_id}"), seconds))
            return {
                name: {
                    "tree": str(trees[name]),
                    "apps": apps,
                    "get_per_s": statistics.median(gets[name]),
                    "get_runs": gets[name],
                    "patch_per_s": statistics.median(patches[name]),
                    "patch_runs": patches[name],
                }
                for name in servers
            }
        finally:
            for server in servers.values():
                server.stop()


def _getter(server: Server, path: str) -> Any:
    return lambda: ok(server.api.get(path, params={"page_size": 1000}))


def _patcher(server: Server, target: str) -> Any:
    counter = iter(range(10**9))
    return lambda: ok(server.api.patch(target, json={"description": f"d{next(counter)}"}))


def _rate(call: Any, seconds: float) -> float:
    for _ in range(20):  # warm up
        call()
    count, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        call()
        count += 1
    return count / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--baseline", type=Path, default=None, help="tree of the in-memory server (e.g. /work/main)"
    )
    parser.add_argument("--sizes", default="1,8,32", help="app counts for the re-adoption timing")
    parser.add_argument("--apps", type=int, default=16, help="apps in the project for the request rates")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_workspace.json")
    args = parser.parse_args()

    results: dict[str, Any] = {"load_before": os.getloadavg(), "readoption": [], "rates": {}}
    for size in [int(s) for s in args.sizes.split(",") if s]:
        figures = bench_readoption(REPO, size)
        results["readoption"].append(figures)
        print(
            f"re-adopt {size:3d} apps: answers {figures['answers_s']:.2f} s, "
            f"all RUNNING {figures['all_running_s']:.2f} s, all routed {figures['all_routed_s']:.2f} s"
        )
    trees = {"sqlite": REPO} if args.baseline is None else {"sqlite": REPO, "in_memory": args.baseline}
    rates = request_rates(trees, args.apps, args.seconds, args.repeat)
    results["rates"] = rates
    for name, figures in rates.items():
        print(
            f"{name:9s} ({figures['tree']}): GET applications {figures['get_per_s']:.0f}/s "
            f"{[round(r) for r in figures['get_runs']]}, PATCH application {figures['patch_per_s']:.0f}/s "
            f"{[round(r) for r in figures['patch_runs']]}"
        )
    status = 0
    if "in_memory" in rates:
        ratio = rates["sqlite"]["get_per_s"] / rates["in_memory"]["get_per_s"]
        results["get_ratio"] = ratio
        verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
        print(f"GET applications SQLite / in-memory = {ratio:.2f} (target >= {TARGET_RATIO}): {verdict}")
        status = 0 if ratio >= TARGET_RATIO else 1
    results["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
