"""Unit tests of the CML client's pure parts: settings, redaction, error mapping, backoff, models.

``httpx.MockTransport`` is used only for the retry arithmetic and error parsing; behaviour against a
real server is in ``test_cml_client.py`` (the local workspace).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable

import httpx
import pytest

from ray_serve_cai.cml import (
    AmbiguousName,
    Application,
    BadRequest,
    CMLAPIError,
    CMLClient,
    CMLConnectionError,
    CMLError,
    CMLSettings,
    CMLSettingsError,
    Conflict,
    CreateApplication,
    CreateJob,
    CreateOutcomeUnknown,
    Forbidden,
    Job,
    JobRun,
    NotFound,
    Project,
    RateLimited,
    RetryPolicy,
    ServerError,
    Unauthorized,
)
from ray_serve_cai.cml._errors import error_from_response
from ray_serve_cai.cml._retry import is_action_path, parse_retry_after
from ray_serve_cai.cml._transport import LoopbackTransport, ssl_context

KEY = "sk-unit-test-0123456789abcdef"


# -- settings ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://ml.example.cloudera.site", "https://ml.example.cloudera.site"),
        ("https://ml.example.cloudera.site/", "https://ml.example.cloudera.site"),
        ("https://ml.example.cloudera.site/api/v2", "https://ml.example.cloudera.site"),
        ("https://ml.example.cloudera.site/api/v2/", "https://ml.example.cloudera.site"),
        ("ml.example.cloudera.site", "https://ml.example.cloudera.site"),
        ("ML.Example.cloudera.site:8443", "https://ml.example.cloudera.site:8443"),
        ("http://localhost:8123", "http://localhost:8123"),
        ("localhost:8123", "http://localhost:8123"),
    ],
)
def test_host_is_normalised(given: str, expected: str) -> None:
    assert CMLSettings(host=given, api_key=KEY).host == expected


@pytest.mark.parametrize("bad", ["", "ftp://x.example", "https://user:pw@x.example", "https://"])
def test_bad_host_is_a_settings_error(bad: str) -> None:
    with pytest.raises(CMLSettingsError) as info:
        CMLSettings.create(host=bad, api_key=KEY)
    assert "host" in str(info.value)
    assert KEY not in str(info.value)


def test_settings_derived_urls() -> None:
    s = CMLSettings(host="https://ml.example.cloudera.site:8443/api/v2", api_key=KEY)
    assert s.api_url == "https://ml.example.cloudera.site:8443/api/v2"
    assert s.scheme == "https"
    assert s.domain == "ml.example.cloudera.site:8443"


def test_from_env_cml_variables() -> None:
    s = CMLSettings.from_env(
        {
            "CML_HOST": "ml.example.com/",
            "CML_API_KEY": KEY,
            "CML_PROJECT_ID": "p1",
            "CML_CA_BUNDLE": "/ca.pem",
        }
    )
    assert s.host == "https://ml.example.com"
    assert s.api_key.get_secret_value() == KEY
    assert s.project_id == "p1"
    assert s.verify == "/ca.pem"
    assert s.timeout == 30 and s.retry_deadline == 60


def test_from_env_inside_a_workload() -> None:
    env = {"CDSW_DOMAIN": "ml.example.com", "CDSW_APIV2_KEY": KEY, "CDSW_PROJECT_ID": "abc"}
    s = CMLSettings.from_env(env)
    assert (s.host, s.project_id) == ("https://ml.example.com", "abc")
    assert s.api_key.get_secret_value() == KEY


def test_from_env_local_workspace_domain_uses_http() -> None:
    s = CMLSettings.from_env({"CDSW_DOMAIN": "localhost:4321", "CDSW_APIV2_KEY": KEY})
    assert s.host == "http://localhost:4321"


def test_workload_key_is_not_sent_to_another_workspace() -> None:
    env = {"CML_HOST": "https://other.example.com", "CDSW_DOMAIN": "ml.example.com", "CDSW_APIV2_KEY": KEY}
    with pytest.raises(CMLSettingsError, match="CML_API_KEY"):
        CMLSettings.from_env(env)


def test_requests_ca_bundle_is_honoured() -> None:
    s = CMLSettings.from_env({"CML_HOST": "h.example", "CML_API_KEY": KEY, "REQUESTS_CA_BUNDLE": "/b.pem"})
    assert s.verify == "/b.pem"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({}, "CML_HOST"),
        ({"CML_API_KEY": KEY}, "CML_HOST"),
        ({"CML_HOST": "https://h.example"}, "CML_API_KEY"),
        ({"CML_HOST": "https://h.example", "CML_API_KEY": "  "}, "CML_API_KEY"),
    ],
)
def test_missing_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(CMLSettingsError) as info:
        CMLSettings.from_env(env)
    text = str(info.value)
    assert variable in text
    assert "\n" not in text
    assert KEY not in text
    assert isinstance(info.value, ValueError)


def test_key_never_in_repr_or_str() -> None:
    s = CMLSettings(host="https://h.example", api_key=KEY)
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.model_dump())):
        assert KEY not in text
    client = CMLClient(s)
    try:
        assert KEY not in repr(client) and KEY not in str(client)
    finally:
        client.close()


def test_missing_ca_bundle_is_a_settings_error(tmp_path: pytest.TempPathFactory) -> None:
    s = CMLSettings(host="https://h.example", api_key=KEY, verify="/nonexistent/ca.pem")
    with pytest.raises(CMLSettingsError, match="CML_CA_BUNDLE"):
        CMLClient(s)


def test_plain_http_client_loads_no_ca_bundle() -> None:
    """A client of a plain-HTTP workspace (the local one) reads no CA bundle (tens of ms per command);
    a bundle that is set must still exist."""
    ssl_context.cache_clear()
    CMLClient(CMLSettings(host="http://127.0.0.1:9", api_key=KEY)).close()
    assert ssl_context.cache_info().currsize == 0
    with pytest.raises(CMLSettingsError, match="CML_CA_BUNDLE"):
        CMLClient(CMLSettings(host="http://127.0.0.1:9", api_key=KEY, verify="/nonexistent/ca.pem"))
    CMLClient(CMLSettings(host="https://h.example", api_key=KEY)).close()
    assert ssl_context.cache_info().currsize == 1


# -- error mapping -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequest),
        (401, Unauthorized),
        (403, Forbidden),
        (404, NotFound),
        (409, Conflict),
        (429, RateLimited),
        (500, ServerError),
        (502, ServerError),
        (503, ServerError),
        (418, CMLAPIError),
    ],
)
def test_error_class_by_status(status: int, cls: type[CMLAPIError]) -> None:
    err = error_from_response(
        httpx.Response(status, json={"message": "boom"}), method="GET", path="/api/v2/x"
    )
    assert type(err) is cls
    assert isinstance(err, CMLError)
    assert err.status_code == status and err.message == "boom"


def test_error_message_and_request_id() -> None:
    response = httpx.Response(
        400,
        json={"code": 3, "message": "Problem with field Subdomain: invalid pattern", "details": []},
        headers={"x-cdp-request-id": "req-1", "x-request-id": "req-2"},
    )
    err = error_from_response(response, method="POST", path="/api/v2/projects/p/applications")
    assert err.request_id == "req-1"
    assert str(err) == (
        "CML rejected the request as invalid (400) on POST /api/v2/projects/p/applications: "
        "Problem with field Subdomain: invalid pattern [request id req-1]"
    )


def test_error_falls_back_to_error_field_and_x_request_id() -> None:
    response = httpx.Response(404, json={"error": "no such job"}, headers={"x-request-id": "r9"})
    err = error_from_response(response)
    assert (err.message, err.request_id) == ("no such job", "r9")


def test_error_without_json_body_uses_reason() -> None:
    err = error_from_response(httpx.Response(502, text="<html>bad gateway</html>"))
    assert err.message == "Bad Gateway"


def test_unauthorized_is_actionable_and_scrubbed() -> None:
    response = httpx.Response(401, json={"message": f"invalid key {KEY}\nsecond line"})
    err = error_from_response(response, method="GET", path="/api/v2/projects", secret=KEY)
    text = str(err)
    assert text.startswith("CML rejected the API key (401)")
    assert "CML_API_KEY" in text
    assert KEY not in text and "\n" not in text


# -- backoff -------------------------------------------------------------------------------------
def test_full_jitter_backoff_bounds() -> None:
    policy = RetryPolicy(deadline=60, base=0.5, cap=4.0, rng=random.Random(7))
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0), (12, 4.0)]:
        delays = [policy.backoff(attempt) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # full jitter spans the whole range
    assert policy.backoff(3, retry_after=7.0) == 7.0
    assert policy.fits(50, 9.9) and not policy.fits(50, 10.0)


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


def test_action_paths() -> None:
    assert is_action_path("/projects/p/applications/a:stop")
    assert is_action_path("/projects/p/jobs/j/runs/r:stop")
    assert is_action_path("/projects/p/applications/a:restart")
    assert not is_action_path("/projects/p/applications")


# -- retry arithmetic with a scripted transport -----------------------------------------------------
class Clock:
    """A fake clock advanced by the client's sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def scripted(
    handler: Callable[[httpx.Request], httpx.Response], deadline: float = 60
) -> tuple[CMLClient, Clock]:
    clock = Clock()
    settings = CMLSettings(host="https://h.example", api_key=KEY, retry_deadline=deadline)
    client = CMLClient(
        settings,
        transport=httpx.MockTransport(handler),
        retry=RetryPolicy(deadline=deadline, rng=random.Random(1)),
        sleep=clock.sleep,
        clock=clock.time,
    )
    return client, clock


