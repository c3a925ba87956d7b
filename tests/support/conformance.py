"""pytest plugin: every workspace the suite starts checks its answers (and our client's requests)
against CML's own spec, and a test fails on the first deviation recorded while it ran.

The spec is read at test time from `shared/reference/cml-api-v2.swagger.json` in the nearest ancestor
of the repository that has one (CI has `shared/` beside the checkout), or from `RAY_CAI_CML_SPEC`;
it is never copied into the repository. Workspaces started by the suite inherit
`RAY_CAI_WORKSPACE_SPEC` and `RAY_CAI_WORKSPACE_CONFORMANCE_LOG` (ray_serve_cai/workspace/conformance.py)
and append violations to that one file; after each phase of each test the new lines are read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from ray_serve_cai.workspace.conformance import LOG_ENV, SPEC_ENV

SPEC_RELATIVE = Path("shared/reference/cml-api-v2.swagger.json")
REPO_ROOT = Path(__file__).resolve().parents[2]


def find_spec() -> Path:
    """CML's API spec: `RAY_CAI_CML_SPEC`, else `shared/reference/…` beside the repo or an ancestor."""
    given = os.environ.get("RAY_CAI_CML_SPEC")
    if given:
        return Path(given)
    for ancestor in REPO_ROOT.parents:
        candidate = ancestor / SPEC_RELATIVE
        if candidate.is_file():
            return candidate
    raise pytest.UsageError(
        f"CML's API spec ({SPEC_RELATIVE}) is not beside the checkout {REPO_ROOT}; put shared/ next "
        "to it or set RAY_CAI_CML_SPEC=/path/to/cml-api-v2.swagger.json"
    )


class ConformanceWatch:
    """Reads the violations appended since the last look."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.offset = 0

    def new_violations(self) -> list[dict[str, object]]:
        if not self.log.exists():
            return []
        with self.log.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


_watch: ConformanceWatch | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _watch
    spec = find_spec()
    log = Path(tempfile.mkdtemp(prefix="ray-cai-conformance-")) / "violations.jsonl"
    os.environ[SPEC_ENV] = str(spec)
    os.environ[LOG_ENV] = str(log)
    _watch = ConformanceWatch(log)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The violations log goes with the session (its folder is this process's own)."""
    if _watch is not None:
        shutil.rmtree(_watch.log.parent, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if _watch is None:
        return
    violations = _watch.new_violations()
    if not violations or report.failed:
        return
    first = violations[0]
    problems = first["problems"]
    assert isinstance(problems, list)
    report.outcome = "failed"
    report.longrepr = (
        f"CML spec violation during {report.when} ({len(violations)} in all): "
        f"{first['operation']} {first['method']} {first['path']}: {problems[0]}"
        + "".join(f"\n  also: {problem}" for problem in problems[1:5])
    )
