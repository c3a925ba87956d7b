"""Pure logic of jobs that outlive their cluster: records, attempts, deadlines, log bounds, run ids,
scheduled runs in the jobs config, cron times of the local workspace, driver log names."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from ray_serve_cai.access.jobs import JobInputError, JobPolicy
from ray_serve_cai.access.logs import driver_log_job
from ray_serve_cai.cli.run import run_id_of
from ray_serve_cai.config import ConfigError, parse_deploy_spec
from ray_serve_cai.config.history import (
    FAILED,
    LOST_MESSAGE,
    META_ATTEMPT,
    META_DEADLINE,
    META_RECORD,
    META_SUBMITTER,
    META_TIMEOUT,
    STOPPED,
    SUCCEEDED,
    JobRecord,
    cap_log,
    lost,
    merge_job,
    retry_id,
    tracked,
)
from ray_serve_cai.deploy.steps import scheduled_run_argv
from ray_serve_cai.node.history import LogKeeper
from ray_serve_cai.workspace.schedules import ScheduleError, next_time


def ray_row(submission_id: str, status: str, **fields: Any) -> dict[str, Any]:
    metadata = fields.pop("metadata", {})
    return {
        "type": "SUBMISSION",
        "submission_id": submission_id,
        "status": status,
        "entrypoint": "python train.py",
        "metadata": metadata,
        "runtime_env": {"env_vars": {"SECRET_TOKEN": "s3cr3t-value"}},
        **fields,
    }


def test_attempts_group_under_their_record_and_the_newest_decides() -> None:
    meta = {META_RECORD: "r1", META_SUBMITTER: "ana@laptop"}
    record = merge_job(
        None, "c", ray_row("r1", FAILED, metadata={**meta, META_ATTEMPT: "1"}, message="exit 3")
    )
    record = merge_job(record, "c", ray_row("r1-retry1", "RUNNING", metadata={**meta, META_ATTEMPT: "2"}))
    assert [a.submission_id for a in record.attempts] == ["r1", "r1-retry1"]
    assert record.status == "RUNNING" and record.submitter == "ana@laptop"
    done = merge_job(record, "c", ray_row("r1-retry1", SUCCEEDED, metadata={**meta, META_ATTEMPT: "2"}))
    assert done.status == SUCCEEDED and len(done.attempts) == 2
    assert done.summary()["attempts"] == 2 and done.summary()["cluster"] == "c"
    assert "s3cr3t-value" not in done.to_json(), "the runtime env (and its secrets) never lands in a record"


def test_a_stop_at_the_deadline_is_failed_with_the_deadline_as_reason() -> None:
    deadline = time.time() - 5
    meta = {META_DEADLINE: f"{deadline:.3f}", META_TIMEOUT: "10"}
    stopped = merge_job(
        None,
        "c",
        ray_row("j", STOPPED, metadata=meta, end_time=int((deadline + 1) * 1000), message="stopped"),
    )
    assert stopped.status == FAILED and "deadline" in stopped.message and "10s" in stopped.message
    by_user = merge_job(
        None,
        "c",
        ray_row("k", STOPPED, metadata=meta, end_time=int((deadline - 3) * 1000), message="stopped"),
    )
    assert by_user.status == STOPPED, "a stop before the deadline is the user's"


def test_records_round_trip_and_lost_jobs_end_failed() -> None:
    record = merge_job(None, "c", ray_row("j", "RUNNING", start_time=1000))
    again = JobRecord.from_json(record.to_json())
    assert again == record
    gone = lost(again, 5000)
    assert gone.status == FAILED and gone.message == LOST_MESSAGE and gone.end_time == 5000
    assert lost(gone, 9000) == gone


def test_drivers_of_ray_init_clients_have_no_record() -> None:
    assert tracked({"type": "DRIVER", "submission_id": None, "job_id": "01000000"}) is None
    assert tracked(ray_row("x", "RUNNING")) is not None
    assert retry_id("r", 1) == "r" and retry_id("r", 3) == "r-retry2"


def test_driver_logs_keep_the_newest_part() -> None:
    text = "".join(f"line {i}\n" for i in range(100_000))
    capped = cap_log(text, cap=10_000)
    assert capped.startswith("[ray-cai: earlier output dropped")
    assert capped.endswith("line 99999\n") and len(capped.encode()) < 10_200
    assert cap_log("short\n", cap=10_000) == "short\n"


def test_node_logs_are_kept_as_they_grow_rotated_and_capped(tmp_path: Path) -> None:
    session = tmp_path / "session_1"
    (session / "logs" / "events").mkdir(parents=True)
    kept = tmp_path / "kept"
    keeper = LogKeeper(lambda: session, kept, node_cap=4000, file_cap=1000)
    raylet = session / "logs" / "raylet.out"
    raylet.write_text("a" * 300)
    (session / "logs" / "events" / "event.log").write_text("e\n")
    assert keeper.sync() == 302
    raylet.write_text("a" * 300 + "b" * 200)  # grows: only the new bytes are copied
    assert keeper.sync() == 200
    assert (kept / "raylet.out").read_text() == "a" * 300 + "b" * 200
    assert (kept / "events" / "event.log").read_text() == "e\n"
    with raylet.open("a") as handle:
        handle.write("c" * 600)  # past the file cap: rotated once into raylet.out.1
    keeper.sync()
    assert (kept / "raylet.out.1").stat().st_size == 1100
    for i in range(8):
        (session / "logs" / f"worker-{i}.out").write_text(str(i) * 900)
    keeper.sync()
    total = sum(p.stat().st_size for p in kept.rglob("*") if p.is_file())
    assert total <= 4000, "the node's kept logs stay under its cap"
    assert not (kept / "raylet.out.1").exists(), "rotated files go first"

    # A new Ray session (the node joined again): the earlier file of that name is kept as `.1`.
    new_session = tmp_path / "session_2"
    (new_session / "logs").mkdir(parents=True)
    (new_session / "logs" / "raylet.out").write_text("new\n")
    keeper.source = lambda: new_session
    keeper.sync()
    assert (kept / "raylet.out").read_text() == "new\n"
    assert (kept / "SESSION").read_text() == "session_2\n"


def test_policy_and_run_identity() -> None:
    with pytest.raises(JobInputError, match="--max-retries"):
        JobPolicy(max_retries=-1).validate()
    with pytest.raises(JobInputError, match="--timeout"):
        JobPolicy(timeout=0).validate()
    one = run_id_of("cfg", "c", "python a.py", "", JobPolicy())
    assert one == run_id_of("cfg", "c", "python a.py", "", JobPolicy())
    assert one != run_id_of("cfg", "c", "python b.py", "", JobPolicy())
    assert one != run_id_of("cfg2", "c", "python a.py", "", JobPolicy())
    assert one != run_id_of("cfg", "c", "python a.py", "", JobPolicy(max_retries=1))


JOBS = {"git_sync": {"name": "Git Sync", "script": "cai_integration/git_sync.py"}}


def test_scheduled_runs_in_the_jobs_config() -> None:
    spec = parse_deploy_spec(
        {
            "jobs": JOBS,
            "scheduled_runs": {
                "nightly": {
                    "name": "Nightly training",
                    "command": "python train.py --epochs 3",
                    "schedule": "0 2 * * *",
                    "timezone": "Europe/Berlin",
                    "cluster": "nightly",
                    "max_retries": 2,
                    "timeout": 3600,
                }
            },
        },
        env={},
    )
    run = spec.scheduled_runs["nightly"]
    assert run.key == "nightly" and run.cluster_config == "ray_cluster_config.yaml"
    with pytest.raises(ConfigError) as caught:
        parse_deploy_spec(
            {
                "jobs": JOBS,
                "scheduled_runs": {
                    "bad": {
                        "name": "Git Sync",
                        "command": " ",
                        "schedule": "every day",
                        "cluster_config": "/abs",
                    }
                },
            },
            env={},
        )
    text = str(caught.value)
    for field in ("bad.name", "bad.command", "bad.schedule", "bad.cluster_config"):
        assert f"scheduled_runs.{field}" in text, text


def test_the_scheduled_job_becomes_ray_cai_run() -> None:
    env = {
        "RAY_CAI_RUN_COMMAND": "python train.py && echo done",
        "RAY_CAI_RUN_CONFIG": "configs/nightly.yaml",
        "RAY_CAI_RUN_CLUSTER": "nightly",
        "RAY_CAI_RUN_MAX_RETRIES": "2",
        "RAY_CAI_RUN_TIMEOUT": "0",
        "RAY_CAI_RUN_KEEP": "0",
    }
    argv = scheduled_run_argv(env)
    assert argv[1:4] == ["-m", "ray_serve_cai.cli.main", "run"]
    assert argv[4:] == [
        "--config", "configs/nightly.yaml", "--cluster", "nightly", "--max-retries", "2",
        "--", "python train.py && echo done",
    ]  # fmt: skip
    with pytest.raises(Exception, match="RAY_CAI_RUN_COMMAND"):
        scheduled_run_argv({})


def test_cron_times_follow_the_timezone() -> None:
    noon_utc = datetime(2026, 3, 2, 12, 0, 30, tzinfo=timezone.utc).timestamp()
    at = next_time("0 13 * * *", "", noon_utc)
    assert datetime.fromtimestamp(at, tz=timezone.utc).hour == 13
    berlin = next_time("0 13 * * *", "Europe/Berlin", noon_utc)  # 13:00 CET is 12:00 UTC: tomorrow
    assert datetime.fromtimestamp(berlin, tz=timezone.utc).strftime("%d %H") == "03 12"
    assert (
        next_time("* * * * *", "UTC", noon_utc)
        == datetime(2026, 3, 2, 12, 1, tzinfo=timezone.utc).timestamp()
    )
    for schedule, zone in (("61 * * * *", ""), ("* * * *", ""), ("* * * * *", "Mars/Olympus")):
        with pytest.raises(ScheduleError):
            next_time(schedule, zone, noon_utc)


@pytest.mark.parametrize(
    ("filename", "job"),
    [
        ("job-driver-raysubmit_0a1b2c3d4e5f6a7b.log", "raysubmit_0a1b2c3d4e5f6a7b"),
        ("job-driver-run-1a2b3c4d5e6f-abc123-retry1.log", "run-1a2b3c4d5e6f-abc123-retry1"),
        ("job-driver-logs.ticks.log", "logs.ticks"),
        ("job-driver-.log", None),
        ("job-driver-a/b.log", None),
        ("job-driver-x.log.1", None),
        ("logs/job-driver-x.log", None),
        ("raylet.out", None),
    ],
)
def test_a_job_driver_log_names_its_job(filename: str, job: str | None) -> None:
    """`ray-cai logs --file job-driver-<id>.log` looks for the node of job <id>'s driver."""
    assert driver_log_job(filename) == job