def test_get_retries_503_then_succeeds() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            return httpx.Response(503, json={"message": "unavailable"})
        return httpx.Response(200, json={"id": "p1", "name": "x", "environment": "{}"})

    client, clock = scripted(handler)
    assert client.get_project("p1").id == "p1"
    assert len(calls) == 3 and len(clock.sleeps) == 2
    assert calls[0].headers["authorization"] == f"Bearer {KEY}"


def test_retry_after_is_honoured() -> None:
    responses = [httpx.Response(429, headers={"Retry-After": "2"}), httpx.Response(200, json={})]

    client, clock = scripted(lambda request: responses.pop(0))
    client.delete_application("p", "a")
    assert clock.sleeps == [2.0]


def test_retries_stop_at_the_deadline() -> None:
    client, clock = scripted(lambda request: httpx.Response(503, json={"message": "down"}), deadline=5)
    with pytest.raises(ServerError) as info:
        client.list_projects()
    assert clock.now < 5
    assert "gave up after" in str(info.value)


def test_retry_after_beyond_the_deadline_gives_up_at_once() -> None:
    client, clock = scripted(lambda request: httpx.Response(429, headers={"Retry-After": "120"}), deadline=10)
    with pytest.raises(RateLimited):
        client.get_project("p")
    assert clock.sleeps == []


