"""Every malformed file in tests/support/bad_configs/ is refused with the problem its first line announces.

Header format: ``# expect: <field fragment> | <message fragment>`` and optionally
``# env: NAME=value ...`` (override variables for that case). Files named ``cluster_*`` are cluster
configs, ``jobs_*`` jobs files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_serve_cai.config import ConfigError, load_cluster_spec, load_deploy_spec

CORPUS = Path(__file__).resolve().parents[1] / "support" / "bad_configs"
CASES = sorted(CORPUS.glob("*.yaml"))


def _header(path: Path) -> tuple[str, str, dict[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# expect: "), f"{path.name}: first line must be '# expect: field | message'"
    field, _, message = lines[0].removeprefix("# expect: ").partition("|")
    env: dict[str, str] = {}
    if len(lines) > 1 and lines[1].startswith("# env: "):
        for pair in lines[1].removeprefix("# env: ").split():
            name, _, value = pair.partition("=")
            env[name] = value
    return field.strip(), message.strip(), env


def test_corpus_is_large_enough() -> None:
    assert len([p for p in CASES if p.name.startswith("cluster_")]) >= 30
    assert len([p for p in CASES if p.name.startswith("jobs_")]) >= 15


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_bad_config_is_refused_with_its_problem(path: Path) -> None:
    field, message, env = _header(path)
    load = load_cluster_spec if path.name.startswith("cluster_") else load_deploy_spec
    with pytest.raises(ConfigError) as caught:
        load(path, env=env)
    error = caught.value
    assert error.source == str(path)
    matching = [p for p in error.problems if field in p.field and message in p.message]
    assert matching, f"expected a problem with field ~ {field!r} and message ~ {message!r}; got:\n{error}"
    # str() is one line per problem, each naming the file.
    assert len(str(error).splitlines()) == len(error.problems)
    assert all(line.startswith(f"{path}: ") for line in str(error).splitlines())
