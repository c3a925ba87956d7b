"""Pure checks of the spec-following parts: RFC 3339 timestamps on every supported Python, the
conformance checker against CML's spec, the documented filter values of the workspace's lists."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from support.conformance import find_spec

from ray_serve_cai.cml import JobRun, parse_timestamp
from ray_serve_cai.cml import _models as models
from ray_serve_cai.deploy import jobs as deploy_jobs
from ray_serve_cai.workspace.conformance import SpecChecker
from ray_serve_cai.workspace.errors import WorkspaceAPIError
from ray_serve_cai.workspace.listing import APP_FILTER_KEYS, list_page

# What Python 3.10's datetime.fromisoformat accepts: 0, 3 or 6 fractional digits, +HH:MM, no "Z".
PY310_ISOFORMAT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d{3}|\.\d{6})?)?([+-]\d\d:\d\d)?$")


class Py310Datetime(datetime):
    """datetime whose fromisoformat refuses what Python 3.10's refuses."""

    @classmethod
    def fromisoformat(cls, text: str) -> Any:  # type: ignore[override]
        if not PY310_ISOFORMAT.match(text):
            raise ValueError(f"Invalid isoformat string: {text!r}")
        return datetime.fromisoformat(text)


UTC = timezone.utc
CASES = [
    ("2026-03-04T05:06:07Z", datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)),
    ("2026-03-04T05:06:07.12Z", datetime(2026, 3, 4, 5, 6, 7, 120000, tzinfo=UTC)),
    ("2026-03-04T05:06:07.123Z", datetime(2026, 3, 4, 5, 6, 7, 123000, tzinfo=UTC)),
    ("2026-03-04T05:06:07.123456Z", datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)),
    ("2026-03-04T05:06:07.123456789Z", datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)),
    (
        "2026-03-04T05:06:07.12+02:00",
        datetime(2026, 3, 4, 5, 6, 7, 120000, tzinfo=timezone(timedelta(hours=2))),
    ),
    (
        "2026-03-04T05:06:07.123456789-05:30",
        datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=timezone(-timedelta(hours=5, minutes=30))),
    ),
    ("2026-03-04T05:06:07+0100", datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=1)))),
    ("2026-03-04t05:06:07.5z", datetime(2026, 3, 4, 5, 6, 7, 500000, tzinfo=UTC)),
]


@pytest.fixture
def python310(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "datetime", Py310Datetime)


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_timestamps_parse_as_python_3_10_would_allow(python310: None, text: str, expected: datetime) -> None:
    parsed = parse_timestamp(text)
    assert parsed == expected and parsed.utcoffset() == expected.utcoffset()
    assert deploy_jobs._timestamp(text) == expected  # the chain compares run and job times with it


@pytest.mark.parametrize(
    "text", ["", "yesterday", "2026-03-04", "2026-13-04T05:06:07Z", "2026-03-04T05:06:07.Z"]
)
def test_non_timestamps_are_refused(python310: None, text: str) -> None:
    with pytest.raises(ValueError):
        parse_timestamp(text)


def test_run_objects_take_every_form(python310: None) -> None:
    run = JobRun.model_validate(
        {
            "id": "r",
            "status": "ENGINE_SKIPPED",
            "created_at": "2026-03-04T05:06:07.123456789Z",
            "finished_at": "2026-03-04T05:06:08Z",
        }
    )
    assert run.created_at == CASES[4][1] and run.is_terminal and run.skipped and not run.is_active


# ---------------------------------------------------------------- the conformance checker


@pytest.fixture(scope="module")
def checker() -> SpecChecker:
    return SpecChecker.from_file(find_spec())


def test_answers_are_checked_against_the_operations_schema(checker: SpecChecker) -> None:
    op = checker.match("GET", "/api/v2/projects/p/jobs/j")
    assert op is not None and op.operation_id == "GetJob"
    good = {"id": "j", "name": "n", "timeout": "30", "created_at": "2026-03-04T05:06:07.123456Z"}
    assert checker.check_response(op, "GET", "/x", 200, json.dumps(good).encode()) == []
    bad = {**good, "timeout": 30, "started_at": None, "finished": 1}
    problems = checker.check_response(op, "GET", "/x", 200, json.dumps(bad).encode())
    assert any("field timeout" in p and "'string'" in p for p in problems)
    assert any("'finished', 'started_at' were unexpected" in p for p in problems)
    error = {"error": "x", "code": 5, "message": "x", "details": []}
    assert checker.check_response(op, "GET", "/x", 404, json.dumps(error).encode()) == []
    assert checker.check_response(op, "GET", "/x", 404, b'{"code": "5"}') != []


def test_requests_of_our_client_use_only_writable_documented_fields(checker: SpecChecker) -> None:
    create = checker.match("POST", "/api/v2/projects/p/jobs")
    body = json.dumps({"name": "n", "script": "s.py", "parent_job_id": "a", "description": "d"}).encode()
    problems = checker.check_request(create, "POST", "/x", "", "application/json", body)
    assert any("deprecated" in p and "parent_job_id" in p for p in problems)
    assert any("'description' was unexpected" in p for p in problems)
    update = checker.match("PATCH", "/api/v2/projects/p/jobs/j")
    problems = checker.check_request(update, "PATCH", "/x", "", "application/json", b'{"paused": true}')
    assert problems == ["request field 'paused' is read-only (CML ignores it)"]
    apps = checker.match("GET", "/api/v2/projects/p/applications")
    query = (
        "search_filter=" + json.dumps({"status": "running", "full_name": "x"}) + "&sort=-created_at&limit=3"
    )
    problems = checker.check_request(apps, "GET", "/x", query, "", b"")
    assert any("'full_name' is not documented" in p for p in problems)
    assert any("'limit' is not a parameter of ListApplications" in p for p in problems)
    upload = checker.match("POST", "/api/v2/projects/p/files")
    assert checker.check_request(upload, "POST", "/x", "", "application/json", b"{}") != []
    assert (
        checker.match("POST", "/api/v2/projects/p/files/a%2Fb.txt:download").operation_id
        == "DownloadProjectFile"
    )
    assert checker.check_request(None, "GET", "/api/v2/nowhere", "", "", b"") != []


# ---------------------------------------------------------------- the workspace's list semantics


def test_status_filter_takes_the_documented_values() -> None:
    items = [{"id": "a", "status": "APPLICATION_RUNNING"}, {"id": "b", "status": "APPLICATION_STOPPED"}]

    def ids(criteria: dict[str, str]) -> list[str]:
        page = list_page(items, "applications", search_filter=json.dumps(criteria), sort=None, page_size=None,
                         page_token=None, filter_keys=APP_FILTER_KEYS)  # fmt: skip
        return [item["id"] for item in page["applications"]]

    assert ids({"status": "running"}) == ["a"]
    assert ids({"status": "stopped"}) == ["b"]
    assert ids({"status": "APPLICATION_RUNNING"}) == ["a"]
    assert ids({"status": "run"}) == []  # a value, not a substring
    with pytest.raises(WorkspaceAPIError, match="'project_id' is not supported"):
        ids({"project_id": "x"})