def test_400_is_not_retried() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(400, json={"message": "no"})

    client, _ = scripted(handler)
    with pytest.raises(CMLAPIError):
        client.get_project("p")
    assert len(calls) == 1


def test_500_on_an_idempotent_request_is_retried() -> None:
    answers = iter(
        [httpx.Response(500, json={"message": "oops"}), httpx.Response(200, json={"id": "p", "name": "n"})]
    )
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return next(answers)

    client, _ = scripted(handler)
    assert client.get_project("p").id == "p"
    assert len(calls) == 2


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_create_answered_5xx_is_outcome_unknown_and_not_retried(status: int) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(status, json={"message": "unavailable"}, headers={"x-request-id": "r1"})

    client, _ = scripted(handler)
    with pytest.raises(CreateOutcomeUnknown) as info:
        client.create_project("x")
    assert len(calls) == 1
    assert info.value.maybe_applied and info.value.status_code == status
    assert info.value.request_id == "r1"
    assert "list before creating" in str(info.value)


def test_create_lost_answer_is_outcome_unknown() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)

    client, _ = scripted(handler)
    with pytest.raises(CreateOutcomeUnknown) as info:
        client.create_application("p", name="a", subdomain="a", script="s.py")
    assert len(calls) == 1
    assert info.value.maybe_applied and isinstance(info.value, CMLConnectionError)


def test_create_retried_when_it_never_left_or_was_rate_limited() -> None:
    state = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        state["n"] += 1
        if state["n"] == 1:
            raise httpx.ConnectError("Connection refused", request=request)
        if state["n"] == 2:
            return httpx.Response(429, json={"message": "slow down"})
        return httpx.Response(200, json={"id": "j", "name": "n", "script": "s.py"})

    client, _ = scripted(handler)
    assert client.create_job("p", name="n", script="s.py").id == "j"
    assert state["n"] == 3


