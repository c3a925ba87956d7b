"""End to end: Ray jobs and node logs through the head's application URL, with real Ray.

The tier's shared cluster (`ray_cluster`: 1 head + 1 worker) on the local workspace. Through the app
URL, with the workspace API key as CML wants it (`Authorization: Bearer`): Ray's own `ray job submit`
follows a job's logs live; `ray-cai job submit` exits 0 / 1 for a succeeding / failing job, Ctrl-C
stops following and not the job, `job stop` stops a running job, `job list --json` lists them;
uncommitted code ships with a local `working_dir`; the workflow's smoke step reaches every node; Ray's
Python SDK and curl work; `ray-cai logs` reads and follows a node's Ray logs, and a job's driver log on
the node its driver runs on (a worker in pods, where the head has fault tolerance).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from ruamel.yaml import YAML
from support.cli import SHARED_HEAD, SHARED_PROJECT, SHARED_WORKER, LocalCluster
from support.fakes import REPO_ROOT

PROJECT, HEAD, WORKER = SHARED_PROJECT, SHARED_HEAD, SHARED_WORKER
WORKFLOW = REPO_ROOT / ".github" / "workflows" / "deploy-ray-cluster.yml"
# Prints a numbered tick every second: a follower that streams sees tick 0 long before the job ends.
TICKS = "import time\nfor i in range({n}):\n    print(f'tick {{i}}', flush=True)\n    time.sleep(1)\n"


@pytest.fixture(scope="module")
def cluster(ray_cluster: LocalCluster) -> LocalCluster:
    """The tier's shared cluster (1 head + 1 worker): these tests only use it."""
    return ray_cluster


@pytest.fixture(scope="module")
def head_url(ray_cluster: LocalCluster) -> str:
    """The head's application URL as the CML client builds it (the local listener's URL)."""
    return ray_cluster.app_url(HEAD)


