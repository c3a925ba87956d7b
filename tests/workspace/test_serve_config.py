"""The Serve config before any API call, and the pure decision of when to PUT (no Ray processes).

Malformed Serve configs through the real CLI exit 2 naming the field, with no API call (the
workspace's counters stay at 0), with Serve's own schema (Ray installed here) and with the light
check of a runner without Ray (Ray made unimportable in the CLI process). Serve's own refusal text
(a real pydantic error from Serve's schema) is parsed into the same field paths. `decide` PUTs only
when an application is missing, changed or no longer wanted.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from support.fakes import cli_env, fake_cluster_yaml, run_cli

from ray_serve_cai.cluster.serve import attach, decide, summarize
from ray_serve_cai.config import ConfigError
from ray_serve_cai.config.serve import (
    ServeConfig,
    load_serve_config,
    parse_serve_config,
    serve_rejection_problems,
)
from ray_serve_cai.workspace.testing import WorkspaceHandle

REPO_ROOT = Path(__file__).resolve().parents[2]
GOOD_APP = {"name": "iris", "route_prefix": "/iris", "import_path": "examples.serve.iris:app"}
# Runs the CLI with Ray unimportable, as on a runner that only deploys (core dependencies only).
NO_RAY_CLI = "import sys; sys.modules['ray'] = None; from ray_serve_cai.cli.main import main; main()"


def serve_yaml(apps: list[dict], **top: object) -> str:
    return yaml.safe_dump({**top, "applications": apps}, sort_keys=False)


@dataclass
class Case:
    id: str
    serve_file: str | None  # content of serve.yaml (None: the file is not written)
    expect: list[str]
    serve_key: str = "config: serve.yaml"
    light: bool = True  # also found by the light check (no Ray)


CASES = [
    Case(
        "unknown-deployment-key",
        serve_yaml([{**GOOD_APP, "deployments": [{"name": "IrisClassifier", "num_replica": 2}]}]),
        ["applications[0].deployments[0].num_replica", "did you mean 'num_replicas'"],
        light=False,  # Serve ignores unknown keys; only its schema's field list knows them
    ),
    Case(
        "unknown-top-level-key",
        serve_yaml([GOOD_APP], proxy_locaton="HeadOnly"),
        ["proxy_locaton", "did you mean 'proxy_location'"],
        light=False,
    ),
    Case(
        "num-replicas-zero",
        serve_yaml([{**GOOD_APP, "deployments": [{"name": "IrisClassifier", "num_replicas": 0}]}]),
        ["applications[0].deployments[0].num_replicas", "greater than 0"],
        light=False,
    ),
    Case(
        "duplicate-app-names",
        serve_yaml([GOOD_APP, {**GOOD_APP, "route_prefix": "/other"}]),
        ["applications", "multiple configs"],
        light=False,
    ),
    Case(
        "import-path-outside-project",
        serve_yaml([{**GOOD_APP, "import_path": "somewhere_else.models:app"}]),
        ["applications[0].import_path", "not in the project"],
    ),
    Case(
        "import-path-no-attribute",
        serve_yaml([{**GOOD_APP, "import_path": "examples/serve/iris.py"}]),
        ["applications[0].import_path"],
    ),
    Case("applications-missing", yaml.safe_dump({"proxy_location": "HeadOnly"}), ["applications"]),
    Case("applications-not-a-list", yaml.safe_dump({"applications": {"iris": GOOD_APP}}), ["applications"]),
    Case("app-without-import-path", serve_yaml([{"name": "iris"}]), ["applications[0].import_path"]),
    Case("yaml-syntax", "applications:\n  - name: [iris\n", ["serve.yaml", "line"]),
    Case("not-a-mapping", "- just\n- a list\n", ["serve.yaml", "expected a Serve config mapping"]),
    Case("file-missing", None, ["serve.yaml", "not found"]),
    Case("path-absolute", serve_yaml([GOOD_APP]), ["ray_cluster.serve.config", "relative"], "config: /etc/x"),
    Case(
        "path-escapes",
        serve_yaml([GOOD_APP]),
        ["ray_cluster.serve.config", "inside the project"],
        "config: ../x",
    ),
    Case("serve-key-typo", serve_yaml([GOOD_APP]), ["ray_cluster.serve.conifg"], "conifg: serve.yaml"),
]


def write_project(root: Path, case: Case) -> Path:
    directory = root / case.id
    (directory / "examples" / "serve").mkdir(parents=True)
    (directory / "examples" / "serve" / "iris.py").write_text("app = None\n")
    cluster = fake_cluster_yaml("servebad", 1) + f"  serve: {{{case.serve_key}}}\n"
    (directory / "ray_cluster_config.yaml").write_text(cluster)
    if case.serve_file is not None:
        (directory / "serve.yaml").write_text(case.serve_file)
    subprocess.run(["git", "init", "-q", str(directory)], check=True)
    return directory


def run(args: list[str], cwd: Path, env: dict[str, str], *, light: bool) -> subprocess.CompletedProcess[str]:
    if not light:
        return run_cli(args, cwd=cwd, env=env, timeout=60)
    command = [sys.executable, "-c", NO_RAY_CLI, *args]  # a process of its own: no Ray importable
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_malformed_serve_configs_exit_2_naming_the_field_with_no_api_call(
    workspace: WorkspaceHandle, tmp_path: Path
) -> None:
    workspace.reset_controls()
    env = cli_env(workspace)
    runs = []
    for case in CASES:
        directory = write_project(tmp_path, case)
        runs.append((case, "up", ["up", "-p", "x"], directory, False))
        runs.append((case, "serve status", ["serve", "status", "-p", "x"], directory, False))
        if case.light:
            runs.append((case, "up (no Ray)", ["up", "-p", "x"], directory, True))

    def one(item: tuple) -> str | None:
        case, label, args, directory, light = item
        proc = run(args, directory, env, light=light)
        output = proc.stdout + proc.stderr
        missing = [f for f in case.expect if f.lower() not in output.lower()]
        if proc.returncode != 2 or missing or "Traceback" in output:
            return f"{case.id} [{label}]: exit {proc.returncode}, missing {missing}:\n{output.strip()[:800]}"
        return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        problems = [p for p in pool.map(one, runs) if p]
    calls = workspace.counters()
    print(f"\nmalformed Serve configs: {len(runs)} runs, {len(problems)} wrong, API calls {calls['total']}")
    assert not problems, "\n\n".join(problems)
    assert calls["total"] == 0, f"a bad Serve config reached the API: {calls['counts']}"


def test_serve_deploy_of_a_bad_file_and_deploy_exit_2_before_any_api_call(
    workspace: WorkspaceHandle, tmp_path: Path
) -> None:
    workspace.reset_controls()
    case = next(c for c in CASES if c.id == "unknown-deployment-key")
    directory = write_project(tmp_path, case)
    (directory / "good.yaml").write_text(serve_yaml([GOOD_APP]))
    jobs = "project:\n  name: serve-bad-never-created\njobs:\n  only: {name: Only, script: job.py}\n"
    (directory / "jobs.yaml").write_text(jobs)
    env = cli_env(workspace)
    serve_deploy = run(["serve", "deploy", "serve.yaml", "-p", "x"], directory, env, light=False)
    # The cluster config names a good file but the one given is bad: still exit 2.
    (directory / "ray_cluster_config.yaml").write_text(
        fake_cluster_yaml("servebad", 1) + "  serve: {config: good.yaml}\n"
    )
    given_bad = run(["serve", "deploy", "serve.yaml", "-p", "x"], directory, env, light=False)
    (directory / "ray_cluster_config.yaml").write_text(
        fake_cluster_yaml("servebad", 1) + "  serve: {config: serve.yaml}\n"
    )
    deploy = run(["deploy", "--jobs", "jobs.yaml"], directory, env, light=False)
    for name, proc in (("serve deploy", serve_deploy), ("serve deploy FILE", given_bad), ("deploy", deploy)):
        output = proc.stdout + proc.stderr
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{output}"
        assert "applications[0].deployments[0].num_replica" in output, f"{name}:\n{output}"
    assert workspace.counters()["total"] == 0


def test_the_example_config_is_valid_and_overrides_are_named(tmp_path: Path) -> None:
    config = load_serve_config("examples/serve/serve_config.yaml", REPO_ROOT)
    assert config.application_names == ["iris"]
    assert config.overridden_settings() == []
    user = parse_serve_config(
        {
            "proxy_location": "EveryNode",
            "http_options": {"host": "0.0.0.0", "port": 8000, "root_path": "/api", "request_timeout_s": 30},
            "applications": [GOOD_APP],
        },
        project_dir=REPO_ROOT,
        source="user.yaml",
    )
    body = user.request_body(43210)
    assert body["proxy_location"] == "HeadOnly"
    assert body["http_options"] == {
        "host": "127.0.0.1",
        "port": 43210,
        "root_path": "/serve",
        "request_timeout_s": 30,
    }
    overridden = user.overridden_settings()
    assert [line.split()[0] for line in overridden] == [
        "proxy_location",
        "http_options.host",
        "http_options.port",
        "http_options.root_path",
    ]
    assert user.document["proxy_location"] == "EveryNode", "the user's document is never modified"


def test_a_runtime_env_with_code_is_not_looked_up_in_the_project() -> None:
    app = {
        **GOOD_APP,
        "import_path": "elsewhere.app:app",
        "runtime_env": {"working_dir": "s3://bucket/code.zip"},
    }
    parse_serve_config({"applications": [app]}, project_dir=REPO_ROOT, source="s.yaml")
    with pytest.raises(ConfigError, match=r"applications\[0\]\.import_path"):
        parse_serve_config(
            {"applications": [{**app, "runtime_env": {}}]}, project_dir=REPO_ROOT, source="s.yaml"
        )


def test_serves_own_refusal_is_reported_with_field_paths() -> None:
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    bad = {"applications": [{**GOOD_APP, "deployments": [{"name": "D", "max_ongoing_requests": "many"}]}]}
    with pytest.raises(ValidationError) as caught:
        ServeDeploySchema.model_validate(bad)
    problems = serve_rejection_problems(repr(caught.value))  # what the dashboard's PUT answers with 400
    assert [p.field for p in problems] == ["applications[0].deployments[0].max_ongoing_requests"]
    assert "integer" in problems[0].message
    controller = serve_rejection_problems("Application 'x' was deployed imperatively")
    assert controller[0].message == "Application 'x' was deployed imperatively"


def details_for(apps: dict[str, dict], **top: object) -> dict:
    """Serve's GET answer shape: applications with the config each was submitted with."""
    return {
        "applications": {
            name: {
                "name": name,
                "status": app.get("status", "RUNNING"),
                "message": app.get("message", ""),
                "route_prefix": app["config"].get("route_prefix", "/"),
                "source": app.get("source", "declarative"),
                "deployed_app_config": app["config"],
                "deployments": {},
            }
            for name, app in apps.items()
        },
        **top,
    }