def test_action_verbs_are_retried() -> None:
    state = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        state["n"] += 1
        if state["n"] == 1:
            raise httpx.ReadError("reset", request=request)
        return httpx.Response(200, json={"id": "a", "name": "a", "status": "APPLICATION_STOPPING"})

    client, _ = scripted(handler)
    app = client.stop_application("p", "a")
    assert app is not None and app.status == "APPLICATION_STOPPING"
    assert state["n"] == 2


def test_delete_whose_first_answer_was_lost_is_done() -> None:
    responses = [httpx.Response(503), httpx.Response(404, json={"message": "not found"})]
    client, _ = scripted(lambda request: responses.pop(0))
    client.delete_job("p", "j")  # no error: the first attempt deleted it


def test_connection_error_text_has_no_key(caplog: pytest.LogCaptureFixture) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    client, _ = scripted(handler, deadline=3)
    with (
        caplog.at_level(logging.DEBUG, logger="ray_serve_cai.cml"),
        pytest.raises(CMLConnectionError) as info,
    ):
        client.list_runtimes()
    assert not info.value.maybe_applied
    assert "cannot reach CML at https://h.example" in str(info.value)
    assert KEY not in str(info.value) and KEY not in caplog.text
    assert "GET /api/v2/runtimes" in caplog.text


def test_pagination_resends_filters_and_page_size() -> None:
    seen: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        seen.append(params)
        token = params.get("page_token", "")
        page = int(token or 0)
        items = [{"id": f"a{page}{i}", "name": f"ray-{page}{i}"} for i in range(2)]
        return httpx.Response(
            200, json={"applications": items, "next_page_token": "" if page == 2 else str(page + 1)}
        )

    client, _ = scripted(handler)
    apps = client.list_applications("p", search_filter={"name": "ray"})
    assert len(apps) == 6
    assert all(json.loads(p["search_filter"]) == {"name": "ray"} for p in seen)
    assert all(p["page_size"] == "100" for p in seen)
    assert [p.get("page_token") for p in seen] == [None, "1", "2"]


def test_non_json_success_is_a_clear_error() -> None:
    client, _ = scripted(lambda request: httpx.Response(200, text="<html>login</html>"))
    with pytest.raises(CMLError, match="not JSON"):
        client.list_projects()


def test_exact_name_lookup_ambiguity() -> None:
    body = {"projects": [{"id": "1", "name": "ray"}, {"id": "2", "name": "ray"}], "next_page_token": ""}
    client, _ = scripted(lambda request: httpx.Response(200, json=body))
    with pytest.raises(AmbiguousName):
        client.find_project_by_name("ray")


# -- request building ---------------------------------------------------------------------------
def test_patch_rejects_misspelled_fields() -> None:
    client, _ = scripted(lambda request: httpx.Response(200, json={}))
    with pytest.raises(TypeError, match="'parent_id'"):
        client.update_job("p", "j", parent_job_id="x")
    with pytest.raises(TypeError, match="'nvidia_gpu'"):
        client.update_application("p", "a", nvidia_gpus=1)
    with pytest.raises(TypeError, match="str to str"):
        client.update_project("p", environment={"A": 1})


def test_create_requests_forbid_unknown_fields() -> None:
    with pytest.raises(ValueError):
        CreateApplication(name="a", subdomain="a", script="s.py", gpu=1)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        CreateJob(name="a", script="s.py", num_gpus=1)  # type: ignore[call-arg]
    with pytest.raises(ValueError):  # the spec's deprecated alias of parent_id is not offered
        CreateJob(name="a", script="s.py", parent_job_id="j0")  # type: ignore[call-arg]
    body = CreateJob(name="a", script="s.py", parent_id="j0").body()
    assert body == {
        "name": "a",
        "script": "s.py",
        "cpu": 1.0,
        "memory": 1.0,
        "nvidia_gpu": 0,
        "parent_id": "j0",
    }


def test_create_request_and_keywords_are_exclusive() -> None:
    client, _ = scripted(lambda request: httpx.Response(200, json={}))
    with pytest.raises(TypeError):
        client.create_application("p", CreateApplication(name="a", subdomain="a", script="s"), name="b")