def submit(cluster: LocalCluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = cluster.popen("job", "submit", *args)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def job(cluster: LocalCluster, submission_id: str) -> dict[str, Any]:
    proc = cluster.cli("job", "status", submission_id, "--json")
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def status(cluster: LocalCluster) -> dict[str, Any]:
    proc = cluster.cli("status", "--json")
    return dict(json.loads(proc.stdout))


def client_env(cluster: LocalCluster, **extra: str) -> dict[str, str]:
    """What a user's shell outside the cluster has: no Ray settings, the key only in RAY_JOB_HEADERS."""
    headers = json.dumps({"Authorization": f"Bearer {cluster.workspace.api_key}"})
    return {**cluster.env, "RAY_JOB_HEADERS": headers, **extra}


def read_lines(stream: Any, into: list[tuple[float, str]]) -> threading.Thread:
    """Collect (arrival time, line) from a pipe in a thread, as they arrive."""

    def run() -> None:
        for line in stream:
            into.append((time.monotonic(), line.rstrip("\n")))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_for_line(lines: list[tuple[float, str]], text: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for at, line in list(lines):
            if text in line:
                return at
        time.sleep(0.05)
    raise AssertionError(f"no line with {text!r} within {timeout}s; got {[line for _, line in lines][-20:]}")


def test_ray_job_submit_through_the_app_url_follows_the_logs_live(
    cluster: LocalCluster, head_url: str
) -> None:
    """Ray's own CLI: `ray job submit --address <app url>` with the key in RAY_JOB_HEADERS (the same
    as --headers, kept out of argv), following the logs over Ray's WebSocket tail."""
    job_id = "ray-cli-live"
    argv = ["ray", "job", "submit", "--address", head_url, "--submission-id", job_id]
    # 12 ticks a second apart, the first and the last ≥ 5 s apart: live, with room for a loaded
    # machine's log monitor to hand over a few lines at once at either end.
    argv += ["--", "python", "-c", TICKS.format(n=12)]
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, env=client_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[tuple[float, str]] = []
    reader = read_lines(proc.stdout, lines)
    try:
        first = wait_for_line(lines, "tick 0", timeout=120)
        status_at_first_line = job(cluster, job_id)["status"]
        assert proc.wait(timeout=120) == 0, "\n".join(line for _, line in lines)
    finally:
        proc.kill()
    reader.join(5)
    last = wait_for_line(lines, "tick 11", timeout=1)
    print(f"\nray job submit: first line {first - started:.1f}s after start, last {last - first:.1f}s later")
    assert status_at_first_line == "RUNNING"
    assert last - first >= 5, "the lines arrived together: the logs were not followed live"
    assert "succeeded" in "\n".join(line for _, line in lines).lower()


def test_ray_cai_job_submit_exit_codes_follow_the_job(cluster: LocalCluster) -> None:
    ok = submit(cluster, "--", "python", "-c", TICKS.format(n=3) + "import os; print('cwd', os.getcwd())")
    assert ok.returncode == 0, ok.stderr
    assert [line for line in ok.stdout.splitlines() if line.startswith("tick")] == [
        "tick 0",
        "tick 1",
        "tick 2",
    ]
    # The job runs in the project directory: the code deployed from git is there.
    assert f"cwd {cluster.workspace.project_dir(cluster.project_id)}" in ok.stdout
    assert "SUCCEEDED" in ok.stderr and "Ctrl-C stops following" in ok.stderr
    assert "polling the logs" not in ok.stderr, "the WebSocket log tail did not pass the app URL"

    failed = submit(cluster, "--", "python", "-c", "import sys; print('about to fail'); sys.exit(3)")
    assert failed.returncode == 1, failed.stderr
    assert "about to fail" in failed.stdout
    assert "FAILED" in failed.stderr and "exit code 3" in failed.stderr


def test_ctrl_c_stops_following_not_the_job_and_job_stop_stops_it(cluster: LocalCluster) -> None:
    job_id = "interrupt-me"
    follower = cluster.popen(
        "job", "submit", "--submission-id", job_id, "--", "python", "-c", TICKS.format(n=300)
    )
    lines: list[tuple[float, str]] = []
    reader = read_lines(follower.stdout, lines)
    try:
        wait_for_line(lines, "tick 1", timeout=120)
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=30) == 130
        stderr = follower.stderr.read() if follower.stderr else ""
    finally:
        follower.kill()
    reader.join(5)
    assert "keeps running" in stderr and f"ray-cai job stop {job_id}" in stderr, stderr
    assert job(cluster, job_id)["status"] == "RUNNING"

    # Follow it again, then stop it from another shell: the follower ends with exit 1 (STOPPED).
    again = cluster.popen("job", "logs", job_id, "--follow")
    lines = []
    reader = read_lines(again.stdout, lines)
    try:
        wait_for_line(lines, "tick 0", timeout=60)
        stop = cluster.cli("job", "stop", job_id, "--json")
        assert stop.returncode == 0, stop.stderr
        assert json.loads(stop.stdout) == {"submission_id": job_id, "stopped": True, "status": "STOPPED"}
        assert again.wait(timeout=60) == 1
        stderr = again.stderr.read() if again.stderr else ""
    finally:
        again.kill()
    assert "STOPPED" in stderr
    assert job(cluster, job_id)["status"] == "STOPPED"
    assert json.loads(cluster.cli("job", "stop", job_id, "--json").stdout)["stopped"] is False


def test_job_list_json_and_status_of_no_wait_jobs(cluster: LocalCluster) -> None:
    quick = submit(cluster, "--no-wait", "--json", "--submission-id", "listed-ok", "--", "true")
    assert quick.returncode == 0, quick.stderr
    assert json.loads(quick.stdout)["submission_id"] == "listed-ok"
    assert (
        submit(cluster, "--no-wait", "--submission-id", "listed-bad", "--", "false").stdout.strip()
        == "listed-bad"
    )

    def statuses() -> dict[str, str]:
        proc = cluster.cli("job", "list", "--json")
        assert proc.returncode == 0, proc.stderr
        return {
            j["submission_id"]: j["status"] for j in json.loads(proc.stdout)["jobs"] if j["submission_id"]
        }

    deadline = time.monotonic() + 120
    seen = statuses()
    while (seen.get("listed-ok"), seen.get("listed-bad")) != ("SUCCEEDED", "FAILED"):
        assert time.monotonic() < deadline, f"jobs did not end: {seen}"
        time.sleep(1)
        seen = statuses()
    plain = cluster.cli("job", "list")
    assert "listed-ok" in plain.stdout and "SUCCEEDED" in plain.stdout


def test_uncommitted_code_ships_with_a_local_working_dir(cluster: LocalCluster, tmp_path: Path) -> None:
    code = tmp_path / "uncommitted"
    code.mkdir()
    (code / "not_in_git.py").write_text("print('shipped from the laptop')\n")
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(
        json.dumps({"working_dir": str(code), "env_vars": {"GREETING": "hi"}})
    )  # JSON is YAML
    proc = submit(cluster, "--runtime-env", str(env_file), "--", "python not_in_git.py && printenv GREETING")
    assert proc.returncode == 0, proc.stderr
    assert "shipped from the laptop\nhi" in proc.stdout
    assert "uploading" in proc.stderr


def test_the_workflow_smoke_step_reaches_every_node(cluster: LocalCluster, tmp_path: Path) -> None:
    """The step of `.github/workflows/deploy-ray-cluster.yml` as the runner runs it (bash, ray-cai on
    PATH, CML_HOST/CML_API_KEY/CML_PROJECT_NAME), against the local cluster."""
    workflow = YAML(typ="safe", pure=True).load(WORKFLOW.read_text())
    step = next(s for s in workflow["jobs"]["deploy"]["steps"] if s.get("name") == "Smoke job on every node")
    (tmp_path / "ray_cluster_config.yaml").write_text(cluster.config.read_text())
    summary = tmp_path / "summary.md"
    env = {
        **cluster.env,
        **step["env"],
        "CML_HOST": cluster.workspace.url,
        "CML_API_KEY": cluster.workspace.api_key,
        "CML_PROJECT_NAME": PROJECT,
        "GITHUB_RUN_ID": "4242",
        "GITHUB_RUN_ATTEMPT": "1",
        "GITHUB_STEP_SUMMARY": str(summary),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    run = subprocess.run(
        ["bash", "-e", "-c", step["run"]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    alive = {n["node_id"] for n in status(cluster)["ray"]["nodes"] if n["alive"]}
    assert len(alive) == 2
    report = summary.read_text()
    assert "Smoke job: passed" in report and "Reached 2 of 2 alive nodes" in report, report
    assert all(node in report for node in alive), report


def test_ray_python_sdk_and_curl_through_the_app_url(
    cluster: LocalCluster, head_url: str, tmp_path: Path
) -> None:
    sdk = textwrap.dedent(
        """
        import asyncio, json, os, sys
        from ray.job_submission import JobSubmissionClient
        client = JobSubmissionClient(sys.argv[1], headers=json.loads(os.environ["RAY_JOB_HEADERS"]))
        job = client.submit_job(entrypoint="python -c \\"print('from the sdk')\\"", submission_id="sdk-job")

        async def follow():
            async for chunk in client.tail_job_logs(job):
                print(chunk, end="", flush=True)

        asyncio.run(follow())
        print("STATUS", client.get_job_status(job))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", sdk, head_url],
        env=client_env(cluster),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from the sdk" in proc.stdout and "STATUS SUCCEEDED" in proc.stdout, proc.stdout

    # curl: the header from a file (`-H @file`), so the key is not in argv either.
    header = tmp_path / "auth.header"
    header.write_text(f"Authorization: Bearer {cluster.workspace.api_key}\n")
    header.chmod(0o600)
    jobs = subprocess.run(
        ["curl", "-sSf", "-H", f"@{header}", f"{head_url}/api/jobs/sdk-job"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert jobs.returncode == 0, jobs.stderr
    assert json.loads(jobs.stdout)["status"] == "SUCCEEDED"
    nodes = subprocess.run(
        ["curl", "-sSf", "-H", f"@{header}", f"{head_url}/api/v0/nodes?detail=false"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert nodes.returncode == 0, nodes.stderr
    assert len(json.loads(nodes.stdout)["data"]["result"]["result"]) == 2
    refused = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{head_url}/api/jobs/"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.stdout in ("401", "403"), refused.stdout


def test_a_cluster_that_never_served_runs_no_serve(cluster: LocalCluster, head_url: str) -> None:
    """Serve starts on demand: the shared cluster has no `serve:`, so no Serve controller runs (nor
    its proxies), the head still publishes where Serve would run, and `/serve/` says how it starts."""
    ray_view = cluster.cli_json("status")["ray"]
    assert ray_view["serve_proxy_location"] in ("EveryNode", "HeadOnly") and ray_view["serve_http_port"]
    auth = {"Authorization": f"Bearer {cluster.workspace.api_key}"}
    query = "filter_keys=name&filter_predicates=%3D&filter_values=SERVE_CONTROLLER_ACTOR&detail=false"
    actors = httpx.get(f"{head_url}/api/v0/actors?{query}", headers=auth, timeout=60, trust_env=False)
    assert actors.status_code == 200, actors.text
    assert actors.json()["data"]["result"]["result"] == []
    answer = httpx.get(f"{head_url}/serve/", headers=auth, timeout=60, trust_env=False)
    assert answer.status_code == 503 and "Ray Serve is not running" in answer.json()["error"], answer.text


def test_node_logs_list_read_and_follow(cluster: LocalCluster) -> None:
    cluster_status = status(cluster)
    node_names = {n["node_id"]: n["node_name"] for n in cluster_status["ray"]["nodes"]}
    worker_id = next(node_id for node_id, name in node_names.items() if name == WORKER)
    listed = cluster.cli("logs", "worker-0", "--list", "--json")
    assert listed.returncode == 0, listed.stderr
    listing = json.loads(listed.stdout)
    assert listing["node"] == WORKER and listing["node_id"] == worker_id
    assert "raylet.out" in listing["files"]["raylet"]

    read = cluster.cli("logs", WORKER, "--tail", "5", "--json")
    assert read.returncode == 0, read.stderr
    body = json.loads(read.stdout)
    assert body["file"] == "raylet.out" and 1 <= len(body["text"].strip().splitlines()) <= 5
    whole = cluster.cli("logs", "worker-0", "--tail", "-1")
    assert whole.returncode == 0, whole.stderr
    assert worker_id in whole.stdout and "(raylet)" in whole.stdout  # the worker's own raylet log

    # Follow the driver log of a job that prints a tick a second, naming no node: `logs` reads it on
    # the node Ray runs the driver on, and the ticks arrive one by one. The follower starts after the
    # job (a CLI process start, seconds on a loaded machine; a job still PENDING is waited for) and
    # gets what was written before it at once: 12 ticks leave several seconds of them to stream.
    driver_log = "job-driver-logs-ticks.log"
    submitted = submit(
        cluster, "--no-wait", "--submission-id", "logs-ticks", "--", "python", "-c", TICKS.format(n=12)
    )
    assert submitted.returncode == 0, submitted.stderr
    follower = cluster.popen("logs", "--file", driver_log, "--follow", "--tail", "-1")
    lines: list[tuple[float, str]] = []
    reader = read_lines(follower.stdout, lines)
    try:
        first = wait_for_line(lines, "tick 0", timeout=120)
        last = wait_for_line(lines, "tick 11", timeout=60)
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=30) == 0
        followed = follower.stderr.read() if follower.stderr else ""
    finally:
        follower.kill()
    reader.join(5)
    assert last - first >= 3, "the lines arrived together: the log was not streamed"
    # The node Ray's job info names; with head fault tolerance on (pods) a worker, as `job submit`
    # places drivers there, else the head.
    ray_job = cluster.workspace.app_request(cluster.apps()[HEAD], "GET", "/api/jobs/logs-ticks").json()
    driver = node_names[ray_job["driver_node_id"]]
    assert driver == (WORKER if (cluster_status["head_fault_tolerance"] or {}).get("enabled") else HEAD)
    assert f"job logs-ticks's driver runs on {driver}" in followed, followed
    print(f"\nlogs --file {driver_log} --follow: the driver's node {driver}, {last - first:.1f}s of ticks")

    # Asked for the head's file of that name: what Ray wrote there (the driver's lines when it ran
    # there), with a note naming the driver's node when it ran elsewhere.
    on_head = cluster.cli("logs", "head", "--file", driver_log, "--tail", "-1")
    assert on_head.returncode == 0, on_head.stderr
    if driver == HEAD:
        assert "tick 11" in on_head.stdout and "driver runs on" not in on_head.stderr, on_head.stderr
    else:
        assert "Runtime env is setting up" in on_head.stdout and "tick 0" not in on_head.stdout
        assert f"driver runs on {driver}, not on {HEAD}" in on_head.stderr, on_head.stderr


def documented_blocks() -> list[tuple[str, str]]:
    """The (language, code) of the two fenced blocks after the `tested:` marker in DEPLOYMENT_GUIDE.md."""
    text = (REPO_ROOT / "DEPLOYMENT_GUIDE.md").read_text()
    after = text[text.index("<!-- tested: tests/ray/test_jobs_e2e.py") :]
    blocks = re.findall(r"```(\w+)\n(.*?)```", after, flags=re.S)
    return [(lang, code) for lang, code in blocks[:2]]


def test_the_documented_commands_run(cluster: LocalCluster, tmp_path: Path) -> None:
    """The guide's block of commands, as a user runs them after `eval "$(ray-cai workspace env)"`."""
    (bash_lang, commands), (python_lang, program) = documented_blocks()
    assert (bash_lang, python_lang) == ("bash", "python")
    (tmp_path / "ray_cluster_config.yaml").write_text(cluster.config.read_text())
    env = {
        **cluster.env,
        "CML_HOST": cluster.workspace.url,
        "CML_API_KEY": cluster.workspace.api_key,
        "CML_PROJECT_NAME": PROJECT,
        "HOME": str(tmp_path),  # the curl header file goes here, not into the real home
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    script = f"set -euo pipefail\n{commands}\npython - <<'PYTHON'\n{program}PYTHON\n"
    run = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert "'CPU': 2.0" in run.stdout and "done" in run.stdout  # ray-cai's two jobs
    assert "raylet" in run.stdout and "SUCCEEDED" in run.stdout and "42" in run.stdout
    assert '"submission_id": "docs-demo"' in run.stdout  # curl
    assert "succeeded" in run.stdout + run.stderr  # Ray's CLI