def test_decide_puts_only_when_serve_does_not_run_the_file() -> None:
    desired = ServeConfig(
        document={"applications": [{**GOOD_APP, "deployments": [{"name": "D", "num_replicas": 2}]}]},
        source="s.yaml",
    )
    same = desired.document["applications"][0]
    reordered = dict(reversed(list(same.items())))
    assert not decide(desired, details_for({"iris": {"config": reordered}})).put
    assert decide(desired, {"applications": {}}).reason.startswith("Serve has no applications")
    scaled = {**same, "deployments": [{"name": "D", "num_replicas": 3}]}
    assert decide(desired, details_for({"iris": {"config": scaled}})).reason == "config changed: iris"
    extra = details_for({"iris": {"config": same}, "old": {"config": {**GOOD_APP, "name": "old"}}})
    assert decide(desired, extra).reason == "no longer in the file: old"
    imperative = details_for(
        {"iris": {"config": same}, "nb": {"config": {"import_path": "a.b"}, "source": "imperative"}}
    )
    assert not decide(desired, imperative).put, "applications deployed by hand (serve.run) are left alone"
    assert decide(desired, details_for({"iris": {"config": same}}, target_capacity=50)).put


def test_status_rule_failed_app_shows_serves_message_and_the_cluster_is_not_ready() -> None:
    from ray_serve_cai.cluster import ClusterStatus

    desired = ServeConfig(
        document={"applications": [GOOD_APP, {**GOOD_APP, "name": "b", "route_prefix": "/b"}]}, source="s"
    )
    message = "ModuleNotFoundError: No module named 'nope'"
    details = details_for(
        {
            "iris": {"config": GOOD_APP},
            "b": {
                "config": desired.document["applications"][1],
                "status": "DEPLOY_FAILED",
                "message": message,
            },
        }
    )
    view = summarize(details, desired, "http://head/serve/")
    ready = ClusterStatus(cluster="c", project_id="p", state="ready", nodes=[])
    failed = attach(ready, view)
    assert failed.state == "failed" and not failed.ready
    assert any(message in p for p in failed.problems)
    assert failed.as_dict()["serve"]["applications"]["b"]["message"] == message
    missing = summarize(details_for({"iris": {"config": GOOD_APP}}), desired, "u")
    assert missing.applications["b"]["status"] == "NOT_DEPLOYED"
    assert attach(ready, missing).state == "pending"
    running = summarize(
        details_for({"iris": {"config": GOOD_APP}}), ServeConfig({"applications": [GOOD_APP]}, "s"), "u"
    )
    assert attach(ready, running).state == "ready"