# -- models --------------------------------------------------------------------------------------
def test_models_parse_environment_and_keep_extras() -> None:
    app = Application.model_validate(
        {
            "id": "a1",
            "name": "ray-x-head",
            "subdomain": "ray-x-head",
            "status": "application_running",
            "environment": '{"RAY_CAI_CLUSTER": "x"}',
            "created_at": "2024-01-02T03:04:05.123Z",
            "log_path": "/tmp/app.log",
        }
    )
    assert app.environment == {"RAY_CAI_CLUSTER": "x"}
    assert app.is_running and not app.is_failed
    assert app.model_extra == {"log_path": "/tmp/app.log"}
    assert app.created_at is not None and not isinstance(app.created_at, str)
    assert Project.model_validate({"id": "p", "name": "n", "environment": ""}).environment == {}
    assert Job.model_validate({"id": "j", "name": "n", "parent_id": ""}).parent_id is None


@pytest.mark.parametrize(
    ("status", "terminal", "succeeded"),
    [
        ("ENGINE_SCHEDULING", False, False),
        ("ENGINE_RUNNING", False, False),
        ("engine_succeeded", True, True),
        ("ENGINE_FAILED", True, False),
        ("ENGINE_STOPPED", True, False),
        ("ENGINE_TIMEDOUT", True, False),
    ],
)
def test_job_run_status_helpers(status: str, terminal: bool, succeeded: bool) -> None:
    run = JobRun.model_validate({"id": "r", "status": status})
    assert (run.is_terminal, run.succeeded, run.is_active) == (terminal, succeeded, not terminal)


def test_app_url() -> None:
    client = CMLClient(CMLSettings(host="https://ml.example.com:8443", api_key=KEY))
    try:
        assert client.app_url("ray-x-head") == "https://ray-x-head.ml.example.com:8443"
        app = Application(id="1", name="n", subdomain="sub")
        assert client.app_url(app) == "https://sub.ml.example.com:8443"
    finally:
        client.close()


def test_app_url_is_the_workspaces_url_field_when_it_has_one() -> None:
    """The local workspace gives each application a `url` (its own loopback listener); the client uses
    it for the object and, once it has seen the application, for its name or subdomain too."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/applications"):
            app = {
                "id": "a1",
                "name": "ray-x-head",
                "subdomain": "ray-x-head",
                "url": "http://127.0.0.1:5555/",
            }
            return httpx.Response(200, json={"applications": [app], "next_page_token": ""})
        return httpx.Response(200, json={"ok": True})

    settings = CMLSettings(host="http://localhost:4321", api_key=KEY)
    with CMLClient(settings, transport=httpx.MockTransport(handler)) as client:
        assert client.app_url("ray-x-head") == "http://ray-x-head.localhost:4321"  # not seen yet: CML's rule
        (app,) = client.list_applications("p")
        assert client.app_url(app) == client.app_url("ray-x-head") == "http://127.0.0.1:5555"
        response = client.app_request("ray-x-head", "GET", "/ray-cai/status")
    assert response.json() == {"ok": True}
    request = seen[-1]
    assert (request.url.host, request.url.port, request.url.path) == ("127.0.0.1", 5555, "/ray-cai/status")
    assert request.headers["authorization"] == f"Bearer {KEY}"


def test_loopback_bypasses_environment_proxies_and_others_use_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with CMLClient(CMLSettings(host="http://localhost:4321", api_key=KEY)) as client:
        # httpx's transport selection (private, stable since 0.18) shows where each URL would go.
        pick = client._apps._transport_for_url
        for url in ("http://localhost:4321/", "http://127.0.0.1:4321/"):
            assert isinstance(pick(httpx.URL(url)), LoopbackTransport), url
        proxied = pick(httpx.URL("https://app.ml.example.com/"))
        assert not isinstance(proxied, LoopbackTransport)
        assert proxied is not client._apps._transport  # the environment proxy's transport


def test_errors_survive_pickling() -> None:
    import pickle

    errors: list[CMLError] = [
        error_from_response(httpx.Response(404, json={"message": "gone"}), method="GET", path="/api/v2/p"),
        CMLConnectionError("cannot reach", maybe_applied=False),
        CreateOutcomeUnknown("lost", status_code=502, request_id="r"),
        CMLSettingsError("set CML_HOST"),
    ]
    for err in errors:
        copy = pickle.loads(pickle.dumps(err))
        assert type(copy) is type(err) and str(copy) == str(err)
        assert copy.__dict__ == err.__dict__
