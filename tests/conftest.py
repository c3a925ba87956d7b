"""The suite's tiers, and a real local CML workspace daemon for the whole test session.

Tiers (folders; each test is also marked with its tier, so `-m "not ray"` works):

* `tests/unit/` — pure code: no processes, no sockets (its conftest fails a test that tries); seconds.
* `tests/workspace/` — the local workspace and fake Ray nodes: real HTTP, real processes, no Ray.
* `tests/ray/` — real Ray clusters; its conftest holds the shared cluster (`ray_cluster`).

Run one tier with `pytest tests/unit` (or `tests/workspace`, `tests/ray`); `pytest` runs all three in that
order and closes with a line per tier: what passed and how long the tier took.

Fixtures:

* `workspace` (session): a `WorkspaceHandle` with `.url`, `.api_key`, `.home`, `.api(method, path, **kw)`,
  `.counters()`, `.reset_counters()`, `.set_faults(**kw)`, `.clear_faults()`, `.set_latency(**kw)` and
  waiting helpers. Tests stop every workload they start and reset the controls they change.
* `workspace_env` (function): `CML_HOST` / `CML_API_KEY` pointing at that workspace.
* `pods_workspace` (session): a workspace with pods — the session one (pods by default where they can
  be made: root on Linux, as in CI), else one of its own; skipped where pods cannot be made.
* `pods_ray_cluster` (session, `support.pods_cluster`): the 1 + 2 real Ray cluster in pods that the
  head-FT and pods modules of the real-Ray tier share.

The session workspace runs every workload in a pod where it can (`RAY_CAI_TEST_PODS=0`: shared-host).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ray_serve_cai.workspace.daemon import start_workspace, stop_workspace
from ray_serve_cai.workspace.testing import WorkspaceHandle

# Every Python process of the session (the CLI, the workspace, the nodes' launchers: hundreds of
# processes) reads compiled bytecode instead of compiling each module again, even where the
# environment says PYTHONDONTWRITEBYTECODE (CI's does): the .pyc files go to a cache of their own
# under the temp directory, not next to the sources. The processes inherit both from here.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.pycache_prefix = os.environ.setdefault(
    "PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / f"ray-cai-pycache-{os.getuid()}")
)
sys.dont_write_bytecode = False

# A shell without job control starts a background command (`pytest ... &`, `nohup`) with SIGINT
# ignored, and every process inherits that: the tests that stop a `ray-cai ... --follow` with Ctrl-C
# (SIGINT) would find it ignored. A handler of our own is reset to the default in each child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

TESTS_DIR = Path(__file__).parent
TEST_APPS_DIR = TESTS_DIR / "support" / "apps"
TIERS = ("unit", "workspace", "ray")


def tier_of(path: Path) -> str | None:
    """The tier of a test file: the folder under tests/ it lives in."""
    try:
        tier = path.resolve().relative_to(TESTS_DIR).parts[0]
    except (ValueError, IndexError):
        return None
    return tier if tier in TIERS else None


# The workspace modules that take longest, handed out first so that none of them is left for the end.
SLOW_WORKSPACE_MODULES = (
    "test_workspace_crash.py",
    "test_bad_input.py",
    "test_serve_config.py",
    "test_crash_resume.py",
    "test_pods.py",
    "test_workspace_cli.py",
    "test_run_history.py",
    "test_watch.py",
)


def xdist_group_of(item: pytest.Item, tier: str) -> str:
    """The unit tier is one group, each workspace module one, the real-Ray tier `ray` — or the group a
    real-Ray module names itself (`pytestmark = pytest.mark.xdist_group("ray-2")`, or `ray-3`)."""
    marker = item.get_closest_marker("xdist_group")
    if marker is not None:
        return str(marker.args[0] if marker.args else marker.kwargs.get("name", "default"))
    return str(item.path.relative_to(TESTS_DIR)) if tier == "workspace" else tier


def _schedule_rank(item: pytest.Item, tier: str, group: str) -> tuple[int, int, str]:
    if tier == "unit":
        return (0, 0, "")
    if tier == "ray":
        return (1, 0 if group == "ray" else 1, group)
    name = item.path.name
    known = SLOW_WORKSPACE_MODULES
    slow = known.index(name) if name in known else len(known)
    return (2, slow, group)


def pytest_configure(config: pytest.Config) -> None:
    # xdist hands out the groups in the order of the collection (set below), not by their test count.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its tier, and group the tests for `pytest -n 3 --dist loadgroup`
    (pytest-xdist): a group runs whole in one worker, in order. Without xdist the tiers run in the
    order of `testpaths` (cheapest first). With it, the unit tier is one group and goes first; the
    real-Ray tier is three groups (`ray`, which holds every test of the shared `ray_cluster`, and
    `ray-2`, `ray-3`, modules that bring up clusters of their own), handed out next, one to each
    worker (xdist gives every worker one group, then a second to each: the worker of the short unit
    tier gets `ray-3`; each worker has its own session workspace); then each workspace module is a
    group (its module fixtures set up once), the slowest first, to whichever worker is free."""
    ranks: dict[int, tuple[int, int, str]] = {}
    for item in items:
        tier = tier_of(item.path)
        if tier is None:
            continue
        item.add_marker(getattr(pytest.mark, tier))
        group = xdist_group_of(item, tier)
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group))
        ranks[id(item)] = _schedule_rank(item, tier, group)
    if hasattr(config, "workerinput"):  # an xdist worker: its collection order is the hand-out order
        # A stable sort: within a group (and a module) the collection order stays.
        items.sort(key=lambda item: ranks.get(id(item), (3, 0, "")))