def test_cluster_file_serve_section_is_optional_and_not_part_of_any_node_hash() -> None:
    from ray_serve_cai.config import desired_nodes, parse_cluster_spec

    base = yaml.safe_load(fake_cluster_yaml("hash", 1))
    plain = parse_cluster_spec(base, env={})
    with_serve = parse_cluster_spec(
        {"ray_cluster": {**base["ray_cluster"], "serve": {"config": "s.yaml"}}}, env={}
    )
    assert plain.serve is None and with_serve.serve is not None
    assert [n.spec_hash for n in desired_nodes(plain)] == [n.spec_hash for n in desired_nodes(with_serve)]


def test_the_code_digest_follows_the_apps_code_and_only_it(tmp_path: Path) -> None:
    """The application's package files are its code: a change there is a changed config for Serve
    (its code version hashes runtime_env: a rolling update), a change elsewhere is nothing (no PUT)."""
    from ray_serve_cai.config.serve import CODE_DIGEST_VAR, code_files

    (tmp_path / "shop" / "models" / "__pycache__").mkdir(parents=True)
    (tmp_path / "shop" / "__init__.py").write_text("")
    (tmp_path / "shop" / "models" / "__init__.py").write_text("")
    (tmp_path / "shop" / "models" / "api.py").write_text("app = 1\n")
    (tmp_path / "shop" / "models" / "weights.json").write_text("[1, 2]\n")
    (tmp_path / "shop" / "models" / "__pycache__" / "api.cpython-311.pyc").write_bytes(b"x")
    (tmp_path / "shop" / "other.py").write_text("x = 1\n")
    (tmp_path / "top.py").write_text("app = 1\n")
    app = {"name": "shop", "import_path": "shop.models.api:app", "runtime_env": {"env_vars": {"A": "1"}}}
    top = {"name": "top", "route_prefix": "/top", "import_path": "top:app"}
    remote = {"name": "far", "route_prefix": "/far", "import_path": "x.y:app",
              "runtime_env": {"working_dir": "s3://b/c.zip"}}  # fmt: skip

    def load() -> ServeConfig:
        return parse_serve_config({"applications": [app, top, remote]}, project_dir=tmp_path, source="s.yaml")

    assert [p.relative_to(tmp_path).as_posix() for p in code_files(app, tmp_path)] == [
        "shop/models/__init__.py",
        "shop/models/api.py",
        "shop/models/weights.json",
    ]
    assert [p.name for p in code_files(top, tmp_path)] == ["top.py"]
    first = load()
    assert set(first.code_digests) == {"shop", "top"}, "a working_dir versions its own code"
    body = first.request_body(8000)
    env_vars = body["applications"][0]["runtime_env"]["env_vars"]
    assert env_vars == {"A": "1", CODE_DIGEST_VAR: first.code_digests["shop"]}, "the user's env_vars are kept"
    assert "runtime_env" not in first.document["applications"][1], "the user's document is never modified"
    running = details_for({a["name"]: {"config": a} for a in body["applications"]})

    (tmp_path / "shop" / "other.py").write_text("x = 2\n")
    (tmp_path / "shop" / "models" / "__pycache__" / "api.cpython-311.pyc").write_bytes(b"y")
    assert not decide(load(), running).put, "a change outside the app's package rolled nothing out"

    (tmp_path / "shop" / "models" / "weights.json").write_text("[1, 3]\n")
    changed = load()
    assert changed.code_digests["shop"] != first.code_digests["shop"]
    assert changed.code_digests["top"] == first.code_digests["top"]
    assert decide(changed, running).reason == "config changed: shop"
    assert summarize(running, changed, "u").outdated == ["shop"]


def test_replicas_stay_off_the_head_unless_a_deployment_chooses_its_nodes() -> None:
    from dataclasses import replace

    from ray_serve_cai.config.serve import OFF_HEAD_SELECTOR

    chosen = {"ray-cai.group": "gpu"}
    app = {
        **GOOD_APP,
        "deployments": [
            {"name": "A", "num_replicas": 2},
            {"name": "B", "ray_actor_options": {"num_cpus": 0.5, "label_selector": chosen}},
        ],
    }
    config = parse_serve_config({"applications": [app]}, project_dir=REPO_ROOT, source="s.yaml")
    assert "ray_actor_options" not in config.applications()[0]["deployments"][0], "no workers: no selector"
    body = replace(config, off_head=True).request_body(8000, "EveryNode")
    deployments = body["applications"][0]["deployments"]
    assert deployments[0]["ray_actor_options"] == {"label_selector": OFF_HEAD_SELECTOR}
    assert deployments[1]["ray_actor_options"] == {"num_cpus": 0.5, "label_selector": chosen}
    assert config.document["applications"][0]["deployments"][0] == {"name": "A", "num_replicas": 2}