@dataclass
class _Tier:
    outcomes: Counter[str] = field(default_factory=Counter)
    started: float | None = None
    ended: float = 0.0


_tiers: dict[str, _Tier] = {}
_ray_groups: dict[str, _Tier] = {}  # under xdist: the real-Ray tier's groups, to balance them


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # From the node id (relative to the root), not the file path: a test may have changed directory.
    tier = tier_of(TESTS_DIR.parent / report.nodeid.split("::", 1)[0])
    if tier is None:
        return
    _record(_tiers.setdefault(tier, _Tier()), report)
    if tier == "ray" and "@" in report.nodeid:  # xdist's loadgroup names the group after an @
        _record(_ray_groups.setdefault(report.nodeid.rsplit("@", 1)[1], _Tier()), report)


def _record(record: _Tier, report: pytest.TestReport) -> None:
    now = time.monotonic()
    if report.when == "setup" and record.started is None:
        record.started = now - report.duration
    record.ended = max(record.ended, now)
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = "error" if report.when == "setup" and report.failed else report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        record.outcomes[outcome] += 1
    elif report.when == "teardown" and report.failed:
        record.outcomes["error"] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per tier: its counts and its wall-clock time (first setup to last teardown); under
    xdist, one more per real-Ray group."""
    if not _tiers:
        return
    terminalreporter.section("tiers", bold=True)
    for tier in TIERS:
        if tier in _tiers:
            terminalreporter.write_line(f"{_summary(tier, _tiers[tier])}   (pytest tests/{tier})")
            if tier == "ray" and len(_ray_groups) > 1:
                for group in sorted(_ray_groups):
                    terminalreporter.write_line(
                        f"  {_summary(group, _ray_groups[group], width=8)}   (xdist group)"
                    )


def _summary(name: str, record: _Tier, width: int = 10) -> str:
    order = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
    counts = ", ".join(f"{record.outcomes[o]} {o}" for o in order if record.outcomes[o])
    seconds = record.ended - (record.started if record.started is not None else record.ended)
    return f"{name:<{width}} {counts or 'nothing run':<40} {seconds:7.1f} s"


# Every workspace the suite starts checks its answers against CML's spec; a deviation fails the test.
# support.pods_cluster: the real-Ray tier's 1 + 2 pods cluster (`pods_ray_cluster`).
pytest_plugins = ["support.conformance", "support.pods_cluster"]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkspaceHandle]:
    # CML's automatic restart of failed apps is off here, so an app a test leaves failed is not
    # started again minutes later under another test; a test of it turns it on with
    # `workspace.set_restart_policy(enabled=True, delay_seconds=...)` (`controls` resets it).
    # The default of `ray-cai workspace start`: pods where they can be made (root on Linux: CI and
    # this machine), so the whole suite runs in pods; RAY_CAI_TEST_PODS=0 forces shared-host for a
    # local run, =1 requires pods. The pods tests make pods of their own when this one has none
    # (`pods_workspace`).
    wanted = os.environ.get("RAY_CAI_TEST_PODS", "").strip()
    with _own_workspace(
        tmp_path_factory, "workspace-home", pods={"0": False, "1": True}.get(wanted)
    ) as handle:
        yield handle


@contextlib.contextmanager
def _own_workspace(
    tmp_path_factory: pytest.TempPathFactory, name: str, *, pods: bool | None
) -> Iterator[WorkspaceHandle]:
    """A workspace in a fresh home (CML's automatic restart of failed apps off), stopped afterwards."""
    home = tmp_path_factory.mktemp(name)
    handle = WorkspaceHandle(start_workspace(home, app_restart=False, pods=pods))
    try:
        yield handle
    finally:
        handle.close()
        stop_workspace(home)


@pytest.fixture(scope="session")
def pods_workspace(
    workspace: WorkspaceHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkspaceHandle]:
    """A workspace whose workloads run in pods: the session one when it has them, else one of its own
    (skipped where pods cannot be made: not root, not Linux)."""
    if workspace.pods:
        yield workspace
        return
    from ray_serve_cai.workspace.pods import pods_possible

    possible, why = pods_possible()
    if not possible:
        pytest.skip(f"pods cannot be made here: {why}")
    with _own_workspace(tmp_path_factory, "pods-workspace-home", pods=True) as handle:
        yield handle


@pytest.fixture
def workspace_env(workspace: WorkspaceHandle, monkeypatch: pytest.MonkeyPatch) -> WorkspaceHandle:
    monkeypatch.setenv("CML_HOST", workspace.url)
    monkeypatch.setenv("CML_API_KEY", workspace.api_key)
    return workspace


@pytest.fixture
def controls(workspace: WorkspaceHandle) -> Iterator[WorkspaceHandle]:
    """The shared workspace with its test controls (faults, latency) reset before and after."""
    workspace.reset_controls()
    try:
        yield workspace
    finally:
        workspace.reset_controls()


@pytest.fixture(scope="module")
def project_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files to copy into a project: the fake Ray node app, the lock script, trivial job scripts."""
    from support.fakes import write_fake_project_files

    return write_fake_project_files(tmp_path_factory.mktemp("fake-files"))


@pytest.fixture(scope="session")
def test_apps_dir() -> Path:
    return TEST_APPS_DIR
